"""A version's manifest: what it holds, where its bytes lie, and how to check them.

Format 2 names the version's data file uniquely (``data-<token>.bin``) so a
writer that loses the race for a version number never overwrites the
winner's bytes; format 1 named it ``data.bin``. Format 3 is format 2 whose
vector tables may hold float16 or int8 codes with per-row scales
(:mod:`stream_rec.model.quant`); a store writes it only for a quantized
version, so a reader that predates it refuses such a version (and keeps
serving the one it has) instead of taking codes for float32 vectors. Readers
accept all three and refuse any other format, an unsafe path, or a delta
without its parent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

FORMAT = 2
QUANTIZED_FORMAT = 3
READABLE_FORMATS = (1, 2, 3)
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


class CorruptSnapshot(RuntimeError):
    """A version failed verification: torn, tampered with or malformed."""


@dataclass
class Manifest:
    version: int
    parent: int | None
    kind: str  # "full" or "delta" (changed rows over ``parent``)
    created_at: float  # epoch seconds
    offsets: dict[str, dict[int, int]]  # topic -> partition -> next offset to read
    watermark: int | None  # largest event ts (epoch ms) included
    counts: dict[str, int]
    config: dict[str, Any]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> sha256, bytes
    # Logical parts (tables, ids) packed into the data file: name -> offset, bytes.
    entries: dict[str, dict[str, int]] = field(default_factory=dict)
    base: int | None = None  # the full version at the root of this version's chain
    chain: int = 0  # deltas between ``base`` and this version (0 for a full one)
    format: int = FORMAT
    writer: str = ""  # who committed it (host:pid:token), for operators
    # topic -> the id (KIP-516) of the incarnation its offsets refer to, where the broker
    # reports one: a worker restarted after the topic was recreated must not trust them.
    topic_ids: dict[str, str] = field(default_factory=dict)

    @property
    def data_file(self) -> str:
        """The one file the entries lie in."""
        if len(self.files) != 1:
            raise CorruptSnapshot(f"v{self.version} names {len(self.files)} data files, not 1")
        return next(iter(self.files))

    def to_json(self) -> bytes:
        data = self.__dict__.copy()
        data["offsets"] = {t: {str(p): o for p, o in parts.items()}
                           for t, parts in self.offsets.items()}
        return orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        try:
            data = orjson.loads(raw)
            data["offsets"] = {t: {int(p): int(o) for p, o in parts.items()}
                               for t, parts in data["offsets"].items()}
            manifest = cls(**data)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptSnapshot(f"malformed manifest: {exc}") from None
        if manifest.format not in READABLE_FORMATS:
            raise CorruptSnapshot(f"manifest format {manifest.format!r} is not one this "
                                  f"reader knows ({', '.join(map(str, READABLE_FORMATS))})")
        if manifest.kind not in ("full", "delta") or (
                manifest.kind == "delta" and (manifest.parent is None or manifest.base is None)):
            raise CorruptSnapshot(f"manifest of kind {manifest.kind!r} lacks its parent")
        for name in [*manifest.files, *manifest.entries]:
            if not SAFE_NAME.match(name) or name in (".", ".."):
                raise CorruptSnapshot(f"manifest names an unsafe path {name!r}")
        return manifest

