"""Inverted-file layouts: rows bucketed by nearest centroid, ``nprobe`` buckets scanned.

- ``ivf``: ``IndexIVFFlat``, float32 rows, a hash direct map so that
  ``update_vectors`` moves changed rows between lists in place.
- ``ivf_sq6`` / ``ivf_sq8``: ``IndexIVFScalarQuantizer`` on residuals (row minus
  its centroid), 6 or 8 bits a column, padded to a multiple of 8 columns.
  No direct map (it would cost 8 bytes a row): a refresh removes the changed
  rows with one ``remove_ids`` pass over the lists (11 ms at a million rows)
  and adds them back, which re-assigns each to its nearest centroid now.
- ``ivf_pq_refine``: ``IndexIVFPQ`` proposes ``k_factor``·k candidates that are
  re-ranked on fp16 copies of the rows (``IndexRefine``). The fp16 copy is
  updated in place (``sa_encode``), the PQ part like ``ivf_sq*``.

Centroids and quantizer ranges are those of the build; refreshed rows are
assigned and encoded with them. A full snapshot version rebuilds the index from
exact vectors, which bounds how stale the training gets.
"""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np

from stream_rec.index.base import (
    Layout,
    Options,
    all_fit,
    copy_codes,
    dead_selector,
    default_nlist,
    default_nprobe,
    ivf_bytes,
    pad,
    padded_dim,
    sq_codes,
    within_ranges,
)

IP = faiss.METRIC_INNER_PRODUCT
SQ_TRAIN_ROWS = 100_000
ADD_CHUNK = 65_536  # rows assigned and added at a time (bounds the residuals' memory)


def _train_sample(vectors: np.ndarray, count: int) -> np.ndarray:
    """Up to ``count`` rows drawn without replacement (k-means time grows with the sample)."""
    n = len(vectors)
    if n <= count:
        return vectors
    rng = np.random.default_rng(0)
    return vectors[np.sort(rng.choice(n, count, replace=False))]


