"""A replay order with a human think time: each user's clicks at least ``think_s`` apart.

A dataset in time order, replayed one event per ``1 / rate`` seconds, puts a
user's burst of clicks a few milliseconds apart, which no person does and no
serving path can reflect. :func:`think_time_schedule` re-times it so that

1. each user's own events keep their dataset order;
2. a user's next event is scheduled no sooner than ``think_s`` after their
   previous one;
3. events are scheduled at the aggregate ``rate`` whenever some user is
   allowed to click, and as close to the dataset order as (1) and (2) permit.

It is greedy list scheduling on integer microseconds. Slots come every
``1 / rate`` s (rounded to the microsecond). At each slot the candidates are the users' next unsent events
whose user last clicked at least ``think_s`` ago; the one earliest in the
dataset goes. A user's burst is thus spread ``think_s`` apart while other
users' events fill the slots in between ("others go ahead meanwhile"). When no
user may click, the clock jumps to the first moment one may (the rate drops
only then: near the end of a dataset, when fewer than ``rate * think_s``
users still have events left). A prefix of the schedule is itself a valid
schedule, so capping a replay by time keeps every property.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Schedule:
    """``order`` (N,) int64: dataset index of the i-th event to send; ``at_s`` (N,) float64:
    its nominal send time in seconds from the start, non-decreasing."""

    order: np.ndarray
    at_s: np.ndarray

    def until(self, seconds: float | None) -> Schedule:
        """The events scheduled before ``seconds`` (all of them for ``None``)."""
        if seconds is None:
            return self
        n = int(np.searchsorted(self.at_s, seconds, side="left"))
        return Schedule(self.order[:n], self.at_s[:n])

    def full_rate_until(self, rate: float) -> float:
        """Seconds from the start during which every slot at ``rate`` was used (the schedule
        kept the aggregate rate); the end of the schedule if it never idled."""
        if len(self.at_s) < 2:
            return float(self.at_s[-1]) if len(self.at_s) else 0.0
        slot_s = max(1, round(1e6 / rate)) / 1e6
        idle = np.flatnonzero(np.diff(self.at_s) > slot_s + 5e-7)   # a slot left empty
        return float(self.at_s[idle[0]] if len(idle) else self.at_s[-1])

    def displacement(self) -> dict[str, float]:
        """How far the sent position of an event is from its dataset position (events)."""
        if not len(self.order):
            return {"mean": 0.0, "p50": 0.0, "max": 0.0}
        d = np.abs(self.order - np.arange(len(self.order)))
        return {"mean": float(d.mean()), "p50": float(np.median(d)), "max": float(d.max())}


def think_time_schedule(users: Sequence[object] | np.ndarray, rate: float, think_s: float
                        ) -> Schedule:
    """Re-time events whose users are ``users`` (dataset order) for a replay at ``rate``
    events/s with at least ``think_s`` seconds between one user's consecutive events."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    if think_s < 0:
        raise ValueError("think_s must be non-negative")
    slot_us = max(1, round(1e6 / rate))
    think_us = round(think_s * 1e6)
    keys = list(users.tolist() if isinstance(users, np.ndarray) else users)
    queues: dict[object, list[int]] = {}
    for i, u in enumerate(keys):
        queues.setdefault(u, []).append(i)
    nxt = dict.fromkeys(queues, 1)           # position of each user's next event
    ready = [q[0] for q in queues.values()]  # dataset indices of events allowed to go now
    heapq.heapify(ready)
    waiting: list[tuple[int, int]] = []      # (allowed from, dataset index)
    order = np.empty(len(keys), dtype=np.int64)
    at = np.empty(len(keys), dtype=np.int64)
    now = 0
    for n in range(len(keys)):
        while waiting and waiting[0][0] <= now:
            heapq.heappush(ready, heapq.heappop(waiting)[1])
        if not ready:                        # nobody may click yet: jump to the first who may
            now = waiting[0][0]
            while waiting and waiting[0][0] <= now:
                heapq.heappush(ready, heapq.heappop(waiting)[1])
        i = heapq.heappop(ready)
        order[n], at[n] = i, now
        q, u = queues[keys[i]], keys[i]
        if nxt[u] < len(q):
            heapq.heappush(waiting, (now + think_us, q[nxt[u]]))
            nxt[u] += 1
        now += slot_us
    return Schedule(order, at / 1e6)
