"""Vector tables held as float16, or as int8 with a scale per row.

A row-aligned float32 table ``name`` (N, D) has one of three encodings:

- ``float32``: as it is;
- ``float16``: the table itself as float16 (N, D), values clipped to float16's
  finite range (an embedding never comes near 65 504; a clipped value stays
  finite, so a reader never meets an infinity it did not write);
- ``int8``: codes (N, D) int8 under ``name`` and a scale (N,) float32 under
  ``name + ".scale"``; row r is ``codes[r] * scale[r]`` with
  ``scale[r] = max |x[r]| / 127`` (symmetric, rounded to nearest), so every row
  uses the whole code range whatever its norm, and a row's error is at most
  half a step of its own largest value.

The scale is a table of the same kind as its codes (``item.*`` or
``user.*``), so the delta algebra carries it without knowing about it: a
delta of changed rows carries those rows' scales, and applying it overwrites
both. Rows written into a table take that table's encoding (:func:`conform`),
so a reader may hold another encoding than the store wrote, and a chain whose
deltas were written under different settings still applies.

Which tables: :data:`SERVING` are the vectors serving reads to answer
(``item.vectors`` for the index, ``item.in`` and ``user.vec`` for the query);
:data:`STORED` is the one of them a snapshot may hold quantized. It is derived
(``item.out``, then ``item.bias`` + ``pop_weight`` * ``item.pop_log``) and no
restore reads it, so a worker restarting from a quantized version restores
bitwise. ``item.in``, ``item.out`` and ``user.vec`` are also training
parameters: a snapshot keeps them exact (docs/OPERATIONS.md, "Quantized
vectors").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

from . import tables as T

Encoding = Literal["float32", "float16", "int8"]
DTYPES: tuple[Encoding, ...] = ("float32", "float16", "int8")
SERVING = (T.ITEM_VECTORS, T.ITEM_IN, T.USER_VEC)
STORED = (T.ITEM_VECTORS,)
SCALE = T.SCALE_SUFFIX
_F16_MAX = float(np.finfo(np.float16).max)
_BLOCK = 1 << 16  # rows encoded at a time: temporaries stay near 16 MB at D = 65


def scale_name(name: str) -> str:
    """The table holding the per-row scales of int8 table ``name``."""
    return name + SCALE


def encoding(tables: dict[str, np.ndarray], name: str) -> Encoding:
    """How ``tables[name]`` is held (by its dtype: int8 codes come with a scale table)."""
    kind = tables[name].dtype
    if kind == np.int8:
        return "int8"
    return "float16" if kind == np.float16 else "float32"


def encode(x: np.ndarray, dtype: Encoding) -> tuple[np.ndarray, np.ndarray | None]:
    """``x`` (N, D) as ``(codes, scales)``: scales (N,) float32 for int8, else ``None``."""
    x = np.asarray(x)
    if dtype == "float32":
        return np.ascontiguousarray(x, dtype=np.float32), None
    if dtype == "float16":
        return np.clip(x, -_F16_MAX, _F16_MAX).astype(np.float16), None
    if dtype != "int8":
        raise ValueError(f"unknown vector dtype {dtype!r}; expected one of {DTYPES}")
    n = len(x)
    codes = np.empty(x.shape, dtype=np.int8)
    scales = np.zeros(n, dtype=np.float32)
    for lo in range(0, n, _BLOCK):
        block = np.asarray(x[lo:lo + _BLOCK], dtype=np.float32)
        if block.shape[1] == 0:
            codes[lo:lo + _BLOCK] = 0
            continue
        amax = np.abs(block).max(axis=1)
        s = scales[lo:lo + _BLOCK] = amax / np.float32(127.0)
        inv = np.divide(np.float32(1.0), s, out=np.zeros_like(s), where=s > 0)
        codes[lo:lo + _BLOCK] = np.clip(np.rint(block * inv[:, None]), -127, 127)
    return codes, scales


def decode(codes: np.ndarray, scales: np.ndarray | None = None) -> np.ndarray:
    """Float32 values of ``codes`` (..., D) with their ``scales`` (...,) when int8."""
    if codes.dtype == np.int8:
        if scales is None:
            raise ValueError("int8 codes without their scales")
        return codes.astype(np.float32) * np.asarray(scales, dtype=np.float32)[..., None]
    return np.asarray(codes, dtype=np.float32)


def take(tables: dict[str, np.ndarray], name: str, rows: np.ndarray | slice) -> np.ndarray:
    """Float32 rows of vector table ``name``: only ``rows`` are decoded.

    ``rows`` is an index array of any shape (the result has that shape plus
    (D,)) or a slice.
    """
    codes = tables[name][rows]
    if codes.dtype == np.int8:
        return decode(codes, tables[scale_name(name)][rows])
    return np.asarray(codes, dtype=np.float32)


def dense(tables: dict[str, np.ndarray], name: str) -> np.ndarray:
    """The whole of vector table ``name`` as float32 (the table itself when it is)."""
    return take(tables, name, slice(None))


def recode(tables: dict[str, np.ndarray], name: str, dtype: Encoding) -> dict[str, np.ndarray]:
    """``{name: codes}`` and, for int8, ``{name.scale: scales}``: table ``name`` in ``dtype``."""
    if encoding(tables, name) == dtype:
        out = {name: tables[name]}
        if dtype == "int8":
            out[scale_name(name)] = tables[scale_name(name)]
        return out
    codes, scales = encode(dense(tables, name), dtype)
    return {name: codes} if scales is None else {name: codes, scale_name(name): scales}


def encoded(tables: dict[str, np.ndarray], names: Iterable[str], dtype: Encoding
            ) -> dict[str, np.ndarray]:
    """``tables`` with each of ``names`` present held in ``dtype`` (others shared, not copied)."""
    out = dict(tables)
    for name in names:
        if name in tables:
            out.pop(scale_name(name), None)
            out.update(recode(tables, name, dtype))
    return out


def conform(tables: dict[str, np.ndarray], like: dict[str, np.ndarray]
            ) -> dict[str, np.ndarray]:
    """``tables`` (rows about to be written into ``like``) in the encodings ``like`` has."""
    out = tables
    for name in SERVING:
        if name in tables and name in like and encoding(tables, name) != encoding(like, name):
            out = encoded(out, [name], encoding(like, name))
    return out


def uniform(parts: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Table sets (consecutive deltas) with one encoding per table: float32 where they differ.

    Decoding is exact for float16 and one rounding for int8, and the rows are
    re-encoded at most once, into the table they are finally written into.
    """
    out = list(parts)
    for name in SERVING:
        kinds = {encoding(p, name) for p in out if name in p}
        if len(kinds) > 1:
            out = [encoded(p, [name], "float32") for p in out]
    return out


