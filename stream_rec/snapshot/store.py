"""Versioned, atomically published snapshots: the worker's checkpoint, serving's input.

Layout of a store (a local directory or an fsspec URL)::

    <root>/versions/v000000000042/manifest.json     # version, kind, parent, offsets, watermark,
                                                     #   counts, config, sha256 of the data file,
                                                     #   and where each table lies in it
    <root>/versions/v000000000042/data-<token>.bin  # the tables (.npy) and ids (.json), packed
    <root>/LATEST                                    # "42": moved last, only forward
    <root>/PIN                                       # optional: serve this version instead
    <root>/lease/epoch-NNNNNNNNNNNN.json             # the writer's lease (see lease.py)

**One writer per store, provably.** A version's data file is written under a
name no other writer uses; the version is *committed* by the exclusive
creation of its ``manifest.json`` (``O_EXCL``-like, see :mod:`.backend`). Two
writers that both try to commit version V: one wins, the other gets
:class:`Fenced` and publishes nothing more. A writer numbers its versions
``parent + 1`` (its first one after a restore: one past the newest version it
can see), so a second writer that forked from an older version collides
instead of interleaving. A reader sees a whole version or none: it lists
only committed manifests, verifies every checksum before using a version,
and refuses anything torn, corrupt or naming a path outside its directory.
``LATEST`` is a hint that only moves forward: readers also look past it for
committed versions.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_rec.faults import failpoint
from stream_rec.model import ModelState, StateDelta, apply_delta, merge_deltas, quant
from stream_rec.model import tables as T

from .backend import Backend, open_backend
from .manifest import FORMAT, CorruptSnapshot, Manifest
from .parts import delta_parts, state_parts, unpack

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_VERSION_DIR = re.compile(r"v(\d{12})$")
# Leftovers of a crashed write (temporary files, data files no manifest names)
# are removed by the lease holder once they are this old.
STALE_AFTER_S = 600.0

__all__ = ["FORMAT", "CorruptSnapshot", "Fenced", "Manifest", "Snapshot", "SnapshotStore"]


class Fenced(RuntimeError):
    """Another writer committed the version this one tried to: this writer must stop."""


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


class SnapshotStore:
    """A store of numbered versions at ``root`` (path or fsspec URL).

    ``vector_dtype`` is how this store object writes the serving-only vector
    tables (``item.vectors``: float32, float16, or int8 with a scale per row);
    readers take any.
    """

    def __init__(self, root: str | os.PathLike[str], keep_versions: int = 20,
                 writer: str = "", *, vector_dtype: quant.Encoding = "float32") -> None:
        if vector_dtype not in quant.DTYPES:
            raise ValueError(f"vector_dtype {vector_dtype!r} is not one of {quant.DTYPES}")
        self.url = str(root)
        self.keep_versions = keep_versions
        self.vector_dtype = vector_dtype
        self.backend: Backend = open_backend(self.url)
        self.fs, self.root = self.backend.fs, self.backend.root
        self.writer = writer  # recorded in the manifests this store object commits
        self.backend.makedirs(self._join("versions"))
        self._parents: dict[int, int | None] = {}  # version -> parent (None: full), for prune

    # -- paths -----------------------------------------------------------
    def _join(self, *parts: str) -> str:
        return self.backend.join(*parts)

    def version_dir(self, version: int) -> str:
        return self._join("versions", f"v{version:012d}")

    def _manifest_path(self, version: int) -> str:
        return self.version_dir(version) + "/" + MANIFEST

    # -- reading ---------------------------------------------------------
    def versions(self) -> list[int]:
        """Committed versions (those with a manifest), oldest first."""
        out = []
        for path in self.backend.glob(self._join("versions", "v*", MANIFEST)):
            m = _VERSION_DIR.search(path.rsplit("/", 2)[-2])
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def latest_version(self) -> int | None:
        """The newest committed version: ``LATEST``, or past it if a newer one is committed.

        ``LATEST`` is moved after a commit, so it may lag (a writer died in
        between) or, with two writers racing, be set back by the slower one;
        committed versions are numbered consecutively, so a reader probes forward.
        """
        try:
            raw = self.backend.cat(self._join("LATEST"))
        except FileNotFoundError:
            versions = self.versions()
            return versions[-1] if versions else None
        try:
            version = int(raw.strip())
        except ValueError:
            log.warning("LATEST pointer is unreadable: %r", raw[:40])
            versions = self.versions()
            return versions[-1] if versions else None
        while self.backend.exists(self._manifest_path(version + 1)):
            version += 1
        return version

    def pinned(self) -> int | None:
        """The version serving is pinned to, if an operator pinned one."""
        try:
            return int(self.backend.cat(self._join("PIN")).strip())
        except (FileNotFoundError, ValueError):
            return None

    def serving_version(self) -> int | None:
        """What readers should serve: the pinned version, else the latest."""
        pin = self.pinned()
        return pin if pin is not None else self.latest_version()

    def pin(self, version: int) -> None:
        """Pin readers to ``version`` (verified first); retention keeps it while pinned."""
        self.load(version)  # raises CorruptSnapshot / FileNotFoundError if unusable
        self.backend.replace(self._join("PIN"), str(version).encode())

    def unpin(self) -> None:
        self.backend.rm(self._join("PIN"))

    def _check_inside(self, version: int, path: str) -> None:
        """Refuse a version directory, or a file in it, that resolves out of the store.

        A symlinked version directory (or manifest) would make the store serve,
        and the worker restore, whatever lies at the other end.
        """
        vdir = self.version_dir(version)
        if not (self.backend.resolves_inside(vdir, self._join("versions"))
                and self.backend.resolves_inside(path, vdir)):
            raise CorruptSnapshot(f"{os.path.basename(path)} in v{version} resolves outside "
                                  "the store")

    def read_manifest(self, version: int) -> Manifest:
        path = self._manifest_path(version)
        self._check_inside(version, path)
        try:
            manifest = Manifest.from_json(self.backend.cat(path))
        except FileNotFoundError:
            raise CorruptSnapshot(f"version {version} has no manifest") from None
        if manifest.version != version:
            raise CorruptSnapshot(f"manifest of v{version} claims version {manifest.version}")
        return manifest

    def _read_verified(self, version: int, name: str, meta: dict[str, Any]) -> bytes:
        path = self.version_dir(version) + "/" + name
        self._check_inside(version, path)
        try:
            raw = self.backend.cat(path)
        except FileNotFoundError:
            raise CorruptSnapshot(f"v{version} is missing {name}") from None
        if len(raw) != meta.get("bytes") or hashlib.sha256(raw).hexdigest() != meta.get("sha256"):
            raise CorruptSnapshot(f"checksum mismatch for {name} in v{version}")
        return raw

    def _read_files(self, manifest: Manifest, only: Collection[str] | None = None
                    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """A version's parts, verified: (json documents, npy tables, those in ``only``)."""
        blobs = {name: self._read_verified(manifest.version, name, meta)
                 for name, meta in manifest.files.items()}
        return unpack(manifest, blobs[manifest.data_file], only)

    def load_delta(self, version: int) -> tuple[Manifest, StateDelta]:
        """The rows a delta version changed over its parent, verified."""
        manifest = self.read_manifest(version)
        if manifest.kind != "delta":
            raise ValueError(f"version {version} is a {manifest.kind} version")
        return manifest, self._read_delta(manifest)

    def _read_delta(self, manifest: Manifest, only: Collection[str] | None = None
                    ) -> StateDelta:
        """The verified delta a delta ``manifest`` describes (tables in ``only``)."""
        docs, tables = self._read_files(manifest, only)
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

    def load(self, version: int | None = None, *, base: Snapshot | None = None,
             tables: Collection[str] | None = None) -> Snapshot | None:
        """Load and verify ``version`` (default: latest); ``None`` for an empty store.

        A delta is applied over its chain. With ``base`` (a loaded version on
        that chain, e.g. the one being served) only the deltas after it are read.
        ``tables`` (e.g. :data:`~stream_rec.model.tables.SERVED`) are the only
        tables decoded, the whole data file being verified all the same; a
        ``base`` must have been loaded with the same ones.
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
            docs, parts = self._read_files(full, tables)
            state = ModelState(config=full.config, user_ids=docs.get("user_ids", []),
                               item_ids=docs.get("item_ids", []), tables=parts)
            start = 1
        merged: StateDelta | None = None
        for i in range(start, len(manifests), 32):  # a few at a time: memory stays near one delta
            # from the manifests chain() read, not read again
            batch = [self._read_delta(m, tables) for m in manifests[i:i + 32]]
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
        """One past the newest committed version: where a writer starts after a restore."""
        existing = self.versions()
        return (existing[-1] if existing else 0) + 1

    def publish(self, state: ModelState, *, offsets: dict[str, dict[int, int]],
                watermark: int | None, parent: int | None = None,
                version: int | None = None,
                topic_ids: dict[str, str] | None = None) -> Manifest:
        """Write ``state`` as a new full version and move ``LATEST`` to it.

        ``version`` defaults to :meth:`next_version`; raises :class:`Fenced`
        when another writer committed that version first.
        """
        version = version if version is not None else self.next_version()
        files, fmt = state_parts(state, self.vector_dtype)
        counts = {"users": len(state.user_ids), "items": len(state.item_ids)}
        if T.USER_EVENTS in state.tables:
            counts["events"] = int(state.tables[T.USER_EVENTS].sum())
        manifest = Manifest(
            version=version, parent=parent, kind="full", created_at=time.time(),
            offsets=offsets, watermark=watermark, counts=counts, config=dict(state.config),
            base=version, chain=0, format=fmt, topic_ids=dict(topic_ids or {}))
        return self._commit_version(manifest, files)

    def publish_delta(self, delta: StateDelta, *, parent: Manifest,
                      offsets: dict[str, dict[int, int]], watermark: int | None,
                      events: int | None = None, version: int | None = None,
                      topic_ids: dict[str, str] | None = None) -> Manifest:
        """Write the rows in ``delta`` as version ``parent + 1`` and move ``LATEST``.

        Raises :class:`Fenced` when another writer committed that version first.
        """
        version = version if version is not None else parent.version + 1
        files, fmt = delta_parts(delta, self.vector_dtype)
        counts = {"users": delta.n_users, "items": delta.n_items,
                  "users_changed": len(delta.user_rows), "items_changed": len(delta.item_rows)}
        if events is not None:
            counts["events"] = events
        manifest = Manifest(
            version=version, parent=parent.version, kind="delta", created_at=time.time(),
            offsets=offsets, watermark=watermark, counts=counts, config=dict(delta.config),
            base=parent.base if parent.base is not None else parent.version,
            chain=parent.chain + 1, format=fmt, topic_ids=dict(topic_ids or {}))
        return self._commit_version(manifest, files)

    def _commit_version(self, manifest: Manifest, parts: dict[str, bytes]) -> Manifest:
        """Write the data file, commit the manifest exclusively, move ``LATEST``, prune.

        All parts go into one data file so that a version costs two file
        fsyncs whatever the number of tables. The data file's name is unique to
        this attempt, so a losing writer never touches the winner's bytes. A
        retry after an error that hid a successful commit finds its own
        manifest (same data checksum) and counts as a success.
        """
        offset = 0
        digest = hashlib.sha256()
        manifest.entries = {}
        for name, data in parts.items():
            manifest.entries[name] = {"offset": offset, "bytes": len(data)}
            digest.update(data)
            offset += len(data)
        data_name = f"data-{uuid.uuid4().hex[:16]}.bin"
        sha = digest.hexdigest()
        manifest.files = {data_name: {"sha256": sha, "bytes": offset}}
        manifest.writer = self.writer
        vdir = self.version_dir(manifest.version)
        self.backend.makedirs(vdir)
        self.backend.write_new(vdir + "/" + data_name, parts.values(),
                               each=lambda: failpoint("during_write"))
        if not self.backend.create(vdir + "/" + MANIFEST, manifest.to_json()):
            theirs = self._committed_digest(manifest.version)
            self.backend.rm(vdir + "/" + data_name)
            if theirs != sha:
                raise Fenced(f"version {manifest.version} was committed by another writer: "
                             "this one stops publishing")
            manifest = self.read_manifest(manifest.version)  # our own earlier attempt
        failpoint("after_rename")  # committed, LATEST not yet moved
        self._advance_latest(manifest.version)
        self._parents[manifest.version] = manifest.parent if manifest.kind == "delta" else None
        self.prune()
        return manifest

    def _committed_digest(self, version: int) -> str | None:
        try:
            files = self.read_manifest(version).files
        except CorruptSnapshot:
            return None
        return next(iter(files.values()), {}).get("sha256") if len(files) == 1 else None

    def _advance_latest(self, version: int) -> None:
        """Move ``LATEST`` to ``version`` unless it already names a newer one."""
        try:
            current = int(self.backend.cat(self._join("LATEST")).strip())
        except (FileNotFoundError, ValueError):
            current = -1
        if version > current:
            self.backend.replace(self._join("LATEST"), str(version).encode())

    # -- retention ---------------------------------------------------------
    def prune(self, keep: int | None = None) -> list[int]:
        """Apply retention: keep the newest ``keep`` versions and every version their
        chains need (back to each one's full base), the latest and the pinned one
        with their chains; delete the rest, oldest first, and the leftovers of
        crashed writes below them."""
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
            self.backend.rm_tree(self.version_dir(v))
        self._sweep_leftovers(min(needed) if needed else None)
        return doomed

    def _sweep_leftovers(self, oldest_kept: int | None) -> None:
        """Remove what crashed writes left: temporary files, and data files no
        committed manifest names (in version folders older than the oldest kept
        one, or once ``STALE_AFTER_S`` old -- a write in progress is younger)."""
        now = time.time()
        for path in self.backend.ls(self.root):
            if ".tmp-" in path.rsplit("/", 1)[-1] and self._stale(path, now):
                self.backend.rm(path)  # a pointer replace that crashed
        committed = set(self.versions())
        for path in self.backend.ls(self._join("versions")):
            m = _VERSION_DIR.search(path)
            if m is None:
                if ".tmp" in path.rsplit("/", 1)[-1] and self._stale(path, now):
                    self.backend.rm_tree(path)  # a temporary folder of an older format
                continue
            v = int(m.group(1))
            if v in committed:
                for f in self.backend.ls(path):
                    if ".tmp-" in f.rsplit("/", 1)[-1] and self._stale(f, now):
                        self.backend.rm(f)
                continue
            if (oldest_kept is not None and v < oldest_kept) or self._stale(path, now):
                self.backend.rm_tree(path)

    def _stale(self, path: str, now: float) -> bool:
        mtime = self.backend.mtime(path)
        return mtime is not None and now - mtime > STALE_AFTER_S

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
