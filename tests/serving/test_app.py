"""Serving: answers, fallbacks, 4xx on bad input, readiness, and swaps without mixing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from stream_rec.index import ItemIndex
from stream_rec.serving.app import create_app
from stream_rec.snapshot import SnapshotStore
from tests.support import trained_state


@pytest.fixture
def served(tmp_path: Path):
    store = SnapshotStore(tmp_path / "store")
    app = create_app(store, watch=False)
    with TestClient(app) as client:
        yield store, app.state.watcher, client


def test_not_ready_until_a_snapshot_is_loaded(served) -> None:
    store, watcher, client = served
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503
    assert client.get("/recommend/u1").status_code == 503
    store.publish(trained_state(), offsets={"t": {0: 600}}, watermark=77)
    assert watcher.poll_once()
    body = client.get("/readyz").json()
    assert body["version"] == 1 and body["watermark"] == 77


def test_recommend_excludes_seen_and_names_the_version(served) -> None:
    store, watcher, client = served
    state = trained_state()
    store.publish(state, offsets={}, watermark=5)
    watcher.poll_once()
    user = state.user_ids[0]
    body = client.get(f"/recommend/{user}", params={"k": 7}).json()
    assert body["version"] == 1 and body["watermark"] == 5 and not body["fallback"]
    items = [i["item_id"] for i in body["items"]]
    assert len(items) == 7 == len(set(items))
    seen = {state.item_ids[r] for r in state.seen(state.user_row(user))}
    assert not seen & set(items)
    assert items == [i for i, _ in state.recommend(user, 7)]


def test_unknown_user_gets_popular_items_and_unknown_item_404(served) -> None:
    store, watcher, client = served
    store.publish(trained_state(), offsets={}, watermark=5)
    watcher.poll_once()
    body = client.get("/recommend/nobody-here", params={"k": 3}).json()
    assert body["fallback"] and len(body["items"]) == 3
    assert client.get("/similar/no-such-item").status_code == 404
    assert client.get("/similar/i1", params={"k": 4}).status_code == 200


@pytest.mark.parametrize("url", ["/recommend/u1?k=0", "/recommend/u1?k=abc",
                                 "/recommend/u1?k=100000", "/similar/i1?k=-1",
                                 "/recommend/" + "x" * 300])
def test_bad_parameters_get_4xx(served, url: str) -> None:
    store, watcher, client = served
    store.publish(trained_state(), offsets={}, watermark=5)
    watcher.poll_once()
    r = client.get(url)
    assert 400 <= r.status_code < 500, r.text


def test_a_corrupt_newer_version_is_refused_and_serving_continues(served) -> None:
    store, watcher, client = served
    store.publish(trained_state(), offsets={}, watermark=1)
    watcher.poll_once()
    store.publish(trained_state(seed=1), offsets={}, watermark=2)
    victim = Path(store.version_dir(2)) / store.read_manifest(2).data_file
    victim.write_bytes(victim.read_bytes()[:-3])
    assert not watcher.poll_once()
    assert client.get("/readyz").json()["version"] == 1
    assert "stream_rec_snapshot_refused_total 1.0" in client.get("/metrics").text


def test_requests_in_flight_keep_their_version(served) -> None:
    store, watcher, _client = served
    store.publish(trained_state(), offsets={}, watermark=1)
    watcher.poll_once()
    held = watcher.current
    store.publish(trained_state(seed=3), offsets={}, watermark=2)
    watcher.poll_once()
    assert watcher.current is not held and held.version == 1
    assert held.recommend(held.state.user_ids[0], 5)["items"]  # the old state still answers


def test_index_updates_in_place_and_tombstones() -> None:
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(20, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)  # so a vector is its own best match
    idx = ItemIndex.build(vecs)
    q = vecs[3:4] * 10
    assert idx.search(q, 1)[0][0][0] == 3
    idx.upsert(np.array([7]), vecs[3:4] * 2)
    assert idx.search(q, 1)[0][0][0] == 7
    idx.tombstone(np.array([7]))
    assert idx.search(q, 1)[0][0][0] == 3
    idx.upsert(np.array([25]), vecs[3:4] * 3)  # grows
    assert idx.ntotal == 26 and idx.search(q, 1)[0][0][0] == 25
    assert 3 not in [r for r, _ in idx.search(q, 5, [np.array([3])])[0]]


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_refreshed_copy_changes_only_the_copy(kind: str) -> None:
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(3000, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    old = ItemIndex.build(vecs, kind=kind, nprobe=64)
    assert old.kind == kind
    q = vecs[10:11]
    new = old.refreshed(np.array([10, 3000]), np.stack([-vecs[10], vecs[10]]))
    assert old.search(q, 1)[0][0][0] == 10  # readers of the old index see no change
    assert new.search(q, 1)[0][0][0] == 3000 and new.ntotal == 3001
    assert 10 not in [r for r, _ in new.search(q, 50)[0]]


def test_serving_applies_deltas_over_the_version_it_holds(served) -> None:
    from stream_rec.model import ModelConfig, StreamingModel, delta_from_state

    store, watcher, client = served
    model = StreamingModel(ModelConfig(dim=8), device="cpu")
    model.learn(["u1", "u2"], ["a", "b"], np.array([1, 2]))
    parent = store.publish(model.state(), offsets={}, watermark=2)
    watcher.poll_once()
    first = watcher.current
    changed = model.learn(["u1", "u3"], ["c", "d"], np.array([3, 4]))
    store.publish_delta(delta_from_state(model.state(), changed.users, changed.items),
                        parent=parent, offsets={}, watermark=4)
    assert watcher.poll_once()
    current = watcher.current
    assert current.snapshot.base_version == first.version
    assert set(current.snapshot.changed_items.tolist()) >= {2, 3}
    body = client.get("/recommend/u3", params={"k": 3}).json()
    assert body["version"] == 2 and not body["fallback"]
    expect = model.state().recommend("u3", 3)
    assert [i["item_id"] for i in body["items"]] == [i for i, _ in expect]


def test_batched_searches_answer_exactly_as_single_ones() -> None:
    import threading

    from stream_rec.serving.batcher import SearchBatcher

    rng = np.random.default_rng(2)
    vecs = rng.normal(size=(5000, 16)).astype(np.float32)
    idx = ItemIndex.build(vecs)
    queries = rng.normal(size=(200, 16)).astype(np.float32)
    excludes = [rng.choice(5000, rng.integers(0, 30), replace=False) for _ in range(200)]
    want = [idx.search(q[None, :], 1 + i % 12, [e])[0]
            for i, (q, e) in enumerate(zip(queries, excludes))]
    batcher = SearchBatcher(max_batch=32)
    got: list = [None] * 200

    def client(lo: int) -> None:
        for i in range(lo, 200, 8):
            got[i] = batcher.search(idx, queries[i], 1 + i % 12, excludes[i]).result(10)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert [[r for r, _ in g] for g in got] == [[r for r, _ in w] for w in want]
    assert batcher.searched == 200 and batcher.batches <= 200


def test_matrix_product_search_matches_faiss_with_exclusions_and_tombstones() -> None:
    from stream_rec.index.item_index import GEMM_MIN_QUERIES

    rng = np.random.default_rng(3)
    vecs = rng.normal(size=(3000, 16)).astype(np.float32)
    idx = ItemIndex.build(vecs)
    idx.tombstone(rng.choice(3000, 40, replace=False))
    queries = rng.normal(size=(3 * GEMM_MIN_QUERIES, 16)).astype(np.float32)
    excludes = [rng.choice(3000, rng.integers(0, 200), replace=False) for _ in queries]
    batched = idx.search(queries, 10, excludes)  # one matrix product
    for q, e, got in zip(queries, excludes, batched):
        want = idx.search(q[None, :], 10, [e])[0]  # FAISS, one query
        assert [r for r, _ in got] == [r for r, _ in want]
        assert np.allclose([s for _, s in got], [s for _, s in want], atol=1e-4)
        assert not {r for r, _ in got} & (set(e.tolist()) | idx.dead)
    tiny = ItemIndex.build(vecs[:5])
    tiny.tombstone(np.array([1]))
    answers = tiny.search(queries, 10, [np.array([0])] * len(queries))
    assert all(sorted(r for r, _ in a) == [2, 3, 4] for a in answers)  # fewer than k exist


def test_a_transient_load_failure_is_retried_not_refused(served, monkeypatch) -> None:
    store, watcher, client = served
    store.publish(trained_state(), offsets={}, watermark=1)
    assert watcher.poll_once()
    store.publish(trained_state(seed=2), offsets={}, watermark=2)
    real_load = store.load
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("connection reset by the store")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(store, "load", flaky)
    assert not watcher.poll_once()            # failed, kept serving v1, not refused
    assert client.get("/readyz").json()["version"] == 1
    assert not watcher.poll_once()            # backing off: not retried at once
    watcher._retry_at = 0.0
    assert watcher.poll_once()                # retried: v2 now
    assert client.get("/readyz").json()["version"] == 2
    assert "stream_rec_snapshot_refused_total 0.0" in client.get("/metrics").text
