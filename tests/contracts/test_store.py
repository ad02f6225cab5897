"""Every snapshot-store backend keeps the same promises (local directory, fsspec memory://),
whichever vector dtype it writes (float32, float16, int8 with per-row scales)."""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest

from stream_rec.model import ModelState, apply_delta, delta_from_state, quant
from stream_rec.model import tables as T
from stream_rec.snapshot import CorruptSnapshot, Fenced, SnapshotStore
from stream_rec.snapshot.lease import Lease
from tests import support

BACKENDS = ["local", "memory"]


@functools.cache
def trained_state(n: int = 600, seed: int = 0) -> ModelState:
    """Shared across the checks (no check mutates a state)."""
    return support.trained_state(n, seed)


@pytest.fixture(params=[(b, d) for b in BACKENDS for d in quant.DTYPES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SnapshotStore]:
    backend, dtype = request.param
    if backend == "local":
        yield SnapshotStore(tmp_path / "store", keep_versions=3, vector_dtype=dtype)
        return
    url = f"memory://contract-{uuid.uuid4().hex[:8]}/store"
    s = SnapshotStore(url, keep_versions=3, vector_dtype=dtype)
    yield s
    s.fs.rm(s.root, recursive=True)


def _same(a: ModelState, b: ModelState, dtype: quant.Encoding = "float32") -> None:
    """``a`` is exactly ``b`` as a store writing ``dtype`` holds it: every table bitwise,
    the serving-only vectors in that encoding (codes and scales bitwise)."""
    assert a.user_ids == b.user_ids and a.item_ids == b.item_ids
    want = quant.encoded(b.tables, quant.STORED, dtype)
    assert set(a.tables) == set(want)
    for name, arr in want.items():
        assert a.tables[name].dtype == arr.dtype, name
        np.testing.assert_array_equal(a.tables[name], arr, err_msg=name)


def test_round_trip_is_exact(store: SnapshotStore) -> None:
    state = trained_state()
    m = store.publish(state, offsets={"t": {0: 10, 1: 5}}, watermark=123)
    snap = store.load()
    assert snap is not None and snap.version == m.version == 1
    assert snap.manifest.offsets == {"t": {0: 10, 1: 5}} and snap.manifest.watermark == 123
    _same(snap.state, state, store.vector_dtype)
    assert snap.manifest.format == (2 if store.vector_dtype == "float32" else 3)
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
    _same(snap.state, apply_delta(base, delta), store.vector_dtype)
    held = store.load(1)
    assert held is not None
    over = store.load(2, base=held)   # a reader holding v1 reads only the delta
    assert over is not None and over.base_version == 1
    _same(over.state, snap.state, store.vector_dtype)


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


def _drop_part(store: SnapshotStore, part: str) -> None:
    """v2's manifest no longer names ``part`` (its bytes stay in the data file)."""
    path = store.version_dir(2) + "/manifest.json"
    doc = orjson.loads(store.fs.cat_file(path))
    del doc["entries"][part]
    store.fs.pipe_file(path, orjson.dumps(doc))


@pytest.mark.parametrize("how", ["truncate", "flip", "missing", "no-manifest", "escape",
                                 "entry-out-of-bounds"])
def test_corrupt_versions_are_refused_and_the_previous_one_kept(store: SnapshotStore,
                                                                how: str) -> None:
    check_refused_and_previous_kept(store, lambda s: _corrupt(s, how))


def _twin(store: SnapshotStore, vector_dtype: quant.Encoding | None = None) -> SnapshotStore:
    """A second writer's view of the same store."""
    return SnapshotStore(store.url, keep_versions=store.keep_versions,
                         vector_dtype=vector_dtype or store.vector_dtype)


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
    _same(snap.state, ours, store.vector_dtype)
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


def test_a_reader_of_some_tables_still_verifies_the_whole_version(store: SnapshotStore
                                                                  ) -> None:
    base, newer = trained_state(300), trained_state(600)
    full = store.publish(base, offsets={}, watermark=None)
    store.publish_delta(delta_from_state(newer, None, None), parent=full, offsets={},
                        watermark=None)
    snap = store.load(tables=T.SERVED)
    assert snap is not None
    assert {n.removesuffix(quant.SCALE) for n in snap.state.tables} == set(T.SERVED) & set(newer.tables)
    whole = store.load()
    assert whole is not None
    for name, arr in snap.state.tables.items():
        np.testing.assert_array_equal(arr, whole.state.tables[name], err_msg=name)
    held = store.load(1, tables=T.SERVED)
    over = store.load(2, base=held, tables=T.SERVED)
    assert over is not None and over.base_version == 1
    _same(over.state, snap.state, store.vector_dtype)
    # a byte flipped in a part this reader does not decode (the replay ring, at the end)
    name = store.read_manifest(2).data_file
    path = store.version_dir(2) + "/" + name
    raw = bytearray(store.fs.cat_file(path))
    raw[-3] ^= 0x01
    store.fs.pipe_file(path, bytes(raw))
    with pytest.raises(CorruptSnapshot):
        store.load(2, base=held, tables=T.SERVED)


def test_vectors_without_their_scales_are_refused(store: SnapshotStore) -> None:
    if store.vector_dtype != "int8":
        pytest.skip("only int8 codes have scales")
    check_refused_and_previous_kept(
        store, lambda s: _drop_part(s, f"{T.ITEM_VECTORS}{quant.SCALE}.npy"))


def test_a_delta_carries_the_scales_of_its_rows_only(store: SnapshotStore) -> None:
    base, newer = trained_state(300), trained_state(600)
    full = store.publish(base, offsets={}, watermark=None)
    items = np.array([1, 4, 9])
    m = store.publish_delta(delta_from_state(newer, np.array([0]), items), parent=full,
                            offsets={}, watermark=None)
    _, delta = store.load_delta(m.version)
    codes = delta.tables[T.ITEM_VECTORS]
    assert len(codes) == 3 and quant.encoding(delta.tables, T.ITEM_VECTORS) == store.vector_dtype
    if store.vector_dtype == "int8":
        assert delta.tables[f"{T.ITEM_VECTORS}{quant.SCALE}"].shape == (3,)
    for name in (T.ITEM_IN, T.ITEM_OUT, T.USER_VEC):  # what the worker restores: exact
        np.testing.assert_array_equal(delta.tables[name],
                                      delta_from_state(newer, np.array([0]), items).tables[name])


def test_a_chain_written_under_other_vector_dtypes_loads(store: SnapshotStore) -> None:
    """A writer restarted with another ``store.vector_dtype`` continues the chain: the rows
    of each delta take the encoding of the version they are applied over."""
    states = [trained_state(n) for n in (200, 400, 600)]
    parent = store.publish(states[0], offsets={}, watermark=None)
    want = ModelState(states[0].config, states[0].user_ids, states[0].item_ids,
                      quant.encoded(states[0].tables, quant.STORED, store.vector_dtype))
    for state, dtype in zip(states[1:], [d for d in quant.DTYPES if d != store.vector_dtype]):
        delta = delta_from_state(state, np.arange(0, len(state.user_ids), 2),
                                 np.arange(len(state.item_ids)))
        parent = _twin(store, dtype).publish_delta(delta, parent=parent, offsets={},
                                                   watermark=None)
        delta.tables = quant.encoded(delta.tables, quant.STORED, dtype)
        want = apply_delta(want, delta)
    snap = store.load()
    assert snap is not None and snap.version == 3
    _same(snap.state, want, store.vector_dtype)
    step = store.load(2)
    assert step is not None
    over = store.load(3, base=step)
    assert over is not None and over.base_version == 2
    _same(over.state, want, store.vector_dtype)


def test_a_worker_restores_bitwise_from_any_vector_dtype(store: SnapshotStore) -> None:
    """The tables the worker restores from are exact whatever the store's vector dtype: a
    model restored from a full version plus a delta continues exactly as the original."""
    import itertools

    from stream_rec import datasets
    from stream_rec.model import ModelConfig, StreamingModel

    def learn(model: StreamingModel, evs: list[dict]) -> np.ndarray:
        return model.learn([e["user_id"] for e in evs], [e["item_id"] for e in evs],
                           np.array([e["ts"] for e in evs], dtype=np.int64)).items

    evs = list(itertools.islice(datasets.iter_synthetic(n_users=40, n_items=60, seed=3), 900))
    model = StreamingModel(ModelConfig(dim=8, train_chunk=100), device="cpu")
    learn(model, evs[:300])
    full = store.publish(model.state(), offsets={}, watermark=None)
    changed = model.learn([e["user_id"] for e in evs[300:550]],
                          [e["item_id"] for e in evs[300:550]],
                          np.array([e["ts"] for e in evs[300:550]], dtype=np.int64))
    store.publish_delta(model.delta(changed.users, changed.items), parent=full, offsets={},
                        watermark=None)
    snap = store.load()
    assert snap is not None
    restored = StreamingModel.from_state(snap.state, device="cpu")
    learn(model, evs[550:])
    learn(restored, evs[550:])
    _same(restored.state(), model.state())
