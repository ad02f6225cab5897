"""What every index layout offers :class:`~stream_rec.index.ItemIndex`, and shared helpers.

A layout holds the vectors of item rows ``0 .. ntotal - 1`` in one FAISS
structure and answers inner-product top-k for them. It knows nothing of
tombstones or of a query's seen items: :class:`ItemIndex` keeps those and hands
the layout a bitmap of dead rows to skip inside FAISS's scan (an
``IDSelector``), so no answer has to over-fetch by the number of dead rows.

Refresh is split in two so that serving never mutates what requests read:
:meth:`Layout.clone` copies (on the swap path, off the request path) and
:meth:`Layout.set_rows` / :meth:`Layout.append` change the copy in place.
Both report which rows were encoded without clipping; :class:`ItemIndex` keeps
the others exact in a :class:`~stream_rec.index.spill.Spill`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import faiss
import numpy as np

# FAISS's scalar-quantizer kernels are SIMD only when the width is a multiple of
# 8; otherwise it falls back to scalar code. Measured on 200 000 of our vectors,
# one query on one thread: SQ8 18.0 ms at 65 columns against 3.95 ms padded to
# 72 (fp16 23.7 against 3.5 ms, 6-bit 33.6 against 9.7 ms). Layouts that
# quantize pad vectors and queries with zero columns, which changes no score.
SIMD_WIDTH = 8


@dataclass(frozen=True)
class Options:
    """Knobs of the approximate layouts; ``None`` picks the measured default for the size.

    Tests set small values so that catalogues of a few thousand rows exercise
    the real structures.
    """

    nlist: int | None = None          # IVF lists; default 4·√N rounded to a power of two
    nprobe: int | None = None         # IVF lists searched per query; default nlist / 64, ≥ 16
    train_per_list: int = 40          # k-means training points per IVF list
    pq_m: int = 13                    # PQ sub-quantizers (must divide D + 1 = 65)
    k_factor: int = 8                 # IVF-PQ candidates re-ranked per answer wanted
    hnsw_m: int = 16                  # HNSW links per node (level 0 has twice as many)
    ef_construction: int = 40
    ef_search: int = 128
    rebuild_fraction: float = 0.25    # HNSW: compact once superseded nodes exceed this share


def padded_dim(dim: int) -> int:
    return -(-dim // SIMD_WIDTH) * SIMD_WIDTH


def pad(x: np.ndarray, width: int) -> np.ndarray:
    """``x`` (B, D) as contiguous float32 (B, width), zero columns on the right."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[1] == width:
        return np.ascontiguousarray(x)
    out = np.zeros((len(x), width), dtype=np.float32)
    out[:, :x.shape[1]] = x
    return out


def default_nlist(n: int) -> int:
    """4·√N lists rounded to a power of two: 4 096 at a million rows, 256 at 3 000."""
    return int(min(65536, max(16, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))))


