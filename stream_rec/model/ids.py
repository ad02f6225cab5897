"""External ids to table rows: growth, reuse of freed rows, admission.

New ids appear at any time; each gets its own row (no hashing into a fixed
table, so no collisions). Rows freed by expiry are reused. With admission on,
an id gets a row only at its ``admit_after``-th event; until then it is
counted in :attr:`IdTable.pending`.
"""

from __future__ import annotations

import numpy as np


class IdTable:
    """External id <-> row, with reuse of freed rows and optional admission counting.

    ``ids[row]`` is the id held by ``row`` (``""`` for a freed row); ``index``
    maps ids to rows; ``free`` lists freed rows, reused last-freed first.
    """

    def __init__(self, admit_after: int) -> None:
        self.index: dict[str, int] = {}
        self.ids: list[str] = []
        self.free: list[int] = []
        self.pending: dict[str, int] = {}
        self.admit_after = admit_after

    def __len__(self) -> int:
        """Rows in use, freed ones included (the tables' logical length)."""
        return len(self.ids)

    def get(self, key: str) -> int | None:
        """The row of a known id, else ``None`` (no admission counting)."""
        return self.index.get(key)

    def lookup(self, key: str) -> tuple[int, bool]:
        """(row, is_new) for ``key``; row -1 while it waits for admission."""
        row = self.index.get(key)
        if row is not None:
            return row, False
        if self.admit_after > 1:
            c = self.pending.get(key, 0) + 1
            if c < self.admit_after:
                self.pending[key] = c
                return -1, False
            self.pending.pop(key, None)
        return self._allocate(key), True

    def admit(self, key: str) -> tuple[int, bool]:
        """(row, is_new) for ``key``, admitted at once whatever its count (an item the
        catalogue announces: it needs a row before anyone clicks it)."""
        row = self.index.get(key)
        if row is not None:
            return row, False
        self.pending.pop(key, None)
        return self._allocate(key), True

    def _allocate(self, key: str) -> int:
        if self.free:
            row = self.free.pop()
            self.ids[row] = key
        else:
            row = len(self.ids)
            self.ids.append(key)
        self.index[key] = row
        return row

    def release(self, row: int) -> None:
        """Free ``row``: its id is forgotten and the row reused by a later new id."""
        del self.index[self.ids[row]]
        self.ids[row] = ""
        self.free.append(row)

    def live(self) -> np.ndarray:
        """Bool mask (rows,) of rows that hold an id."""
        return np.array([bool(x) for x in self.ids], dtype=bool)

    def restore(self, ids: list[str], free: list[int], pending: dict[str, int]) -> None:
        """Load the rows, free list and admission counts recorded in a state."""
        self.ids = list(ids)
        self.index = {x: r for r, x in enumerate(ids) if x}
        self.free = list(free)
        self.pending = dict(pending)
