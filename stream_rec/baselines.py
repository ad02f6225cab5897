"""Count-based baselines the model is measured against, tested then taught event by event.

Each keeps its own id -> index map and per-user seen sets and ranks exactly as
the server orders answers (:mod:`stream_rec.ranking`).
"""

from __future__ import annotations

import math
import time

import numpy as np

from .ranking import Metrics, rank_of


class Baseline:
    """Shared id -> index map and per-user seen sets; subclasses score and count."""

    def __init__(self) -> None:
        self.items: dict[str, int] = {}
        self.seen: dict[str, set[int]] = {}
        self.metrics = Metrics()

    def _item(self, item: str) -> int:
        row = self.items.get(item)
        if row is None:
            row = self.items[item] = len(self.items)
        return row

    def test(self, user: str, item: str, ts: int) -> None:
        target = self.items.get(item, -1)
        scores = self.scores(user, ts) if self.items else None
        self.metrics.add(None if scores is None or target < 0
                         else rank_of(scores, target, self.seen.get(user, ())))

    def learn(self, user: str, item: str, ts: int, w: float) -> None:
        t0 = time.perf_counter()
        row = self._item(item)
        self.update(user, row, ts, w)
        self.seen.setdefault(user, set()).add(row)
        self.metrics.train_s += time.perf_counter() - t0
        self.metrics.train_events += 1

    def scores(self, user: str, ts: int) -> np.ndarray | None:
        raise NotImplementedError

    def update(self, user: str, row: int, ts: int, w: float) -> None:
        raise NotImplementedError


class PopularityBaseline(Baseline):
    """All-time event counts."""

    def __init__(self) -> None:
        super().__init__()
        self.count = np.zeros(1024, dtype=np.float64)

    def update(self, user: str, row: int, ts: int, w: float) -> None:
        if row >= len(self.count):
            self.count = np.concatenate([self.count, np.zeros_like(self.count)])
        self.count[row] += w

    def scores(self, user: str, ts: int) -> np.ndarray:
        return self.count[: len(self.items)]


class DecayedPopularityBaseline(PopularityBaseline):
    """Exponentially decayed counts (event time), kept as log-sums against a fixed origin."""

    def __init__(self, half_life_ms: int = 86_400_000) -> None:
        super().__init__()
        self.lam = math.log(2.0) / half_life_ms
        self.t0: int | None = None
        self.count[:] = -np.inf

    def update(self, user: str, row: int, ts: int, w: float) -> None:
        if row >= len(self.count):
            self.count = np.concatenate([self.count, np.full_like(self.count, -np.inf)])
        if self.t0 is None:
            self.t0 = ts
        x = self.lam * (ts - self.t0) + math.log(max(w, 1e-10))
        self.count[row] = np.logaddexp(self.count[row], x)


class CooccurrenceBaseline(PopularityBaseline):
    """Incremental item-to-item co-occurrence over each user's last ``window`` items.

    The usual streaming item-kNN: when a user clicks item i, ``C[j, i]`` and
    ``C[i, j]`` grow by ``w * pair_decay**d`` for each of the user's previous
    ``window`` items j (``d`` = 0 for the newest), so close neighbours in a
    session count more. A user is scored by the recency-weighted sum of C rows
    over the last ``window`` items (weight ``recency**h / popularity(j)**beta``,
    h = 0 newest: a click on a rare item says more than one on a blockbuster),
    divided by the candidate's ``popularity**alpha`` so that items co-occurring
    with everything do not win by volume alone; ties are broken by all-time
    popularity. Defaults are the best of a small grid on ML-100K's default
    protocol (docs/MODEL.md), so this reference is, if anything, optimistic.
    """

    def __init__(self, window: int = 20, recency: float = 0.6, alpha: float = 0.3,
                 pair_decay: float = 0.9, beta: float = 0.3) -> None:
        super().__init__()
        self.beta = beta
        self.window = window
        self.recency = recency
        self.alpha = alpha
        self.pair_decay = pair_decay
        self.co: dict[int, dict[int, float]] = {}
        self.recent: dict[str, list[int]] = {}

    def update(self, user: str, row: int, ts: int, w: float) -> None:
        super().update(user, row, ts, w)
        rec = self.recent.setdefault(user, [])   # oldest first
        ci = self.co.setdefault(row, {})
        f = w
        for j in reversed(rec):
            if j != row:
                cj = self.co.setdefault(j, {})
                cj[row] = cj.get(row, 0.0) + f
                ci[j] = ci.get(j, 0.0) + f
            f *= self.pair_decay
        rec.append(row)
        if len(rec) > self.window:
            del rec[0]

    def scores(self, user: str, ts: int) -> np.ndarray:
        n = len(self.items)
        pop = self.count[:n]
        out = np.zeros(n, dtype=np.float64)
        wt = 1.0
        for j in reversed(self.recent.get(user, ())):
            row = self.co.get(j)
            if row:
                out[np.fromiter(row.keys(), dtype=np.int64, count=len(row))] += \
                    wt / max(pop[j], 1.0) ** self.beta * np.fromiter(row.values(), dtype=np.float64, count=len(row))
            wt *= self.recency
        if self.alpha:
            out /= np.maximum(pop, 1.0) ** self.alpha
        return out + pop / (pop.max() + 1.0) * 1e-6
