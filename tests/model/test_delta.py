"""Delta versions: a chain applied to its base equals a full snapshot at the same point,
and retention never deletes a version that a kept chain needs."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_rec import datasets
from stream_rec.model import ModelConfig, ModelState, StreamingModel, apply_delta, delta_from_state
from stream_rec.snapshot import SnapshotStore


def assert_same_state(a: ModelState, b: ModelState) -> None:
    assert a.user_ids == b.user_ids and a.item_ids == b.item_ids
    assert set(a.tables) == set(b.tables)
    for name in a.tables:
        np.testing.assert_array_equal(a.tables[name], b.tables[name], err_msg=name)


def _events(seed: int, n: int, n_users: int, n_items: int) -> list[dict]:
    return list(itertools.islice(
        datasets.iter_synthetic(n_users=n_users, n_items=n_items, seed=seed), n))


def _learn(model: StreamingModel, batch: list[dict]):
    return model.learn([e["user_id"] for e in batch], [e["item_id"] for e in batch],
                       np.array([e["ts"] for e in batch], dtype=np.int64))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), sizes=st.lists(st.integers(1, 120), min_size=1,
                                                    max_size=6))
def test_changed_rows_capture_every_change(seed: int, sizes: list[int]) -> None:
    """apply(previous, rows the model says changed) == the model's new state, batch by batch."""
    model = StreamingModel(ModelConfig(dim=8, seed=seed % 7), device="cpu")
    events = _events(seed, sum(sizes), n_users=40, n_items=60)
    prev = model.state()
    pos = 0
    for size in sizes:
        changed = _learn(model, events[pos:pos + size])
        pos += size
        cur = model.state()
        assert_same_state(apply_delta(prev, delta_from_state(cur, changed.users, changed.items)),
                          cur)
        prev = cur


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                              HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000),
       plan=st.lists(st.tuples(st.integers(1, 80), st.booleans()), min_size=1, max_size=7))
def test_delta_chain_equals_full_snapshot(tmp_path_factory, seed: int,
                                          plan: list[tuple[int, bool]]) -> None:
    """Publishing deltas (merged across batches) and reading back equals a full snapshot."""
    store = SnapshotStore(tmp_path_factory.mktemp("store"), keep_versions=3)
    model = StreamingModel(ModelConfig(dim=8, seed=1), device="cpu")
    events = _events(seed, sum(n for n, _ in plan), n_users=30, n_items=50)
    parent = None
    held = None
    pending_u: set[int] = set()
    pending_i: set[int] = set()
    pos = 0
    for size, publish in plan:
        changed = _learn(model, events[pos:pos + size])
        pos += size
        pending_u.update(changed.users.tolist())
        pending_i.update(changed.items.tolist())
        if not publish:
            continue  # consecutive deltas merge: rows accumulate until the next publish
        state = model.state()
        if parent is None:
            parent = store.publish(state, offsets={"t": {0: pos}}, watermark=pos)
        else:
            delta = delta_from_state(state, np.array(sorted(pending_u), dtype=np.int64),
                                     np.array(sorted(pending_i), dtype=np.int64))
            parent = store.publish_delta(delta, parent=parent, offsets={"t": {0: pos}},
                                         watermark=pos, events=pos)
        pending_u.clear()
        pending_i.clear()
        snap = store.load()
        assert snap is not None and snap.manifest.offsets == {"t": {0: pos}}
        assert_same_state(snap.state, state)
        if held is not None:  # a reader holding the previous version reads only what follows
            assert_same_state(store.load(snap.version, base=held).state, state)
        held = snap
        if snap.manifest.kind == "delta":
            assert snap.manifest.counts["events"] == int(state.tables["user.events"].sum())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                               HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.booleans(), min_size=1, max_size=14), keep=st.integers(2, 5),
       pin=st.integers(0, 13))
def test_retention_never_breaks_a_kept_chain(tmp_path_factory, kinds: list[bool], keep: int,
                                             pin: int) -> None:
    store = SnapshotStore(tmp_path_factory.mktemp("store"), keep_versions=keep)
    model = StreamingModel(ModelConfig(dim=4), device="cpu")
    _learn(model, _events(0, 20, 10, 10))
    state = model.state()
    parent = store.publish(state, offsets={}, watermark=None)
    for i, full in enumerate(kinds):
        if full:
            parent = store.publish(state, offsets={}, watermark=None)
        else:
            parent = store.publish_delta(delta_from_state(state, np.array([0]), np.array([0])),
                                         parent=parent, offsets={}, watermark=None)
        if i == pin:
            store.pin(parent.version)
    versions = store.versions()
    for v in versions[-keep:] + [store.latest_version()] + (
            [store.pinned()] if store.pinned() else []):
        snap = store.load(v)
        assert snap is not None
        assert_same_state(snap.state, state)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), sizes=st.lists(st.integers(1, 60), min_size=2, max_size=6))
def test_merged_deltas_apply_as_the_chain_does(seed: int, sizes: list[int]) -> None:
    from stream_rec.model import merge_deltas

    model = StreamingModel(ModelConfig(dim=8, seed=2), device="cpu")
    events = _events(seed, sum(sizes), n_users=25, n_items=40)
    base = model.state()
    deltas, pos = [], 0
    for size in sizes:
        changed = _learn(model, events[pos:pos + size])
        pos += size
        deltas.append(model.delta(changed.users, changed.items))
    stepwise = base
    for d in deltas:
        stepwise = apply_delta(stepwise, d)
    assert_same_state(apply_delta(base, merge_deltas(deltas)), stepwise)
    assert_same_state(stepwise, model.state())


def test_writer_and_readers_read_only_the_manifests_they_lack(tmp_path, monkeypatch) -> None:
    """Pruning after each publish and a reader catching up do not re-read the whole chain."""
    store = SnapshotStore(tmp_path / "store", keep_versions=3)
    model = StreamingModel(ModelConfig(dim=4), device="cpu")
    _learn(model, _events(0, 20, 10, 10))
    state = model.state()
    parent = store.publish(state, offsets={}, watermark=None)
    reads: list[int] = []
    real = SnapshotStore.read_manifest

    def counted(self: SnapshotStore, version: int):
        reads.append(version)
        return real(self, version)

    monkeypatch.setattr(SnapshotStore, "read_manifest", counted)
    for _ in range(40):
        parent = store.publish_delta(delta_from_state(state, np.array([0]), np.array([0])),
                                     parent=parent, offsets={}, watermark=None)
    assert len(reads) <= 40  # at most the parent per publish; the chain walk would be 820
    assert store.versions() == list(range(1, 42))  # retention kept the newest one's chain
    reader = SnapshotStore(tmp_path / "store")
    held = reader.load(35)
    assert held is not None
    reads.clear()
    caught_up = reader.load(41, base=held)
    assert caught_up is not None and caught_up.base_version == 35
    assert sorted(reads) == list(range(36, 42))  # each once, nothing at or before the one held
    assert_same_state(caught_up.state, reader.load(41).state)
