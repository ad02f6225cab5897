"""The three scoring paths give the same top-k: in-memory model, snapshot state, HTTP answer.

The model scores with torch on its own tables; a snapshot's ``ModelState``
scores with numpy through FAISS; the server answers over HTTP from a loaded
version through its index and batcher. Whatever the configuration, a user's
top-k (seen items excluded, unknown users falling back to popular items) must
be the same list in all three.

With quantized vectors (``store.vector_dtype`` / ``serve.vector_dtype`` float16
or int8) the served answer is exact over the vectors the server holds: it is
the same list as the snapshot state's answer over those vectors, decoded. It
is the in-memory answer up to the encoding's error, and no further: every
served score is within the bound ``delta`` of the exact one, and no item left
out scores, exactly, more than ``delta`` above one served (see :func:`_bounds`).
Unknown users' popular items are not quantized and stay identical.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from stream_rec.datasets import iter_synthetic
from stream_rec.model import ModelConfig, ModelState, StreamingModel, quant
from stream_rec.model.scoring import item_vectors, user_query
from stream_rec.serving.app import create_app
from stream_rec.settings import ServeSettings
from stream_rec.snapshot import SnapshotStore

CONFIGS = [
    {},
    {"tied": False, "transition": True, "mask_seen": False, "pop_weight": 0.3},
    {"inbatch_negatives": 32, "use_user_vector": False, "ttl_ms": 3_000, "admit_after": 2},
    {"admit_after": 3, "shared_rows": 8, "seen_max": 5, "max_users": 80, "max_items": 120,
     "pending_max": 10},
]
IDS = ["default", "untied", "admission", "bounded"]
USERS = ["u0", "u3", "u7", "u42", "u99", "never-seen"]
K = 10


@functools.cache
def _trained(config: int) -> StreamingModel:
    """Shared by the dtypes of one configuration (scoring does not change the model)."""
    return _train(CONFIGS[config])


def _train(extra: dict) -> StreamingModel:
    cfg = ModelConfig(dim=16, history=8, negatives=32, replay=300, replay_per_step=60,
                      train_chunk=250, **extra)
    model = StreamingModel(cfg, device="cpu")
    ev = list(itertools.islice(iter_synthetic(n_users=100, n_items=150, seed=5), 2600))
    for b in range(0, len(ev), 400):
        batch = ev[b:b + 400]
        model.learn([e["user_id"] for e in batch], [e["item_id"] for e in batch],
                    np.array([e["ts"] for e in batch], dtype=np.int64))
    return model


def _paths(model: StreamingModel, tmp_path: Path, dtype: quant.Encoding):
    state = model.state()
    store = SnapshotStore(tmp_path / "store", vector_dtype=dtype)
    store.publish(state, offsets={}, watermark=None)
    app = create_app(store, ServeSettings(vector_dtype=dtype), watch=False)
    client = TestClient(app)
    client.__enter__()
    assert app.state.watcher.poll_once()
    loaded = store.load()
    assert loaded is not None
    # the version as the server holds it: every vector it reads in ``dtype``
    held = ModelState(loaded.state.config, loaded.state.user_ids, loaded.state.item_ids,
                      quant.encoded(loaded.state.tables, quant.SERVING, dtype))

    def in_memory(user: str) -> list[tuple[str, float]]:
        return model.recommend(user, K)

    def snapshot(user: str) -> list[tuple[str, float]]:
        return held.recommend(user, K)

    def served(user: str) -> list[tuple[str, float]]:
        body = client.get(f"/recommend/{user}", params={"k": K}).json()
        return [(x["item_id"], x["score"]) for x in body["items"]]

    return {"in_memory": in_memory, "snapshot": snapshot, "served": served}, client, held


def _ids(answer: list[tuple[str, float]]) -> list[str]:
    return [i for i, _ in answer]


def _bounds(model: StreamingModel, held: ModelState, row: int, dtype: str) -> np.ndarray:
    """Per item row, the most the served score may differ from the exact one.

    served - exact = q'.(v' - v) + (q' - q).v for the exact query q and item
    vectors v and the served q', v' (decoded). The first term is bounded by the
    encoding's promise per element (int8: half a step of the row's scale;
    float16: half an ulp, tests/model/test_quant.py), the second is the query's
    actual error; plus float32 rounding of the dot products.
    """
    v = item_vectors(model).numpy()                                  # (I, D + 1)
    q = user_query(model, np.array([row])).numpy()[0]
    q_served = held.query(np.array([row]))[0]
    if dtype == "int8":
        eps = np.repeat(np.abs(v).max(axis=1, keepdims=True) / 127 / 2, v.shape[1], axis=1)
    else:
        eps = np.abs(v) * 2.0 ** -11 + 2.0 ** -25
    magnitude = np.abs(v) @ np.abs(q_served)
    return (eps @ np.abs(q_served) + np.abs(v) @ np.abs(q_served - q)
            + 1e-5 * magnitude + 1e-6)


def _check_within_bounds(model: StreamingModel, held: ModelState, user: str,
                         served: list[tuple[str, float]], dtype: str) -> None:
    row = model.query_row(user)
    assert row is not None
    exact = model.score_user(user)
    assert exact is not None
    delta = _bounds(model, held, row, dtype)
    rows = np.array([model.item_row(i) for i, _ in served])
    got = np.array([s for _, s in served])
    assert (np.abs(got - exact[rows]) <= delta[rows]).all(), (user, got, exact[rows])
    candidates = np.flatnonzero(model.live_items())
    candidates = np.setdiff1d(candidates, np.concatenate([model.seen_rows(row), rows]))
    assert len(served) == min(K, len(rows) + len(candidates))
    floor = (exact[rows] + delta[rows]).min()
    left_out = exact[candidates] - delta[candidates]
    assert (left_out <= floor).all(), (user, candidates[left_out > floor])


@pytest.mark.parametrize("dtype", quant.DTYPES)
@pytest.mark.parametrize("config", range(len(CONFIGS)), ids=IDS)
def test_every_path_gives_the_same_top_k(config: int, dtype: quant.Encoding,
                                         tmp_path: Path) -> None:
    model = _trained(config)
    paths, client, held = _paths(model, tmp_path, dtype)
    try:
        for user in USERS:
            answers = {name: path(user) for name, path in paths.items()}
            ids = {name: _ids(a) for name, a in answers.items()}
            assert len(ids["in_memory"]) == K, (user, ids)
            assert ids["served"] == ids["snapshot"], (user, ids)
            if dtype == "float32" or model.query_row(user) is None:
                assert ids["snapshot"] == ids["in_memory"], (user, ids)
                assert ids["served"] == ids["in_memory"], (user, ids)
            else:
                _check_within_bounds(model, held, user, answers["served"], dtype)
    finally:
        client.__exit__(None, None, None)


@functools.cache
def _trained_with_content() -> StreamingModel:
    from tests.model.test_content import _catalogue

    model = _train({"content_dim": 24})
    ids, vecs = _catalogue(150)
    model.announce(ids + ["only-announced"], np.concatenate([vecs, vecs[:1]]))
    return model


@pytest.mark.parametrize("dtype", quant.DTYPES)
def test_every_path_gives_the_same_top_k_with_content(tmp_path: Path,
                                                      dtype: quant.Encoding) -> None:
    """Item text through W: in-memory, snapshot and served (without the serving term) agree;
    served from quantized vectors, the top-k stays the in-memory one but for near ties."""
    model = _trained_with_content()
    state = model.state()
    store = SnapshotStore(tmp_path / "store", vector_dtype=dtype)
    store.publish(state, offsets={}, watermark=None)
    app = create_app(store, ServeSettings(content_alpha=0.0, vector_dtype=dtype), watch=False)
    with TestClient(app) as client:
        assert app.state.watcher.poll_once()
        for user in USERS:
            want = [i for i, _ in model.recommend(user, K)]
            assert [i for i, _ in state.recommend(user, K)] == want, user
            body = client.get(f"/recommend/{user}", params={"k": K}).json()
            got = [x["item_id"] for x in body["items"]]
            if dtype == "float32":
                assert got == want, user
            else:
                assert len(got) == K and len(set(got) & set(want)) >= K - 2, (user, got, want)
        assert client.get("/similar/only-announced").status_code == 200
