"""Shared rows: ids waiting for admission are learned on hashed rows and answered from them."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from stream_rec.datasets import iter_synthetic
from stream_rec.model import ModelConfig, StreamingModel
from stream_rec.model.ids import shared_row

CFG = {"dim": 8, "history": 4, "negatives": 16, "replay": 50, "replay_per_step": 10,
       "admit_after": 3, "shared_rows": 4}


def test_needs_admission() -> None:
    with pytest.raises(ValueError, match="admit_after"):
        ModelConfig(shared_rows=4)


def test_waiting_ids_are_learned_on_their_shared_rows() -> None:
    m = StreamingModel(ModelConfig(**CFG, train_chunk=4), device="cpu")
    assert m.n_users == m.n_items == 4
    m.learn(["a", "a", "b", "c"], ["x", "y", "x", "x"], np.arange(4))
    st = m.state()
    assert st.user_ids[:4] == [""] * 4 and st.item_ids[:4] == [""] * 4
    assert st.user_row("a") is None and st.item_row("x") is not None     # x: 3rd event
    assert st.tables["user.events"].sum() == 4                           # nothing dropped
    sa = shared_row("a", 4)
    assert st.tables["user.events"][sa] >= 2
    assert (st.tables["user.hist"][:4] == -1).all()   # shared users keep no history ...
    assert st.seen(sa).size == 0                       # ... and no seen list
    assert st.query_row("a") == m.query_row("a") == sa
    assert st.query_row("nobody") == shared_row("nobody", 4)


def test_shared_items_enter_no_history() -> None:
    """A known user clicking an item that waits for admission learns the event on the
    shared item row, but the row stays out of their history and seen list."""
    m = StreamingModel(ModelConfig(**CFG, train_chunk=5), device="cpu")
    m.learn(["u"] * 5, ["x", "x", "x", "rare", "x"], np.arange(5))
    row = m.user_row("u")
    st = m.state()
    assert st.tables["user.events"][row] == 3 and st.item_row("rare") is None
    assert st.tables["item.events"][shared_row("rare", 4)] == 1
    assert set(st.tables["user.hist"][row].tolist()) == {st.item_row("x"), -1}
    assert st.seen(row).tolist() == [st.item_row("x")]


def test_new_user_gets_a_learned_answer_not_the_fallback() -> None:
    ev = list(itertools.islice(iter_synthetic(n_users=300, n_items=100, seed=1), 6000))
    m = StreamingModel(ModelConfig(**CFG), device="cpu")
    for b in range(0, len(ev), 500):
        m.learn([e["user_id"] for e in ev[b:b + 500]], [e["item_id"] for e in ev[b:b + 500]],
                np.array([e["ts"] for e in ev[b:b + 500]], dtype=np.int64))
    st = m.state()
    row = shared_row("brand-new", 4)
    assert np.abs(st.tables["user.vec"][row]).sum() > 0        # trained by waiting users
    got = [i for i, _ in m.recommend("brand-new", 10)]
    assert got == [i for i, _ in st.recommend("brand-new", 10)]
    assert len(got) == 10 and "" not in got                    # shared items are never served
    scores = dict(m.recommend("brand-new", 10))
    assert scores != {st.item_ids[r]: float(st.tables["item.pop_log"][r])
                      for r in st.popular(10)}


def test_admitted_rows_start_afresh() -> None:
    """An admitted id's own row is initialised as without sharing, not copied."""
    m = StreamingModel(ModelConfig(**CFG, train_chunk=3), device="cpu")
    n = StreamingModel(ModelConfig(**{**CFG, "shared_rows": 0}, train_chunk=3), device="cpu")
    for model in (m, n):
        model.learn(["u1", "u2", "u3"], ["new", "new", "new"], np.arange(3))
    i, si = m.item_row("new"), shared_row("new", 4)
    assert i is not None and i >= 4
    assert not torch.equal(m.params.item_out[i], m.params.item_out[si])
    assert m.params.acc_bias[si] > 0                # the shared row learned the waiting events
    assert m.state().tables["item.events"].sum() == 3   # three waiting users, all learned
    assert n.state().tables["item.events"].sum() == 0   # without sharing, all dropped
