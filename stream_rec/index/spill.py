"""Rows a scalar quantizer would clip, kept exact beside the quantized layout.

An SQ code spans the per-column range seen when the index was trained. A row
outside it -- a vector that grew since the last full build, or an extreme row
the training sample missed -- would be clipped to the range, and in inner
product search the extreme rows are exactly the ones that score highest. So
such rows are hidden from the quantized layout (set in the bitmap its scan
skips) and scored exactly from float32 copies here, then merged by score.

The spill is immutable: an update returns a new one (copy-on-write, like the
index). It stays small: rows outside the ranges by more than one quantization
step are rare (the figures are in the ``spilled`` column of
``scripts/bench_index.py``), and every full snapshot version rebuilds the index
with fresh ranges and an empty spill.
"""

from __future__ import annotations

import numpy as np
import torch


class Spill:
    """Exact rows (M,) sorted int64 with their vectors (M, D) float32."""

    def __init__(self, dim: int, rows: np.ndarray | None = None,
                 vectors: np.ndarray | None = None) -> None:
        self.dim = dim
        self.rows = np.zeros(0, np.int64) if rows is None else rows
        self.vectors = np.zeros((0, dim), np.float32) if vectors is None else vectors

    @classmethod
    def of(cls, rows: np.ndarray, vectors: np.ndarray, fits: np.ndarray | None) -> Spill:
        """The rows among ``rows`` (B,) whose ``fits`` entry is False."""
        dim = int(vectors.shape[1])
        if fits is None or fits.all():
            return cls(dim)
        out = ~fits
        order = np.argsort(rows[out])
        return cls(dim, rows[out][order], np.ascontiguousarray(vectors[out][order]))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes + self.vectors.nbytes)

    def updated(self, rows: np.ndarray, vectors: np.ndarray, fits: np.ndarray) -> Spill:
        """A new spill: ``rows`` leave it, then those that do not ``fit`` join with their vectors."""
        if not len(self) and fits.all():
            return self
        keep = ~np.isin(self.rows, rows)
        joined = Spill.of(rows, vectors, fits)
        all_rows = np.concatenate([self.rows[keep], joined.rows])
        order = np.argsort(all_rows)
        return Spill(self.dim, all_rows[order],
                     np.concatenate([self.vectors[keep], joined.vectors])[order])

    def search(self, queries: np.ndarray, k: int, dead_bits: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` (scores, rows), each (B, k), -inf / -1 where fewer live rows exist.

        Torch, not numpy, multiplies: numpy's OpenBLAS starts its own threads
        for a (64, 65) x (65, 176) product and took 35 ms for it on the shared
        machine, torch on the serving thread's one thread 0.05 ms.
        """
        b = len(queries)
        scores = np.full((b, k), -np.inf, dtype=np.float32)
        rows = np.full((b, k), -1, dtype=np.int64)
        if not len(self):
            return scores, rows
        s = torch.from_numpy(np.ascontiguousarray(queries)) @ torch.from_numpy(self.vectors).T
        if dead_bits is not None:
            dead = (dead_bits[self.rows >> 3] >> (self.rows & 7)) & 1
            s[:, torch.from_numpy(dead.astype(bool))] = -np.inf
        m = min(k, len(self))
        top_s, top = torch.topk(s, m, dim=1)
        scores[:, :m] = top_s.numpy()
        rows[:, :m] = np.where(np.isfinite(scores[:, :m]), self.rows[top.numpy()], -1)
        return scores, rows


def merge(first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray]
          ) -> tuple[np.ndarray, np.ndarray]:
    """Two (scores, rows) candidate lists per query merged best first; -1 rows sort last."""
    scores = np.concatenate([first[0], second[0]], axis=1)
    rows = np.concatenate([first[1], second[1]], axis=1)
    scores = np.where(rows >= 0, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)
