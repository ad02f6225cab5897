"""Content in the prequential evaluation: the model with item text against the one without.

``stream-rec eval --items`` trains, in the same run and on the same stream,
the configured model (the ``"model"`` result) and the same configuration with
content (``content_dim`` = the text vectors' width): catalogue items are
announced into it when the catalogue lists them (before their first click),
and its answers get the serving content term (``serve.content_alpha``, see
:mod:`stream_rec.model.content`). Both are ranked, each event before it is
learned, on three slices after the warm-up:

* ``overall``: the usual 1-in-``sample_every`` sample (the ``"model"`` result's);
* ``cold``: *every* event whose item had 1-9 earlier events -- about 6 500 on
  ML-100K, so the figure is not noise (the sample holds about 300);
* ``first``: every event that is its item's first, for items the catalogue
  announced before it: only content can reach those.

The two models learn in two passes over the stream (they share nothing, so
this equals training them side by side); ranks of the model without content
come from the main pass.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .model import ModelConfig, StreamingModel
from .model.content import YOUNG_MAX_EVENTS, term_scores
from .ranking import Metrics, model_rank, rank_of

SLICES = ("overall", "cold", "first")


def content_slices(items: list[str], ts: np.ndarray, start: int, tested: np.ndarray,
                   catalogue: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Bool masks (N,) of the slices (see the module docstring)."""
    n = len(items)
    prior = np.zeros(n, dtype=np.int64)           # earlier events of the event's item
    counts: dict[str, int] = {}
    for j, it in enumerate(items):
        prior[j] = counts.get(it, 0)
        counts[it] = prior[j] + 1
    listed = {str(c["item_id"]): int(c["ts"]) for c in catalogue}
    announced = np.array([listed.get(it, np.iinfo(np.int64).max) <= t
                          for it, t in zip(items, ts.tolist())], dtype=bool)
    after = np.arange(n) >= start
    return {"overall": tested.copy(),
            "cold": after & (prior >= 1) & (prior <= YOUNG_MAX_EVENTS),
            "first": after & (prior == 0) & announced}


def content_ranks(model: StreamingModel, user: str, item: str,
                  alpha: float) -> tuple[int | None, int | None]:
    """Rank of ``item`` for ``user`` without and with the content term (as ``model_rank``)."""
    target = model.item_row(item)
    row = model.query_row(user)
    if target is None or row is None:
        rank = model_rank(model, user, item)
        return rank, rank
    scores = model.score_user(user)
    assert scores is not None
    base = np.where(model.live_items(), scores, -np.inf)
    seen = model.seen_rows(row)
    plain = rank_of(base, target, seen)
    term = term_scores(model, row) if alpha else None
    if term is None:
        return plain, plain
    return plain, rank_of(base + np.float32(alpha) * term, target, seen)


def content_pass(users: list[str], items: list[str], ts: np.ndarray, ws: np.ndarray,
                 cfg: ModelConfig, device: str, batch_size: int,
                 catalogue: list[dict[str, Any]], vectors: dict[str, np.ndarray],
                 slices: dict[str, np.ndarray], base_ranks: dict[int, int | None],
                 alpha: float) -> dict[str, Any]:
    """Train the model with content over the stream; the ``"content"`` result."""
    dim = len(next(iter(vectors.values()))) if vectors else 0
    model = StreamingModel(cfg.model_copy(update={"content_dim": dim}), device=device)
    listed = sorted((int(c["ts"]), str(c["item_id"])) for c in catalogue
                    if str(c["item_id"]) in vectors)
    ann_ts = np.array([t for t, _ in listed], dtype=np.int64)
    ann_ids = [i for _, i in listed]
    m = {s: {"with": Metrics(), "no_term": Metrics(), "without": Metrics()} for s in SLICES}
    any_slice = slices["overall"] | slices["cold"] | slices["first"]
    nxt = 0
    test_s = 0.0
    t_all = time.perf_counter()
    for b0 in range(0, len(users), batch_size):
        b1 = min(len(users), b0 + batch_size)

        def before(j: int, b0: int = b0) -> None:
            nonlocal nxt, test_s
            t0 = time.perf_counter()
            k = b0 + j
            end = int(np.searchsorted(ann_ts, ts[k], side="right"))
            if end > nxt:           # the catalogue listed these before this event
                ids = ann_ids[nxt:end]
                model.announce(ids, np.stack([vectors[i] for i in ids]), int(ts[k]))
                nxt = end
            if any_slice[k]:
                plain, with_term = content_ranks(model, users[k], items[k], alpha)
                for s in SLICES:
                    if slices[s][k]:
                        m[s]["with"].add(with_term)
                        m[s]["no_term"].add(plain)
                        m[s]["without"].add(base_ranks[k])
            test_s += time.perf_counter() - t0

        model.learn(users[b0:b1], items[b0:b1], ts[b0:b1], ws[b0:b1], before_event=before)
    train_s = time.perf_counter() - t_all - test_s
    r = {s: {k: v.result() for k, v in ms.items()} for s, ms in m.items()}
    out: dict[str, Any] = {
        "hr@10": r["overall"]["with"]["hr@10"],
        "hr@10_without": r["overall"]["without"]["hr@10"],
        "cold_hr@10": r["cold"]["with"]["hr@10"],
        "cold_hr@10_without": r["cold"]["without"]["hr@10"],
        "cold_events": m["cold"]["with"].n,
    }
    out.update({
        "first_hr@10": r["first"]["with"]["hr@10"],
        "first_hr@10_without": r["first"]["without"]["hr@10"],
        "first_events": m["first"]["with"].n,
        "hr@10_no_term": r["overall"]["no_term"]["hr@10"],
        "cold_hr@10_no_term": r["cold"]["no_term"]["hr@10"],
        "first_hr@10_no_term": r["first"]["no_term"]["hr@10"],
        "ndcg@10": r["overall"]["with"]["ndcg@10"],
        "ndcg@10_without": r["overall"]["without"]["ndcg@10"],
        "alpha": alpha, "content_dim": dim, "announced": nxt,
        "items_with_text": int(model.params.n_text),
        "events_per_s": len(users) / train_s if train_s > 0 else 0.0,
    })
    return out
