"""Versioned snapshots (full and delta): the worker's checkpoint and serving's input."""

from stream_rec.snapshot.manifest import CorruptSnapshot, Manifest
from stream_rec.snapshot.store import Fenced, Snapshot, SnapshotStore

__all__ = ["CorruptSnapshot", "Fenced", "Manifest", "Snapshot", "SnapshotStore"]
