"""Bounded host state: seen caps, bounded admission counts, row caps, restore under new settings."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from stream_rec.datasets import iter_synthetic
from stream_rec.model import ModelConfig, ModelState, StreamingModel, apply_delta
from stream_rec.model.config import RestoreRefused

SMALL = {"dim": 8, "history": 4, "negatives": 16, "replay": 50, "replay_per_step": 10}


def _same(a: ModelState, b: ModelState) -> None:
    assert a.user_ids == b.user_ids and a.item_ids == b.item_ids
    assert list(a.tables) == list(b.tables)
    for k in a.tables:
        assert a.tables[k].dtype == b.tables[k].dtype, k
        np.testing.assert_array_equal(a.tables[k], b.tables[k], err_msg=k)


def _stream(n: int, n_users: int = 100, n_items: int = 200, seed: int = 0):
    ev = list(itertools.islice(iter_synthetic(n_users=n_users, n_items=n_items, seed=seed), n))
    return ([e["user_id"] for e in ev], [e["item_id"] for e in ev],
            np.array([e["ts"] for e in ev], dtype=np.int64))


def test_seen_keeps_the_most_recent_distinct_items() -> None:
    m = StreamingModel(ModelConfig(**SMALL, seen_max=3), device="cpu")
    m.learn(["u"] * 5, ["a", "b", "c", "a", "d"], np.arange(5))
    st = m.state()
    row = st.user_row("u")
    # "a" clicked again moved to the newest end; "b" was the oldest when "d" came
    assert [st.item_ids[r] for r in st.seen(row)] == ["c", "a", "d"]
    assert "b" in [i for i, _ in m.recommend("u", 10)]      # no longer excluded
    assert "a" not in [i for i, _ in m.recommend("u", 10)]


def test_admission_counts_are_bounded() -> None:
    m = StreamingModel(ModelConfig(**SMALL, admit_after=2, pending_max=3), device="cpu")
    m.learn([f"once{k}" for k in range(10)], ["x"] * 10, np.arange(10))
    st = m.state()
    assert len(st.tables["global.pending_user_keys"]) == 3
    assert st.tables["global.pending_user_keys"].dtype == np.uint64
    assert len(st.tables["global.pending_item_keys"]) == 0     # "x" was admitted
    # once9 is still counted: its second event admits it; once0 was forgotten
    m.learn(["once9", "once0"], ["x", "x"], np.array([10, 11]))
    assert m.user_row("once9") is not None and m.user_row("once0") is None


@pytest.mark.parametrize("side", ["users", "items"])
def test_row_cap_evicts_least_recently_seen(side: str) -> None:
    cap = {"max_users": 32} if side == "users" else {"max_items": 32}
    m = StreamingModel(ModelConfig(**SMALL, train_chunk=40, **cap), device="cpu")
    n = 40
    users = [f"u{k}" for k in range(n)] if side == "users" else ["u"] * n
    items = ["i"] * n if side == "users" else [f"i{k}" for k in range(n)]
    ch = m.learn(users, items, np.arange(n) * 1000)
    ids = m.fast.users.ids if side == "users" else m.fast.items.ids
    gone = [f"{side[0]}{k}" for k in range(10)]        # 40 - 30 (15/16 of 32) oldest
    assert sorted(x for x in ids if x) == sorted(f"{side[0]}{k}" for k in range(10, n))
    assert m.fast.users.n_live + m.fast.items.n_live == 31
    rows = ch.users if side == "users" else ch.items
    assert set(range(10)) <= set(rows.tolist())        # the removals are published
    st = m.state()
    if side == "items":      # evicted items left the user's seen list and history
        seen = {st.item_ids[r] for r in st.seen(st.user_row("u"))}
        assert seen == {f"i{k}" for k in range(10, n)}
        assert set(st.tables["user.hist"][st.user_row("u")].tolist()) <= \
            {st.item_row(f"i{k}") for k in range(36, n)}
    else:
        assert all(st.user_row(x) is None for x in gone)
    # new ids reuse the freed rows instead of growing the tables
    more = [f"new{k}" for k in range(5)]
    m.learn(more if side == "users" else ["u"] * 5, ["i"] * 5 if side == "users" else more,
            np.arange(5) + 10**6)
    assert (m.n_users if side == "users" else m.n_items) == n


def test_restore_refuses_what_the_tables_fix() -> None:
    m = StreamingModel(ModelConfig(**SMALL), device="cpu")
    m.learn(*_stream(300))
    st = m.state()
    with pytest.raises(RestoreRefused, match=r"dim \(8 in the state, 16 asked\).*history"):
        StreamingModel.from_state(st, device="cpu",
                                  cfg=ModelConfig(**{**SMALL, "dim": 16, "history": 5}))
    with pytest.raises(RestoreRefused, match="train_chunk"):
        StreamingModel.from_state(st, device="cpu", cfg=ModelConfig(**SMALL, train_chunk=300))


def test_restore_applies_new_bounds_and_reports_what_they_change() -> None:
    """A smaller seen cap, a new TTL, row caps, admission and replay size all apply from the
    restore on, and the rows they change are in the next delta (no silent divergence)."""
    users, items, ts = _stream(3000)
    base = ModelConfig(**SMALL, train_chunk=500)
    m = StreamingModel(base, device="cpu")
    m.learn(users[:2100], items[:2100], ts[:2100])
    st = m.state()
    assert np.diff(st.tables["global.seen_indptr"]).max() > 5
    new = ModelConfig(**{**base.model_dump(), "seen_max": 5, "ttl_ms": 30_000,
                         "max_users": 60, "max_items": 150, "replay": 20, "pop_weight": 0.2,
                         "admit_after": 2, "lr": 0.05})
    r = StreamingModel.from_state(st, device="cpu", cfg=new)
    assert r.cfg == new
    ch = r.learn(users[2100:2101], items[2100:2101], ts[2100:2101])
    after = r.state()
    assert after.config["seen_max"] == 5
    assert np.diff(after.tables["global.seen_indptr"]).max() <= 5
    assert len(after.tables["global.replay_user"]) == 20
    # every row whose exported values changed is reported: the delta rebuilds the state
    _same(apply_delta(st, r.delta(ch.users, ch.items)), after)
    r.learn(users[2101:], items[2101:], ts[2101:])       # caps and TTL at the chunk ends
    assert r.fast.users.n_live <= 60 and r.fast.items.n_live <= 150


def test_restore_of_an_older_state() -> None:
    """States written before the bounds (ids in the admission tables, sorted seen lists,
    no bound in the config) restore, and today's default caps apply visibly."""
    m = StreamingModel(ModelConfig(**SMALL, admit_after=2, seen_max=0), device="cpu")
    m.learn(*_stream(2000, n_users=20))
    st = m.state()
    t = dict(st.tables)
    pending = {"user": ["never-again"], "item": ["rare-item"]}
    for side in ("user", "item"):
        del t[f"global.pending_{side}_keys"]
        t[f"global.pending_{side}_ids"] = np.asarray(pending[side], dtype=str)
        t[f"global.pending_{side}_counts"] = np.ones(1, dtype=np.int64)
    ptr, seen = t["global.seen_indptr"], t["global.seen_items"].copy()
    for u in range(len(ptr) - 1):
        seen[ptr[u]:ptr[u + 1]].sort()
    t["global.seen_items"] = seen
    config = {k: v for k, v in st.config.items()
              if k not in ("seen_max", "max_users", "max_items", "pending_max", "shared_rows")}
    old = ModelState(config=config, user_ids=st.user_ids, item_ids=st.item_ids, tables=t)
    r = StreamingModel.from_state(old, device="cpu",
                                  cfg=ModelConfig(**SMALL, admit_after=2, seen_max=8))
    row = r.user_row(st.user_ids[0])
    recent = list(dict.fromkeys(x for x in r.fast.hist[row].tolist() if x >= 0))[::-1]
    kept = r.seen_rows(row).tolist()
    assert len(kept) == 8 and len(recent) > 1
    assert kept[-len(recent):] == recent      # the known-recent items survive, newest last
    r.learn(["never-again"], ["rare-item"], np.array([int(st.tables["global.watermark"][0])]))
    assert r.user_row("never-again") is not None and r.item_row("rare-item") is not None
