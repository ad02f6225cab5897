"""Content in the model: text vectors through a learned projection W, announced items.

The explicit step with W is checked against the autograd reference like the
step without it; a model with content but no text vectors is the model
without content, bit for bit; and the state properties (bitwise restore,
deltas, call-size independence) hold with announcements in the stream.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from stream_rec.datasets import iter_synthetic
from stream_rec.model import ModelConfig, StreamingModel, apply_delta, delta_from_state
from stream_rec.model import content as C
from stream_rec.model import tables as T
from stream_rec.model.reference import ReferenceTrainer
from stream_rec.model.train import Plan
from tests.model.test_train_step import FAMILIES, _rel_diff

K = 24
SMALL = {"dim": 16, "history": 8, "negatives": 48, "replay": 300, "replay_per_step": 60,
         "train_chunk": 100, "content_dim": K}
PLANS = {"cpu": Plan(), "gather": Plan(csr=False), "cuda-plan": Plan.for_device("cuda")}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _stream(n: int, seed: int = 0) -> tuple[list[str], list[str], np.ndarray]:
    ev = list(itertools.islice(iter_synthetic(n_users=120, n_items=300, seed=seed), n))
    return ([e["user_id"] for e in ev], [e["item_id"] for e in ev],
            np.array([e["ts"] for e in ev], dtype=np.int64))


def _texts(ids: list[str], seed: int = 0) -> np.ndarray:
    """Unit text vectors that share a direction within each id's taste group (``i<n>``:
    n mod 10, the synthetic stream's groups), like a genre."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((10, K))
    x = np.stack([centres[int(i.lstrip("i")) % 10] for i in ids]) + rng.standard_normal(
        (len(ids), K))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _catalogue(n_items: int = 300, every: int = 3) -> tuple[list[str], np.ndarray]:
    """Two thirds of the items have text (ids ``i<k>``, k not divisible by ``every``)."""
    ids = [f"i{k}" for k in range(n_items) if k % every]
    return ids, _texts(ids)


def _feed(m: StreamingModel, data: tuple, batch: int = 500,
          announce_at: dict[int, tuple[list[str], np.ndarray]] | None = None) -> list:
    """Learn ``data`` in calls of ``batch`` events; ``announce_at[pos]`` is announced
    before the event at stream position ``pos`` (calls are split there)."""
    users, items, ts = data
    cuts = sorted(set(range(0, len(users), batch)) | set(announce_at or {}))
    changed = []
    for a, b in zip(cuts, cuts[1:] + [len(users)]):
        if announce_at and a in announce_at:
            ids, vecs = announce_at[a]
            changed.append(m.announce(ids, vecs, int(ts[min(a, len(ts) - 1)])))
        if b > a:
            changed.append(m.learn(users[a:b], items[a:b], ts[a:b]))
    return changed


def _plan_of_announcements() -> dict[int, tuple[list[str], np.ndarray]]:
    ids, vecs = _catalogue()
    # a third before any click, a third mid-chunk later, the rest after their items are known
    return {0: (ids[::3], vecs[::3]), 1250: (ids[1::3], vecs[1::3]),
            2730: (ids[2::3], vecs[2::3])}


CONTENT_FAMILIES = ["default", "untied-transition-history-mask", "shared-history-transition",
                    "logq-decay-l2-two-steps", "expiry-admission"]


def _family(name: str) -> dict:
    extra = dict(FAMILIES[name])
    extra.pop("tied", None)            # content needs the tied table
    return extra


@pytest.mark.parametrize("family, plan", [(f, "cpu") for f in CONTENT_FAMILIES] +
                         [("default", "gather"), ("shared-history-transition", "cuda-plan")])
