"""FAISS index of item vectors where the id of a vector is its item row.

Kinds (``serve.index``), with what ``scripts/bench_index.py`` measured at
1 000 000 items of the model's shape (dim 64 + bias = 65 columns): bytes a
row, recall@10 against exact, single-query p50 on one thread, 1 % refresh
(docs/benchmarks.md, "Index", has the whole table):

- ``flat``: exact float32 rows; 260 B, 1.0, 24 ms, 0.14 s.
- ``sq8`` / ``fp16``: every row scanned, scalar-quantized; 72 / 144 B,
  0.984 / 0.999, 18-24 ms.
- ``ivf``: ``IndexIVFFlat``, ``nprobe`` 16 unless told; 285 B, 0.935, 0.27 ms.
- ``ivf_sq6`` / ``ivf_sq8``: IVF over residual 6- / 8-bit codes; 64 / 82 B,
  0.960 / 0.990, 0.68 ms, 0.11 / 0.20 s.
- ``ivf_pq_refine``: IVF-PQ candidates re-ranked on fp16 rows; 152 B, 0.973.
- ``hnsw_sq8``: an HNSW graph over SQ8 codes; 234 B, 0.71, 1.2 s.
- ``auto`` (default): exact ``flat`` below :data:`AUTO_EXACT_MAX` rows, where
  one exact query's p99 stays well inside 5 ms (1.4 ms at 100 000 rows, 4.6 ms
  at 200 000), and :data:`AUTO_ANN` from there: the one kind within a quarter of
  flat's bytes that keeps recall@10 above 0.95.

Each layout says in its module how it takes changed rows (in place, or as
remove + add, or as new graph nodes with the old ones superseded).

Expired rows are tombstoned: a bitmap that FAISS consults while it scans (an
``IDSelector``), so no answer over-fetches by the number of dead rows. A
query's seen items are over-fetched and filtered (they are few). Rows a
scalar quantizer would clip are hidden the same way and scored exactly from a
small float32 :class:`~stream_rec.index.spill.Spill` instead.

A serving reader never mutates the index that requests are reading:
:meth:`ItemIndex.refreshed` copies the index and updates only the changed rows
of the copy. An approximate kind over a catalogue too small to train it is
searched exactly, and becomes that kind in the refresh that first finds enough
rows.
"""

from __future__ import annotations

import dataclasses
import math

import faiss
import numpy as np
import torch

from stream_rec.index.base import Layout, Options
from stream_rec.index.flat import FlatLayout, FP16Layout, SQLayout
from stream_rec.index.hnsw import HNSWSQLayout
from stream_rec.index.ivf import IVFFlatLayout, IVFPQRefineLayout, IVFSQ8Layout, IVFSQLayout
from stream_rec.index.spill import Spill, merge

LAYOUTS: dict[str, type[Layout]] = {cls.name: cls for cls in (
    FlatLayout, SQLayout, FP16Layout, IVFFlatLayout, IVFSQLayout, IVFSQ8Layout,
    IVFPQRefineLayout, HNSWSQLayout)}
KINDS = ("auto", *LAYOUTS)

# ``auto`` is exact below this many rows and AUTO_ANN from it on (the module
# docstring and docs/benchmarks.md give the measurements behind both).
AUTO_EXACT_MAX = 150_000
AUTO_ANN = "ivf_sq6"
# An approximate kind needs this many rows to train its centroids; below, exact.
MIN_ANN_ROWS = 1024

# Exact searches of at least this many queries run as one matrix product plus a
# top-k (see ItemIndex._search_gemm); smaller ones go to FAISS.
GEMM_MIN_QUERIES = 8


def layout_for(kind: str, n: int) -> str:
    """The structure a ``kind`` index over ``n`` rows uses."""
    if kind == "auto":
        return "flat" if n < AUTO_EXACT_MAX else AUTO_ANN
    if kind not in ("flat", "sq8", "fp16", "hnsw_sq8") and n < MIN_ANN_ROWS:
        return "flat"
    return kind


def set_search_threads(n: int) -> None:
    """Threads FAISS (for the calling thread) and torch (for the whole process) may use.

    One suits a server answering single queries from many request threads:
    measured here, a 100 000-item flat search took 0.9 ms on one thread and
    14 ms with two OpenMP threads contending with the rest of the process.
    Torch's count is process-wide, so call this in a serving process, not in
    one that also trains.
    """
    faiss.omp_set_num_threads(max(1, n))
    torch.set_num_threads(max(1, n))


