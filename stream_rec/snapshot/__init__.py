"""Versioned snapshots (full and delta): the worker's checkpoint and serving's input."""

from stream_rec.snapshot.delta import StateDelta, apply_delta, delta_from_state
from stream_rec.snapshot.store import CorruptSnapshot, Manifest, Snapshot, SnapshotStore

__all__ = ["CorruptSnapshot", "Manifest", "Snapshot", "SnapshotStore", "StateDelta",
           "apply_delta", "delta_from_state"]
