"""Exact inner-product index over item vectors, where slot = item row.

Changed rows are overwritten in place in FAISS's own storage (no remove + add),
new rows are appended, expired rows are tombstoned and filtered from answers.
"""

from __future__ import annotations

import faiss
import numpy as np


class ItemIndex:
    """An ``IndexFlatIP`` whose slot ``i`` holds the vector of item row ``i``."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.index = faiss.IndexFlatIP(dim)
        self.dead: set[int] = set()

    @classmethod
    def build(cls, vectors: np.ndarray, dead: np.ndarray | None = None) -> ItemIndex:
        """An index over ``vectors`` (N, D); rows in ``dead`` are tombstoned."""
        idx = cls(int(vectors.shape[1]))
        idx.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        if dead is not None:
            idx.dead = {int(r) for r in dead}
        return idx

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def _storage(self) -> np.ndarray:
        """A writable (ntotal, D) view of the index's vectors (re-fetch after every add)."""
        n = self.ntotal
        return faiss.rev_swig_ptr(self.index.get_xb(), n * self.dim).reshape(n, self.dim)

    def upsert(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Set the vectors of item ``rows`` (B,) to ``vectors`` (B, D); grows as needed."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        top = int(rows.max()) + 1
        if top > self.ntotal:
            self.index.add(np.zeros((top - self.ntotal, self.dim), dtype=np.float32))
        self._storage()[rows] = vectors
        if self.dead:
            self.dead.difference_update(rows.tolist())

    def tombstone(self, rows: np.ndarray) -> None:
        """Expire item ``rows``: zero their vectors and never return them."""
        rows = np.asarray(rows, dtype=np.int64)
        rows = rows[rows < self.ntotal]
        self._storage()[rows] = 0.0
        self.dead.update(rows.tolist())

    def vectors(self) -> np.ndarray:
        return self._storage().copy()

    def search(self, queries: np.ndarray, k: int,
               exclude: list[np.ndarray] | None = None) -> list[list[tuple[int, float]]]:
        """Top-``k`` item rows per query (B, D), skipping each query's ``exclude`` rows.

        Over-fetches by the largest exclusion set plus the tombstones so that every
        answer still has ``k`` items when the catalogue allows it.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        exclude = exclude or [np.empty(0, np.int64)] * len(queries)
        extra = max((len(e) for e in exclude), default=0) + len(self.dead)
        kk = min(self.ntotal, k + extra)
        if kk == 0:
            return [[] for _ in range(len(queries))]
        scores, rows = self.index.search(queries, kk)
        out = []
        for q in range(len(queries)):
            banned = self.dead.union(exclude[q].tolist()) if len(exclude[q]) else self.dead
            hits = []
            for r, s in zip(rows[q].tolist(), scores[q].tolist()):
                if r >= 0 and r not in banned:
                    hits.append((r, s))
                    if len(hits) == k:
                        break
            out.append(hits)
        return out