class ItemIndex:
    """Inner-product index over item rows (id = item row), with tombstones.

    ``kind`` is what was asked for (a setting); ``layout.name`` is the
    structure in use now (``flat`` for ``auto`` below its threshold).
    ``dead`` (tombstoned rows) is read-only outside this class.
    """

    def __init__(self, dim: int, kind: str = "flat", nprobe: int | None = None,
                 options: Options | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS}")
        self.dim = dim
        self.kind = kind
        self.nprobe = nprobe or None
        self.options = options or Options()
        if self.nprobe:
            self.options = dataclasses.replace(self.options, nprobe=self.nprobe)
        self.layout: Layout = FlatLayout(dim, self.options)
        self.spill = Spill(dim)
        self.dead: set[int] = set()
        self._dead_cache: tuple[np.ndarray | None, np.ndarray, np.ndarray | None] | None = None

    @classmethod
    def build(cls, vectors: np.ndarray, dead: np.ndarray | None = None, kind: str = "flat",
              nprobe: int | None = None, options: Options | None = None) -> ItemIndex:
        """An index over ``vectors`` (N, D) float32; rows in ``dead`` are tombstoned."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        idx = cls(int(vectors.shape[1]), kind, nprobe, options)
        idx.layout = LAYOUTS[layout_for(kind, len(vectors))].build(vectors, idx.options)
        idx.spill = Spill.of(np.arange(len(vectors)), vectors, idx.layout.build_fits)
        if dead is not None:
            idx.dead = {int(r) for r in dead}
        idx._prepare()
        return idx

    @property
    def ntotal(self) -> int:
        return self.layout.ntotal

    @property
    def index(self) -> faiss.Index:
        """The FAISS structure itself (for inspection and tuning, e.g. an IVF's ``nprobe``)."""
        return self.layout.index  # type: ignore[attr-defined, no-any-return]

    def nbytes(self) -> int:
        """Bytes held: the layout's codes, ids, links and centroids, the spill, the bitmaps."""
        return self.layout.nbytes() + self.spill.nbytes + 2 * ((self.ntotal + 7) // 8)

    # ---- updates ---------------------------------------------------------------
    def upsert(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Set the vectors of item ``rows`` (B,) to ``vectors`` (B, D), in place.

        Rows past the end grow the index; rows skipped over on the way are
        tombstoned until given a vector.
        """
        rows, vectors = self._normalise(rows, vectors)
        if len(rows):
            before = self.ntotal
            self.layout, self.spill = self._updated(self.layout, True, rows, vectors)
            self._revive(rows, before)

    def tombstone(self, rows: np.ndarray) -> None:
        """Expire item ``rows``: they are never returned again (until re-upserted)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        self.dead.update(rows[(rows >= 0) & (rows < self.ntotal)].tolist())
        self._dead_cache = None

    def refreshed(self, rows: np.ndarray, vectors: np.ndarray,
                  dead: np.ndarray | None = None) -> ItemIndex:
        """A copy of this index with ``rows`` set to ``vectors``; this one is untouched.

        Runs on the snapshot watcher's thread: the copy, the updates and any
        rebuild a layout asks for happen here, never on a request.
        """
        rows, vectors = self._normalise(rows, vectors)
        out = ItemIndex(self.dim, self.kind, self.nprobe, self.options)
        out.dead = set(self.dead)
        out.layout, out.spill = self._updated(self.layout, False, rows, vectors) if len(rows) \
            else (self.layout.clone(), self.spill)
        out._revive(rows, self.ntotal)
        if dead is not None and len(dead):
            out.tombstone(dead)
        out._prepare()
        return out

    def _normalise(self, rows: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows unique (the last vector given for a row wins), vectors (B, D) float32."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        if len(rows) > 1:
            last = len(rows) - 1 - np.unique(rows[::-1], return_index=True)[1]
            if len(last) < len(rows):
                rows, vectors = rows[last], vectors[last]
        return rows, vectors

    def _updated(self, layout: Layout, owned: bool, rows: np.ndarray,
                 vectors: np.ndarray) -> tuple[Layout, Spill]:
        """``layout`` with ``rows`` set (a copy unless ``owned``; migrated if the size says
        so) and the spill that goes with it."""
        n = layout.ntotal
        top = max(n, int(rows.max()) + 1)
        want = layout_for(self.kind, top)
        if want != layout.name and layout.exact:  # the catalogue outgrew exact search
            full = np.zeros((top, self.dim), dtype=np.float32)
            full[:n] = layout.vectors()
            full[rows] = vectors
            built = LAYOUTS[want].build(full, self.options)
            return built, Spill.of(np.arange(top), full, built.build_fits)
        if not owned:
            layout = layout.clone(reserve=top - n)
        old = rows < n
        fits = np.ones(len(rows), dtype=bool)
        if old.any():
            fits[old] = layout.set_rows(rows[old], vectors[old])
        if top > n:
            block = np.zeros((top - n, self.dim), dtype=np.float32)
            block[rows[~old] - n] = vectors[~old]
            fits[~old] = layout.append(block)[rows[~old] - n]
        return layout.compacted() or layout, self.spill.updated(rows, vectors, fits)

    def _revive(self, rows: np.ndarray, before: int) -> None:
        """Rows just given vectors are alive; rows skipped past ``before`` to reach them are not."""
        self.dead.difference_update(rows.tolist())
        if self.ntotal > before:
            gaps = np.setdiff1d(np.arange(before, self.ntotal, dtype=np.int64), rows)
            self.dead.update(gaps.tolist())
        self._dead_cache = None

    def _dead_bits(self) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
        """(bitmap of dead rows, dead rows (M,) int64, bitmap of dead + spilled rows), cached.

        Bitmaps are packed little-endian (FAISS's ``IDSelectorBitmap``), None when empty.
        """
        cache = self._dead_cache
        if cache is None:
            dead_rows = np.fromiter(self.dead, dtype=np.int64, count=len(self.dead))
            mask = np.zeros(self.ntotal, dtype=bool)
            mask[dead_rows] = True
            dead_bits = np.packbits(mask, bitorder="little") if len(dead_rows) else None
            hidden_bits = dead_bits
            if len(self.spill):
                mask[self.spill.rows] = True
                hidden_bits = np.packbits(mask, bitorder="little")
            cache = self._dead_cache = (dead_bits, dead_rows, hidden_bits)
        return cache

    def _prepare(self) -> None:
        """Build what the first search would need, here rather than on a request."""
        self.layout.prepare(self._dead_bits()[2])

    # ---- search ----------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int,
               exclude: list[np.ndarray] | None = None) -> list[list[tuple[int, float]]]:
        """Top-``k`` item rows per query (B, D), skipping each query's ``exclude`` rows.

        Tombstones are skipped inside FAISS; seen items are over-fetched (by the
        largest exclusion set in the batch) and filtered, so every answer still
        has ``k`` items when the catalogue allows it.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        exclude = exclude or [np.empty(0, np.int64)] * len(queries)
        if self.layout.exact and len(queries) >= GEMM_MIN_QUERIES and self.ntotal:
            return self._search_gemm(queries, k, exclude)
        dead_bits, _, hidden_bits = self._dead_bits()
        extra = max((len(e) for e in exclude), default=0)
        kk = min(self.ntotal - len(self.dead), k + extra)
        if kk <= 0:
            return [[] for _ in range(len(queries))]
        scores, rows = self.layout.search(queries, kk, hidden_bits)
        if len(self.spill):
            scores, rows = merge((scores, rows), self.spill.search(queries, kk, dead_bits))
        dead = self.dead
        out = []
        for q in range(len(queries)):
            seen = set(exclude[q].tolist()) if len(exclude[q]) else ()
            hits = []
            for r, s in zip(rows[q].tolist(), scores[q].tolist()):
                if r >= 0 and r not in seen and r not in dead:
                    hits.append((r, s))
                    if len(hits) == k:
                        break
            out.append(hits)
        return out

    def _search_gemm(self, queries: np.ndarray, k: int,
                     exclude: list[np.ndarray]) -> list[list[tuple[int, float]]]:
        """Exact batched search: one (B, N) score matrix, banned cells masked, top-k.

        FAISS's own batched flat search measured no cheaper per query than one
        query at a time here (0.9 against 0.75 ms at 100 000 items), while a
        single matrix product over FAISS's storage plus torch's top-k took
        0.41 ms per query in batches of 64: the item matrix is read once per
        batch instead of once per query. Exclusions are masked exactly, so
        there is no over-fetch.
        """
        n = self.ntotal
        items = torch.from_numpy(self.layout.vectors())      # FAISS's memory, no copy
        scores = torch.from_numpy(queries) @ items.T         # (B, N)
        _, dead_rows, _ = self._dead_bits()
        if len(dead_rows):
            scores[:, torch.from_numpy(dead_rows)] = -math.inf
        lens = [len(e) for e in exclude]
        if any(lens):
            cols = np.concatenate(exclude).astype(np.int64, copy=False)
            rows = np.repeat(np.arange(len(exclude)), lens)
            ok = (cols >= 0) & (cols < n)
            scores[torch.from_numpy(rows[ok]), torch.from_numpy(cols[ok])] = -math.inf
        top_s, top_r = torch.topk(scores, min(k, n), dim=1)
        out = []
        for srow, rrow in zip(top_s.tolist(), top_r.tolist()):
            out.append([(r, s) for r, s in zip(rrow, srow) if s != -math.inf])
        return out
