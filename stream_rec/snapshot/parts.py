"""The parts of a version's data file: tables as ``.npy``, ids as JSON.

A full version's parts are its ids and every table; a delta's are the ids of
its rows, the rows themselves (``delta.user_rows``, ``delta.item_rows``), the
changed users' seen lists (``delta.seen_*``) and the tables restricted to
those rows. The store writes the vector tables of :data:`quant.STORED` in its
``vector_dtype`` (codes, and for int8 a ``<name>.scale`` part beside them);
everything the worker restores from stays exact.
"""

from __future__ import annotations

import io
from collections.abc import Collection
from typing import Any

import numpy as np
import orjson

from stream_rec.model import ModelState, StateDelta, quant

from .manifest import FORMAT, QUANTIZED_FORMAT, CorruptSnapshot, Manifest


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _tables(tables: dict[str, np.ndarray], dtype: quant.Encoding
            ) -> tuple[dict[str, bytes], int]:
    """Table parts with :data:`quant.STORED` in ``dtype``, and the manifest format they need."""
    tables = quant.encoded(tables, quant.STORED, dtype)
    fmt = QUANTIZED_FORMAT if quant.is_quantized(tables) else FORMAT
    return {f"{name}.npy": npy_bytes(arr) for name, arr in tables.items()}, fmt


def state_parts(state: ModelState, dtype: quant.Encoding) -> tuple[dict[str, bytes], int]:
    """The parts of a full version of ``state``, and its manifest format."""
    files = {"user_ids.json": orjson.dumps(list(state.user_ids)),
             "item_ids.json": orjson.dumps(list(state.item_ids))}
    tables, fmt = _tables(state.tables, dtype)
    return {**files, **tables}, fmt


def delta_parts(delta: StateDelta, dtype: quant.Encoding) -> tuple[dict[str, bytes], int]:
    """The parts of a delta version, and its manifest format."""
    files = {
        "user_ids.json": orjson.dumps(delta.user_ids),
        "item_ids.json": orjson.dumps(delta.item_ids),
        "delta.user_rows.npy": npy_bytes(delta.user_rows),
        "delta.item_rows.npy": npy_bytes(delta.item_rows),
        "delta.seen_indptr.npy": npy_bytes(delta.seen_indptr),
        "delta.seen_items.npy": npy_bytes(delta.seen_items),
    }
    tables, fmt = _tables(delta.tables, dtype)
    return {**files, **tables}, fmt


def unpack(manifest: Manifest, data: bytes, only: Collection[str] | None = None
           ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(json documents, tables) of a version's verified data file.

    ``only`` names the tables to decode (with their scales; a delta's own
    ``delta.*`` parts and the ids always are); ``None`` decodes all. Refuses,
    as :class:`CorruptSnapshot`, a part outside the file, one that does not
    parse, and vector tables a reader could not decode.
    """
    docs: dict[str, Any] = {}
    tables: dict[str, np.ndarray] = {}
    for name, where in manifest.entries.items():
        table = name[:-4].removesuffix(quant.SCALE)
        if only is not None and name.endswith(".npy") and not name.startswith("delta.") \
                and table not in only:
            continue
        start, size = int(where.get("offset", -1)), int(where.get("bytes", -1))
        if start < 0 or size < 0 or start + size > len(data):
            raise CorruptSnapshot(f"{name} lies outside the data file of v{manifest.version}")
        raw = memoryview(data)[start:start + size]
        try:
            if name.endswith(".json"):
                docs[name[:-5]] = orjson.loads(raw)
            elif name.endswith(".npy"):
                tables[name[:-4]] = np.load(io.BytesIO(raw), allow_pickle=False)
        except ValueError as exc:
            raise CorruptSnapshot(
                f"{name} in v{manifest.version} does not parse: {exc}") from None
    try:
        quant.check(tables, f" in v{manifest.version}")
    except ValueError as exc:
        raise CorruptSnapshot(str(exc)) from None
    return docs, tables
