"""Ranks through the served state: the rows published, the configurations, the result."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from stream_rec import datasets
from stream_rec.evaluation import run_eval
from stream_rec.model import ModelConfig, StreamingModel, apply_delta, delta_from_state
from stream_rec.served_eval import ServedConfig, changed_rows
from tests.model.test_delta import assert_same_state


def test_changed_rows_are_enough_to_rebuild_the_new_state() -> None:
    """Ids, row tables and seen lists (expiry empties lists without touching rows)."""
    cfg = ModelConfig(dim=8, train_chunk=100, ttl_ms=2_000, seen_max=6, max_items=50)
    model = StreamingModel(cfg, device="cpu")
    evs = list(itertools.islice(datasets.iter_synthetic(n_users=40, n_items=70, seed=2), 1500))
    prev = None
    partial = 0   # publications that needed fewer than all user rows
    for b in range(0, len(evs), 45):
        batch = evs[b:b + 45]
        model.learn([e["user_id"] for e in batch], [e["item_id"] for e in batch],
                    np.array([e["ts"] for e in batch], dtype=np.int64))
        cur = model.state()
        users, items = changed_rows(prev, cur)
        if prev is None:
            assert len(users) == len(cur.user_ids) and len(items) == len(cur.item_ids)
        else:
            partial += len(users) < len(cur.user_ids)
            assert_same_state(apply_delta(prev, delta_from_state(cur, users, items)), cur)
        prev = cur
    assert partial > 10


def test_served_configurations_parse_and_refuse_unknown_dtypes() -> None:
    assert ServedConfig.parse("int8") == ServedConfig("int8", "int8", "flat")
    assert ServedConfig.parse("float32>int8:sq8") == ServedConfig("float32", "int8", "sq8")
    assert ServedConfig.parse("float16:fp16").name == "float16:fp16"
    assert ServedConfig.parse("int8>float32").name == "int8>float32"
    for bad in ("int4", "int8:nope", "float32>bf16"):
        with pytest.raises(ValueError):
            ServedConfig.parse(bad)


def test_float32_served_ranks_are_the_models_own() -> None:
    """No lag and no encoding: the served state answers what the model in process does."""
    evs = list(itertools.islice(datasets.iter_synthetic(n_users=60, n_items=90, seed=4), 2500))
    res = run_eval(evs, sample_every=40, model_cfg=ModelConfig(dim=8, train_chunk=200),
                   device="cpu", baselines=False, served=["float32", "int8"],
                   served_full_every=5)
    served = res["served"]
    assert set(served) == {"float32", "int8"}
    f32 = served["float32"]
    assert f32["hr@10"] == res["model"]["hr@10"] and f32["ndcg@10"] == res["model"]["ndcg@10"]
    assert f32["top10_same_as_model"] == 1.0
    assert served["int8"]["served_vector_bytes"] < f32["served_vector_bytes"]
    assert 0.9 <= served["int8"]["overlap_at_10_with_model"] <= 1.0
