"""External ids to table rows: growth, reuse of freed rows, admission, shared rows.

New ids appear at any time; each gets its own row (no hashing into a fixed
table, so no collisions). Rows freed by expiry are reused. With admission on,
an id gets a row only at its ``admit_after``-th event; until then it is
counted in :attr:`IdTable.pending`, a bounded table keyed by a 64-bit hash of
the id that forgets the least recently counted id beyond ``pending_max``
entries.

Shared rows for the long tail (``shared_rows = K``, with admission on): rows
``0 .. K - 1`` of the user and the item tables are reserved (their id is
``""``: never live, never served, never expired). An event whose id waits for
admission is learned on the row ``hash(id) mod K`` of its side instead of
being dropped, and a user without a row of their own is answered from their
shared row's vector instead of the popularity fallback. A shared row stands
for many ids, so it enters no per-user state: a shared user row keeps no
history and no seen list, and a shared item row is learned as the event's
target but enters neither the user's history nor their seen list. An admitted
id's own row starts afresh, as without sharing. Both choices were measured on
ML-100K (``docs/MODEL.md``, "Shared rows").
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


def id_hash(key: str) -> int:
    """A stable 64-bit hash of an id (the same in every process, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def shared_row(key: str, shared: int) -> int:
    """The shared row (``0 .. shared - 1``) that ``key`` uses while it waits for admission."""
    return id_hash(key) % shared


class IdTable:
    """External id <-> row, with reuse of freed rows and bounded admission counting.

    ``ids[row]`` is the id held by ``row`` (``""`` for a freed or a shared
    row); ``index`` maps ids to rows; ``free`` lists freed rows, reused
    last-freed first. Rows ``0 .. shared - 1`` are reserved (never live, never
    freed). ``pending`` maps the hash of each id waiting for admission to its
    count, least recently counted first.
    """

    def __init__(self, admit_after: int, pending_max: int = 0, shared: int = 0) -> None:
        self.index: dict[str, int] = {}
        self.ids: list[str] = [""] * shared
        self.free: list[int] = []
        self.pending: OrderedDict[int, int] = OrderedDict()
        self.admit_after = admit_after
        self.pending_max = pending_max
        self.shared = shared
        self._live = np.zeros(max(16, shared), dtype=bool)
        self.n_live = 0

    def __len__(self) -> int:
        """Rows in use, freed and shared ones included (the tables' logical length)."""
        return len(self.ids)

    def get(self, key: str) -> int | None:
        """The row of a known id, else ``None`` (no admission counting)."""
        return self.index.get(key)

    def lookup(self, key: str) -> tuple[int, bool]:
        """(row, is_new) for ``key``; while it waits for admission, its shared row or -1."""
        row = self.index.get(key)
        if row is not None:
            return row, False
        if self.admit_after > 1:
            h = id_hash(key)
            c = self.pending.pop(h, 0) + 1
            if c < self.admit_after:
                self.pending[h] = c
                if self.pending_max > 0 and len(self.pending) > self.pending_max:
                    self.pending.popitem(last=False)
                return (h % self.shared if self.shared else -1), False
        return self._allocate(key), True

    def admit(self, key: str) -> tuple[int, bool]:
        """(row, is_new) for ``key``, admitted at once whatever its count (an item the
        catalogue announces: it needs a row before anyone clicks it)."""
        row = self.index.get(key)
        if row is not None:
            return row, False
        if self.pending:
            self.pending.pop(id_hash(key), None)
        return self._allocate(key), True

    def _allocate(self, key: str) -> int:
        if self.free:
            row = self.free.pop()
            self.ids[row] = key
        else:
            row = len(self.ids)
            self.ids.append(key)
            if row >= len(self._live):
                live = np.zeros(2 * len(self._live), dtype=bool)
                live[: len(self._live)] = self._live
                self._live = live
        self.index[key] = row
        self._live[row] = True
        self.n_live += 1
        return row

    def release(self, row: int) -> None:
        """Free ``row``: its id is forgotten and the row reused by a later new id."""
        del self.index[self.ids[row]]
        self.ids[row] = ""
        self.free.append(row)
        self._live[row] = False
        self.n_live -= 1

    def live(self) -> np.ndarray:
        """Bool mask (rows,) of rows that hold an id (a view: do not modify)."""
        return self._live[: len(self.ids)]

    def pending_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(hash keys uint64, counts int64) of the ids waiting for admission, oldest first."""
        return (np.fromiter(self.pending.keys(), dtype=np.uint64, count=len(self.pending)),
                np.fromiter(self.pending.values(), dtype=np.int64, count=len(self.pending)))

    def restore(self, ids: list[str], free: list[int], pending_keys: np.ndarray,
                pending_counts: np.ndarray) -> None:
        """Load the rows, free list and admission counts recorded in a state.

        Beyond ``pending_max`` the least recently counted ids are dropped, and
        all of them when admission is now off.
        """
        self.ids = list(ids)
        self.index = {x: r for r, x in enumerate(ids) if x}
        self.free = list(free)
        keep = len(pending_keys) if self.pending_max <= 0 else self.pending_max
        keep = keep if self.admit_after > 1 else 0
        start = max(0, len(pending_keys) - keep)
        self.pending = OrderedDict(zip(pending_keys[start:].tolist(),
                                       pending_counts[start:].tolist()))
        self._live = np.zeros(max(16, len(ids)), dtype=bool)
        self._live[: len(ids)] = [bool(x) for x in ids]
        self.n_live = len(self.index)
