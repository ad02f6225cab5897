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


@pytest.fixture
def one_thread():
    """One torch thread: thousands of tiny scoring calls, each a parallel region that waits
    for a descheduled second thread on a loaded machine (ten times slower, same result)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def _planted_catalogue(events: list[dict], k: int = 16, seed: int = 0):
    """Every item listed an hour before its first event, with a text vector that says
    its taste group (item ``i<n>`` belongs to group n mod 10) plus noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((10, k))
    first: dict[str, int] = {}
    for e in events:
        first.setdefault(e["item_id"], e["ts"])
    catalogue = [{"item_id": i, "ts": t - 3_600_000} for i, t in first.items()]
    vectors = {}
    for i in first:
        x = centres[int(i[1:]) % 10] + 0.5 * rng.standard_normal(k)
        vectors[i] = (x / np.linalg.norm(x)).astype(np.float32)
    return catalogue, vectors


def test_content_comparison_in_the_same_run(one_thread: None) -> None:
    import numpy as np

    events = list(itertools.islice(iter_synthetic(n_users=100, n_items=400, seed=3), 3000))
    catalogue, vectors = _planted_catalogue(events)
    res = evaluation.run_eval(events, sample_every=10, batch_size=500, model_cfg=CFG,
                              device="cpu", baselines=False, catalogue=catalogue,
                              vectors=vectors)
    c = res["content"]
    assert {"hr@10", "hr@10_without", "cold_hr@10", "cold_hr@10_without",
            "cold_events"} <= set(c)
    assert c["hr@10_without"] == res["model"]["hr@10"]     # the same ranks as the main pass
    prior: dict[str, int] = {}
    cold = first = 0
    for j, e in enumerate(events):
        p = prior.get(e["item_id"], 0)
        prior[e["item_id"]] = p + 1
        if j >= 300:
            cold += 1 <= p <= 9
            first += p == 0
    assert c["cold_events"] == cold and c["first_events"] == first > 0
    assert c["announced"] == len(catalogue) and c["items_with_text"] == len(catalogue)
    assert c["cold_hr@10"] > c["cold_hr@10_without"]            # the planted text helps
    off = evaluation.run_eval(events[:1200], sample_every=10, batch_size=500, model_cfg=CFG,
                              device="cpu", baselines=False, catalogue=catalogue,
                              vectors=vectors, content_alpha=0.0)["content"]
    for key in ("hr@10", "cold_hr@10", "first_hr@10"):
        assert off[key] == off[key.replace("hr@10", "hr@10_no_term")]
    assert np.isfinite(off["events_per_s"])
