"""Versioned snapshots (full and delta): the worker's checkpoint and serving's input."""

from stream_rec.snapshot.store import CorruptSnapshot, Manifest, Snapshot, SnapshotStore

__all__ = ["CorruptSnapshot", "Manifest", "Snapshot", "SnapshotStore"]