def default_nprobe(nlist: int) -> int:
    """1/64 of the lists (64 of 4 096 at a million rows), at least 16 of them."""
    return min(nlist, max(16, nlist // 64))


def dead_selector(bits: np.ndarray | None) -> faiss.IDSelector | None:
    """A selector that refuses the rows set in ``bits`` (packed, little-endian bit order).

    FAISS keeps raw pointers: the caller must keep the returned object (which
    holds the bitmap and the inner selector) alive while searches use it.
    """
    if bits is None:
        return None
    inner = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
    sel = faiss.IDSelectorNot(inner)
    sel.keep = (inner, bits)  # type: ignore[attr-defined]
    return sel


class Layout(ABC):
    """One FAISS structure over item rows; see the module docstring."""

    name: ClassVar[str]
    exact: ClassVar[bool] = False

    def __init__(self, dim: int, options: Options) -> None:
        self.dim = dim
        self.options = options
        # set by build(): which of its rows were encoded without clipping (None: all)
        self.build_fits: np.ndarray | None = None

    @classmethod
    @abstractmethod
    def build(cls, vectors: np.ndarray, options: Options) -> Layout:
        """A layout over ``vectors`` (N, D) float32, row r = vectors[r]."""

    @property
    @abstractmethod
    def ntotal(self) -> int:
        """Rows held (the highest row + 1)."""

    @abstractmethod
    def clone(self, reserve: int = 0) -> Layout:
        """An independent copy; the original is never changed by the copy's updates.

        ``reserve``: rows about to be appended; layouts that store rows in one
        array make room for them now, so the append does not copy it again.
        """

    @abstractmethod
    def set_rows(self, rows: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """Overwrite existing ``rows`` (B,) (all < ntotal, unique) with ``vectors`` (B, D).

        Returns (B,) bool: the rows encoded without clipping.
        """

    @abstractmethod
    def append(self, vectors: np.ndarray) -> np.ndarray:
        """Add rows ``ntotal .. ntotal + B - 1``; returns (B,) bool as :meth:`set_rows`."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int, dead_bits: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Scores and rows, each (B, k), best first; row -1 where fewer than k were found."""

    @abstractmethod
    def nbytes(self) -> int:
        """Memory the structure holds (codes, ids, links, centroids), bytes."""

    def vectors(self) -> np.ndarray:
        """The exact float32 vectors (ntotal, D); only exact layouts have them."""
        raise NotImplementedError(f"{self.name} keeps no exact vectors")

    def prepare(self, dead_bits: np.ndarray | None) -> None:
        """Precompute what the first search would (called off the request path)."""

    def compacted(self) -> Layout | None:
        """A rebuilt copy when updates degraded this one past its bound, else ``None``."""
        return None


def sq_codes(index: faiss.Index) -> np.ndarray:
    """A writable (ntotal, code_size) uint8 view of a flat-codes index's storage."""
    n = int(index.ntotal)
    size = int(index.code_size)
    if n == 0:
        return np.zeros((0, size), dtype=np.uint8)
    return faiss.rev_swig_ptr(index.codes.data(), n * size).reshape(n, size)


def copy_codes(src: faiss.Index, dst: faiss.Index, reserve: int) -> None:
    """``src``'s codes into the empty flat-codes index ``dst``, one copy, room for ``reserve``.

    ``add`` resizes the code array to exactly the rows it holds, and a copy
    holds exactly its rows: the first append after ``clone_index`` would copy
    every row a second time (measured: a 1 % refresh of a 1 000 000-row flat
    index took 0.96 s, of which 0.38 s was the clone).
    """
    n, size = int(src.ntotal), int(src.code_size)
    dst.codes.resize((n + reserve) * size)  # zero-filled; add() fills the reserve in place
    if n:
        faiss.rev_swig_ptr(dst.codes.data(), n * size)[:] = \
            faiss.rev_swig_ptr(src.codes.data(), n * size)
    dst.ntotal = n


def all_fit(n: int) -> np.ndarray:
    return np.ones(n, dtype=bool)


def within_ranges(sq: faiss.ScalarQuantizer, x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (B, W) that ``sq`` encodes without clipping by more than one step.

    A trained non-uniform quantizer holds per-column ``vmin`` then ``vdiff``
    (= vmax - vmin); a value outside [vmin, vmin + vdiff] is clipped to it.
    """
    vmin, vdiff = faiss.vector_to_array(sq.trained).reshape(2, -1)
    step = vdiff / ((1 << int(sq.bits)) - 1)
    return ((x >= vmin - step) & (x <= vmin + vdiff + step)).all(axis=1)


def ivf_bytes(index: faiss.IndexIVF) -> int:
    """Codes + 8-byte ids per entry + centroids (+ 16 bytes per entry for a hash direct map)."""
    entries = int(index.invlists.compute_ntotal())
    per = int(index.code_size) + 8
    if index.direct_map.type == faiss.DirectMap.Hashtable:  # type: ignore[attr-defined]
        per += 16  # the serialised size; in memory an unordered_map entry costs more
    elif index.direct_map.type == faiss.DirectMap.Array:  # type: ignore[attr-defined]
        per += 8
    return entries * per + int(index.nlist) * int(index.d) * 4
