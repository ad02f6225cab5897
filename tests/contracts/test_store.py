"""Every snapshot-store backend keeps the same promises (local directory, fsspec memory://)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from stream_rec.model import apply_delta, delta_from_state
from stream_rec.snapshot import CorruptSnapshot, SnapshotStore
from tests.support import trained_state

BACKENDS = ["local", "memory"]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SnapshotStore]:
    if request.param == "local":
        yield SnapshotStore(tmp_path / "store", keep_versions=3)
        return
    url = f"memory://contract-{uuid.uuid4().hex[:8]}/store"
    s = SnapshotStore(url, keep_versions=3)
    yield s
    s.fs.rm(s.root, recursive=True)


def _same(a, b) -> None:
    assert a.user_ids == b.user_ids and a.item_ids == b.item_ids
    assert set(a.tables) == set(b.tables)
    for name, arr in b.tables.items():
        np.testing.assert_array_equal(a.tables[name], arr, err_msg=name)


def test_round_trip_is_exact(store: SnapshotStore) -> None:
    state = trained_state()
    m = store.publish(state, offsets={"t": {0: 10, 1: 5}}, watermark=123)
    snap = store.load()
    assert snap is not None and snap.version == m.version == 1
    assert snap.manifest.offsets == {"t": {0: 10, 1: 5}} and snap.manifest.watermark == 123
    _same(snap.state, state)
    assert snap.manifest.counts["events"] == 600


def test_a_delta_chain_loads_as_the_state_it_describes(store: SnapshotStore) -> None:
    base, newer = trained_state(300), trained_state(600)
    full = store.publish(base, offsets={"t": {0: 3}}, watermark=1)
    users = np.arange(0, len(newer.user_ids), 2)
    items = np.arange(len(newer.item_ids))
    delta = delta_from_state(newer, users, items)
    store.publish_delta(delta, parent=full, offsets={"t": {0: 6}}, watermark=2, events=600)
    snap = store.load()
    assert snap is not None and snap.manifest.kind == "delta" and snap.manifest.parent == 1
    _same(snap.state, apply_delta(base, delta))
    held = store.load(1)
    assert held is not None
    over = store.load(2, base=held)   # a reader holding v1 reads only the delta
    assert over is not None and over.base_version == 1
    _same(over.state, snap.state)


def test_latest_moves_and_retention_prunes(store: SnapshotStore) -> None:
    state = trained_state(200)
    for _ in range(5):
        store.publish(state, offsets={}, watermark=None)
    assert store.latest_version() == 5
    assert store.versions() == [3, 4, 5]


def test_a_pinned_version_is_served_and_kept(store: SnapshotStore) -> None:
    state = trained_state(200)
    store.publish(state, offsets={}, watermark=None)
    store.pin(1)
    for _ in range(4):
        store.publish(state, offsets={}, watermark=None)
    assert store.serving_version() == 1 and 1 in store.versions()
    store.unpin()
    store.prune()
    assert store.serving_version() == 5 and 1 not in store.versions()


def test_empty_store_loads_nothing(store: SnapshotStore) -> None:
    assert store.load() is None and store.load_latest_valid() is None


def _corrupt(store: SnapshotStore, how: str) -> None:
    vdir = store.version_dir(2)
    data, manifest = vdir + "/data.bin", vdir + "/manifest.json"
    fs = store.fs
    if how == "truncate":
        fs.pipe_file(data, fs.cat_file(data)[:-7])
    elif how == "flip":
        raw = bytearray(fs.cat_file(data))
        raw[len(raw) // 2] ^= 0x01
        fs.pipe_file(data, bytes(raw))
    elif how == "missing":
        fs.rm(data)
    elif how == "no-manifest":
        fs.rm(manifest)
    elif how == "escape":
        text = fs.cat_file(manifest).replace(b'"data.bin"', b'"../v000000000001/data.bin"')
        fs.pipe_file(manifest, text)
    elif how == "entry-out-of-bounds":
        fs.pipe_file(manifest, fs.cat_file(manifest).replace(b'"offset": 0',
                                                             b'"offset": 99999999'))
    else:  # pragma: no cover
        raise AssertionError(how)


def check_refused_and_previous_kept(store: SnapshotStore,
                                    corrupt: Callable[[SnapshotStore], None]) -> None:
    """Publish v1 and v2, ``corrupt`` v2: it is refused and v1 is what restores."""
    state = trained_state(200)
    store.publish(state, offsets={"t": {0: 1}}, watermark=1)
    store.publish(state, offsets={"t": {0: 2}}, watermark=2)
    corrupt(store)
    with pytest.raises(CorruptSnapshot):
        store.load(2)
    snap = store.load_latest_valid()
    assert snap is not None and snap.version == 1


@pytest.mark.parametrize("how", ["truncate", "flip", "missing", "no-manifest", "escape",
                                 "entry-out-of-bounds"])
def test_corrupt_versions_are_refused_and_the_previous_one_kept(store: SnapshotStore,
                                                                how: str) -> None:
    check_refused_and_previous_kept(store, lambda s: _corrupt(s, how))
