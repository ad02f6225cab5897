"""The per-event fast path: host-side state that follows every click at once.

For each event, in stream order: map its ids to rows (admission and growth),
push the item onto the user's recent-items history, add it to the user's seen
set, and count it (events, last time, decayed popularity). The user's query
is a mix of their most recent items, so a click changes their next answer
before any gradient step. The learned events are returned, each with the
history it was learned with, for the training chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .buffers import Events
from .config import ModelConfig
from .ids import IdTable

_EPS = 1e-10
_REANCHOR = 200.0  # re-base pop_log when the newest event is this many nats past t_ref


class FastPath:
    """Ids, histories, seen sets and counters (numpy/Python, microseconds per event).

    Row arrays (capacity, ...) grow by doubling; ``grow_users`` / ``grow_items``
    also call the hooks given, so the device tables grow with them.
    ``hist`` (capU, H) i64 item rows newest first (-1 empty), ``hist_ts`` their
    times (ms); ``u_last`` / ``i_last`` newest event time (ms), ``u_events`` /
    ``i_events`` events learned; ``pop`` (capI,) f64 log decayed event count
    relative to ``t_ref`` (-inf: none); ``seen[u]`` the item rows user u clicked.
    """

    def __init__(self, cfg: ModelConfig, grow_users: Callable[[int], None],
                 grow_items: Callable[[int], None], capacity: int = 16) -> None:
        self.cfg = cfg
        self.lam = math.log(2.0) / cfg.pop_half_life_ms
        self.users = IdTable(cfg.admit_after)
        self.items = IdTable(cfg.admit_after)
        self._grow_users_hook = grow_users
        self._grow_items_hook = grow_items
        H = cfg.history
        self.t_ref: int | None = None
        self.watermark: int | None = None
        self.hist = np.full((capacity, H), -1, dtype=np.int64)
        self.hist_ts = np.zeros((capacity, H), dtype=np.int64)
        self.u_last = np.zeros(capacity, dtype=np.int64)
        self.u_events = np.zeros(capacity, dtype=np.int64)
        self.seen: list[set[int]] = []
        self.i_last = np.zeros(capacity, dtype=np.int64)
        self.i_events = np.zeros(capacity, dtype=np.int64)
        self.pop = np.full(capacity, -np.inf, dtype=np.float64)

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
        state and the events are applied one by one; without it they are
        applied in bulk, ending in exactly the same state.
        """
        n = len(ts)
        if self.t_ref is None and n:
            self.t_ref = int(ts[0])
        # log of each event's popularity mass, relative to t_ref (float64)
        pop_x = (self.lam * (ts - (self.t_ref or 0)).astype(np.float64)
                 + np.log(np.maximum(weight.astype(np.float64), _EPS)))
        wm = self.watermark if self.watermark is not None else (int(ts[0]) if n else 0)
        new_u: list[int] = []
        new_i: list[int] = []
        if before_event is None:
            rows, hist, hist_ts, wm = self._apply_bulk(user_ids, item_ids, ts, new_u, new_i, wm)
            if len(rows):
                eu, ei = rows[:, 0], rows[:, 1]
                # same results as the per-event loop, applied in order by ufunc.at
                np.add.at(self.u_events, eu, 1)
                np.add.at(self.i_events, ei, 1)
                tj = ts[rows[:, 2]]
                np.maximum.at(self.u_last, eu, tj)
                np.maximum.at(self.i_last, ei, tj)
                np.logaddexp.at(self.pop, ei, pop_x[rows[:, 2]])
        else:
            rows, hist, hist_ts, wm = self._apply_each(user_ids, item_ids, ts, pop_x,
                                                       new_u, new_i, wm, before_event)
        self.watermark = wm
        events = Events(user=rows[:, 0].copy(), item=rows[:, 1].copy(),
                        weight=weight[rows[:, 2]], hist=hist, bucket=self.buckets(hist_ts))
        return events, new_u, new_i

    def _lookup(self, user_id: str, item_id: str, new_u: list[int],
                new_i: list[int]) -> tuple[int, int]:
        """Rows of one event's ids (-1 while not admitted), growing tables for new ids."""
        u, u_new = self.users.lookup(user_id)
        i, i_new = self.items.lookup(item_id)
        if u_new:
            self.grow_users(u + 1)
            new_u.append(u)
            if u == len(self.seen):
                self.seen.append(set())
        if i_new:
            self.grow_items(i + 1)
            new_i.append(i)
        return u, i

    def _apply_each(self, user_ids: Sequence[str], item_ids: Sequence[str], ts: np.ndarray,
                    pop_x: np.ndarray, new_u: list[int], new_i: list[int], wm: int,
                    before_event: Callable[[int], None]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Event by event, with an observer that may look at the state in between."""
        n, H = len(ts), self.cfg.history
        rows = np.empty((n, 3), dtype=np.int64)   # user row, item row, index in the call
        hist_out = np.empty((n, H), dtype=np.int64)
        ts_out = np.empty((n, H), dtype=np.int64)
        m = 0
        for j in range(n):
            before_event(j)
            u, i = self._lookup(str(user_ids[j]), str(item_ids[j]), new_u, new_i)
            if u < 0 or i < 0:
                continue
            t = int(ts[j])
            wm = max(wm, t)
            hist = self.hist[u]
            hts = self.hist_ts[u]
            rows[m] = (u, i, j)
            hist_out[m] = hist
            ts_out[m] = hts
            m += 1
            hist[1:] = hist[:-1].copy()
            hist[0] = i
            hts[1:] = hts[:-1].copy()
            hts[0] = t
            self.seen[u].add(i)
            # counters and popularity event by event, for a caller that looks in between
            self.u_events[u] += 1
            self.i_events[i] += 1
            self.u_last[u] = max(self.u_last[u], t)
            self.i_last[i] = max(self.i_last[i], t)
            self.pop[i] = np.logaddexp(self.pop[i], pop_x[j])
        return rows[:m], hist_out[:m], ts_out[:m], wm

    def _apply_bulk(self, user_ids: Sequence[str], item_ids: Sequence[str], ts: np.ndarray,
                    new_u: list[int], new_i: list[int], wm: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """The per-event fast path for a whole call at once (no observer between events).

        Ids are mapped one by one (admission and row allocation depend on order);
        histories are then built with array operations: event k of a user that
        has p earlier events in the call sees those p items (newest first)
        followed by its stored history. Returns ((m, 3) user row / item row /
        index in the call of the m learned events, their histories (m, H), the
        histories' times (m, H), the new watermark); counters are left to the
        caller. Ends in exactly the state of the per-event loop.
        """
        # known ids by plain dict lookups; the rest in stream order, since admission
        # counts and row allocation depend on it (a known id cannot change meanwhile)
        ukeys, ikeys = list(map(str, user_ids)), list(map(str, item_ids))
        uget, iget = self.users.index.get, self.items.index.get
        rows_u = np.array([uget(k, -2) for k in ukeys], dtype=np.int64)
        rows_i = np.array([iget(k, -2) for k in ikeys], dtype=np.int64)
        for j in np.flatnonzero((rows_u == -2) | (rows_i == -2)).tolist():
            rows_u[j], rows_i[j] = self._lookup(ukeys[j], ikeys[j], new_u, new_i)
        keep = np.flatnonzero((rows_u >= 0) & (rows_i >= 0))
        m = len(keep)
        H = self.cfg.history
        if m == 0:
            empty = np.zeros((0, H), dtype=np.int64)
            return np.zeros((0, 3), dtype=np.int64), empty, empty.copy(), wm
        eu, ei, et = rows_u[keep], rows_i[keep], ts[keep]
        wm = max(wm, int(et.max()))
        order = np.argsort(eu, kind="stable")           # group by user, stream order inside
        su, si, st = eu[order], ei[order], et[order]
        starts = np.flatnonzero(np.r_[True, su[1:] != su[:-1]])
        counts = np.diff(np.r_[starts, m])
        gid = np.repeat(np.arange(len(starts)), counts)
        pos = np.arange(m) - starts[gid]                 # earlier events of the same user
        slot = np.arange(H)[None, :]

        def build(p: np.ndarray, base: np.ndarray, uu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            from_batch = slot < p[:, None]
            bidx = np.clip(base[:, None] + p[:, None] - 1 - slot, 0, m - 1)
            oidx = np.clip(slot - p[:, None], 0, H - 1)
            old_h = np.take_along_axis(self.hist[uu], oidx, axis=1)
            old_t = np.take_along_axis(self.hist_ts[uu], oidx, axis=1)
            return np.where(from_batch, si[bidx], old_h), np.where(from_batch, st[bidx], old_t)

        hist_out = np.empty((m, H), dtype=np.int64)
        ts_out = np.empty((m, H), dtype=np.int64)
        hist_out[order], ts_out[order] = build(pos, starts[gid], su)
        last_u = su[starts]
        self.hist[last_u], self.hist_ts[last_u] = build(counts, starts, last_u)
        seen = self.seen
        for u, i in zip(eu.tolist(), ei.tolist()):
            seen[u].add(i)
        return np.stack([eu, ei, keep], axis=1), hist_out, ts_out, wm

    # ------------------------------------------------------------------ reads
    def buckets(self, hist_ts: np.ndarray) -> np.ndarray:
        """Age bucket (B, H) int64 of each history slot relative to the newest slot."""
        edges = np.asarray(self.cfg.time_buckets_s, dtype=np.float64) * 1000.0
        age = hist_ts[:, :1] - hist_ts
        return np.searchsorted(edges, age, side="right").astype(np.int64)

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