class _IVFBase(Layout):
    """Shared by the IVF layouts: nlist/nprobe choice, ids = rows, remove + add refresh."""

    index: Any
    width: int

    def _ivf(self) -> faiss.IndexIVF:
        """The IVF part; its ``nprobe`` field is the one searches use (tunable in place)."""
        return self.index

    def _nlist(self, n: int) -> int:
        return self.options.nlist or default_nlist(n)

    def _probe(self, ivf: faiss.IndexIVF) -> None:
        ivf.nprobe = self.options.nprobe or default_nprobe(int(ivf.nlist))

    @property
    def ntotal(self) -> int:
        return self._n

    def _params(self, sel: faiss.IDSelector | None) -> Any:
        return faiss.SearchParametersIVF(sel=sel, nprobe=int(self._ivf().nprobe))

    def search(self, queries: np.ndarray, k: int, dead_bits: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray]:
        sel = dead_selector(dead_bits)
        return self.index.search(pad(queries, self.width), k, params=self._params(sel))

    def _encode_add(self, ivf: faiss.IndexIVF, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Add ``x`` (B, width) as ``rows``; (B,) bool: encoded without clipping."""
        ivf.add_with_ids(x, rows)
        return all_fit(len(rows))

    def _replace(self, ivf: faiss.IndexIVF, rows: np.ndarray, vectors: np.ndarray
                 ) -> np.ndarray:
        removed = ivf.remove_ids(faiss.IDSelectorBatch(rows))
        if removed != len(rows):
            raise RuntimeError(f"IVF held {removed} of {len(rows)} rows to replace")
        return self._encode_add(ivf, pad(vectors, self.width), rows)

    def _add(self, ivf: faiss.IndexIVF, vectors: np.ndarray) -> np.ndarray:
        rows = np.arange(self._n, self._n + len(vectors), dtype=np.int64)
        fits = self._encode_add(ivf, pad(vectors, self.width), rows)
        self._n += len(vectors)
        return fits


class IVFFlatLayout(_IVFBase):
    """``IndexIVFFlat`` with a hash direct map; ``nprobe`` 16 unless told."""

    name = "ivf"

    @classmethod
    def build(cls, vectors: np.ndarray, options: Options) -> IVFFlatLayout:
        out = cls(int(vectors.shape[1]), options)
        out.width = out.dim
        n = len(vectors)
        nlist = options.nlist or int(min(65536, max(16, 4 * math.sqrt(n))))
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(out.dim), out.dim, nlist, IP)
        ivf.nprobe = options.nprobe or 16
        ivf.train(_train_sample(vectors, 64 * nlist))
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
        ivf.add_with_ids(vectors, np.arange(n, dtype=np.int64))
        out.index, out._n = ivf, n
        return out

    def clone(self, reserve: int = 0) -> IVFFlatLayout:
        out = IVFFlatLayout(self.dim, self.options)
        out.index, out.width, out._n = faiss.clone_index(self.index), self.width, self._n
        out.index.nprobe = self.index.nprobe
        return out

    def set_rows(self, rows: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        self.index.update_vectors(rows, np.ascontiguousarray(vectors, dtype=np.float32))
        return all_fit(len(rows))

    def append(self, vectors: np.ndarray) -> np.ndarray:
        return self._add(self.index, vectors)

    def nbytes(self) -> int:
        return ivf_bytes(self.index)


class IVFSQLayout(_IVFBase):
    """IVF over residual scalar-quantized codes (6 bits a column unless a subclass says 8)."""

    name = "ivf_sq6"
    qtype = faiss.ScalarQuantizer.QT_6bit

    @classmethod
    def build(cls, vectors: np.ndarray, options: Options) -> IVFSQLayout:
        out = cls(int(vectors.shape[1]), options)
        out.width = padded_dim(out.dim)
        x = pad(vectors, out.width)
        ivf = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(out.width), out.width,
                                            out._nlist(len(x)), cls.qtype, IP, True)
        out._probe(ivf)
        nlist = int(ivf.nlist)
        out.index, out._n = ivf, 0
        # k-means wants ~40 rows a list; the quantizer's per-column ranges want the
        # extremes too (the rows with the largest scores are the outliers), so
        # a small catalogue trains on every row and a large one on 100 000 or more.
        ivf.train(_train_sample(x, max(options.train_per_list * nlist, SQ_TRAIN_ROWS)))
        out.build_fits = out._add(ivf, x)
        return out

    def clone(self, reserve: int = 0) -> IVFSQLayout:
        out = type(self)(self.dim, self.options)
        out.index, out.width, out._n = faiss.clone_index(self.index), self.width, self._n
        out.index.nprobe = self.index.nprobe
        return out

    def _encode_add(self, ivf: faiss.IndexIVF, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Assign once, check the residuals against the quantizer's ranges, add (in chunks)."""
        fits = np.empty(len(x), dtype=bool)
        quantizer = faiss.downcast_index(ivf.quantizer)
        centroids = faiss.rev_swig_ptr(quantizer.get_xb(), int(ivf.nlist) * self.width)
        centroids = centroids.reshape(-1, self.width)
        for lo in range(0, len(x), ADD_CHUNK):
            xs, ids = x[lo:lo + ADD_CHUNK], rows[lo:lo + ADD_CHUNK]
            lists = np.ascontiguousarray(quantizer.assign(xs, 1).reshape(-1), dtype=np.int64)
            fits[lo:lo + len(xs)] = within_ranges(ivf.sq, xs - centroids[lists])
            ivf.add_core(len(xs), faiss.swig_ptr(xs), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
        return fits

    def set_rows(self, rows: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        return self._replace(self.index, rows, vectors)

    def append(self, vectors: np.ndarray) -> np.ndarray:
        return self._add(self.index, vectors)

    def nbytes(self) -> int:
        return ivf_bytes(self.index)


class IVFSQ8Layout(IVFSQLayout):
    name = "ivf_sq8"
    qtype = faiss.ScalarQuantizer.QT_8bit


class IVFPQRefineLayout(_IVFBase):
    """IVF-PQ candidates re-ranked on fp16 rows: (pq_m + 8 + 2·(D + 1)) bytes a row.

    Unpadded: the PQ splits D + 1 = 65 columns into ``pq_m`` = 13 groups of 5,
    and the fp16 re-rank scores only ``k_factor``·k candidates, where SIMD
    widths do not matter.
    """

    name = "ivf_pq_refine"

    @classmethod
    def build(cls, vectors: np.ndarray, options: Options) -> IVFPQRefineLayout:
        out = cls(int(vectors.shape[1]), options)
        out.width = out.dim
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        nlist = out._nlist(len(x))
        base = faiss.IndexIVFPQ(faiss.IndexFlatIP(out.dim), out.dim, nlist, options.pq_m, 8, IP)
        out._probe(base)
        # PQ codebooks have 256 centroids each: FAISS asks for 39 training points per centroid
        base.train(_train_sample(x, max(options.train_per_list * nlist, 39 * 256)))
        base.add_with_ids(x, np.arange(len(x), dtype=np.int64))
        fine = faiss.IndexScalarQuantizer(out.dim, faiss.ScalarQuantizer.QT_fp16, IP)
        fine.add(x)
        out._wrap(base, fine, len(x))
        return out

    def _wrap(self, base: faiss.IndexIVFPQ, fine: faiss.IndexScalarQuantizer, n: int) -> None:
        self.base, self.fine, self._n = base, fine, n
        self.index = faiss.IndexRefine(base, fine)  # borrows both: we keep the references

    def clone(self, reserve: int = 0) -> IVFPQRefineLayout:
        out = IVFPQRefineLayout(self.dim, self.options)
        out.width = self.width
        fine = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_fp16, IP)
        copy_codes(self.fine, fine, reserve)
        out._wrap(faiss.clone_index(self.base), fine, self._n)
        out.base.nprobe = self.base.nprobe
        return out

    def _ivf(self) -> faiss.IndexIVF:
        return self.base

    def _params(self, sel: faiss.IDSelector | None) -> Any:
        return faiss.IndexRefineSearchParameters(
            k_factor=self.options.k_factor,
            base_index_params=faiss.SearchParametersIVF(sel=sel, nprobe=int(self.base.nprobe)))

    def set_rows(self, rows: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        self._replace(self.base, rows, x)
        sq_codes(self.fine)[rows] = self.fine.sa_encode(x).reshape(len(rows), -1)
        return all_fit(len(rows))  # PQ picks the nearest code word, fp16 does not clip

    def append(self, vectors: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        self._add(self.base, x)
        self.fine.add(x)
        self.index.ntotal = self._n
        return all_fit(len(x))

    def nbytes(self) -> int:
        codebooks = int(self.base.pq.centroids.size()) * 4
        return ivf_bytes(self.base) + codebooks + self._n * int(self.fine.code_size)