def check(tables: dict[str, np.ndarray], where: str = "") -> None:
    """Refuse vector tables a reader could not decode: raises ``ValueError`` naming one.

    int8 codes need a scale (N,) float32, finite and not negative; float16
    codes must be finite; a scale table needs int8 codes beside it.
    """
    for name, arr in tables.items():
        if name.endswith(SCALE):
            base = name[: -len(SCALE)]
            if base not in SERVING or base not in tables or tables[base].dtype != np.int8:
                raise ValueError(f"{name}{where} has no int8 codes beside it")
            continue
        if name not in SERVING:
            continue
        if arr.dtype not in (np.float32, np.float16, np.int8) or arr.ndim != 2:
            raise ValueError(f"{name}{where} is {arr.dtype} {arr.shape}, not a vector table")
        if arr.dtype == np.int8:
            s = tables.get(scale_name(name))
            if s is None or s.dtype != np.float32 or s.shape != (len(arr),):
                raise ValueError(f"{name}{where} is int8 without a float32 scale per row")
            if not (np.isfinite(s) & (s >= 0)).all():
                raise ValueError(f"{scale_name(name)}{where} holds a negative or non-finite scale")
        elif arr.dtype == np.float16 and not np.isfinite(arr).all():
            raise ValueError(f"{name}{where} holds non-finite float16 values")


def is_quantized(tables: dict[str, np.ndarray]) -> bool:
    """Does any vector table in ``tables`` hold codes rather than float32?"""
    return any(name in tables and encoding(tables, name) != "float32" for name in SERVING)


def nbytes(tables: dict[str, np.ndarray], names: Iterable[str] = SERVING) -> int:
    """Bytes the vector tables ``names`` (codes and scales) take in ``tables``."""
    total = 0
    for name in names:
        for part in (name, scale_name(name)):
            if part in tables:
                total += int(tables[part].nbytes)
    return total