def test_explicit_step_with_content_matches_autograd(family: str, plan: str) -> None:
    """40 chunks with announcements: every float table within 2e-5 of autograd's, W included."""
    cfg = ModelConfig(**SMALL, **_family(family))
    data = _stream(4000)
    new, ref = StreamingModel(cfg, device="cpu"), StreamingModel(cfg, device="cpu")
    new.trainer.plan = PLANS[plan]
    ref.trainer = ReferenceTrainer(cfg, ref.params)  # type: ignore[assignment]
    _feed(new, data, announce_at=_plan_of_announcements())
    _feed(ref, data, announce_at=_plan_of_announcements())
    sa, sb = new.state(), ref.state()
    assert sa.item_ids == sb.item_ids
    for name, want in sb.tables.items():
        got = sa.tables[name]
        if want.dtype.kind != "f":
            np.testing.assert_array_equal(got, want, err_msg=name)
        elif want.size:
            assert _rel_diff(got, want) < 2e-5, name
    w0 = StreamingModel(cfg, device="cpu").state().tables[T.CONTENT_W]
    assert np.abs(sa.tables[T.CONTENT_W] - w0).max() > 1e-3        # W learned


def test_content_without_text_is_the_model_without_content() -> None:
    """content_dim > 0 but no text vector: every table of the plain model, bitwise."""
    data = _stream(2500, seed=3)
    plain = StreamingModel(ModelConfig(**{**SMALL, "content_dim": 0}), device="cpu")
    empty = StreamingModel(ModelConfig(**SMALL), device="cpu")
    _feed(plain, data, batch=333)
    _feed(empty, data, batch=333)
    sa, sb = plain.state(), empty.state()
    assert set(sb.tables) - set(sa.tables) == {T.ITEM_TEXT, T.CONTENT_W, T.CONTENT_ACC}
    for name, a in sa.tables.items():
        assert a.tobytes() == sb.tables[name].tobytes(), name
    assert sa.query(np.arange(5))[:, :17].tobytes() == sb.query(np.arange(5))[:, :17].tobytes()
    assert not sb.index_vectors()[:, 17:].any()       # zero text: the W block adds nothing


def test_restore_continues_bitwise_with_content() -> None:
    data = _stream(3000, seed=1)
    cfg = ModelConfig(**SMALL, ttl_ms=40_000, admit_after=2)
    plan = _plan_of_announcements()
    a = StreamingModel(cfg, device="cpu")
    head = {k: v for k, v in plan.items() if k < 1500}
    tail = {k - 1500: v for k, v in plan.items() if k >= 1500}
    first = tuple(x[:1500] for x in data)
    rest = tuple(x[1500:] for x in data)
    _feed(a, first, batch=250, announce_at=head)
    b = StreamingModel.from_state(a.state(), device="cpu")
    _feed(a, rest, batch=250, announce_at=tail)
    _feed(b, rest, batch=250, announce_at=tail)
    sa, sb = a.state(), b.state()
    assert sa.item_ids == sb.item_ids and list(sa.tables) == list(sb.tables)
    for name, x in sa.tables.items():
        assert x.dtype == sb.tables[name].dtype and x.tobytes() == sb.tables[name].tobytes(), name


def test_call_sizes_do_not_matter_with_content() -> None:
    """Announcements at fixed stream positions, learned in calls of 97 or 1 000 events."""
    data = _stream(2600, seed=2)
    cfg = ModelConfig(**SMALL)
    states = []
    for batch in (97, 1000):
        m = StreamingModel(cfg, device="cpu")
        _feed(m, data, batch=batch, announce_at=_plan_of_announcements())
        states.append(m.state())
    for name, x in states[0].tables.items():
        assert x.tobytes() == states[1].tables[name].tobytes(), name


def test_changed_rows_and_deltas_cover_announcements() -> None:
    """apply(previous, the rows each call reports) == the new state; delta == delta_from_state."""
    data = _stream(1800, seed=4)
    m = StreamingModel(ModelConfig(**SMALL), device="cpu")
    prev = m.state()
    users, items, ts = data
    plan = _plan_of_announcements()
    pos = 0
    for size in (170, 400, 90, 700, 440):
        for at in [k for k in plan if pos <= k < pos + size]:
            ids, vecs = plan[at]
            ch = m.announce(ids, vecs)
            cur = m.state()
            np.testing.assert_array_equal(
                apply_delta(prev, delta_from_state(cur, ch.users, ch.items)).tables[T.ITEM_TEXT],
                cur.tables[T.ITEM_TEXT])
            prev = cur
        ch = m.learn(users[pos:pos + size], items[pos:pos + size], ts[pos:pos + size])
        pos += size
        cur = m.state()
        got = apply_delta(prev, delta_from_state(cur, ch.users, ch.items))
        assert got.item_ids == cur.item_ids
        for name, x in cur.tables.items():
            np.testing.assert_array_equal(got.tables[name], x, err_msg=name)
        d_model = m.delta(ch.users, ch.items)
        d_state = delta_from_state(cur, ch.users, ch.items)
        for name, x in d_state.tables.items():
            assert x.tobytes() == d_model.tables[name].tobytes(), name
        prev = cur


