"""Every snapshot-store backend keeps the same promises (local directory, fsspec memory://)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from stream_rec.model import apply_delta, delta_from_state
from stream_rec.snapshot import CorruptSnapshot, Fenced, SnapshotStore
from stream_rec.snapshot.lease import Lease
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
    name = store.read_manifest(2).data_file
    data, manifest = vdir + "/" + name, vdir + "/manifest.json"
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
        text = fs.cat_file(manifest).replace(f'"{name}"'.encode(),
                                             b'"../v000000000001/data.bin"')
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


def _twin(store: SnapshotStore) -> SnapshotStore:
    """A second writer's view of the same store."""
    return SnapshotStore(store.url, keep_versions=store.keep_versions)


def test_two_writers_never_commit_one_version(store: SnapshotStore) -> None:
    base = trained_state(200)
    parent = store.publish(base, offsets={"t": {0: 1}}, watermark=1)
    other = _twin(store)
    ours, theirs = trained_state(300), trained_state(300, seed=4)
    store.publish_delta(delta_from_state(ours, None, None), parent=parent,
                        offsets={"t": {0: 2}}, watermark=2)
    with pytest.raises(Fenced):
        other.publish_delta(delta_from_state(theirs, None, None), parent=parent,
                            offsets={"t": {0: 9}}, watermark=9)
    assert store.versions() == [1, 2]
    snap = other.load(2)
    assert snap is not None and snap.manifest.offsets == {"t": {0: 2}}
    _same(snap.state, ours)
    # the loser left no bytes behind in the winner's folder
    assert len(store.backend.ls(store.version_dir(2))) == 2


def test_latest_only_moves_forward(store: SnapshotStore) -> None:
    state = trained_state(200)
    v1 = store.publish(state, offsets={}, watermark=None)
    _twin(store).publish(state, offsets={}, watermark=None, parent=v1.version, version=2)
    store.backend.replace(store._join("LATEST"), b"1")   # a slow writer's late pointer move
    assert store.latest_version() == 2
    store._advance_latest(1)
    assert store.backend.cat(store._join("LATEST")) == b"1"
    store._advance_latest(2)
    assert store.backend.cat(store._join("LATEST")) == b"2"


def test_the_writer_lease_is_exclusive_and_expires(store: SnapshotStore) -> None:
    a = Lease(store.backend, "a", ttl_s=0.3)
    b = Lease(store.backend, "b", ttl_s=0.3)
    assert a.try_acquire() and a.held()
    assert not b.try_acquire()
    assert a.renew()
    time.sleep(0.4)                       # a stops renewing: its lease expires
    assert not a.held()
    assert b.try_acquire() and b.held()
    assert not a.renew()                  # a newer epoch exists: a has lost it for good
    current = b.current()
    assert current is not None and current.holder == "b"
    b.release()
    assert a.try_acquire()                # released: no wait for expiry


def test_standbys_racing_for_an_expired_lease_get_one_winner(store: SnapshotStore) -> None:
    Lease(store.backend, "gone", ttl_s=0.01).try_acquire()
    time.sleep(0.05)
    racers = [Lease(store.backend, f"s{i}", ttl_s=5) for i in range(4)]
    won = []
    barrier = threading.Barrier(len(racers))

    def race(lease: Lease) -> None:
        barrier.wait()
        if lease.try_acquire():
            won.append(lease.holder)

    threads = [threading.Thread(target=race, args=(x,)) for x in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
