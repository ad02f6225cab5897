"""Prequential evaluation: the model beats popularity on planted structure; CLI output."""

from __future__ import annotations

import itertools
import json

import pytest

from stream_rec import evaluation
from stream_rec.cli import main
from stream_rec.datasets import iter_synthetic
from stream_rec.model import ModelConfig

CFG = ModelConfig(dim=16, history=10, negatives=64, replay=500, replay_per_step=100)


def test_model_far_above_popularity_on_planted_stream() -> None:
    events = list(itertools.islice(iter_synthetic(n_users=200, n_items=400, seed=1), 8000))
    res = evaluation.run_eval(events, sample_every=5, batch_size=250, model_cfg=CFG,
                              device="cpu")
    hr = res["model"]["hr@10"]
    pop = res["baselines"]["popularity"]["hr@10"]
    assert res["n_tested"] == (8000 - 800) // 5
    assert hr > 1.5 * pop and hr > pop + 0.05, res
    for r in [res["model"], *res["baselines"].values()]:
        assert 0 <= r["ndcg@10"] <= r["hr@10"] <= 1 and r["events_per_s"] > 0


def test_rank_order_and_exclusion() -> None:
    import numpy as np

    s = np.array([0.5, 0.9, 0.9, 0.1])
    assert evaluation._rank(s, 1, ()) == 0
    assert evaluation._rank(s, 2, ()) == 1          # tie broken by row
    assert evaluation._rank(s, 2, {1}) == 0         # seen removed
    assert evaluation._rank(s, 9, ()) is None


def test_cli_json_last_line(tmp_path, capsys) -> None:
    path = tmp_path / "ev.jsonl"
    events = list(itertools.islice(iter_synthetic(n_users=50, n_items=100), 1500))
    path.write_text("\n".join(json.dumps(e) for e in events) + "\nnot json\n")
    assert main(["eval", "--dataset", str(path), "--batch-size", "300",
                 "--sample-every", "10", "--device", "cpu", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "HR@10" in lines[0]
    out = json.loads(lines[-1])
    assert set(out["baselines"]) == {"popularity", "decayed_popularity", "cooccurrence"}
    assert {"hr@10", "ndcg@10", "mrr", "events_per_s"} <= set(out["model"])
    assert out["events_per_s"] > 0


@pytest.mark.parametrize("bs", [1, 7])
def test_batch_size_only_changes_slow_path(bs: int) -> None:
    events = list(itertools.islice(iter_synthetic(n_users=20, n_items=30), 60))
    res = evaluation.run_eval(events, batch_size=bs, sample_every=3, model_cfg=CFG,
                              device="cpu")
    assert res["n_tested"] == 18
    assert res["baselines"]["popularity"]["hr@10"] == pytest.approx(
        evaluation.run_eval(events, batch_size=60, sample_every=3, model_cfg=CFG,
                            device="cpu")["baselines"]["popularity"]["hr@10"])


def test_cooccurrence_prefers_recent_neighbours_and_discounts_popularity() -> None:
    from stream_rec.evaluation import CooccurrenceBaseline

    bl = CooccurrenceBaseline(window=5)
    for u, seq in (("a", ["x", "y"]), ("b", ["z", "w"]), ("c", ["x", "y"])):
        for t, item in enumerate(seq):
            bl.learn(u, item, t, 1.0)
    # a user who just clicked z (after x long before) gets w, z's neighbour, first
    bl.learn("d", "x", 10, 1.0)
    bl.learn("d", "z", 11, 1.0)
    s = bl.scores("d", 12)
    assert s[bl.items["w"]] > s[bl.items["y"]] > 0
    # popularity division: a neighbour seen everywhere weighs less than a rare one
    for k in range(6):
        bl.learn(f"p{k}", "pop", 20 + k, 1.0)
    bl.learn("e", "q", 30, 1.0)
    bl.learn("e", "pop", 31, 1.0)
    bl.learn("f", "q", 32, 1.0)
    bl.learn("f", "rare", 33, 1.0)
    bl.learn("g", "q", 35, 1.0)
    s = bl.scores("g", 36)
    assert s[bl.items["rare"]] > s[bl.items["pop"]]


def test_a_simulated_gang_tests_every_event_once_and_learns_like_one_worker() -> None:
    """``--ranks``: each event tested once on its owner; quality close to one worker's;
    the baselines (counts, independent of the model) exactly the same."""
    events = list(itertools.islice(iter_synthetic(n_users=200, n_items=400, seed=1), 8000))
    one = evaluation.run_eval(events, sample_every=5, batch_size=250, model_cfg=CFG,
                              device="cpu")
    gang = evaluation.run_eval(events, sample_every=5, batch_size=250, model_cfg=CFG,
                               device="cpu", ranks=3)
    assert gang["ranks"] == 3 and gang["n_tested"] == one["n_tested"]
    assert gang["baselines"] == {k: {**v, "events_per_s": gang["baselines"][k]["events_per_s"]}
                                 for k, v in one["baselines"].items()}
    assert abs(gang["model"]["hr@10"] - one["model"]["hr@10"]) < 0.03, (gang, one)
    assert main(["eval", "--ranks", "0"]) == 2
