"""Versioned, atomically published snapshots: the worker's checkpoint, serving's input.

Layout of a store (a local directory or an fsspec URL)::

    <root>/versions/v000000000042/manifest.json   # version, parent, offsets, watermark,
    <root>/versions/v000000000042/*.npy, *.json   #   counts, config, sha256 per file
    <root>/LATEST                                  # "42": moved last

Publishing writes a version under a temporary name, fsyncs files and directory,
renames it into place and only then moves ``LATEST``; a reader therefore sees a
whole version or none. Readers verify every checksum before using a version
and refuse anything torn, corrupt or naming a path outside its directory.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
import numpy as np
import orjson

from stream_rec.model import ModelState

log = logging.getLogger(__name__)

FORMAT = 1
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
_VERSION_DIR = re.compile(r"^v(\d{12})$")


class CorruptSnapshot(RuntimeError):
    """A version failed verification: torn, tampered with or malformed."""


@dataclass
class Manifest:
    version: int
    parent: int | None
    kind: str  # "full"
    created_at: float  # epoch seconds
    offsets: dict[str, dict[int, int]]  # topic -> partition -> next offset to read
    watermark: int | None  # largest event ts (epoch ms) included
    counts: dict[str, int]
    config: dict[str, Any]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> sha256, bytes
    format: int = FORMAT

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
        for name in manifest.files:
            if not _SAFE_NAME.match(name) or name in (".", ".."):
                raise CorruptSnapshot(f"manifest names an unsafe path {name!r}")
        return manifest


@dataclass
class Snapshot:
    manifest: Manifest
    state: ModelState

    @property
    def version(self) -> int:
        return self.manifest.version


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


class SnapshotStore:
    """A store of numbered versions at ``root`` (path or fsspec URL)."""

    def __init__(self, root: str | os.PathLike[str], keep_versions: int = 20) -> None:
        self.url = str(root)
        self.keep_versions = keep_versions
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        # Local directories get fsync'd temp-dir + rename; other filesystems use
        # their own (object stores: each put is atomic, LATEST moves last).
        self.local = isinstance(self.fs, LocalFileSystem)
        self.fs.makedirs(self._join("versions"), exist_ok=True)

    # -- paths -----------------------------------------------------------
    def _join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def version_dir(self, version: int) -> str:
        return self._join("versions", f"v{version:012d}")

    # -- reading ---------------------------------------------------------
    def versions(self) -> list[int]:
        """Published versions, oldest first (temporary directories are ignored)."""
        out = []
        for entry in self.fs.ls(self._join("versions"), detail=False):
            m = _VERSION_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def latest_version(self) -> int | None:
        """The version ``LATEST`` points at, or ``None`` for an empty store."""
        try:
            raw = self.fs.cat_file(self._join("LATEST"))
        except FileNotFoundError:
            return None
        try:
            return int(raw.strip())
        except ValueError:
            log.warning("LATEST pointer is unreadable: %r", raw[:40])
            return None

    def pinned(self) -> int | None:
        """The version serving is pinned to, if an operator pinned one."""
        try:
            return int(self.fs.cat_file(self._join("PIN")).strip())
        except (FileNotFoundError, ValueError):
            return None

    def serving_version(self) -> int | None:
        """What readers should serve: the pinned version, else the latest."""
        pin = self.pinned()
        return pin if pin is not None else self.latest_version()

    def pin(self, version: int) -> None:
        """Pin readers to ``version`` (verified first); retention keeps it while pinned."""
        self.load(version)  # raises CorruptSnapshot / FileNotFoundError if unusable
        self._write_pointer("PIN", version)

    def unpin(self) -> None:
        try:
            self.fs.rm(self._join("PIN"))
        except FileNotFoundError:
            pass

    def read_manifest(self, version: int) -> Manifest:
        path = self.version_dir(version) + "/manifest.json"
        try:
            manifest = Manifest.from_json(self.fs.cat_file(path))
        except FileNotFoundError:
            raise CorruptSnapshot(f"version {version} has no manifest") from None
        if manifest.version != version:
            raise CorruptSnapshot(f"manifest of v{version} claims version {manifest.version}")
        return manifest

    def _read_verified(self, version: int, name: str, meta: dict[str, Any]) -> bytes:
        path = self.version_dir(version) + "/" + name
        if self.local:
            real = os.path.realpath(path)
            base = os.path.realpath(self.version_dir(version))
            if os.path.dirname(real) != base:
                raise CorruptSnapshot(f"{name} in v{version} resolves outside its version")
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            raise CorruptSnapshot(f"v{version} is missing {name}") from None
        if len(raw) != meta.get("bytes") or hashlib.sha256(raw).hexdigest() != meta.get("sha256"):
            raise CorruptSnapshot(f"checksum mismatch for {name} in v{version}")
        return raw

    def load(self, version: int | None = None) -> Snapshot | None:
        """Load and verify ``version`` (default: latest); ``None`` for an empty store."""
        if version is None:
            version = self.latest_version()
            if version is None:
                return None
        manifest = self.read_manifest(version)
        tables: dict[str, np.ndarray] = {}
        user_ids: list[str] = []
        item_ids: list[str] = []
        for name, meta in manifest.files.items():
            raw = self._read_verified(version, name, meta)
            try:
                if name == "user_ids.json":
                    user_ids = orjson.loads(raw)
                elif name == "item_ids.json":
                    item_ids = orjson.loads(raw)
                elif name.endswith(".npy"):
                    tables[name[:-4]] = np.load(io.BytesIO(raw), allow_pickle=False)
            except ValueError as exc:
                raise CorruptSnapshot(f"{name} in v{version} does not parse: {exc}") from None
        state = ModelState(config=manifest.config, user_ids=user_ids, item_ids=item_ids,
                           tables=tables)
        return Snapshot(manifest, state)

    def load_latest_valid(self) -> Snapshot | None:
        """The newest version that verifies, walking back past corrupt ones."""
        latest = self.latest_version()
        candidates = [v for v in reversed(self.versions()) if latest is None or v <= latest]
        for version in candidates:
            try:
                return self.load(version)
            except CorruptSnapshot as exc:
                log.error("skipping version %d: %s", version, exc)
        return None

    # -- writing ---------------------------------------------------------
    def publish(self, state: ModelState, *, offsets: dict[str, dict[int, int]],
                watermark: int | None, parent: int | None = None,
                version: int | None = None) -> Manifest:
        """Write ``state`` as a new full version and move ``LATEST`` to it."""
        if version is None:
            existing = self.versions()
            version = (existing[-1] if existing else 0) + 1
        files: dict[str, bytes] = {
            "user_ids.json": orjson.dumps(list(state.user_ids)),
            "item_ids.json": orjson.dumps(list(state.item_ids)),
        }
        for name, arr in state.tables.items():
            files[f"{name}.npy"] = _npy_bytes(arr)
        counts = {"users": len(state.user_ids), "items": len(state.item_ids)}
        if "user.events" in state.tables:
            counts["events"] = int(state.tables["user.events"].sum())
        manifest = Manifest(
            version=version, parent=parent, kind="full", created_at=time.time(),
            offsets=offsets, watermark=watermark, counts=counts, config=dict(state.config),
            files={n: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)}
                   for n, b in files.items()})
        files["manifest.json"] = manifest.to_json()
        final = self.version_dir(version)
        tmp = self._join("versions", f".tmp-{version}-{uuid.uuid4().hex[:8]}")
        if self.local:
            self._write_local(tmp, final, files)
        else:
            self.fs.makedirs(tmp, exist_ok=True)
            for name, data in files.items():
                self.fs.pipe_file(f"{tmp}/{name}", data)
            self.fs.mv(tmp, final, recursive=True)
        self._set_latest(version)
        self.prune()
        return manifest

    def _write_local(self, tmp: str, final: str, files: dict[str, bytes]) -> None:
        os.makedirs(tmp)
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(os.path.dirname(final))

    def _set_latest(self, version: int) -> None:
        self._write_pointer("LATEST", version)

    def _write_pointer(self, name: str, version: int) -> None:
        """Atomically replace the small pointer file ``name`` with ``version``."""
        data = str(version).encode()
        if self.local:
            tmp = self._join(f".{name}.{uuid.uuid4().hex[:8]}")
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._join(name))
            _fsync_dir(self.root)
        else:
            self.fs.pipe_file(self._join(name), data)

    def prune(self, keep: int | None = None) -> list[int]:
        """Delete all but the newest ``keep`` versions (never the latest or the pinned one)."""
        keep = keep if keep is not None else self.keep_versions
        versions = self.versions()
        protected = {self.latest_version(), self.pinned()}
        doomed = [v for v in versions[:-keep] if v not in protected] if keep > 0 else []
        for v in doomed:
            if self.local:
                shutil.rmtree(self.version_dir(v), ignore_errors=True)
            else:
                self.fs.rm(self.version_dir(v), recursive=True)
        return doomed


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
