"""Where a target lands in a served order, and the metrics that count it.

Shared by the prequential evaluation and its content slices so both rank the
same way the server orders answers: score descending, then row ascending, with
seen rows and non-candidates (``-inf``) removed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from .model import StreamingModel

K = 10


class Metrics:
    """Accumulates HR@10, NDCG@10 and MRR over tested events."""

    def __init__(self) -> None:
        self.n = 0
        self.hits = 0.0
        self.ndcg = 0.0
        self.mrr = 0.0
        self.train_s = 0.0
        self.train_events = 0

    def add(self, rank: int | None) -> None:
        """``rank`` is 0-based among unseen candidates, ``None`` = not rankable (miss)."""
        self.n += 1
        if rank is None:
            return
        self.mrr += 1.0 / (rank + 1)
        if rank < K:
            self.hits += 1
            self.ndcg += 1.0 / math.log2(rank + 2)

    def result(self) -> dict[str, float]:
        n = max(self.n, 1)
        return {"hr@10": self.hits / n, "ndcg@10": self.ndcg / n, "mrr": self.mrr / n,
                "events_per_s": self.train_events / self.train_s if self.train_s > 0 else 0.0}


def rank_of(scores: np.ndarray, target: int, excluded: Iterable[int]) -> int | None:
    """0-based position of ``target`` in the served order (score desc, then row asc).

    ``scores`` (I,) over candidate rows; rows in ``excluded`` (seen) are removed
    and ``-inf`` rows are not candidates.
    """
    if target < 0 or target >= len(scores):
        return None
    s = scores.astype(np.float64, copy=True)
    ex = np.fromiter(excluded, dtype=np.int64)
    if len(ex):
        s[ex] = -np.inf
    st = s[target]
    if not np.isfinite(st):
        return None
    return int((s > st).sum() + (s[:target] == st).sum())


def model_scores(model: StreamingModel, user: str) -> tuple[np.ndarray, np.ndarray]:
    """The model's scores (I,) of every item row for ``user`` (-inf: not a candidate) and the
    rows excluded as seen (R,) int64; users without a row get decayed popularity."""
    row = model.query_row(user)
    live = model.live_items()
    if row is None:
        pop = model.fast.pop[: model.n_items]
        return np.where(live & np.isfinite(pop), pop, -np.inf), np.zeros(0, dtype=np.int64)
    user_scores = model.score_user(user)
    assert user_scores is not None
    return np.where(live, user_scores, -np.inf), model.seen_rows(row)


def model_top(model: StreamingModel, scores: np.ndarray, seen: np.ndarray, k: int = K
              ) -> list[str]:
    """The model's top-``k`` item ids from its ``scores`` (the served order)."""
    s = scores.astype(np.float64, copy=True)
    s[seen] = -np.inf
    order = np.argsort(-s, kind="stable")[:k]
    ids = model.fast.items.ids
    return [ids[r] for r in order if np.isfinite(s[r])]


def model_rank(model: StreamingModel, user: str, item: str) -> int | None:
    """Rank of ``item`` in the model's answer for ``user`` (popular fallback for new users)."""
    target = model.item_row(item)
    if target is None:
        return None
    scores, seen = model_scores(model, user)
    return rank_of(scores, target, seen)
