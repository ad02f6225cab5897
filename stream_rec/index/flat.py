"""Layouts that scan every row: exact float32, and scalar-quantized (SQ8, fp16).

A row's position is its item row, so a changed row is rewritten where it is:
float32 storage directly, quantized codes re-encoded with ``sa_encode`` (the
same per-dimension ranges as at build). New rows are appended.
"""

from __future__ import annotations

import faiss
import numpy as np

from stream_rec.index.base import (
    Layout,
    Options,
    all_fit,
    copy_codes,
    dead_selector,
    pad,
    padded_dim,
    sq_codes,
    within_ranges,
)


class FlatLayout(Layout):
    """Exact inner product over float32 rows (``IndexFlatIP``); 4·(D + 1) bytes a row."""

    name = "flat"
    exact = True

    def __init__(self, dim: int, options: Options) -> None:
        super().__init__(dim, options)
        self.index: faiss.Index = faiss.IndexFlatIP(dim)

    @classmethod
    def build(cls, vectors: np.ndarray, options: Options) -> FlatLayout:
        out = cls(int(vectors.shape[1]), options)
        if len(vectors):
            out.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return out

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def vectors(self) -> np.ndarray:
        """A writable (ntotal, D) view of FAISS's storage (re-fetch after every append)."""
        n = self.ntotal
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        xb = self.index.get_xb()  # type: ignore[attr-defined]
        return faiss.rev_swig_ptr(xb, n * self.dim).reshape(n, self.dim)

    def clone(self, reserve: int = 0) -> FlatLayout:
        out = FlatLayout(self.dim, self.options)
        copy_codes(self.index, out.index, reserve)
        return out

    def set_rows(self, rows: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        self.vectors()[rows] = vectors
        return all_fit(len(rows))

    def append(self, vectors: np.ndarray) -> np.ndarray:
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return all_fit(len(vectors))

    def search(self, queries: np.ndarray, k: int, dead_bits: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray]:
        sel = dead_selector(dead_bits)
        params = faiss.SearchParameters(sel=sel) if sel is not None else None
        return self.index.search(queries, k, params=params)

    def nbytes(self) -> int:
        return self.ntotal * self.dim * 4


class SQLayout(Layout):
    """``IndexScalarQuantizer`` over every row, 8-bit or fp16, padded for SIMD.

    SQ8 keeps per-dimension min/max from the build: a row refreshed later with
    values outside them is clipped to the range until the next full version
    rebuilds the index.
    """

    name = "sq8"
    qtype = faiss.ScalarQuantizer.QT_8bit

    def __init__(self, dim: int, options: Options) -> None:
        super().__init__(dim, options)
        self.width = padded_dim(dim)
        self.index = faiss.IndexScalarQuantizer(self.width, self.qtype, faiss.METRIC_INNER_PRODUCT)

    @classmethod
    def build(cls, vectors: np.ndarray, options: Options) -> SQLayout:
        out = cls(int(vectors.shape[1]), options)
        x = pad(vectors, out.width)
        out.index.train(x if len(x) else np.zeros((1, out.width), np.float32))
        if len(x):
            out.build_fits = out.append(x)
        return out

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def clone(self, reserve: int = 0) -> SQLayout:
        out = type(self)(self.dim, self.options)
        faiss.copy_array_to_vector(faiss.vector_to_array(self.index.sq.trained),
                                   out.index.sq.trained)
        out.index.is_trained = True
        copy_codes(self.index, out.index, reserve)
        return out

    def fits(self, x: np.ndarray) -> np.ndarray:
        return within_ranges(self.index.sq, x)

    def set_rows(self, rows: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        x = pad(vectors, self.width)
        sq_codes(self.index)[rows] = self.index.sa_encode(x).reshape(len(rows), -1)
        return self.fits(x)

    def append(self, vectors: np.ndarray) -> np.ndarray:
        x = pad(vectors, self.width)
        self.index.add(x)
        return self.fits(x)

    def search(self, queries: np.ndarray, k: int, dead_bits: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray]:
        sel = dead_selector(dead_bits)
        params = faiss.SearchParameters(sel=sel) if sel is not None else None
        return self.index.search(pad(queries, self.width), k, params=params)

    def nbytes(self) -> int:
        return self.ntotal * int(self.index.code_size) + 2 * self.width * 4


class FP16Layout(SQLayout):
    """Half-precision rows: 2 bytes a column, no training, no clipping."""

    name = "fp16"
    qtype = faiss.ScalarQuantizer.QT_fp16

    def fits(self, x: np.ndarray) -> np.ndarray:
        return all_fit(len(x))
