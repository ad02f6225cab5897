"""Each user's seen list: the most recent distinct items they clicked, bounded.

Serving leaves seen items out of a user's answer and training masks them out
of the user's softmax. A Python ``set`` per user costs about 100 bytes per
entry and never shrinks; here every list lives in one ``int32`` arena in size
classes (see :mod:`.kernels`), 4 to 8 bytes per entry plus 13 per user,
and keeps at most ``limit`` items: a click on a seen item makes it the newest,
a click on a new item past the limit drops the oldest. ``limit = 0`` keeps
every item (the behaviour of a set).
"""

from __future__ import annotations

import numpy as np

from . import kernels as K

_UNBOUNDED_CLASSES = 40  # blocks up to 2**40 items: no list ever needs more


def size_classes(limit: int) -> np.ndarray:
    """Block sizes (int64, increasing): 2, 4, 8, ... and ``limit`` itself as the last one."""
    sizes = []
    s = 2
    while (limit <= 0 and len(sizes) < _UNBOUNDED_CLASSES) or (limit > 0 and s < limit):
        sizes.append(s)
        s *= 2
    if limit > 0:
        sizes.append(max(limit, 2))
    return np.asarray(sizes, dtype=np.int64)


class SeenLists:
    """Seen lists of user rows ``0 .. capacity - 1``, oldest item first.

    ``off`` (cap,) int64 start of a user's block in ``arena``, ``length`` (cap,)
    int32 items in use, ``cls`` (cap,) int8 its size class (-1: none);
    ``meta[0]`` arena slots handed out so far.
    """

    def __init__(self, limit: int, capacity: int = 16) -> None:
        self.limit = limit
        self.sizes = size_classes(limit)
        self.off = np.zeros(capacity, dtype=np.int64)
        self.length = np.zeros(capacity, dtype=np.int32)
        self.cls = np.full(capacity, -1, dtype=np.int8)
        self.arena = np.zeros(1024, dtype=np.int32)
        self.free_head = np.full(len(self.sizes), -1, dtype=np.int64)
        self.meta = np.zeros(2, dtype=np.int64)

    def grow(self, capacity: int) -> None:
        """Room for user rows up to ``capacity`` (never shrinks)."""
        old = len(self.off)
        if capacity <= old:
            return
        for name, fill in (("off", 0), ("length", 0), ("cls", -1)):
            a = getattr(self, name)
            b = np.full(capacity, fill, dtype=a.dtype)
            b[:old] = a
            setattr(self, name, b)

    def reserve_arena(self) -> None:
        """Grow the arena to what the last failed allocation needed (at least doubling)."""
        need = int(self.meta[K.NEED])
        if need <= len(self.arena):
            return
        arena = np.zeros(max(need, 2 * len(self.arena)), dtype=np.int32)
        arena[: len(self.arena)] = self.arena
        self.arena = arena

    # ------------------------------------------------------------------ reads
    def __len__(self) -> int:
        return len(self.off)

    def rows(self, u: int) -> np.ndarray:
        """Item rows (int64) user ``u`` has seen, oldest first (a copy)."""
        n = int(self.length[u])
        o = int(self.off[u])
        return self.arena[o:o + n].astype(np.int64)

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """CSR ``(indptr (R + 1,), items)`` int64 of ``rows``' lists, each oldest first."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        return K.seen_gather(rows, self.off, self.length, self.arena)

    def entries(self) -> int:
        """Items held over all lists."""
        return int(self.length.sum())

    def nbytes(self) -> int:
        """Bytes of the arrays (the arena at its allocated size)."""
        return sum(a.nbytes for a in (self.off, self.length, self.cls, self.arena))

    # ------------------------------------------------------------------ writes
    def add(self, u: int, i: int) -> None:
        """Item ``i`` becomes user ``u``'s newest seen item (what the fast path does)."""
        while not K.seen_add(u, i, self.off, self.length, self.cls, self.arena, self.sizes,
                             self.free_head, self.meta, self.limit):
            self.reserve_arena()

    def clear(self, rows: np.ndarray) -> None:
        """Empty the lists of ``rows`` (expired users)."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        K.seen_clear(rows, self.off, self.length, self.cls, self.arena, self.free_head)

    def remove_items(self, n_users: int, gone: np.ndarray, touched: np.ndarray) -> None:
        """Drop items with ``gone[item]`` (bool mask) from users ``0 .. n_users - 1``' lists.

        Users that lost an item are set in ``touched`` (bool, at least ``n_users``).
        """
        K.seen_remove(n_users, gone, self.off, self.length, self.arena, touched)

    def load(self, indptr: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Replace everything by the CSR ``(indptr, items)`` (each list oldest first).

        Lists longer than ``limit`` keep their newest ``limit`` items; returns
        the user rows whose list was cut (a restore under a smaller limit).
        """
        n = len(indptr) - 1
        self.grow(n)
        lens = np.diff(indptr)
        if self.limit > 0:
            lens = np.minimum(lens, self.limit)
        cls = np.searchsorted(self.sizes, lens)
        blocks = int(np.where(lens > 0, self.sizes[np.minimum(cls, len(self.sizes) - 1)], 0).sum())
        self.arena = np.zeros(1024 + blocks + blocks // 4, dtype=np.int32)  # room to grow
        self.free_head[:] = -1
        self.meta[:] = 0
        self.off[:] = 0
        self.length[:] = 0
        self.cls[:] = -1
        cut = K.seen_load(np.ascontiguousarray(indptr, dtype=np.int64),
                          np.ascontiguousarray(items, dtype=np.int64), self.limit,
                          self.sizes, self.off, self.length, self.cls, self.arena, self.meta)
        return np.flatnonzero(cut).astype(np.int64)
