"""``hnsw_sq8``: an HNSW graph over SQ8 codes (``IndexHNSWSQ``).

HNSW cannot change a node's vector or remove a node: the graph's links were
chosen for the old position. So a changed row is added as a new node (a fresh
internal id), the row now points at it, and its old node is superseded: kept
in the graph as a waypoint but never returned (an ``IDSelector`` over internal
ids). Superseded nodes cost memory and search time, so once they exceed
``Options.rebuild_fraction`` of the rows the next refresh rebuilds the graph
from the live rows' codes (decoded and re-encoded with the same ranges, which
gives back the same codes). That rebuild runs where refreshes run: on the
snapshot watcher's thread, off the request path, while the previous version
keeps answering.
"""

from __future__ import annotations

import faiss
import numpy as np

from stream_rec.index.base import Layout, Options, pad, padded_dim, sq_codes, within_ranges


class HNSWSQLayout(Layout):
    """Internal node ids differ from rows: ``row_of`` (nodes,) and ``node_of`` (rows,) map them."""

    name = "hnsw_sq8"

    def __init__(self, dim: int, options: Options) -> None:
        super().__init__(dim, options)
        self.width = padded_dim(dim)
        self.index = self._empty()
        self.row_of = np.zeros(0, dtype=np.int64)
        self.node_of = np.zeros(0, dtype=np.int64)
        self.superseded = np.zeros(0, dtype=bool)
        self._cache: tuple[np.ndarray | None, faiss.IDSelector | None] | None = None

    def _empty(self) -> faiss.IndexHNSWSQ:
        index = faiss.IndexHNSWSQ(self.width, faiss.ScalarQuantizer.QT_8bit,
                                  self.options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.options.ef_construction
        return index

    @classmethod
    def build(cls, vectors: np.ndarray, options: Options) -> HNSWSQLayout:
        out = cls(int(vectors.shape[1]), options)
        x = pad(vectors, out.width)
        out.index.train(x if len(x) else np.zeros((1, out.width), np.float32))
        out._add_nodes(x, np.arange(len(x), dtype=np.int64))
        out.node_of = np.arange(len(x), dtype=np.int64)
        out.build_fits = out._fits(x)
        return out

    def _fits(self, x: np.ndarray) -> np.ndarray:
        return within_ranges(faiss.downcast_index(self.index.storage).sq, x)

    @property
    def ntotal(self) -> int:
        return len(self.node_of)

    def _add_nodes(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        first = int(self.index.ntotal)
        if len(x):
            self.index.add(x)
        self.row_of = np.concatenate([self.row_of, rows])
        self.superseded = np.concatenate([self.superseded, np.zeros(len(rows), dtype=bool)])
        self._cache = None
        return np.arange(first, first + len(rows), dtype=np.int64)

    def clone(self, reserve: int = 0) -> HNSWSQLayout:
        out = HNSWSQLayout(self.dim, self.options)
        out.index = faiss.clone_index(self.index)
        out.row_of, out.node_of = self.row_of.copy(), self.node_of.copy()
        out.superseded = self.superseded.copy()
        return out

    def set_rows(self, rows: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        x = pad(vectors, self.width)
        self.superseded[self.node_of[rows]] = True
        self.node_of[rows] = self._add_nodes(x, rows)
        return self._fits(x)

    def append(self, vectors: np.ndarray) -> np.ndarray:
        x = pad(vectors, self.width)
        rows = np.arange(self.ntotal, self.ntotal + len(vectors), dtype=np.int64)
        self.node_of = np.concatenate([self.node_of, self._add_nodes(x, rows)])
        return self._fits(x)

    def _selector(self, dead_bits: np.ndarray | None) -> faiss.IDSelector | None:
        """Refuse superseded nodes and the nodes of dead rows (cached per tombstone bitmap)."""
        cache = self._cache
        if cache is not None and cache[0] is dead_bits:
            return cache[1]
        banned = self.superseded.copy()
        if dead_bits is not None:
            dead_rows = np.unpackbits(dead_bits, count=self.ntotal, bitorder="little")
            banned |= dead_rows.astype(bool)[self.row_of]
        sel = None
        if banned.any():
            bits = np.packbits(banned, bitorder="little")
            inner = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
            sel = faiss.IDSelectorNot(inner)
            sel.keep = (inner, bits)  # type: ignore[attr-defined]
        self._cache = (dead_bits, sel)
        return sel

    def prepare(self, dead_bits: np.ndarray | None) -> None:
        self._selector(dead_bits)

    def search(self, queries: np.ndarray, k: int, dead_bits: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray]:
        params = faiss.SearchParametersHNSW(sel=self._selector(dead_bits),
                                            efSearch=max(self.options.ef_search, k))
        scores, nodes = self.index.search(pad(queries, self.width), k, params=params)
        rows = np.where(nodes >= 0, self.row_of[np.maximum(nodes, 0)], -1)
        return scores, rows

    def compacted(self) -> HNSWSQLayout | None:
        if self.superseded.sum() <= self.options.rebuild_fraction * max(1, self.ntotal):
            return None
        storage = faiss.downcast_index(self.index.storage)
        codes = sq_codes(storage)[self.node_of]
        out = HNSWSQLayout(self.dim, self.options)
        # the same ranges as before: decoding and re-encoding then returns the same codes
        trained = faiss.vector_to_array(storage.sq.trained)
        fresh = faiss.downcast_index(out.index.storage)
        faiss.copy_array_to_vector(trained, fresh.sq.trained)
        fresh.is_trained = out.index.is_trained = True
        out._add_nodes(storage.sa_decode(codes), np.arange(self.ntotal, dtype=np.int64))
        out.node_of = np.arange(self.ntotal, dtype=np.int64)
        return out

    def nbytes(self) -> int:
        nodes = int(self.index.ntotal)
        hnsw = self.index.hnsw
        links = int(hnsw.neighbors.size()) * 4 + int(hnsw.offsets.size()) * 8 + nodes * 4
        own = self.row_of.nbytes + self.node_of.nbytes + self.superseded.nbytes
        storage = faiss.downcast_index(self.index.storage)
        return nodes * int(storage.code_size) + links + own
