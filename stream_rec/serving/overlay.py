"""A server's overlay: each user's clicks that arrived after the version it serves.

The learned parameters reach a server only inside published versions, but a
user's next click follows from their last few, which the server can read from
the topic itself. The overlay holds, per user, the clicks past the held
version's offsets -- applied with the model's own fast path
(:class:`~stream_rec.model.fastpath.FastPath`: the same history and seen-set
code the worker runs) -- so an answer can use the version's parameters with
the user's newest history.

Nothing counts twice: when a newer version is swapped in, the clicks its
offsets cover are dropped (the overlay is rebuilt from the clicks past them),
since the version's own history holds them now. The overlay is bounded by a
number of clicks; past it, the oldest are dropped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from stream_rec.events import Batch
from stream_rec.model.config import ModelConfig
from stream_rec.model.fastpath import FastPath


@dataclass(frozen=True)
class UserClicks:
    """One user's overlay clicks: item ids newest first (at most H), their times (ms),
    every item they clicked in the overlay, and how many clicks it holds for them."""

    items: list[str]
    ts: list[int]
    seen: list[str]
    events: int
    reach: dict[int, int]  # how far the overlay had read when these were taken
    base_version: int | None = None  # the version whose offsets the overlay starts from


@dataclass
class _Clicks:
    """Accepted clicks of one batch, with where each came from."""

    partition: np.ndarray  # (N,) int32
    offset: np.ndarray     # (N,) int64
    users: list[str]
    items: list[str]
    ts: np.ndarray         # (N,) int64 ms
    weight: np.ndarray     # (N,) float32

    def select(self, keep: np.ndarray) -> _Clicks:
        idx = np.flatnonzero(keep)
        return _Clicks(self.partition[idx], self.offset[idx], [self.users[i] for i in idx],
                       [self.items[i] for i in idx], self.ts[idx], self.weight[idx])


class Overlay:
    """Clicks past the served version's offsets, per user, bounded by ``max_events``.

    Thread-safe: the topic follower applies batches, the watcher rebases on a
    swap and requests read, each under one lock held for microseconds (a
    rebuild, for the clicks past a new version, for milliseconds).
    """

    def __init__(self, history: int = 20, max_events: int = 500_000) -> None:
        self.history = history
        self.max_events = max_events
        self.base: dict[int, int] | None = None  # offsets the served version covers
        self.base_version: int | None = None
        self.reach: dict[int, int] = {}           # next offset past the last click applied
        self._lock = threading.Lock()
        self._log: list[_Clicks] = []
        self._events = 0
        self._users: dict[str, int] = {}          # clicks per user in the overlay
        self._fast = self._new_fast()
        self.applied = 0                          # clicks applied since start (metrics)

    def _new_fast(self) -> FastPath:
        # No admission (a user's first click counts at once) and no popularity use.
        cfg = ModelConfig(history=self.history, admit_after=0)
        return FastPath(cfg, lambda _cap: None, lambda _cap: None)

    # -- writes --------------------------------------------------------------
    def apply(self, batch: Batch) -> int:
        """Apply a decoded batch's accepted clicks past the base; returns how many."""
        with self._lock:
            if self.base is None or not len(batch.ts):
                self._reach(batch)
                return 0
            start = np.array([self.base.get(int(p), 0) for p in batch.partition],
                             dtype=np.int64)
            clicks = _Clicks(batch.partition, batch.offset, list(batch.user_ids),
                             list(batch.item_ids), batch.ts, batch.weight)
            clicks = clicks.select(clicks.offset >= start)
            self._reach(batch)
            if not len(clicks.ts):
                return 0
            self._log.append(clicks)
            self._events += len(clicks.ts)
            self._add(clicks)
            if self._events > self.max_events:
                self._trim()
            return len(clicks.ts)

    def _reach(self, batch: Batch) -> None:
        for p, o in zip(batch.partition.tolist(), batch.offset.tolist()):
            if o + 1 > self.reach.get(p, 0):
                self.reach[p] = o + 1

    def _add(self, clicks: _Clicks) -> None:
        self._fast.apply(clicks.users, clicks.items, clicks.ts, clicks.weight, None)
        for u in clicks.users:
            self._users[u] = self._users.get(u, 0) + 1
        self.applied += len(clicks.ts)

    def rebase(self, offsets: dict[int, int], version: int | None = None) -> None:
        """A version covering ``offsets`` is served now: keep only the clicks past them."""
        with self._lock:
            self.base_version = version
            backward = self.base is not None and any(
                o < self.base.get(p, 0) for p, o in offsets.items())
            self.base = dict(offsets)
            if backward:  # an older version (a pin): the follower reads from its offsets again
                self.reach = dict(offsets)
                self._rebuild([])
                return
            for p, o in offsets.items():
                self.reach[p] = max(self.reach.get(p, 0), o)
            kept = []
            for clicks in self._log:
                start = np.array([offsets.get(int(p), 0) for p in clicks.partition],
                                 dtype=np.int64)
                rest = clicks.select(clicks.offset >= start)
                if len(rest.ts):
                    kept.append(rest)
            self._rebuild(kept)

    def _trim(self) -> None:
        """Drop the oldest batches until the overlay holds at most ``max_events`` clicks."""
        kept = list(self._log)
        total = self._events
        while kept and total > self.max_events:
            total -= len(kept.pop(0).ts)
        self._rebuild(kept)

    def _rebuild(self, kept: list[_Clicks]) -> None:
        self._log, self._events = kept, sum(len(c.ts) for c in kept)
        self._fast, self._users = self._new_fast(), {}
        applied = self.applied
        for clicks in kept:
            self._add(clicks)
        self.applied = applied

    # -- reads ---------------------------------------------------------------
    def clicks(self, user_id: str) -> UserClicks:
        """``user_id``'s overlay clicks (none: empty lists), with how far the overlay had read.

        Taken under one lock, so an answer never claims to reach an offset
        whose click its query did not include.
        """
        with self._lock:
            fast = self._fast
            row = fast.users.get(user_id)
            if row is None:
                return UserClicks([], [], [], 0, dict(self.reach), self.base_version)
            ids = fast.items.ids
            hist, hts = fast.hist[row], fast.hist_ts[row]
            filled = hist >= 0
            return UserClicks(items=[ids[r] for r in hist[filled].tolist()],
                              ts=hts[filled].tolist(),
                              seen=[ids[r] for r in fast.seen.rows(row).tolist()],
                              events=self._users.get(user_id, 0), reach=dict(self.reach),
                              base_version=self.base_version)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"users": len(self._users), "events": self._events}
