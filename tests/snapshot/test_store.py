"""Snapshot store: atomic publish, verified load, refusal of torn or hostile versions."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest

from stream_rec import datasets
from stream_rec.model import ModelConfig, StreamingModel
from stream_rec.snapshot import CorruptSnapshot, SnapshotStore


def trained_state(n: int = 600, seed: int = 0):
    """A small state whose vectors were really trained (chunks of 100 events)."""
    model = StreamingModel(ModelConfig(dim=16, seed=seed, train_chunk=100), device="cpu")
    evs = list(itertools.islice(datasets.iter_synthetic(n_users=50, n_items=80, seed=seed), n))
    for chunk in range(0, n, 200):
        batch = evs[chunk:chunk + 200]
        model.learn([e["user_id"] for e in batch], [e["item_id"] for e in batch],
                    np.array([e["ts"] for e in batch], dtype=np.int64))
    return model.state()


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "store", keep_versions=3)


def test_round_trip_is_exact(store: SnapshotStore) -> None:
    state = trained_state()
    m = store.publish(state, offsets={"t": {0: 10, 1: 5}}, watermark=123)
    snap = store.load()
    assert snap is not None and snap.version == m.version == 1
    assert snap.manifest.offsets == {"t": {0: 10, 1: 5}} and snap.manifest.watermark == 123
    assert snap.state.user_ids == state.user_ids and snap.state.item_ids == state.item_ids
    assert set(snap.state.tables) == set(state.tables)
    for name, arr in state.tables.items():
        np.testing.assert_array_equal(snap.state.tables[name], arr)
    assert snap.manifest.counts["events"] == 600


def test_latest_moves_and_retention_prunes(store: SnapshotStore) -> None:
    state = trained_state(200)
    for _ in range(5):
        store.publish(state, offsets={}, watermark=None)
    assert store.latest_version() == 5
    assert store.versions() == [3, 4, 5]


def test_empty_store_loads_nothing(store: SnapshotStore) -> None:
    assert store.load() is None and store.load_latest_valid() is None


def _corrupt(store: SnapshotStore, how: str) -> None:
    vdir = Path(store.version_dir(2))
    victim = vdir / "data.bin"
    if how == "truncate":
        victim.write_bytes(victim.read_bytes()[:-7])
    elif how == "flip":
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        victim.write_bytes(bytes(raw))
    elif how == "missing":
        victim.unlink()
    elif how == "escape":
        manifest = (vdir / "manifest.json").read_text()
        (vdir / "manifest.json").write_text(manifest.replace('"data.bin"',
                                                             '"../v000000000001/data.bin"'))
    elif how == "absolute":
        manifest = (vdir / "manifest.json").read_text()
        (vdir / "manifest.json").write_text(manifest.replace('"data.bin"', '"/etc/passwd"'))
    elif how == "entry-out-of-bounds":
        manifest = (vdir / "manifest.json").read_text()
        (vdir / "manifest.json").write_text(manifest.replace('"offset": 0', '"offset": 99999999'))
    elif how == "symlink":
        outside = Path(store.root).parent / "outside.npy"
        outside.write_bytes(victim.read_bytes())
        victim.unlink()
        os.symlink(outside, victim)
    elif how == "no-manifest":
        (vdir / "manifest.json").unlink()


@pytest.mark.parametrize("how", ["truncate", "flip", "missing", "escape", "absolute",
                                 "entry-out-of-bounds", "symlink", "no-manifest"])
def test_corrupt_versions_are_refused_and_the_previous_one_kept(store: SnapshotStore,
                                                                how: str) -> None:
    state = trained_state(200)
    store.publish(state, offsets={"t": {0: 1}}, watermark=1)
    store.publish(state, offsets={"t": {0: 2}}, watermark=2)
    _corrupt(store, how)
    with pytest.raises(CorruptSnapshot):
        store.load(2)
    snap = store.load_latest_valid()
    assert snap is not None and snap.version == 1


def test_fsspec_memory_store_round_trip() -> None:
    store = SnapshotStore("memory://stream-rec-test/store")
    state = trained_state(200)
    store.publish(state, offsets={"t": {0: 7}}, watermark=9)
    snap = store.load()
    assert snap is not None and snap.manifest.offsets == {"t": {0: 7}}
    np.testing.assert_array_equal(snap.state.tables["item.vectors"],
                                  state.tables["item.vectors"])
