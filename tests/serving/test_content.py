"""Serving a version with item text: the content term for young items, in the plan.

Answers with the term equal a brute-force ranking over every item (the index
vectors against the query, plus ``alpha * g_u * x̂_u · x_i`` for young items,
seen items excluded), through ``ServingState.recommend``, the HTTP batcher and
the overlay path alike; ``/similar`` answers for an item nobody clicked.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from stream_rec.events import decode_columns, encode_event
from stream_rec.model import ModelConfig, ModelState, StreamingModel
from stream_rec.model import content as C
from stream_rec.model import tables as T
from stream_rec.serving.app import create_app
from stream_rec.serving.overlay import Overlay
from stream_rec.serving.state import ServingState
from stream_rec.settings import ServeSettings
from stream_rec.snapshot import SnapshotStore
from tests.model.test_content import SMALL, _catalogue, _feed, _stream, _texts

ALPHA = 1.5
NEW = ["new-a", "new-b", "new-c"]          # announced, never clicked


@pytest.fixture(scope="module")
def model() -> StreamingModel:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = StreamingModel(ModelConfig(**SMALL), device="cpu")
        ids, vecs = _catalogue()
        _feed(m, _stream(2500, seed=6), announce_at={0: (ids, vecs)})
        m.announce(NEW, _texts(["i1", "i2", "i3"]))         # text groups 1, 2, 3
    finally:
        torch.set_num_threads(threads)
    return m


def _state(model: StreamingModel, tmp_path: Path) -> tuple[ModelState, SnapshotStore]:
    store = SnapshotStore(tmp_path / "store")
    store.publish(model.state(), offsets={"clicks": {0: 2500}}, watermark=1)
    snap = store.load()
    assert snap is not None
    return snap.state, store


def _brute_force(st: ModelState, hist: np.ndarray, query: np.ndarray, exclude: set[int],
                 k: int) -> list[int]:
    t = st.tables
    scores = st.index_vectors() @ query
    term = C.text_term(hist, t[T.ITEM_EVENTS], t[T.ITEM_TEXT])
    if term is not None:
        live = np.array([bool(i) for i in st.item_ids])
        rows = C.young(t[T.ITEM_EVENTS], t[T.ITEM_TEXT].any(axis=1), live)
        scores[rows] += ALPHA * (t[T.ITEM_TEXT][rows].astype(np.float32) @ term)
    order = [r for r in np.lexsort((np.arange(len(scores)), -scores)).tolist()
             if r not in exclude]
    return order[:k]


def test_recommend_with_the_term_is_the_brute_force_ranking(model: StreamingModel,
                                                            tmp_path: Path) -> None:
    st, store = _state(model, tmp_path)
    served = ServingState(store.load(), content_alpha=ALPHA)
    plain = ServingState(store.load(), content_alpha=0.0)
    assert served.content is not None and len(served.content.rows) > 20
    app = create_app(store, ServeSettings(content_alpha=ALPHA), watch=False)
    gated = 0
    with TestClient(app) as client:
        assert app.state.watcher.poll_once()
        for user in [u for u in st.user_ids if u][:40]:
            row = st.user_row(user)
            hist = st.tables[T.USER_HIST][row]
            want = _brute_force(st, hist, st.query(np.array([row]))[0],
                                set(st.seen(row).tolist()), 10)
            got = [st.item_row(x["item_id"]) for x in served.recommend(user, 10)["items"]]
            http = client.get(f"/recommend/{user}", params={"k": 10}).json()["items"]
            assert got == want == [st.item_row(x["item_id"]) for x in http], user
            if served.content.user_term(hist) is not None:
                gated += 1
                assert len(served.plan(user).exclude) > len(plain.plan(user).exclude)
        assert gated > 10                          # the term did apply to most users
        # items nobody clicked: /similar answers from their text alone (through W)
        for item, group in (("new-a", 1), ("new-c", 3)):
            plain_sim = plain.plan_similar(item)
            assert plain_sim is not None and plain_sim.scored is None
            hits = plain.index.search(plain_sim.query[None], 10, [plain_sim.exclude])[0]
            near = [st.item_ids[r] for r, _ in hits]
            assert sum(int(i[1:]) % 10 == group for i in near if i.startswith("i")) >= 6, near
            body = client.get(f"/similar/{item}", params={"k": 5})
            assert body.status_code == 200 and len(body.json()["items"]) == 5
        # and the term lifts one towards the items of its group
        ranks = []
        for state in (plain, served):
            p = state.plan_similar("i2")
            hits = state.index.search(p.query[None], 40, [p.exclude])[0]
            names = [x["item_id"] for x in state.answer_similar("i2", hits, p, 40)["items"]]
            ranks.append(names.index("new-b") if "new-b" in names else 40)
        assert ranks[1] < ranks[0]


def test_the_term_follows_overlay_clicks(model: StreamingModel, tmp_path: Path) -> None:
    st, store = _state(model, tmp_path)
    served = ServingState(store.load(), content_alpha=ALPHA)
    overlay = Overlay(history=st.tables[T.USER_HIST].shape[1])
    overlay.rebase({0: 2500})
    user = next(u for u in st.user_ids if u)
    # rare items of one group, clicked after the version: the gate opens for that group
    events = st.tables[T.ITEM_EVENTS]
    rare = [i for r, i in enumerate(st.item_ids) if i.startswith("i") and events[r] <= 9
            and int(i[1:]) % 10 == 4 and int(i[1:]) % 3][:4]
    assert len(rare) == 4
    recs = [SimpleNamespace(topic="clicks", partition=0, offset=2500 + j, key=user.encode(),
                            value=encode_event({"user_id": user, "item_id": i,
                                                "ts": 1_700_000_000_000 + j}), timestamp=0)
            for j, i in enumerate(rare)]
    assert overlay.apply(decode_columns(recs)) == 4
    plan = served.plan(user, overlay)
    hist, _ = served._history(st.user_row(user), overlay.clicks(user))
    exclude = set(st.seen(st.user_row(user)).tolist()) | {st.item_row(i) for i in rare}
    want = _brute_force(st, hist, plan.query, exclude, 10)
    got = [st.item_row(x["item_id"]) for x in served.recommend(user, 10, overlay)["items"]]
    assert got == want
    assert served.content.user_term(hist) is not None


def test_without_text_the_answers_are_those_without_the_term(tmp_path: Path) -> None:
    m = StreamingModel(ModelConfig(**SMALL), device="cpu")       # content, but no text
    _feed(m, _stream(800, seed=7))
    store = SnapshotStore(tmp_path / "store")
    store.publish(m.state(), offsets={}, watermark=1)
    with_term = ServingState(store.load(), content_alpha=ALPHA)
    without = ServingState(store.load(), content_alpha=0.0)
    assert without.content is None and with_term.content is not None
    assert not len(with_term.content.rows)
    for user in m.state().user_ids[:20]:
        assert with_term.recommend(user, 10) == without.recommend(user, 10)
