"""Model contract: learning on planted structure, dynamic ids, state round trips."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_rec.datasets import iter_synthetic
from stream_rec.model import Changed, ModelConfig, ModelState, StreamingModel

SMALL = {"dim": 16, "history": 10, "negatives": 64, "replay": 500, "replay_per_step": 100}
# every bound binding on the synthetic streams (100 users, 200 items): seen lists cut,
# admission counts forgotten, rows evicted, waiting ids learned on shared rows
BOUNDED = {"seen_max": 4, "max_users": 40, "max_items": 70, "admit_after": 2,
           "pending_max": 6, "shared_rows": 3}


def _assert_same(sa: ModelState, sb: ModelState) -> None:
    assert sa.user_ids == sb.user_ids and sa.item_ids == sb.item_ids
    assert list(sa.tables) == list(sb.tables)
    for k in sa.tables:
        assert sa.tables[k].dtype == sb.tables[k].dtype, k
        np.testing.assert_array_equal(sa.tables[k], sb.tables[k], err_msg=k)


def _events(n: int, **kw):
    ev = list(itertools.islice(iter_synthetic(n_users=100, n_items=200, **kw), n))
    users = [e["user_id"] for e in ev]
    items = [e["item_id"] for e in ev]
    ts = np.array([e["ts"] for e in ev], dtype=np.int64)
    return users, items, ts


def _feed(model: StreamingModel, users, items, ts, batch: int = 200) -> list[Changed]:
    out = []
    for b in range(0, len(users), batch):
        out.append(model.learn(users[b:b + batch], items[b:b + batch], ts[b:b + batch]))
    return out


@pytest.fixture(scope="module")
def trained() -> StreamingModel:
    torch.manual_seed(0)
    m = StreamingModel(ModelConfig(**SMALL), device="cpu")
    _feed(m, *_events(3000))
    return m


def test_events_counted_exactly(trained: StreamingModel) -> None:
    users, items, _ = _events(3000)
    st = trained.state()
    assert st.tables["user.events"].sum() == 3000
    assert st.tables["item.events"].sum() == 3000
    for uid in set(users[:50]):
        assert st.tables["user.events"][st.user_row(uid)] == users.count(uid)
    for iid in set(items[:50]):
        assert st.tables["item.events"][st.item_row(iid)] == items.count(iid)


def test_unknown_user_gets_popular(trained: StreamingModel) -> None:
    rec = trained.recommend("nobody", 5)
    st = trained.state()
    assert [i for i, _ in rec] == [st.item_ids[r] for r in st.popular(5)]
    assert [i for i, _ in st.recommend("nobody", 5)] == [i for i, _ in rec]


@pytest.mark.parametrize("extra", [
    {},
    {"tied": False, "transition": True, "mask_seen": False, "pop_weight": 0.3},
    {"inbatch_negatives": 64, "use_user_vector": False, "ttl_ms": 3_000, "admit_after": 2},
    BOUNDED,
])
def test_state_round_trip_continues_bitwise(extra: dict) -> None:
    users, items, ts = _events(2400)
    cfg = ModelConfig(**SMALL, seed=3, **extra)
    a = StreamingModel(cfg, device="cpu")
    _feed(a, users[:1200], items[:1200], ts[:1200])
    b = StreamingModel.from_state(a.state(), device="cpu")
    _feed(a, users[1200:], items[1200:], ts[1200:])
    _feed(b, users[1200:], items[1200:], ts[1200:])
    _assert_same(a.state(), b.state())


def test_ids_grow_without_restart() -> None:
    m = StreamingModel(ModelConfig(dim=8, history=4), device="cpu")
    n = 0
    for b in range(5):
        users = [f"user{b}-{k}" for k in range(40 * (b + 1))]
        items = [f"item{b}-{k}" for k in range(40 * (b + 1))]
        ch = m.learn(users, items, np.full(len(users), 1000 + b, dtype=np.int64))
        n += len(users)
        assert m.n_users == n and m.n_items == n
        assert set(ch.users.tolist()) >= {m.user_row(u) for u in users}
    st = m.state()
    assert st.tables["item.vectors"].shape == (n, 9)
    assert st.user_row("user4-0") == n - 200
    assert np.isfinite(st.tables["item.vectors"]).all()


def test_admission_threshold() -> None:
    m = StreamingModel(ModelConfig(dim=8, history=4, admit_after=3), device="cpu")
    m.learn(["a", "a", "b"], ["x", "x", "x"], np.array([1, 2, 3]))
    assert m.user_row("a") is None and m.item_row("x") is not None
    assert m.state().tables["item.events"].sum() == 0      # nothing learned yet
    m.learn(["a"], ["x"], np.array([4]))
    assert m.user_row("a") is not None
    st = m.state()
    assert st.tables["user.events"][st.user_row("a")] == 1
    assert st.tables["item.events"][st.item_row("x")] == 1


def test_ttl_expiry_frees_and_reuses_rows() -> None:
    m = StreamingModel(ModelConfig(dim=8, history=4, ttl_ms=1000, train_chunk=1), device="cpu")
    m.learn(["old", "keep", "both"], ["i_old", "i_keep", "i_old"], np.array([0, 0, 0]))
    m.learn(["keep", "both"], ["i_keep", "i_keep"], np.array([900, 900]))
    old_u, old_i = m.user_row("old"), m.item_row("i_old")
    both = m.user_row("both")
    ch = m.learn(["keep"], ["i_keep"], np.array([1500]))
    assert old_u in ch.users.tolist() and old_i in ch.items.tolist()
    assert both in ch.users.tolist()          # its seen set and history lost i_old
    st_both = m.state()
    assert old_i not in st_both.seen(both).tolist()
    assert old_i not in st_both.tables["user.hist"][both].tolist()
    st = m.state()
    assert st.user_ids[old_u] == "" and st.item_ids[old_i] == ""
    assert not st.tables["item.vectors"][old_i].any()
    assert not st.tables["user.vec"][old_u].any()
    assert st.tables["user.events"][old_u] == 0
    assert old_i not in st.tables["user.hist"][st.user_row("keep")]
    # freed rows are reused by new ids
    m.learn(["new"], ["i_new"], np.array([1600]))
    assert m.user_row("new") == old_u and m.item_row("i_new") == old_i
    assert m.n_users == 3 and m.n_items == 2
    assert "i_old" not in [i for i, _ in m.recommend("keep", 5)]


def test_state_is_plain_numpy(trained: StreamingModel) -> None:
    st = trained.state()
    assert isinstance(st, ModelState)
    assert all(isinstance(v, np.ndarray) for v in st.tables.values())
    for name, v in st.tables.items():
        if name.startswith("user."):
            assert len(v) == len(st.user_ids), name
        if name.startswith("item."):
            assert len(v) == len(st.item_ids), name
    assert st.tables["item.vectors"].dtype == np.float32
    assert st.tables["user.events"].dtype == np.int64
    assert st.query(np.arange(3)).shape == (3, st.tables["item.vectors"].shape[1])


def test_click_changes_answer_immediately(trained: StreamingModel) -> None:
    before = trained.recommend("u3", 10)
    top = before[0][0]
    trained.learn(["u3"], [top], np.array([10**13]))
    after = trained.recommend("u3", 10)
    assert top not in [i for i, _ in after]


@pytest.mark.parametrize("n_users, extra", [
    (100, {}),
    (7, {"admit_after": 2, "ttl_ms": 2_000}),   # many events per user per batch (> history)
    (100, {**BOUNDED, "ttl_ms": 2_000}),
])
def test_callback_path_matches_batch_path(n_users: int, extra: dict) -> None:
    """learn() with a per-event observer ends in exactly the same state as without."""
    ev = list(itertools.islice(iter_synthetic(n_users=n_users, n_items=200), 1200))
    users = [e["user_id"] for e in ev]
    items = [e["item_id"] for e in ev]
    ts = np.array([e["ts"] for e in ev], dtype=np.int64)
    cfg = ModelConfig(**SMALL, pop_weight=0.3, **extra)
    a, b = StreamingModel(cfg, device="cpu"), StreamingModel(cfg, device="cpu")
    calls: list[int] = []
    for s in range(0, 1200, 300):
        a.learn(users[s:s + 300], items[s:s + 300], ts[s:s + 300])
        b.learn(users[s:s + 300], items[s:s + 300], ts[s:s + 300], before_event=calls.append)
    assert len(calls) == 1200
    _assert_same(a.state(), b.state())


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), sizes=st.lists(st.integers(1, 150), min_size=1, max_size=4),
       frac_u=st.floats(0.0, 1.0), frac_i=st.floats(0.0, 1.0), bounds=st.integers(0, 2))
def test_delta_equals_delta_from_state(seed: int, sizes: list[int], frac_u: float,
                                       frac_i: float, bounds: int) -> None:
    """delta(rows) is field by field, bitwise, delta_from_state(state(), rows)."""
    from stream_rec.model import delta_from_state

    extra = [{}, {"ttl_ms": 40_000, "admit_after": 2},
             {"seen_max": 3, "max_users": 12, "max_items": 20, "admit_after": 2,
              "pending_max": 4, "shared_rows": 2}][bounds]
    cfg = ModelConfig(dim=8, history=5, seed=seed % 5, pop_weight=0.3, **extra)
    m = StreamingModel(cfg, device="cpu")
    ev = list(itertools.islice(iter_synthetic(n_users=30, n_items=50, seed=seed), sum(sizes)))
    rng = np.random.default_rng(seed)
    pos = 0
    for size in sizes:
        batch = ev[pos:pos + size]
        pos += size
        m.learn([e["user_id"] for e in batch], [e["item_id"] for e in batch],
                np.array([e["ts"] for e in batch], dtype=np.int64))
        users = rng.integers(-2, m.n_users + 3, size=int(frac_u * m.n_users) + 1)
        items = rng.integers(-2, m.n_items + 3, size=int(frac_i * m.n_items) + 1)
        for uu, ii in ((users, items), (None, None), (users[:0], items[:0])):
            got, want = m.delta(uu, ii), delta_from_state(m.state(), uu, ii)
            assert got.config == want.config
            assert (got.n_users, got.n_items) == (want.n_users, want.n_items)
            assert got.user_ids == want.user_ids and got.item_ids == want.item_ids
            for a, b in ((got.user_rows, want.user_rows), (got.item_rows, want.item_rows),
                         (got.seen_indptr, want.seen_indptr),
                         (got.seen_items, want.seen_items)):
                assert a.dtype == b.dtype
                np.testing.assert_array_equal(a, b)
            assert list(got.tables) == list(want.tables)
            for k in want.tables:
                assert got.tables[k].dtype == want.tables[k].dtype, k
                assert got.tables[k].shape == want.tables[k].shape, k
                assert got.tables[k].tobytes() == want.tables[k].tobytes(), k


def _splits(rng: np.random.Generator, n: int, hi: int) -> list[int]:
    """Cut points 0 < c1 < ... < n of calls of random sizes 1..hi."""
    cuts, pos = [], 0
    while pos < n:
        pos = min(n, pos + int(rng.integers(1, hi + 1)))
        cuts.append(pos)
    return cuts


CHUNKED = [
    {"train_chunk": 700},
    {"train_chunk": 256, "ttl_ms": 3_000, "admit_after": 2, "mask_seen": False},
    {"train_chunk": 300, "ttl_ms": 5_000, **BOUNDED},
]


def _chunked_cases(test: Callable[..., None]) -> Callable[..., None]:
    """Run ``test(extra, seed)`` for each CHUNKED configuration on a few random streams."""
    test = given(seed=st.integers(0, 10_000))(test)
    test = settings(max_examples=3, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])(test)
    return pytest.mark.parametrize("extra", CHUNKED)(test)


def _reference(n: int, seed: int, extra: dict, batch: int | None = None) -> tuple:
    """A random stream, its config, and a model fed it in calls of ``batch`` (train_chunk)."""
    users, items, ts = _events(n, seed=seed)
    cfg = ModelConfig(**SMALL, seed=seed % 3, **extra)
    ref = StreamingModel(cfg, device="cpu")
    _feed(ref, users, items, ts, batch=batch or cfg.train_chunk)
    return users, items, ts, cfg, ref


@_chunked_cases
def test_training_independent_of_call_sizes(extra: dict, seed: int) -> None:
    """Calls of random sizes 1..3000 (some with an observer) == calls of exactly train_chunk."""
    users, items, ts, cfg, ref = _reference(5000, seed, extra)
    m = StreamingModel(cfg, device="cpu")
    rng = np.random.default_rng(seed)
    prev, pos = m.state(), 0
    from stream_rec.model import apply_delta

    for cut in _splits(rng, len(users), 3000):
        cb = (lambda j: None) if rng.random() < 0.3 else None
        ch = m.learn(users[pos:cut], items[pos:cut], ts[pos:cut], before_event=cb)
        pos = cut
        cur = m.state()   # the rows reported as changed carry every change
        _assert_same(apply_delta(prev, m.delta(ch.users, ch.items)), cur)
        prev = cur
    _assert_same(m.state(), ref.state())


@_chunked_cases
def test_restore_mid_chunk_continues_bitwise(extra: dict, seed: int) -> None:
    """state()/from_state() at arbitrary cut points (mid-chunk) continues bit for bit."""
    users, items, ts, cfg, ref = _reference(4000, seed, extra, batch=997)
    m = StreamingModel(cfg, device="cpu")
    rng = np.random.default_rng(seed + 1)
    pos = 0
    for cut in _splits(rng, len(users), 1500):
        m.learn(users[pos:cut], items[pos:cut], ts[pos:cut])
        pos = cut
        m = StreamingModel.from_state(m.state(), device="cpu")
    _assert_same(m.state(), ref.state())