def test_announced_item_has_a_content_vector_before_any_click() -> None:
    cfg = ModelConfig(**SMALL, admit_after=3)
    m = StreamingModel(cfg, device="cpu")
    data = _stream(1500, seed=5)
    _feed(m, data)
    vec = _texts(["i7"])
    ch = m.announce(["brand-new"], vec, ts_ms=int(data[2][-1]))
    row = m.item_row("brand-new")
    assert row is not None and ch.items.tolist() == [row]       # admitted at once
    st = m.state()
    assert not st.tables[T.ITEM_OUT][row].any() and st.tables[T.ITEM_EVENTS][row] == 0
    assert np.isneginf(st.tables[T.ITEM_POP_LOG][row])
    want = vec[0].astype(np.float16).astype(np.float32) @ st.tables[T.CONTENT_W]
    e = st.item_query(row)[:cfg.dim]
    np.testing.assert_allclose(e, want, rtol=1e-5, atol=1e-6)
    # the in-memory scores are the snapshot's: query . index vectors, the new item included
    user = data[0][-1]
    scores = m.score_user(user)
    assert scores is not None
    snap = st.index_vectors() @ st.query(np.array([st.user_row(user)]))[0]
    np.testing.assert_allclose(scores, snap, rtol=1e-4, atol=1e-5)
    assert np.isfinite(scores[row]) and scores[row] != 0.0
    # a click later moves its free row; the text stays
    before = st.tables[T.ITEM_TEXT][row].copy()
    m.learn(["u1"] * 100, ["brand-new"] * 100, np.full(100, int(data[2][-1]) + 1))
    st2 = m.state()
    assert st2.tables[T.ITEM_OUT][row].any()
    np.testing.assert_array_equal(st2.tables[T.ITEM_TEXT][row], before)


def test_text_rows_leave_with_expiry() -> None:
    m = StreamingModel(ModelConfig(**{**SMALL, "ttl_ms": 1000, "train_chunk": 1}), device="cpu")
    m.announce(["a", "b"], _texts(["i1", "i2"]), ts_ms=0)
    m.learn(["u"], ["b"], np.array([500]))
    m.learn(["u"], ["b"], np.array([1600]))      # "a" idle since 0: expired
    assert m.item_row("a") is None and m.params.n_text == 1
    m.learn(["u"], ["c"], np.array([1700]))      # reuses a's row, without its text
    row = m.item_row("c")
    assert not m.state().tables[T.ITEM_TEXT][row].any()


def test_text_term() -> None:
    text = _texts([f"i{k}" for k in range(6)])
    events = np.array([0, 3, 20, 12, 13, 1])
    hist = np.array([1, -1, 2, 3, -1])
    got = C.text_term(hist, events, text)
    xu = 0.9 ** 0 * text[1] + 0.9 ** 2 * text[2] + 0.9 ** 3 * text[3]
    wt = np.array([1, 0.6 ** 2, 0.6 ** 3])
    gate = (wt * np.array([1, 0, 1])).sum() / wt.sum()
    np.testing.assert_allclose(got, gate * xu / np.linalg.norm(xu), rtol=1e-5)
    assert C.text_term(np.array([2, 4]), events, text) is None      # no tail item: no term
    assert C.text_term(np.array([-1, -1]), events, text) is None
    live = np.ones(6, dtype=bool)
    has = np.array([True, True, True, False, True, True])
    assert C.young(events, has, live).tolist() == [0, 1, 5]


def test_scratch_rows_stay_zero_with_content() -> None:
    cfg = ModelConfig(**SMALL, transition=True, l2=1e-3)
    for plan in PLANS.values():
        m = StreamingModel(cfg, device="cpu")
        m.trainer.plan = plan
        _feed(m, _stream(1500, seed=2), announce_at=_plan_of_announcements())
        for name, t in m.params.full.items():
            assert not t[0].any(), name
