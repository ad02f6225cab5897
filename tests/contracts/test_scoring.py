"""The three scoring paths give the same top-k: in-memory model, snapshot state, HTTP answer.

The model scores with torch on its own tables; a snapshot's ``ModelState``
scores with numpy through FAISS; the server answers over HTTP from a loaded
version through its index and batcher. Whatever the configuration, a user's
top-k (seen items excluded, unknown users falling back to popular items) must
be the same list in all three.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from stream_rec.datasets import iter_synthetic
from stream_rec.model import ModelConfig, StreamingModel
from stream_rec.serving.app import create_app
from stream_rec.snapshot import SnapshotStore

CONFIGS = [
    {},
    {"tied": False, "transition": True, "mask_seen": False, "pop_weight": 0.3},
    {"inbatch_negatives": 32, "use_user_vector": False, "ttl_ms": 3_000, "admit_after": 2},
    {"admit_after": 3, "shared_rows": 8, "seen_max": 5, "max_users": 80, "max_items": 120,
     "pending_max": 10},
]
USERS = ["u0", "u3", "u7", "u42", "u99", "never-seen"]
K = 10


def _trained(extra: dict) -> StreamingModel:
    cfg = ModelConfig(dim=16, history=8, negatives=32, replay=300, replay_per_step=60,
                      train_chunk=250, **extra)
    model = StreamingModel(cfg, device="cpu")
    ev = list(itertools.islice(iter_synthetic(n_users=100, n_items=150, seed=5), 2600))
    for b in range(0, len(ev), 400):
        batch = ev[b:b + 400]
        model.learn([e["user_id"] for e in batch], [e["item_id"] for e in batch],
                    np.array([e["ts"] for e in batch], dtype=np.int64))
    return model


def _paths(model: StreamingModel, tmp_path: Path):
    state = model.state()
    store = SnapshotStore(tmp_path / "store")
    store.publish(state, offsets={}, watermark=None)
    app = create_app(store, watch=False)
    client = TestClient(app)
    client.__enter__()
    assert app.state.watcher.poll_once()

    def in_memory(user: str) -> list[str]:
        return [i for i, _ in model.recommend(user, K)]

    def snapshot(user: str) -> list[str]:
        return [i for i, _ in state.recommend(user, K)]

    def served(user: str) -> list[str]:
        body = client.get(f"/recommend/{user}", params={"k": K}).json()
        return [x["item_id"] for x in body["items"]]

    return {"in_memory": in_memory, "snapshot": snapshot, "served": served}, client


@pytest.mark.parametrize("extra", CONFIGS, ids=["default", "untied", "admission", "bounded"])
def test_every_path_gives_the_same_top_k(extra: dict, tmp_path: Path) -> None:
    model = _trained(extra)
    paths, client = _paths(model, tmp_path)
    try:
        for user in USERS:
            answers = {name: path(user) for name, path in paths.items()}
            assert len(answers["in_memory"]) == K, (user, answers)
            assert answers["snapshot"] == answers["in_memory"], (user, answers)
            assert answers["served"] == answers["in_memory"], (user, answers)
    finally:
        client.__exit__(None, None, None)


def test_every_path_gives_the_same_top_k_with_content(tmp_path: Path) -> None:
    """Item text through W: in-memory, snapshot and served (without the serving term) agree."""
    from stream_rec.settings import ServeSettings
    from tests.model.test_content import _catalogue

    model = _trained({"content_dim": 24})
    ids, vecs = _catalogue(150)
    model.announce(ids + ["only-announced"], np.concatenate([vecs, vecs[:1]]))
    state = model.state()
    store = SnapshotStore(tmp_path / "store")
    store.publish(state, offsets={}, watermark=None)
    app = create_app(store, ServeSettings(content_alpha=0.0), watch=False)
    with TestClient(app) as client:
        assert app.state.watcher.poll_once()
        for user in USERS:
            want = [i for i, _ in model.recommend(user, K)]
            assert [i for i, _ in state.recommend(user, K)] == want, user
            body = client.get(f"/recommend/{user}", params={"k": K}).json()
            assert [x["item_id"] for x in body["items"]] == want, user
        assert client.get("/similar/only-announced").status_code == 200
