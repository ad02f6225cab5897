"""Prequential (test-then-train) evaluation of the streaming model against baselines.

Events are replayed in stream order in micro-batches of ``batch_size`` (the
worker's default). Before an event is learned, the model and every baseline
are asked for its user's top-10 (items the user has already seen excluded);
a hit is counted when the event's item is among them. Only a fixed 1-in-
``sample_every`` sample of events after the first ``warmup`` fraction is tested;
every event is learned.

Semantics match the worker: each event is scored against embeddings as of the
last complete training chunk (``ModelConfig.train_chunk`` events counted from
the start of the stream) and fast-path state (history, seen set, popularity)
updated up to the previous event. Micro-batches of ``batch_size`` only decide
how events are handed to ``learn()``; training is chunked independently of
them. Baselines are counts and update per event.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .baselines import (
    Baseline,
    CooccurrenceBaseline,
    DecayedPopularityBaseline,
    PopularityBaseline,
)
from .model import ModelConfig, StreamingModel
from .ranking import Metrics, model_rank, model_scores, model_top, rank_of


# ------------------------------------------------------------------------ data
def _to_arrays(events: Any) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(users, items, ts_ms (N,) int64, weights (N,) float32) from dicts or a structured array."""
    if isinstance(events, np.ndarray) and events.dtype.names:
        users = [str(x) for x in events["user"].tolist()]
        items = [str(x) for x in events["item"].tolist()]
        return users, items, events["ts"].astype(np.int64), np.ones(len(events), np.float32)
    users, items, ts, ws = [], [], [], []
    for ev in events:
        if not isinstance(ev, dict):
            continue
        try:
            u, i, t = ev["user_id"], ev["item_id"], int(ev["ts"])
        except (KeyError, TypeError, ValueError):
            continue
        if u is None or i is None or u == "" or i == "":
            continue
        users.append(str(u))
        items.append(str(i))
        ts.append(t)
        ws.append(float(ev.get("weight", 1.0) or 1.0))
    return users, items, np.asarray(ts, dtype=np.int64), np.asarray(ws, dtype=np.float32)


# ------------------------------------------------------------------------- run
def run_eval(events: Any, *, warmup: float = 0.1, sample_every: int = 25, seed: int = 0,
             batch_size: int = 1000, model_cfg: ModelConfig | None = None,
             device: str = "auto", baselines: bool = True,
             catalogue: list[dict[str, Any]] | None = None,
             vectors: dict[str, np.ndarray] | None = None,
             content_alpha: float = 1.5, ranks: int = 1,
             served: Sequence[str] = (), served_full_every: int = 100) -> dict[str, Any]:
    """Prequential evaluation; returns the JSON result described in the module docstring.

    ``events``: iterable of event dicts (``user_id``, ``item_id``, ``ts`` ms,
    optional ``weight``) or the structured array of :func:`datasets.load_ml100k`.
    ``baselines=False`` runs the model alone (for ablations). The tested sample is every ``sample_every``-th event after warm-up, starting
    at offset ``seed % sample_every``. ``served`` also ranks each tested event
    through the served state, once per configuration (``"int8"``, ``"float16:fp16"``,
    see :class:`~stream_rec.served_eval.ServedConfig`), under ``result["served"]``.

    With ``catalogue`` (item dicts with ``item_id`` and ``ts``) and ``vectors``
    (item id -> text vector), the same run also trains the model with content
    and adds ``"content"`` to the result (:mod:`stream_rec.evaluation_content`):
    both models ranked on the sample, on the cold slice and on announced items'
    first events, with the serving content term at ``content_alpha``.

    ``ranks`` > 1 trains the model as a gang of that many ranks would
    (:func:`stream_rec.evaluation_gang.run_gang_model`); a gang trains no item
    text, so it takes no ``vectors``.
    """
    cfg = model_cfg or ModelConfig()
    users, items, ts, ws = _to_arrays(events)
    n = len(users)
    start = math.ceil(warmup * n)
    tested = np.zeros(n, dtype=bool)
    if sample_every > 0 and start < n:
        tested[start + (seed % sample_every)::sample_every] = True
    if ranks > 1:
        if vectors is not None:
            raise ValueError("a gang (ranks > 1) trains no item text: compare content "
                             "with one rank")
        from .evaluation_gang import run_gang_eval

        return run_gang_eval(users, items, ts, ws, tested, batch_size, cfg, device,
                             baselines, ranks)
    slices = None
    extra = np.zeros(n, dtype=bool)          # events ranked for the content comparison only
    base_ranks: dict[int, int | None] = {}
    if vectors is not None:
        from .evaluation_content import content_slices

        slices = content_slices(items, ts, start, tested, catalogue or [])
        extra = slices["cold"] | slices["first"]
    model = StreamingModel(cfg, device=device)
    with_baselines = baselines
    runners: dict[str, Baseline] = {} if not with_baselines else {
        "popularity": PopularityBaseline(),
        "decayed_popularity": DecayedPopularityBaseline(cfg.pop_half_life_ms),
        "cooccurrence": CooccurrenceBaseline(cfg.history),
    }
    mm = Metrics()
    serving = None
    if served:
        from .served_eval import ServedMetrics

        serving = ServedMetrics(served, served_full_every)
    test_s = 0.0
    t_all = time.perf_counter()
    for b0 in range(0, n, batch_size):
        b1 = min(n, b0 + batch_size)
        bu, bi, bt, bw = users[b0:b1], items[b0:b1], ts[b0:b1], ws[b0:b1]

        def before(j: int, b0: int = b0, bu: list[str] = bu, bi: list[str] = bi,
                   bt: np.ndarray = bt, bw: np.ndarray = bw) -> None:
            nonlocal test_s
            t0 = time.perf_counter()
            k = b0 + j
            if tested[k] or extra[k]:
                if tested[k] and serving is not None:   # the model's top-10 beside its rank
                    scores, seen = model_scores(model, bu[j])
                    target = model.item_row(bi[j])
                    rank = None if target is None else rank_of(scores, target, seen)
                    serving.test(model, bu[j], bi[j], model_top(model, scores, seen))
                else:
                    rank = model_rank(model, bu[j], bi[j])
                if slices is not None:
                    base_ranks[k] = rank
            if tested[k]:
                mm.add(rank)
                for bl in runners.values():
                    bl.test(bu[j], bi[j], int(bt[j]))
            for bl in runners.values():
                bl.learn(bu[j], bi[j], int(bt[j]), float(bw[j]))
            test_s += time.perf_counter() - t0

        test_before = test_s
        t0 = time.perf_counter()
        model.learn(bu, bi, bt, bw, before_event=before)
        mm.train_s += time.perf_counter() - t0 - (test_s - test_before)
        mm.train_events += b1 - b0
    wall = time.perf_counter() - t_all
    res = mm.result()
    out: dict[str, Any] = {} if serving is None else {"served": serving.result()}
    if slices is not None:
        from .evaluation_content import content_pass

        assert vectors is not None
        out["content"] = content_pass(users, items, ts, ws, cfg, device, batch_size,
                                      catalogue or [], vectors, slices, base_ranks,
                                      content_alpha)
        wall = time.perf_counter() - t_all
    return {
        "model": res,
        "baselines": {k: v.metrics.result() for k, v in runners.items()},
        "events_per_s": res["events_per_s"],
        "n_events": n,
        "n_tested": mm.n,
        "batch_size": batch_size,
        "device": str(model.device),
        "wall_s": wall,
        **out,
    }
