"""Where a store's bytes live: a local directory or any fsspec filesystem, behind one interface.

The store needs few primitives, and two of them carry its guarantees:

- :meth:`Backend.create` writes a complete file under a name that must not exist
  yet, and tells whether it won. A version is committed by creating its
  manifest this way, so two writers can never both commit one version number
  (``O_EXCL`` semantics: ``link(2)`` of a fsynced temporary file locally,
  fsspec mode ``"xb"`` elsewhere -- a conditional put on object stores).
- :meth:`Backend.replace` atomically replaces a small file (pointers, leases):
  a reader sees the old bytes or the new, never a mix.

Everything else (reads, listings, removal) is plain.
"""

from __future__ import annotations

import errno
import glob as _glob
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import fsspec
from fsspec.implementations.local import LocalFileSystem


class Backend(Protocol):
    """The file operations a snapshot store needs (paths are the backend's own)."""

    fs: Any
    root: str

    def join(self, *parts: str) -> str: ...
    def cat(self, path: str) -> bytes: ...
    def create(self, path: str, data: bytes) -> bool: ...
    def replace(self, path: str, data: bytes) -> None: ...
    def write_new(self, path: str, chunks: Iterable[bytes],
                  each: Callable[[], None] | None = None) -> None: ...
    def glob(self, pattern: str) -> list[str]: ...
    def ls(self, path: str) -> list[str]: ...
    def exists(self, path: str) -> bool: ...
    def rm(self, path: str) -> None: ...
    def rm_tree(self, path: str) -> None: ...
    def makedirs(self, path: str) -> None: ...
    def mtime(self, path: str) -> float | None: ...
    def resolves_inside(self, path: str, directory: str) -> bool: ...


def open_backend(url: str) -> Backend:
    """The backend for a local path or an fsspec URL (``memory://``, ``s3://`` …)."""
    fs, root = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return LocalBackend(fs, root)
    return FsspecBackend(fs, root)


class _Common:
    def __init__(self, fs: Any, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/") or "/"

    def join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])


class LocalBackend(_Common):
    """A local directory: fsync'd writes, ``link(2)`` for exclusive creation, real paths."""

    def cat(self, path: str) -> bytes:
        with open(path, "rb") as fh:
            return fh.read()

    def create(self, path: str, data: bytes) -> bool:
        """Write ``data`` to a fsynced temporary file, then hard-link it to ``path``.

        ``link`` fails with EEXIST when ``path`` exists, and the file it makes
        visible is already complete and durable: exclusive and atomic at once.
        """
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        _write_fsync(tmp, [data])
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        _fsync_dir(os.path.dirname(path))
        return True

    def replace(self, path: str, data: bytes) -> None:
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        _write_fsync(tmp, [data])
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path))

    def write_new(self, path: str, chunks: Iterable[bytes],
                  each: Callable[[], None] | None = None) -> None:
        """A new file written and fsynced (its name is unique: nobody else writes it)."""
        _write_fsync(path, chunks, each)
        _fsync_dir(os.path.dirname(path))

    def glob(self, pattern: str) -> list[str]:
        return sorted(_glob.glob(pattern))

    def ls(self, path: str) -> list[str]:
        try:
            return sorted(os.path.join(path, n) for n in os.listdir(path))
        except FileNotFoundError:
            return []

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def rm(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def rm_tree(self, path: str) -> None:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            self.rm(path)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def mtime(self, path: str) -> float | None:
        try:
            return os.lstat(path).st_mtime
        except FileNotFoundError:
            return None

    def resolves_inside(self, path: str, directory: str) -> bool:
        """Does ``path`` resolve (symlinks followed) to a direct child of ``directory``?"""
        real_dir = os.path.realpath(directory)
        return os.path.dirname(os.path.realpath(path)) == real_dir


class FsspecBackend(_Common):
    """Any other fsspec filesystem: each put is atomic; ``"xb"`` is the exclusive create."""

    def cat(self, path: str) -> bytes:
        return bytes(self.fs.cat_file(path))

    def create(self, path: str, data: bytes) -> bool:
        try:
            with self.fs.open(path, "xb") as fh:
                fh.write(data)
        except FileExistsError:
            return False
        except OSError as exc:  # some filesystems report the conflict as EEXIST
            if exc.errno == errno.EEXIST:
                return False
            raise
        return True

    def replace(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data)

    def write_new(self, path: str, chunks: Iterable[bytes],
                  each: Callable[[], None] | None = None) -> None:
        pieces = []
        for chunk in chunks:
            pieces.append(chunk)
            if each:
                each()
        self.fs.pipe_file(path, b"".join(pieces))

    def glob(self, pattern: str) -> list[str]:
        return sorted(str(p) for p in self.fs.glob(pattern))

    def ls(self, path: str) -> list[str]:
        try:
            return sorted(str(p).rstrip("/") for p in self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(path))

    def rm(self, path: str) -> None:
        try:
            self.fs.rm(path)
        except FileNotFoundError:
            pass

    def rm_tree(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    def mtime(self, path: str) -> float | None:
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        for key in ("mtime", "LastModified", "created"):
            value = info.get(key)
            if value is not None:
                return value.timestamp() if hasattr(value, "timestamp") else float(value)
        return None

    def resolves_inside(self, path: str, directory: str) -> bool:
        return True  # object stores and memory have no links to follow


def _write_fsync(path: str, chunks: Iterable[bytes],
                 each: Callable[[], None] | None = None) -> None:
    with open(path, "xb") as fh:
        for chunk in chunks:
            fh.write(chunk)
            if each:
                each()
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
