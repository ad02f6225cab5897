"""Versioned, atomically published snapshots: the worker's checkpoint, serving's input.

Layout of a store (a local directory or an fsspec URL)::

    <root>/versions/v000000000042/manifest.json   # version, kind, parent, offsets, watermark,
                                                   #   counts, config, sha256 per file, and
                                                   #   where each table lies in data.bin
    <root>/versions/v000000000042/data.bin        # the tables (.npy) and ids (.json), packed
    <root>/LATEST                                  # "42": moved last
    <root>/PIN                                     # optional: serve this version instead

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
from typing import Any

import fsspec
import numpy as np
import orjson
from fsspec.implementations.local import LocalFileSystem

from stream_rec.faults import failpoint
from stream_rec.model import ModelState, StateDelta, apply_delta, merge_deltas
from stream_rec.model import tables as T

log = logging.getLogger(__name__)

FORMAT = 1
DATA_FILE = "data.bin"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
_VERSION_DIR = re.compile(r"^v(\d{12})$")


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
    # Logical parts (tables, ids) packed into ``data.bin``: name -> offset, bytes.
    entries: dict[str, dict[str, int]] = field(default_factory=dict)
    base: int | None = None  # the full version at the root of this version's chain
    chain: int = 0  # deltas between ``base`` and this version (0 for a full one)
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
        if manifest.kind not in ("full", "delta") or (
                manifest.kind == "delta" and (manifest.parent is None or manifest.base is None)):
            raise CorruptSnapshot(f"manifest of kind {manifest.kind!r} lacks its parent")
        for name in [*manifest.files, *manifest.entries]:
            if not _SAFE_NAME.match(name) or name in (".", ".."):
                raise CorruptSnapshot(f"manifest names an unsafe path {name!r}")
        return manifest


@dataclass
class Snapshot:
    manifest: Manifest
    state: ModelState
    # Item rows changed since the ``base`` it was loaded over (None: loaded whole).
    changed_items: np.ndarray | None = None
    base_version: int | None = None

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
        self._parents: dict[int, int | None] = {}  # version -> parent (None: full), for prune

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

    def _check_inside(self, version: int, path: str) -> None:
        """Refuse a version directory, or a file in it, that resolves out of the store.

        A symlinked version directory (or manifest) would make the store serve,
        and the worker restore, whatever lies at the other end.
        """
        if not self.local:
            return
        versions = os.path.realpath(self._join("versions"))
        vdir = os.path.realpath(self.version_dir(version))
        if os.path.dirname(vdir) != versions or os.path.dirname(os.path.realpath(path)) != vdir:
            raise CorruptSnapshot(f"{os.path.basename(path)} in v{version} resolves outside "
                                  "the store")

    def read_manifest(self, version: int) -> Manifest:
        path = self.version_dir(version) + "/manifest.json"
        self._check_inside(version, path)
        try:
            manifest = Manifest.from_json(self.fs.cat_file(path))
        except FileNotFoundError:
            raise CorruptSnapshot(f"version {version} has no manifest") from None
        if manifest.version != version:
            raise CorruptSnapshot(f"manifest of v{version} claims version {manifest.version}")
        return manifest

    def _read_verified(self, version: int, name: str, meta: dict[str, Any]) -> bytes:
        path = self.version_dir(version) + "/" + name
        self._check_inside(version, path)
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            raise CorruptSnapshot(f"v{version} is missing {name}") from None
        if len(raw) != meta.get("bytes") or hashlib.sha256(raw).hexdigest() != meta.get("sha256"):
            raise CorruptSnapshot(f"checksum mismatch for {name} in v{version}")
        return raw

    def _read_files(self, manifest: Manifest) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Every part of a version, verified: (json documents, npy tables)."""
        blobs = {name: self._read_verified(manifest.version, name, meta)
                 for name, meta in manifest.files.items()}
        data = blobs.get(DATA_FILE, b"")
        docs: dict[str, Any] = {}
        tables: dict[str, np.ndarray] = {}
        for name, where in manifest.entries.items():
            start, size = int(where.get("offset", -1)), int(where.get("bytes", -1))
            if start < 0 or size < 0 or start + size > len(data):
                raise CorruptSnapshot(f"{name} lies outside data.bin of v{manifest.version}")
            raw = memoryview(data)[start:start + size]
            try:
                if name.endswith(".json"):
                    docs[name[:-5]] = orjson.loads(raw)
                elif name.endswith(".npy"):
                    tables[name[:-4]] = np.load(io.BytesIO(raw), allow_pickle=False)
            except ValueError as exc:
                raise CorruptSnapshot(
                    f"{name} in v{manifest.version} does not parse: {exc}") from None
        return docs, tables

    def load_delta(self, version: int) -> tuple[Manifest, StateDelta]:
        """The rows a delta version changed over its parent, verified."""
        manifest = self.read_manifest(version)
        if manifest.kind != "delta":
            raise ValueError(f"version {version} is a {manifest.kind} version")
        return manifest, self._read_delta(manifest)

    def _read_delta(self, manifest: Manifest) -> StateDelta:
        """The verified delta a delta ``manifest`` describes."""
        docs, tables = self._read_files(manifest)
        try:
            delta = StateDelta(
                config=manifest.config, n_users=int(manifest.counts["users"]),
                n_items=int(manifest.counts["items"]),
                user_rows=tables.pop("delta.user_rows"), item_rows=tables.pop("delta.item_rows"),
                user_ids=docs["user_ids"], item_ids=docs["item_ids"],
                seen_indptr=tables.pop("delta.seen_indptr"),
                seen_items=tables.pop("delta.seen_items"), tables=tables)
        except KeyError as exc:
            raise CorruptSnapshot(f"delta v{manifest.version} lacks {exc}") from None
        return delta

    def chain(self, version: int, *, stop_at: int | None = None) -> list[Manifest]:
        """Manifests from the full base of ``version`` up to ``version`` itself.

        With ``stop_at`` (a version the caller already holds), the walk ends
        when it reaches that version and only the manifests after it are
        returned: a reader a few deltas behind reads a few manifests, not the
        whole chain back to the full base.
        """
        out = [self.read_manifest(version)]
        while out[-1].kind == "delta":
            parent = out[-1].parent
            assert parent is not None
            if len(out) > 100_000 or parent >= out[-1].version:
                raise CorruptSnapshot(f"v{version} has a broken parent chain")
            if parent == stop_at:
                break
            out.append(self.read_manifest(parent))
        return out[::-1]

    def load(self, version: int | None = None, *, base: Snapshot | None = None
             ) -> Snapshot | None:
        """Load and verify ``version`` (default: latest); ``None`` for an empty store.

        A delta is applied over its chain. With ``base`` (a loaded version on
        that chain, e.g. the one being served) only the deltas after it are read.
        """
        if version is None:
            version = self.latest_version()
            if version is None:
                return None
        if base is not None and base.version == version:
            return Snapshot(self.read_manifest(version), base.state,
                            changed_items=np.zeros(0, np.int64), base_version=version)
        held = base.version if base is not None and base.version < version else None
        manifests = self.chain(version, stop_at=held)
        start = 0
        state: ModelState | None = None
        from_base = False
        if base is not None and manifests[0].kind == "delta" and manifests[0].parent == held:
            state, from_base = base.state, True  # the chain passes through the version held
        if state is None:
            full = manifests[0]
            docs, tables = self._read_files(full)
            state = ModelState(config=full.config, user_ids=docs.get("user_ids", []),
                               item_ids=docs.get("item_ids", []), tables=tables)
            start = 1
        merged: StateDelta | None = None
        for i in range(start, len(manifests), 32):  # a few at a time: memory stays near one delta
            # from the manifests chain() read, not read again
            batch = [self._read_delta(m) for m in manifests[i:i + 32]]
            merged = merge_deltas([merged, *batch] if merged else batch)
        if merged is not None:
            try:
                state = apply_delta(state, merged)
            except (ValueError, KeyError, IndexError) as exc:
                raise CorruptSnapshot(
                    f"deltas up to v{manifests[-1].version} do not apply: {exc}") from None
        if from_base and base is not None:
            rows = np.unique(merged.item_rows) if merged is not None else np.zeros(0, np.int64)
            return Snapshot(manifests[-1], state, changed_items=rows, base_version=base.version)
        return Snapshot(manifests[-1], state)

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
    def next_version(self) -> int:
        existing = self.versions()
        return (existing[-1] if existing else 0) + 1

    def publish(self, state: ModelState, *, offsets: dict[str, dict[int, int]],
                watermark: int | None, parent: int | None = None,
                version: int | None = None) -> Manifest:
        """Write ``state`` as a new full version and move ``LATEST`` to it."""
        version = version if version is not None else self.next_version()
        files: dict[str, bytes] = {
            "user_ids.json": orjson.dumps(list(state.user_ids)),
            "item_ids.json": orjson.dumps(list(state.item_ids)),
        }
        for name, arr in state.tables.items():
            files[f"{name}.npy"] = _npy_bytes(arr)
        counts = {"users": len(state.user_ids), "items": len(state.item_ids)}
        if T.USER_EVENTS in state.tables:
            counts["events"] = int(state.tables[T.USER_EVENTS].sum())
        manifest = Manifest(
            version=version, parent=parent, kind="full", created_at=time.time(),
            offsets=offsets, watermark=watermark, counts=counts, config=dict(state.config),
            base=version, chain=0)
        return self._commit_version(manifest, files)

    def publish_delta(self, delta: StateDelta, *, parent: Manifest,
                      offsets: dict[str, dict[int, int]], watermark: int | None,
                      events: int | None = None, version: int | None = None) -> Manifest:
        """Write the rows in ``delta`` as a version over ``parent`` and move ``LATEST``."""
        version = version if version is not None else self.next_version()
        files: dict[str, bytes] = {
            "user_ids.json": orjson.dumps(delta.user_ids),
            "item_ids.json": orjson.dumps(delta.item_ids),
            "delta.user_rows.npy": _npy_bytes(delta.user_rows),
            "delta.item_rows.npy": _npy_bytes(delta.item_rows),
            "delta.seen_indptr.npy": _npy_bytes(delta.seen_indptr),
            "delta.seen_items.npy": _npy_bytes(delta.seen_items),
        }
        for name, arr in delta.tables.items():
            files[f"{name}.npy"] = _npy_bytes(arr)
        counts = {"users": delta.n_users, "items": delta.n_items,
                  "users_changed": len(delta.user_rows), "items_changed": len(delta.item_rows)}
        if events is not None:
            counts["events"] = events
        manifest = Manifest(
            version=version, parent=parent.version, kind="delta", created_at=time.time(),
            offsets=offsets, watermark=watermark, counts=counts, config=dict(delta.config),
            base=parent.base if parent.base is not None else parent.version,
            chain=parent.chain + 1)
        return self._commit_version(manifest, files)

    def _commit_version(self, manifest: Manifest, parts: dict[str, bytes]) -> Manifest:
        """Pack, checksum, write atomically, move ``LATEST``, apply retention.

        All parts go into one ``data.bin`` so that a version costs two file
        fsyncs whatever the number of tables (per-file fsyncs dominated the cost
        of small deltas).
        """
        offset = 0
        digest = hashlib.sha256()
        manifest.entries = {}
        for name, data in parts.items():
            manifest.entries[name] = {"offset": offset, "bytes": len(data)}
            digest.update(data)
            offset += len(data)
        manifest.files = {DATA_FILE: {"sha256": digest.hexdigest(), "bytes": offset}}
        final = self.version_dir(manifest.version)
        tmp = self._join("versions", f".tmp-{manifest.version}-{uuid.uuid4().hex[:8]}")
        chunks = {DATA_FILE: list(parts.values()), "manifest.json": [manifest.to_json()]}
        if self.local:
            self._write_local(tmp, final, chunks)
        else:
            self.fs.makedirs(tmp, exist_ok=True)
            for name, pieces in chunks.items():
                self.fs.pipe_file(f"{tmp}/{name}", b"".join(pieces))
            self.fs.mv(tmp, final, recursive=True)
        failpoint("after_rename")  # the version is in place, LATEST not yet moved
        self._set_latest(manifest.version)
        self._parents[manifest.version] = manifest.parent if manifest.kind == "delta" else None
        self.prune()
        return manifest

    def _write_local(self, tmp: str, final: str, files: dict[str, list[bytes]]) -> None:
        os.makedirs(tmp)
        for name, pieces in files.items():
            with open(os.path.join(tmp, name), "wb") as fh:
                for piece in pieces:
                    fh.write(piece)
                    failpoint("during_write")  # a version half serialised to disk
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
        """Apply retention: keep the newest ``keep`` versions and every version their
        chains need (back to each one's full base), the latest and the pinned one
        with their chains; delete the rest, oldest first."""
        keep = keep if keep is not None else self.keep_versions
        versions = self.versions()
        wanted = set(versions[-keep:]) if keep > 0 else set(versions)
        wanted.update(v for v in (self.latest_version(), self.pinned()) if v is not None)
        needed: set[int] = set()
        for v in sorted(wanted, reverse=True):
            if v in needed:
                continue
            try:
                needed.update(self._chain_versions(v))
            except CorruptSnapshot:
                needed.add(v)  # unreadable: keep it for an operator to inspect
        doomed = [v for v in versions if v not in needed]
        for v in doomed:
            self._parents.pop(v, None)
            if self.local:
                shutil.rmtree(self.version_dir(v), ignore_errors=True)
            else:
                self.fs.rm(self.version_dir(v), recursive=True)
        return doomed

    def _chain_versions(self, version: int) -> list[int]:
        """The versions of ``version``'s chain, reading only manifests not read before.

        A committed version's parent never changes, so a writer that prunes
        after every publish reads one new manifest each time instead of the
        whole chain (up to ``full_every`` deltas) back to its full base.
        """
        out = [version]
        while True:
            v = out[-1]
            if v not in self._parents:
                m = self.read_manifest(v)
                self._parents[v] = m.parent if m.kind == "delta" else None
            parent = self._parents[v]
            if parent is None:
                return out
            if len(out) > 100_000 or parent >= v:
                raise CorruptSnapshot(f"v{version} has a broken parent chain")
            out.append(parent)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
