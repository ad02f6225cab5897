"""The per-event fast path: host-side state that follows every click at once.

For each event, in stream order: map its ids to rows (admission and growth),
push the item onto the user's recent-items history, make it the newest item
of the user's seen list, and count it (events, last time, decayed
popularity). The user's query is a mix of their most recent items, so a click
changes their next answer before any gradient step. The learned events are returned, each with the
history it was learned with, for the training chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import repeat
from typing import Any

import numpy as np

from . import kernels
from .buffers import Events
from .config import ModelConfig
from .ids import IdTable
from .seen import SeenLists

_EPS = 1e-10
_REANCHOR = 200.0  # re-base pop_log when the newest event is this many nats past t_ref


class FastPath:
    """Ids, histories, seen lists and counters: dict lookups, then one compiled loop.

    Row arrays (capacity, ...) grow by doubling; ``grow_users`` / ``grow_items``
    also call the hooks given, so the device tables grow with them.
    ``hist`` (capU, H) i64 item rows newest first (-1 empty), ``hist_ts`` their
    times (ms); ``u_last`` / ``i_last`` newest event time (ms), ``u_events`` /
    ``i_events`` events learned; ``pop`` (capI,) f64 log decayed event count
    relative to ``t_ref`` (-inf: none); ``seen`` the users' recent distinct
    items (:class:`~stream_rec.model.seen.SeenLists`).
    """

    def __init__(self, cfg: ModelConfig, grow_users: Callable[[int], None],
                 grow_items: Callable[[int], None], capacity: int = 16) -> None:
        self.cfg = cfg
        self.lam = math.log(2.0) / cfg.pop_half_life_ms
        shared = cfg.shared_rows
        self.users = IdTable(cfg.admit_after, cfg.pending_max, shared)
        self.items = IdTable(cfg.admit_after, cfg.pending_max, shared)
        self._grow_users_hook = grow_users
        self._grow_items_hook = grow_items
        H = cfg.history
        self.t_ref: int | None = None
        self.watermark: int | None = None
        self.hist = np.full((capacity, H), -1, dtype=np.int64)
        self.hist_ts = np.zeros((capacity, H), dtype=np.int64)
        self.u_last = np.zeros(capacity, dtype=np.int64)
        self.u_events = np.zeros(capacity, dtype=np.int64)
        self.seen = SeenLists(cfg.seen_max, capacity)
        self.i_last = np.zeros(capacity, dtype=np.int64)
        self.i_events = np.zeros(capacity, dtype=np.int64)
        self.pop = np.full(capacity, -np.inf, dtype=np.float64)
        self._edges = np.asarray(cfg.time_buckets_s, dtype=np.float64) * 1000.0
        if shared:
            self.grow_users(shared)
            self.grow_items(shared)

    # ----------------------------------------------------------------- growth
    def grow_users(self, need: int) -> None:
        cap = self.hist.shape[0]
        if need <= cap:
            return
        new = max(need, 2 * cap)
        self._grow_users_hook(new)
        self.hist = _grow(self.hist, new, -1)
        self.hist_ts = _grow(self.hist_ts, new, 0)
        self.u_last = _grow(self.u_last, new, 0)
        self.u_events = _grow(self.u_events, new, 0)
        self.seen.grow(new)

    def grow_items(self, need: int) -> None:
        cap = self.pop.shape[0]
        if need <= cap:
            return
        new = max(need, 2 * cap)
        self._grow_items_hook(new)
        self.i_last = _grow(self.i_last, new, 0)
        self.i_events = _grow(self.i_events, new, 0)
        self.pop = _grow(self.pop, new, -np.inf)

    # ------------------------------------------------------------------ apply
    def apply(self, user_ids: Sequence[str], item_ids: Sequence[str], ts: np.ndarray,
              weight: np.ndarray, before_event: Callable[[int], None] | None
              ) -> tuple[Events, list[int], list[int]]:
        """Apply N >= 1 events in order; returns (learned events, new user rows, new item rows).

        ``before_event(j)``, when given, runs before event ``j`` touches any
        state and the events are applied one by one; without it, ids are
        mapped first and the events applied in one compiled loop. Both end in
        exactly the same state: the same loop runs either way.
        """
        n = len(ts)
        if self.t_ref is None and n:
            self.t_ref = int(ts[0])
        pop_x = self.pop_mass(ts, weight)
        new_u: list[int] = []
        new_i: list[int] = []
        H = self.cfg.history
        hist_out = np.empty((n, H), dtype=np.int64)
        bucket_out = np.empty((n, H), dtype=np.int64)
        if before_event is None:
            rows_u, rows_i = self._rows(user_ids, item_ids, new_u, new_i)
            keep = np.flatnonzero((rows_u >= 0) & (rows_i >= 0))
            eu, ei, et, px = rows_u[keep], rows_i[keep], ts[keep], pop_x[keep]
            self._run(0, len(keep), eu, ei, et, px, hist_out, bucket_out)
        else:
            eu = np.empty(n, dtype=np.int64)
            ei = np.empty(n, dtype=np.int64)
            et = np.empty(n, dtype=np.int64)
            px = np.empty(n, dtype=np.float64)
            kept: list[int] = []
            for j in range(n):
                before_event(j)
                u, i = self._lookup(str(user_ids[j]), str(item_ids[j]), new_u, new_i)
                if u < 0 or i < 0:
                    continue
                m = len(kept)
                eu[m], ei[m], et[m], px[m] = u, i, ts[j], pop_x[j]
                kept.append(j)
                self._run(m, m + 1, eu, ei, et, px, hist_out, bucket_out)
            keep = np.asarray(kept, dtype=np.int64)
        m = len(keep)
        if m:
            base = self.watermark if self.watermark is not None else int(ts[0])
            self.watermark = max(base, int(ts[keep].max()))
        elif self.watermark is None and n:
            self.watermark = int(ts[0])
        events = Events(user=eu[:m].copy(), item=ei[:m].copy(), weight=weight[keep],
                        hist=hist_out[:m], bucket=bucket_out[:m])
        return events, new_u, new_i

    def pop_mass(self, ts: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """Log of each event's popularity mass (N,) float64, relative to ``t_ref``."""
        return (self.lam * (ts - (self.t_ref or 0)).astype(np.float64)
                + np.log(np.maximum(weight.astype(np.float64), _EPS)))

    def _run(self, start: int, stop: int, eu: np.ndarray, ei: np.ndarray, et: np.ndarray,
             px: np.ndarray, hist_out: np.ndarray, bucket_out: np.ndarray) -> None:
        """The compiled loop over learned events ``start .. stop - 1``, growing the seen arena."""
        s = self.seen
        while start < stop:
            start = kernels.apply_events(
                start, stop, eu, ei, et, px, self.users.shared, self.items.shared, self.hist,
                self.hist_ts,
                self.u_events, self.i_events, self.u_last, self.i_last, self.pop, self._edges,
                hist_out, bucket_out, s.off, s.length, s.cls, s.arena, s.sizes, s.free_head,
                s.meta, s.limit)
            if start < stop:
                s.reserve_arena()

    def _lookup(self, user_id: str, item_id: str, new_u: list[int],
                new_i: list[int]) -> tuple[int, int]:
        """Rows of one event's ids (-1 while not admitted), growing tables for new ids."""
        u, u_new = self.users.lookup(user_id)
        i, i_new = self.items.lookup(item_id)
        if u_new:
            self.grow_users(u + 1)
            new_u.append(u)
        if i_new:
            self.grow_items(i + 1)
            new_i.append(i)
        return u, i

    def _rows(self, user_ids: Sequence[str], item_ids: Sequence[str], new_u: list[int],
              new_i: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Rows (N,) int64 of a call's ids (-1: not learned), mapped in stream order.

        Known ids by plain dict lookups; the rest one by one in stream order,
        since admission counts and row allocation depend on it (a known id
        cannot change meanwhile: rows are freed only at a chunk's end).
        """
        n = len(user_ids)
        rows_u = np.fromiter(map(self.users.index.get, map(str, user_ids), repeat(-2)),
                             dtype=np.int64, count=n)
        rows_i = np.fromiter(map(self.items.index.get, map(str, item_ids), repeat(-2)),
                             dtype=np.int64, count=n)
        for j in np.flatnonzero((rows_u == -2) | (rows_i == -2)).tolist():
            rows_u[j], rows_i[j] = self._lookup(str(user_ids[j]), str(item_ids[j]), new_u, new_i)
        return rows_u, rows_i

    # ------------------------------------------------------------------ reads
    def buckets(self, hist_ts: np.ndarray) -> np.ndarray:
        """Age bucket (B, H) int64 of each history slot relative to the newest slot."""
        age = hist_ts[:, :1] - hist_ts
        return np.searchsorted(self._edges, age, side="right").astype(np.int64)

    def reanchor(self, n_items: int) -> bool:
        """Keep ``pop`` small: shift the reference time when it has drifted far.

        Returns whether it did (then every item's vector changed).
        """
        if self.watermark is None or self.t_ref is None:
            return False
        drift = self.lam * (self.watermark - self.t_ref)
        if drift < _REANCHOR:
            return False
        self.pop[:n_items] -= drift
        self.t_ref = int(self.watermark)
        return True


def _grow(a: np.ndarray, cap: int, fill: Any) -> np.ndarray:
    out = np.full((cap,) + a.shape[1:], fill, dtype=a.dtype)
    out[: a.shape[0]] = a
    return out
