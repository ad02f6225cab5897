"""Prequential evaluation of a gang: the model trained as ``stream-rec worker --procs W``
would train it, with the W ranks as threads of this process (``stream-rec eval --ranks W``).

Every event is tested once, on the rank that owns its user, against that
rank's replica of the model; the metrics of all ranks are summed. The
baselines do not depend on the model, so they are the single run's, computed
event by event beside it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .baselines import CooccurrenceBaseline, DecayedPopularityBaseline, PopularityBaseline
from .model import ModelConfig
from .ranking import Metrics, model_rank


def run_baselines(users: list[str], items: list[str], ts: np.ndarray, ws: np.ndarray,
                  tested: np.ndarray, cfg: ModelConfig) -> dict[str, dict[str, float]]:
    """The baselines alone, test-then-learn event by event (what the model's run interleaves)."""
    runners = {
        "popularity": PopularityBaseline(),
        "decayed_popularity": DecayedPopularityBaseline(cfg.pop_half_life_ms),
        "cooccurrence": CooccurrenceBaseline(cfg.history),
    }
    for j in range(len(users)):
        for bl in runners.values():
            if tested[j]:
                bl.test(users[j], items[j], int(ts[j]))
            bl.learn(users[j], items[j], int(ts[j]), float(ws[j]))
    return {k: v.metrics.result() for k, v in runners.items()}


def run_gang_model(users: list[str], items: list[str], ts: np.ndarray, ws: np.ndarray,
                   tested: np.ndarray, batch_size: int, cfg: ModelConfig, device: str,
                   ranks: int) -> tuple[Metrics, str]:
    """The model trained by a gang of ``ranks`` ranks (threads of this process), tested
    prequentially on each event's owner; returns the summed metrics and the device.

    Users are spread over ranks as Kafka spreads them over partitions (a hash of
    the user id; one partition per rank here). Each batch of ``batch_size``
    events of the stream is one round: every rank learns its users' events of
    the batch, in stream order, with the gang's step semantics
    (:mod:`stream_rec.model.gang`). Every event is tested on its owner, before
    its user side is applied, against the embeddings of the last chunk's end.
    ``train_s`` is the slowest rank's (the ranks run side by side).
    """
    from .model.exchange import ThreadExchange
    from .model.gang import GangModel
    from .model.ids import id_hash

    owner = np.array([id_hash(u) % ranks for u in users], dtype=np.int64)
    n = len(users)

    def body(ex: ThreadExchange) -> tuple[Metrics, str]:
        model = GangModel(cfg, device=device, exchange=ex)
        mm = Metrics()
        for b0 in range(0, n, batch_size):
            idx = np.flatnonzero(owner[b0:b0 + batch_size] == ex.rank) + b0
            bu, bi = [users[j] for j in idx], [items[j] for j in idx]
            test_s = 0.0

            def before(j: int, idx: np.ndarray = idx, bu: list[str] = bu,
                       bi: list[str] = bi) -> None:
                nonlocal test_s
                if tested[idx[j]]:
                    t0 = time.perf_counter()
                    mm.add(model_rank(model, bu[j], bi[j]))
                    test_s += time.perf_counter() - t0

            t0 = time.perf_counter()
            model.learn_round(bu, bi, ts[idx], ws[idx], partitions=owner[idx],
                              before_event=before)
            mm.train_s += time.perf_counter() - t0 - test_s
            mm.train_events += len(idx)
        return mm, str(model.device)

    per_rank = ThreadExchange.run(ranks, body)
    total = Metrics()
    for mm, _ in per_rank:
        total.n += mm.n
        total.hits += mm.hits
        total.ndcg += mm.ndcg
        total.mrr += mm.mrr
        total.train_events += mm.train_events
        total.train_s = max(total.train_s, mm.train_s)
    return total, per_rank[0][1]


def run_gang_eval(users: list[str], items: list[str], ts: np.ndarray, ws: np.ndarray,
                  tested: np.ndarray, batch_size: int, cfg: ModelConfig, device: str,
                  baselines: bool, ranks: int) -> dict[str, Any]:
    """:func:`stream_rec.evaluation.run_eval`'s result for a gang of ``ranks`` (plus ``ranks``)."""
    t_all = time.perf_counter()
    mm, dev = run_gang_model(users, items, ts, ws, tested, batch_size, cfg, device, ranks)
    res = mm.result()
    return {
        "model": res,
        "baselines": run_baselines(users, items, ts, ws, tested, cfg) if baselines else {},
        "events_per_s": res["events_per_s"],
        "n_events": len(users),
        "n_tested": mm.n,
        "batch_size": batch_size,
        "ranks": ranks,
        "device": dev,
        "wall_s": time.perf_counter() - t_all,
    }
