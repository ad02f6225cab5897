"""Two-speed streaming recommender.

Fast path (per event, numpy/Python, microseconds): id -> row mapping with
admission and growth, the user's recent-items history and seen set, event
counters and the item's decayed popularity. Because the query is a mix of the
user's most recent items, a click changes its user's next answer at once,
before any gradient step.

Slow path (per micro-batch, torch on ``cpu`` or ``cuda``): a few sampled-softmax
gradient steps (in-batch targets + uniform negatives, plus events replayed from
a small buffer of recent ones) with row-wise Adagrad on only the rows touched.

See ``docs/MODEL.md`` for the design and measured ablations.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .config import ModelConfig
from .state import Changed, ModelState

if TYPE_CHECKING:  # stream_rec.snapshot imports this package
    from stream_rec.snapshot.delta import StateDelta

_EPS = 1e-10
_REANCHOR = 200.0  # re-base pop_log when the newest event is this many nats past t_ref


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> cuda when available else cpu; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _Ids:
    """External id <-> row with reuse of freed rows and optional admission counting."""

    def __init__(self, admit_after: int) -> None:
        self.index: dict[str, int] = {}
        self.ids: list[str] = []
        self.free: list[int] = []
        self.pending: dict[str, int] = {}
        self.admit_after = admit_after

    def lookup(self, key: str) -> tuple[int, bool]:
        """(row, is_new) for ``key``; row -1 while it waits for admission."""
        row = self.index.get(key)
        if row is not None:
            return row, False
        if self.admit_after > 1:
            c = self.pending.get(key, 0) + 1
            if c < self.admit_after:
                self.pending[key] = c
                return -1, False
            self.pending.pop(key, None)
        if self.free:
            row = self.free.pop()
            self.ids[row] = key
        else:
            row = len(self.ids)
            self.ids.append(key)
        self.index[key] = row
        return row, True

    def release(self, row: int) -> None:
        del self.index[self.ids[row]]
        self.ids[row] = ""
        self.free.append(row)


class StreamingModel:
    """Streaming two-tower model whose user tower reads the user's recent items.

    Tables live on ``self.device`` and grow by capacity doubling; ``n_users`` /
    ``n_items`` count rows in use (expired rows included until reused).
    Not thread-safe: call :meth:`learn`, :meth:`recommend` and :meth:`state` from
    one thread; hand the :class:`ModelState` returned by :meth:`state` to others.
    """

    def __init__(self, cfg: ModelConfig | None = None, device: str = "auto") -> None:
        self.cfg = cfg or ModelConfig()
        self.device = resolve_device(device)
        c = self.cfg
        self._lam = math.log(2.0) / c.pop_half_life_ms
        self._users = _Ids(c.admit_after)
        self._items = _Ids(c.admit_after)
        self._step = 0
        self._t_ref: int | None = None
        self._watermark: int | None = None
        cap_u = cap_i = 16
        D, H = c.dim, c.history
        f32: dict[str, Any] = {"dtype": torch.float32, "device": self.device}
        # slow-path parameters (device)
        self._U = torch.zeros(cap_u, D, **f32)
        self._U_acc = torch.zeros(cap_u, **f32)
        self._Ein = torch.zeros(cap_i, D, **f32)
        self._Eout = torch.zeros(cap_i, D, **f32)
        self._B = torch.zeros(cap_i, **f32)
        self._acc_in = torch.zeros(cap_i, **f32)
        self._acc_out = torch.zeros(cap_i, **f32)
        self._acc_b = torch.zeros(cap_i, **f32)
        self._pos_w = torch.from_numpy(self._initial_pos_w()).to(self.device)
        self._pos_acc = torch.zeros(H, self._n_buckets, **f32)
        self._M = torch.zeros(D, D, **f32)
        self._M_acc = torch.zeros(D, D, **f32)
        # fast-path state (host)
        self._hist = np.full((cap_u, H), -1, dtype=np.int64)
        self._hist_ts = np.zeros((cap_u, H), dtype=np.int64)
        self._u_last = np.zeros(cap_u, dtype=np.int64)
        self._u_events = np.zeros(cap_u, dtype=np.int64)
        self._seen: list[set[int]] = []
        self._i_last = np.zeros(cap_i, dtype=np.int64)
        self._i_events = np.zeros(cap_i, dtype=np.int64)
        self._pop = np.full(cap_i, -np.inf, dtype=np.float64)
        # replay ring buffer
        self._rp = _Events(c.replay, H)
        self._rp_n = 0      # filled entries
        self._expiry_touched: list[int] = []   # users whose seen/history lost an expired item
        self._rp_pos = 0    # next write position
        # events of the current, incomplete training chunk (fast path done, not yet trained)
        self._ck = _Events(c.train_chunk, H)
        self._ck_m = 0      # learned events queued (admitted user and item)
        self._ck_fill = 0   # stream events since the chunk started (queued or not)
        self._ck_new_u: list[int] = []   # rows allocated in this chunk, initialised at its end
        self._ck_new_i: list[int] = []

    # ------------------------------------------------------------------ sizes
    @property
    def n_users(self) -> int:
        return len(self._users.ids)

    @property
    def n_items(self) -> int:
        return len(self._items.ids)

    @property
    def _n_buckets(self) -> int:
        return len(self.cfg.time_buckets_s) + 1

    def _initial_pos_w(self) -> np.ndarray:
        """Weights (H, NB) per (slot, age bucket); start recency-decayed, newest weighs most."""
        h = np.arange(self.cfg.history, dtype=np.float32)
        w = (self.cfg.recency ** h).astype(np.float32)
        return np.repeat(w[:, None], self._n_buckets, axis=1)

    # ----------------------------------------------------------------- growth
    def _grow_users(self, need: int) -> None:
        cap = self._hist.shape[0]
        if need <= cap:
            return
        new = max(need, 2 * cap)
        self._U = _grow_t(self._U, new)
        self._U_acc = _grow_t(self._U_acc, new)
        self._hist = _grow_np(self._hist, new, -1)
        self._hist_ts = _grow_np(self._hist_ts, new, 0)
        self._u_last = _grow_np(self._u_last, new, 0)
        self._u_events = _grow_np(self._u_events, new, 0)

    def _grow_items(self, need: int) -> None:
        cap = self._pop.shape[0]
        if need <= cap:
            return
        new = max(need, 2 * cap)
        for name in ("_Ein", "_Eout", "_B", "_acc_in", "_acc_out", "_acc_b"):
            setattr(self, name, _grow_t(getattr(self, name), new))
        self._i_last = _grow_np(self._i_last, new, 0)
        self._i_events = _grow_np(self._i_events, new, 0)
        self._pop = _grow_np(self._pop, new, -np.inf)

    # ------------------------------------------------------------------ learn
    def learn(self, user_ids: Sequence[str], item_ids: Sequence[str], ts_ms: np.ndarray,
              weights: np.ndarray | None = None,
              before_event: Callable[[int], None] | None = None) -> Changed:
        """Apply events in stream order; train on every chunk they complete.

        The fast path runs event by event. Gradient steps run on fixed chunks of
        ``cfg.train_chunk`` events counted from the start of the stream, so the
        result does not depend on how the stream is split into calls (a replay
        or a restart with other micro-batch boundaries ends in the same state,
        bitwise on CPU). Events of an incomplete chunk wait in the state.
        ``before_event(j)``, when given, is called before event ``j`` of this
        call touches any state -- the prequential evaluator uses it to test each
        event against the state it would have been served from. ``ts_ms`` (N,)
        int64 event time in ms; ``weights`` (N,) float, default 1.
        """
        n = len(user_ids)
        ts = np.asarray(ts_ms, dtype=np.int64).reshape(-1)
        w_in = (np.ones(n, dtype=np.float32) if weights is None
                else np.asarray(weights, dtype=np.float32).reshape(-1))
        if len(item_ids) != n or len(ts) != n or len(w_in) != n:
            raise ValueError("user_ids, item_ids, ts_ms and weights must have equal length")
        C = self.cfg.train_chunk
        ch_u: list[np.ndarray] = []
        ch_i: list[np.ndarray] = []
        s = 0
        while s < n:
            e = min(n, s + C - self._ck_fill)
            cb = None if before_event is None else (
                lambda j, s=s: before_event(j + s))  # type: ignore[misc]
            self._fast_segment(user_ids[s:e], item_ids[s:e], ts[s:e], w_in[s:e], cb, ch_u, ch_i)
            self._ck_fill += e - s
            s = e
            if self._ck_fill >= C:
                self._end_chunk(ch_u, ch_i)
        if not ch_u:
            empty = np.zeros(0, dtype=np.int64)
            return Changed(users=empty, items=empty.copy())
        users_c = np.unique(np.concatenate(ch_u)).astype(np.int64)
        items_c = np.unique(np.concatenate(ch_i)).astype(np.int64)
        return Changed(users=users_c[users_c >= 0], items=items_c[items_c >= 0])

    def _fast_segment(self, user_ids: Sequence[str], item_ids: Sequence[str], ts: np.ndarray,
                      w_in: np.ndarray, before_event: Callable[[int], None] | None,
                      ch_u: list[np.ndarray], ch_i: list[np.ndarray]) -> None:
        """Fast path for events that all fall in the current chunk; queues them for training.

        Appends the rows it changes (learned events' users/items, new rows) to
        ``ch_u`` / ``ch_i``.
        """
        n = len(ts)
        H = self.cfg.history
        ex_u = np.empty(n, dtype=np.int64)
        ex_i = np.empty(n, dtype=np.int64)
        ex_w = np.empty(n, dtype=np.float32)
        ex_h = np.empty((n, H), dtype=np.int64)
        ex_t = np.empty((n, H), dtype=np.int64)
        new_u: list[int] = []
        new_i: list[int] = []
        m = 0
        if self._t_ref is None and n:
            self._t_ref = int(ts[0])
        live = before_event is not None
        ex_j = np.empty(n, dtype=np.int64)
        # log of each event's popularity mass, relative to t_ref (float64)
        pop_x = (self._lam * (ts - (self._t_ref or 0)).astype(np.float64)
                 + np.log(np.maximum(w_in.astype(np.float64), _EPS)))
        wm = self._watermark if self._watermark is not None else (int(ts[0]) if n else 0)
        if not live:
            m, wm = self._fast_path_bulk(user_ids, item_ids, ts, w_in, ex_u, ex_i, ex_w, ex_h,
                                         ex_t, ex_j, new_u, new_i, wm)
        else:
            assert before_event is not None
            for j in range(n):
                before_event(j)
                u, i = self._lookup(user_ids[j], item_ids[j], new_u, new_i)
                if u < 0 or i < 0:
                    continue
                t = int(ts[j])
                wm = max(wm, t)
                hist = self._hist[u]
                hts = self._hist_ts[u]
                ex_u[m] = u
                ex_i[m] = i
                ex_w[m] = w_in[j]
                ex_h[m] = hist
                ex_t[m] = hts
                m += 1
                hist[1:] = hist[:-1].copy()
                hist[0] = i
                hts[1:] = hts[:-1].copy()
                hts[0] = t
                self._seen[u].add(i)
                ex_j[m - 1] = j
                # counters and popularity event by event, for a caller that looks in between
                self._u_events[u] += 1
                self._i_events[i] += 1
                self._u_last[u] = max(self._u_last[u], t)
                self._i_last[i] = max(self._i_last[i], t)
                self._pop[i] = np.logaddexp(self._pop[i], pop_x[j])
        self._watermark = wm
        if not live and m:
            # same results as the per-event branch, applied in order by ufunc.at
            np.add.at(self._u_events, ex_u[:m], 1)
            np.add.at(self._i_events, ex_i[:m], 1)
            tj = ts[ex_j[:m]]
            np.maximum.at(self._u_last, ex_u[:m], tj)
            np.maximum.at(self._i_last, ex_i[:m], tj)
            np.logaddexp.at(self._pop, ex_i[:m], pop_x[ex_j[:m]])
        ex_b = self._buckets(ex_t[:m])
        k = self._ck_m
        self._ck.put(slice(k, k + m), ex_u[:m], ex_i[:m], ex_w[:m], ex_h[:m], ex_b)
        self._ck_m = k + m
        self._ck_new_u.extend(new_u)
        self._ck_new_i.extend(new_i)
        ch_u.extend([ex_u[:m], np.asarray(new_u, dtype=np.int64)])
        ch_i.extend([ex_i[:m], np.asarray(new_i, dtype=np.int64)])

    def _end_chunk(self, ch_u: list[np.ndarray], ch_i: list[np.ndarray]) -> None:
        """Close a full chunk: initialise its new rows, expire idle ids, train, fill replay.

        Appends every row this changes to ``ch_u`` / ``ch_i``.
        """
        k = self._ck_m
        ex_u, ex_i, ex_w, ex_h, ex_b = self._ck.take(slice(0, k))
        new_u = np.asarray(self._ck_new_u, dtype=np.int64)
        new_i = np.asarray(self._ck_new_i, dtype=np.int64)
        self._ck_m = self._ck_fill = 0
        self._ck_new_u, self._ck_new_i = [], []
        all_items_changed = self._maybe_reanchor()
        self._init_rows(new_u.tolist(), new_i.tolist())
        exp_u, exp_i = self._expire()
        if len(exp_u) or len(exp_i):
            keep = ~(np.isin(ex_u, exp_u) | np.isin(ex_i, exp_i))
            ex_u, ex_i, ex_w, ex_h = ex_u[keep], ex_i[keep], ex_w[keep], ex_h[keep]
            ex_b = ex_b[keep]
            if len(exp_i):
                ex_h[np.isin(ex_h, exp_i)] = -1
        ch_u.extend([exp_u, new_u, np.asarray(self._expiry_touched, dtype=np.int64)])
        self._expiry_touched = []
        ch_i.extend([exp_i, new_i])
        if len(ex_u):
            tu, ti = self._train(ex_u, ex_i, ex_h, ex_b, ex_w)
            ch_u.append(tu)
            ch_i.append(ti)
            self._push_replay(ex_u, ex_i, ex_h, ex_b, ex_w)
        self._step += 1
        if all_items_changed:
            ch_i.append(np.arange(self.n_items, dtype=np.int64))

    def _lookup(self, user_id: object, item_id: object, new_u: list[int],
                new_i: list[int]) -> tuple[int, int]:
        """Rows of one event's ids (-1 while not admitted), growing tables for new ids."""
        u, u_new = self._users.lookup(str(user_id))
        i, i_new = self._items.lookup(str(item_id))
        if u_new:
            self._grow_users(u + 1)
            new_u.append(u)
            if u == len(self._seen):
                self._seen.append(set())
        if i_new:
            self._grow_items(i + 1)
            new_i.append(i)
        return u, i

    def _fast_path_bulk(self, user_ids: Sequence[str], item_ids: Sequence[str], ts: np.ndarray,
                        w_in: np.ndarray, ex_u: np.ndarray, ex_i: np.ndarray, ex_w: np.ndarray,
                        ex_h: np.ndarray, ex_t: np.ndarray, ex_j: np.ndarray, new_u: list[int],
                        new_i: list[int], wm: int) -> tuple[int, int]:
        """The per-event fast path for a whole batch at once (no observer between events).

        Ids are mapped one by one (admission and row allocation depend on order);
        histories are then built with array operations: event k of a user that
        has p earlier events in the batch sees those p items (newest first)
        followed by its stored history. Fills ``ex_*`` (first m rows); returns
        (m, new watermark). Ends in exactly the state of the per-event loop.
        """
        # known ids by plain dict lookups; the rest in stream order, since admission
        # counts and row allocation depend on it (a known id cannot change meanwhile)
        ukeys, ikeys = list(map(str, user_ids)), list(map(str, item_ids))
        uget, iget = self._users.index.get, self._items.index.get
        rows_u = np.array([uget(k, -2) for k in ukeys], dtype=np.int64)
        rows_i = np.array([iget(k, -2) for k in ikeys], dtype=np.int64)
        for j in np.flatnonzero((rows_u == -2) | (rows_i == -2)).tolist():
            rows_u[j], rows_i[j] = self._lookup(ukeys[j], ikeys[j], new_u, new_i)
        keep = np.flatnonzero((rows_u >= 0) & (rows_i >= 0))
        m = len(keep)
        if m == 0:
            return 0, wm
        H = self.cfg.history
        eu, ei, et = rows_u[keep], rows_i[keep], ts[keep]
        ex_u[:m], ex_i[:m], ex_w[:m], ex_j[:m] = eu, ei, w_in[keep], keep
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
            old_h = np.take_along_axis(self._hist[uu], oidx, axis=1)
            old_t = np.take_along_axis(self._hist_ts[uu], oidx, axis=1)
            return np.where(from_batch, si[bidx], old_h), np.where(from_batch, st[bidx], old_t)

        h_sorted, t_sorted = build(pos, starts[gid], su)
        ex_h[order], ex_t[order] = h_sorted, t_sorted
        last_u = su[starts]
        new_h, new_t = build(counts, starts, last_u)
        self._hist[last_u], self._hist_ts[last_u] = new_h, new_t
        seen = self._seen
        for u, i in zip(eu.tolist(), ei.tolist()):
            seen[u].add(i)
        return m, wm

    def _buckets(self, hist_ts: np.ndarray) -> np.ndarray:
        """Age bucket (B, H) int64 of each history slot relative to the newest slot."""
        edges = np.asarray(self.cfg.time_buckets_s, dtype=np.float64) * 1000.0
        age = hist_ts[:, :1] - hist_ts
        return np.searchsorted(edges, age, side="right").astype(np.int64)

    def _maybe_reanchor(self) -> bool:
        """Keep ``pop_log`` small: shift the reference time when it has drifted far."""
        if self._watermark is None or self._t_ref is None:
            return False
        drift = self._lam * (self._watermark - self._t_ref)
        if drift < _REANCHOR:
            return False
        self._pop[: self.n_items] -= drift
        self._t_ref = int(self._watermark)
        return True

    def _init_rows(self, new_u: list[int], new_i: list[int]) -> None:
        """Initialise rows allocated in this batch; seeded by (seed, step) for exact replay."""
        if new_u:
            r = torch.as_tensor(np.asarray(new_u, dtype=np.int64), device=self.device)
            self._U[r] = 0.0
            self._U_acc[r] = 0.0
        if new_i:
            rows = np.asarray(new_i, dtype=np.int64)
            rng = np.random.default_rng([self.cfg.seed, 1, self._step])
            D = self.cfg.dim
            init = rng.standard_normal((2, len(rows), D)).astype(np.float32) * self.cfg.init_std
            r = torch.as_tensor(rows, device=self.device)
            self._Ein[r] = torch.from_numpy(init[0]).to(self.device)
            self._Eout[r] = torch.from_numpy(init[1]).to(self.device)
            if self.cfg.tied:
                self._Ein[r] = self._Eout[r]
            for t in (self._B, self._acc_in, self._acc_out, self._acc_b):
                t[r] = 0.0

    # ----------------------------------------------------------------- expiry
    def _expire(self) -> tuple[np.ndarray, np.ndarray]:
        """Free rows idle for more than ``ttl_ms`` of event time (off when 0)."""
        ttl = self.cfg.ttl_ms
        empty = np.zeros(0, dtype=np.int64)
        if ttl <= 0 or self._watermark is None:
            return empty, empty
        cut = self._watermark - ttl
        nu, ni = self.n_users, self.n_items
        live_u = np.array([bool(x) for x in self._users.ids], dtype=bool)
        live_i = np.array([bool(x) for x in self._items.ids], dtype=bool)
        exp_u = np.flatnonzero(live_u & (self._u_last[:nu] < cut)).astype(np.int64)
        exp_i = np.flatnonzero(live_i & (self._i_last[:ni] < cut)).astype(np.int64)
        if len(exp_u):
            for r in exp_u.tolist():
                self._users.release(r)
                self._seen[r] = set()
            self._hist[exp_u] = -1
            self._hist_ts[exp_u] = 0
            self._u_last[exp_u] = 0
            self._u_events[exp_u] = 0
            ru = torch.as_tensor(exp_u, device=self.device)
            self._U[ru] = 0.0
            self._U_acc[ru] = 0.0
        if len(exp_i):
            for r in exp_i.tolist():
                self._items.release(r)
            gone = set(exp_i.tolist())
            for r, s in enumerate(self._seen):
                if s and not s.isdisjoint(gone):
                    s -= gone
                    self._expiry_touched.append(r)
            hist = self._hist[:nu]
            in_hist = np.isin(hist, exp_i)
            hist[in_hist] = -1
            self._expiry_touched.extend(np.flatnonzero(in_hist.any(axis=1)).tolist())
            self._i_last[exp_i] = 0
            self._i_events[exp_i] = 0
            self._pop[exp_i] = -np.inf
            ri = torch.as_tensor(exp_i, device=self.device)
            for t in (self._Ein, self._Eout, self._B, self._acc_in, self._acc_out, self._acc_b):
                t[ri] = 0.0
        if self._rp_n and (len(exp_u) or len(exp_i)):
            k = self._rp_n
            rp = self._rp
            dead = np.isin(rp.user[:k], exp_u) | np.isin(rp.item[:k], exp_i)
            rp.weight[:k][dead] = 0.0
            rp.hist[:k][np.isin(rp.hist[:k], exp_i)] = -1
        return exp_u, exp_i

    # ---------------------------------------------------------------- replay
    def _push_replay(self, u: np.ndarray, i: np.ndarray, h: np.ndarray, b: np.ndarray,
                     w: np.ndarray) -> None:
        R = self.cfg.replay
        if R <= 0:
            return
        if len(u) > R:
            u, i, h, b, w = u[-R:], i[-R:], h[-R:], b[-R:], w[-R:]
        idx = (self._rp_pos + np.arange(len(u))) % R
        self._rp.put(idx, u, i, w, h, b)
        self._rp_pos = int((self._rp_pos + len(u)) % R)
        self._rp_n = min(R, self._rp_n + len(u))

    # ----------------------------------------------------------------- train
    def _train(self, u: np.ndarray, i: np.ndarray, h: np.ndarray, b: np.ndarray,
               w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sampled-softmax steps on the batch (N events) plus replay; returns touched rows."""
        c = self.cfg
        rng = np.random.default_rng([c.seed, 2, self._step])
        live_items = self.n_items
        touched_u: list[np.ndarray] = []
        touched_i: list[np.ndarray] = []
        pop = self._pop[:live_items]
        for _ in range(c.steps):
            bu, bi, bh, bb, bw = u, i, h, b, w
            k = min(c.replay_per_step, self._rp_n)
            if k > 0:
                sel = rng.choice(self._rp_n, size=k, replace=False)
                sel = sel[self._rp.weight[sel] > 0]      # expired while in the ring
                ru, ri, rw, rh, rb = self._rp.take(sel)
                bu = np.concatenate([bu, ru])
                bi = np.concatenate([bi, ri])
                bh = np.concatenate([bh, rh])
                bb = np.concatenate([bb, rb])
                bw = np.concatenate([bw, rw])
            neg = rng.integers(0, live_items, size=c.negatives) if c.negatives else \
                np.zeros(0, dtype=np.int64)
            if len(neg):
                neg = neg[np.isfinite(pop[neg])]
            shared = None
            if c.inbatch_negatives > 0:
                neg = np.concatenate([rng.choice(bi, size=c.inbatch_negatives), neg])
            cand, label = _unique_inverse(np.concatenate([bi, neg]), live_items)
            label = label[: len(bi)]
            if c.inbatch_negatives > 0:
                shared = np.unique(np.searchsorted(cand, neg))
            uu, u_inv = _unique_inverse(bu, self.n_users)
            # history slots: -1 (empty) maps to a zero row 0, item r to r + 1
            hh, h_inv = _unique_inverse(bh.reshape(-1) + 1, live_items + 1)
            has_pad = bool(len(hh) and hh[0] == 0)
            hrows = (hh[1:] if has_pad else hh) - 1
            slot_w = (np.arange(bh.shape[1])[None, :] * self._n_buckets + bb).reshape(-1)
            mask = None
            if c.mask_seen:
                # seen rows of each distinct user, then expanded to that user's events
                uniq_u, u_pos = np.unique(bu, return_inverse=True)
                sets = [self._seen[x] for x in uniq_u.tolist()]
                ulen = np.fromiter(map(len, sets), np.int64, len(sets))
                uflat = np.fromiter(itertools.chain.from_iterable(sets), np.int64, int(ulen.sum()))
                # candidate column of each (distinct user, seen item); most are not candidates,
                # so keep the pairs that are before expanding them to the user's events
                col = np.full(live_items, -1, dtype=np.int64)
                col[cand] = np.arange(len(cand))
                ucol = col[uflat]
                keep = ucol >= 0
                pair_col = ucol[keep]
                per_user = np.bincount(np.repeat(np.arange(len(sets)), ulen)[keep],
                                       minlength=len(sets))
                pstart = np.cumsum(per_user) - per_user
                lens = per_user[u_pos]
                ev = np.repeat(np.arange(len(bu)), lens)
                # index of each (event, k) into pair_col: start of its user's pairs + k
                offs = np.arange(len(ev)) - np.repeat(np.cumsum(lens) - lens, lens)
                pos = pair_col[pstart[u_pos][ev] + offs]
                hit = pos != label[ev]
                mask = (ev[hit], pos[hit])
            elif c.mask_history:
                # (event, candidate) pairs where the candidate is already in the history
                pos = np.minimum(np.searchsorted(cand, bh), len(cand) - 1)
                hit = (cand[pos] == bh) & (pos != label[:, None])
                ev = np.broadcast_to(np.arange(len(bh))[:, None], bh.shape)
                mask = (ev[hit], pos[hit])
            self._sgd_step(uu, u_inv, hrows, h_inv, has_pad, bh.shape, slot_w, cand, label, bw,
                           pop, mask, shared)
            touched_u.append(uu)
            touched_i.extend([cand, hrows])
        return np.concatenate(touched_u), np.concatenate(touched_i)

    def _sgd_step(self, uu: np.ndarray, u_inv: np.ndarray, hrows: np.ndarray,
                  h_inv: np.ndarray, has_pad: bool, hshape: tuple[int, int],
                  slot_w: np.ndarray, cand: np.ndarray,
                  label: np.ndarray, bw: np.ndarray, pop: np.ndarray,
                  mask: tuple[np.ndarray, np.ndarray] | None = None,
                  shared: np.ndarray | None = None) -> None:
        """One sampled-softmax step on N events over candidate rows ``cand`` (C,).

        ``shared`` (K,) indexes the candidates used as negatives for every event
        (the event's own target is scored separately); ``None`` scores all C.
        ``mask`` = (event, candidate) pairs excluded from the softmax.
        """
        c = self.cfg
        dev = self.device
        t_uu = torch.as_tensor(uu, device=dev)
        t_hr = torch.as_tensor(hrows, device=dev)
        t_c = torch.as_tensor(cand, device=dev)
        U = self._U[t_uu].requires_grad_(c.use_user_vector)
        if c.tied:
            rows = np.union1d(hrows, cand)
            t_r = torch.as_tensor(rows, device=dev)
            Er = self._Eout[t_r].requires_grad_(True)
            Ei = Er[torch.as_tensor(np.searchsorted(rows, hrows), device=dev)]
            Eo = Er[torch.as_tensor(np.searchsorted(rows, cand), device=dev)]
        else:
            Ei = self._Ein[t_hr].requires_grad_(True)
            Eo = self._Eout[t_c].requires_grad_(True)
        Bc = self._B[t_c].requires_grad_(True)
        pw = self._pos_w.clone().requires_grad_(True)
        # weighted sum of history input embeddings, one bag per event (N, D)
        N, H = hshape
        idx = torch.as_tensor(h_inv, device=dev)
        psw = pw.reshape(-1)[torch.as_tensor(slot_w, device=dev)]              # (N * H,)
        if has_pad:
            Ei_full = torch.cat([torch.zeros(1, Ei.shape[1], device=dev), Ei])
            psw = psw * (idx > 0).to(torch.float32)
        else:
            Ei_full = Ei
        offsets = torch.arange(0, N * H, H, device=dev)
        q = torch.nn.functional.embedding_bag(idx, Ei_full, offsets, mode="sum",
                                              per_sample_weights=psw)
        if c.transition:
            Mv = self._M.clone().requires_grad_(True)
            last = idx.view(N, H)[:, 0]
            q = q + Ei_full[last] @ Mv
        if c.use_user_vector:
            q = q + U[torch.as_tensor(u_inv, device=dev)]
        pc = pop[cand]
        prior_np = c.pop_weight * (pc - pc.max())
        if c.logq > 0:
            expected = np.bincount(label, minlength=len(cand)) + c.negatives / max(len(pop), 1)
            prior_np = prior_np - c.logq * np.log(expected)
        prior = torch.as_tensor(prior_np.astype(np.float32), device=dev)
        qs = c.scale * q
        t_label = torch.as_tensor(label, device=dev)
        mrow = mcol = np.zeros(0, dtype=np.int64)
        if shared is None:
            logits = qs @ Eo.T + (Bc + prior)                                       # (N, C)
            target = t_label
            if mask is not None:
                mrow, mcol = mask
        else:
            t_sh = torch.as_tensor(shared, device=dev)
            pos = (qs * Eo[t_label]).sum(1) + (Bc + prior)[t_label]               # (N,)
            negl = qs @ Eo[t_sh].T + (Bc + prior)[t_sh]                            # (N, K)
            logits = torch.cat([pos[:, None], negl], dim=1)                        # (N, 1 + K)
            target = torch.zeros(len(label), dtype=torch.long, device=dev)
            col = np.full(len(cand), -1, dtype=np.int64)
            col[shared] = np.arange(1, len(shared) + 1)
            hit_r = np.flatnonzero(col[label] > 0)                                 # accidental hits
            mrow, mcol = hit_r, col[label[hit_r]]
            if mask is not None and len(mask[0]):
                keep = col[mask[1]] > 0
                mrow = np.concatenate([mrow, mask[0][keep]])
                mcol = np.concatenate([mcol, col[mask[1][keep]]])
            mask = (mrow, mcol)
        if len(mrow):
            # in place: the preceding add does not need its output for backward
            logits.index_put_((torch.as_tensor(mrow, device=dev),
                               torch.as_tensor(mcol, device=dev)),
                              torch.tensor(-1e4, device=dev))
        ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        loss = (ce * torch.as_tensor(bw, device=dev)).sum()
        if c.l2 > 0:
            loss = loss + c.l2 * (Ei.pow(2).sum() + Eo.pow(2).sum() + U.pow(2).sum())
        params = [Er, Er, Bc, pw] if c.tied else [Ei, Eo, Bc, pw]
        params += [U] if c.use_user_vector else []
        params += [Mv] if c.transition else []
        grads = torch.autograd.grad(loss, params[1:] if c.tied else params)
        if c.tied:  # the tied table's gradient arrives through the output side
            grads = (None,) + grads  # type: ignore[assignment]
        lr = c.lr
        with torch.no_grad():
            if c.tied:
                _adagrad_rows(self._Eout, self._acc_out, t_r, Er, grads[1], lr, c.acc_decay)
                self._Ein[t_r] = self._Eout[t_r]
            else:
                _adagrad_rows(self._Ein, self._acc_in, t_hr, Ei, grads[0], lr, c.acc_decay)
                _adagrad_rows(self._Eout, self._acc_out, t_c, Eo, grads[1], lr, c.acc_decay)
            acc = c.acc_decay * self._acc_b[t_c] + grads[2].pow(2)
            self._acc_b[t_c] = acc
            self._B[t_c] = Bc.detach() - lr * grads[2] / (acc.sqrt() + 1e-8)
            self._pos_acc += grads[3].pow(2)
            self._pos_w -= c.pos_lr_scale * lr * grads[3] / (self._pos_acc.sqrt() + 1e-8)
            if c.use_user_vector:
                _adagrad_rows(self._U, self._U_acc, t_uu, U, grads[4], lr, c.acc_decay)
            if c.transition:
                g = grads[-1]
                self._M_acc += g.pow(2)
                self._M -= c.pos_lr_scale * lr * g / (self._M_acc.sqrt() + 1e-8)

    # ------------------------------------------------------------- serving
    def _user_query(self, rows: np.ndarray) -> torch.Tensor:
        """Query vectors (B, D + 1) on device from the current fast-path history."""
        hist = torch.as_tensor(self._hist[rows], device=self.device)    # (B, H)
        bucket = torch.as_tensor(self._buckets(self._hist_ts[rows]), device=self.device)
        slots = torch.arange(hist.shape[1], device=self.device)[None, :]
        wts = self._pos_w[slots.expand_as(bucket), bucket] * (hist >= 0).to(torch.float32)
        emb = self._Ein[hist.clamp_min(0)]
        q = torch.einsum("bhd,bh->bd", emb, wts)
        if self.cfg.transition:
            q = q + (emb[:, 0] * (hist[:, :1] >= 0).to(torch.float32)) @ self._M
        if self.cfg.use_user_vector:
            q = q + self._U[torch.as_tensor(rows, device=self.device)]
        q = q * self.cfg.scale
        return torch.cat([q, torch.ones(len(rows), 1, device=self.device)], dim=1)

    def _item_vectors(self, rows: np.ndarray | slice | None = None) -> torch.Tensor:
        """FAISS vectors (R, D + 1): output embedding and bias + weighted log popularity.

        ``rows``: a slice or int64 row array; ``None`` = every row in use.
        """
        if rows is None:
            rows = slice(0, self.n_items)
        pop_r = self._pop[rows]
        pop = np.where(np.isfinite(pop_r), pop_r, 0.0)
        t_rows = rows if isinstance(rows, slice) else torch.as_tensor(rows, device=self.device)
        extra = self._B[t_rows] + torch.as_tensor(
            (self.cfg.pop_weight * pop).astype(np.float32), device=self.device)
        return torch.cat([self._Eout[t_rows], extra[:, None]], dim=1)

    def score_user(self, user_id: str) -> np.ndarray | None:
        """Scores (I,) float32 of every item row for a known user (seen not removed)."""
        row = self._users.index.get(str(user_id))
        if row is None:
            return None
        q = self._user_query(np.array([row]))
        return (self._item_vectors() @ q[0]).cpu().numpy()

    def user_row(self, user_id: str) -> int | None:
        return self._users.index.get(str(user_id))

    def item_row(self, item_id: str) -> int | None:
        return self._items.index.get(str(item_id))

    def seen_rows(self, user_row: int) -> set[int]:
        return self._seen[user_row]

    def live_items(self) -> np.ndarray:
        """Bool mask (I,) of rows that hold an item."""
        return np.array([bool(x) for x in self._items.ids], dtype=bool)

    def popular_rows(self, k: int) -> np.ndarray:
        pop = np.where(self.live_items(), self._pop[: self.n_items], -np.inf)
        order = np.argsort(-pop, kind="stable")[:k]
        return order[np.isfinite(pop[order])]

    def recommend(self, user_id: str, k: int) -> list[tuple[str, float]]:
        """Top-``k`` unseen items for ``user_id``; unknown users get decayed-popular items."""
        row = self._users.index.get(str(user_id))
        if row is None:
            return [(self._items.ids[r], float(self._pop[r])) for r in self.popular_rows(k)]
        scores = self.score_user(user_id)
        assert scores is not None
        scores = scores.astype(np.float32)
        scores[~self.live_items()] = -np.inf
        seen = np.fromiter(self._seen[row], dtype=np.int64, count=len(self._seen[row]))
        scores[seen] = -np.inf
        kk = min(k, int(np.isfinite(scores).sum()))
        if kk <= 0:
            return []
        top = np.argpartition(-scores, kk - 1)[:kk]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(self._items.ids[r], float(scores[r])) for r in top]

    # ---------------------------------------------------------------- state
    def _row_tables(self, urows: np.ndarray | slice, irows: np.ndarray | slice
                    ) -> dict[str, np.ndarray]:
        """``user.*`` tables at ``urows`` and ``item.*`` tables at ``irows`` as CPU copies.

        Rows are either slices (the whole state) or sorted int64 arrays (a delta);
        both go through the same element-wise arithmetic, so a row's values are
        bitwise identical either way.
        """
        dev = self.device

        def pick(t: torch.Tensor, rows: np.ndarray | slice) -> np.ndarray:
            if isinstance(rows, slice):
                return t[rows].detach().to("cpu").numpy().copy()
            return t[torch.as_tensor(rows, device=dev)].detach().to("cpu").numpy()

        return {
            "user.vec": pick(self._U, urows),
            "user.acc": pick(self._U_acc, urows),
            "user.hist": self._hist[urows].copy(),
            "user.hist_ts": self._hist_ts[urows].copy(),
            "user.last_ts": self._u_last[urows].copy(),
            "user.events": self._u_events[urows].copy(),
            "item.vectors": self._item_vectors(irows).detach().to("cpu").numpy().copy(),
            "item.in": pick(self._Ein, irows),
            "item.out": pick(self._Eout, irows),
            "item.bias": pick(self._B, irows),
            "item.acc_in": pick(self._acc_in, irows),
            "item.acc_out": pick(self._acc_out, irows),
            "item.acc_bias": pick(self._acc_b, irows),
            "item.pop_log": self._pop[irows].copy(),
            "item.last_ts": self._i_last[irows].copy(),
            "item.events": self._i_events[irows].copy(),
        }

    def _seen_csr(self, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """CSR ``(indptr (len(rows) + 1,), items)`` int64 of the sorted seen lists of ``rows``."""
        lists = [np.fromiter(sorted(self._seen[r]), dtype=np.int64, count=len(self._seen[r]))
                 for r in rows]
        indptr = np.zeros(len(lists) + 1, dtype=np.int64)
        if lists:
            indptr[1:] = np.cumsum([len(s) for s in lists])
        items = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
        return indptr, items

    def _global_tables(self) -> dict[str, np.ndarray]:
        """The small ``global.*`` tables (everything except the seen CSR), as copies."""
        cpu = lambda t: t.detach().to("cpu").numpy().copy()
        pu = self._users.pending
        pi = self._items.pending
        return {
            "global.pos_w": cpu(self._pos_w),
            "global.pos_acc": cpu(self._pos_acc),
            "global.transition": cpu(self._M),
            "global.transition_acc": cpu(self._M_acc),
            "global.step": np.array([self._step], dtype=np.int64),
            "global.t_ref": np.array([-1 if self._t_ref is None else self._t_ref], dtype=np.int64),
            "global.watermark": np.array(
                [-1 if self._watermark is None else self._watermark], dtype=np.int64),
            **self._rp.tables("global.replay_", self._rp_n),
            "global.replay_pos": np.array([self._rp_pos], dtype=np.int64),
            "global.free_users": np.asarray(self._users.free, dtype=np.int64),
            "global.free_items": np.asarray(self._items.free, dtype=np.int64),
            "global.pending_user_ids": np.asarray(list(pu.keys()), dtype=str),
            "global.pending_user_counts": np.asarray(list(pu.values()), dtype=np.int64),
            "global.pending_item_ids": np.asarray(list(pi.keys()), dtype=str),
            "global.pending_item_counts": np.asarray(list(pi.values()), dtype=np.int64),
            **self._ck.tables("global.chunk_", self._ck_m),
            "global.chunk_fill": np.array([self._ck_fill], dtype=np.int64),
            "global.chunk_new_users": np.asarray(self._ck_new_u, dtype=np.int64),
            "global.chunk_new_items": np.asarray(self._ck_new_i, dtype=np.int64),
        }

    def state(self) -> ModelState:
        """A consistent CPU numpy copy of everything (see :class:`ModelState`)."""
        nu, ni = self.n_users, self.n_items
        tables = self._row_tables(slice(0, nu), slice(0, ni))
        tables.update(self._global_tables())
        tables["global.seen_indptr"], tables["global.seen_items"] = self._seen_csr(range(nu))
        return ModelState(config=self.cfg.model_dump(), user_ids=list(self._users.ids),
                          item_ids=list(self._items.ids), tables=tables)

    def delta(self, users: np.ndarray | None, items: np.ndarray | None) -> StateDelta:
        """The :class:`~stream_rec.snapshot.delta.StateDelta` of rows ``users`` / ``items``.

        Equal field by field (bitwise) to ``delta_from_state(self.state(), users,
        items)``, but it gathers only the requested rows: O(rows + global tables)
        instead of copying every (U, D) and (I, D + 1) table. ``users`` / ``items``
        are int64 row numbers in any order, duplicates and out-of-range rows
        ignored; ``None`` means every row.
        """
        from stream_rec.snapshot.delta import StateDelta, _rows  # snapshot imports model

        nu, ni = self.n_users, self.n_items
        urows, irows = _rows(users, nu), _rows(items, ni)
        tables = self._row_tables(urows, irows)
        tables.update(self._global_tables())
        ptr, seen = self._seen_csr(urows.tolist())
        uids, iids = self._users.ids, self._items.ids
        return StateDelta(config=self.cfg.model_dump(), n_users=nu, n_items=ni, user_rows=urows,
                          item_rows=irows, user_ids=[uids[r] for r in urows.tolist()],
                          item_ids=[iids[r] for r in irows.tolist()], tables=tables,
                          seen_indptr=ptr, seen_items=seen)

    @classmethod
    def from_state(cls, state: ModelState, device: str = "auto") -> StreamingModel:
        """Exact restore: learning continues as if never interrupted (bitwise on CPU)."""
        m = cls(ModelConfig(**state.config), device=device)
        t = state.tables
        nu, ni = len(state.user_ids), len(state.item_ids)
        m._grow_users(nu)
        m._grow_items(ni)
        dev = m.device

        def put(dst: torch.Tensor, src: np.ndarray) -> None:
            dst[: len(src)] = torch.from_numpy(np.ascontiguousarray(src)).to(dev)

        put(m._U, t["user.vec"])
        put(m._U_acc, t["user.acc"])
        m._hist[:nu] = t["user.hist"]
        m._hist_ts[:nu] = t["user.hist_ts"]
        m._u_last[:nu] = t["user.last_ts"]
        m._u_events[:nu] = t["user.events"]
        put(m._Ein, t["item.in"])
        put(m._Eout, t["item.out"])
        put(m._B, t["item.bias"])
        put(m._acc_in, t["item.acc_in"])
        put(m._acc_out, t["item.acc_out"])
        put(m._acc_b, t["item.acc_bias"])
        m._pop[:ni] = t["item.pop_log"]
        m._i_last[:ni] = t["item.last_ts"]
        m._i_events[:ni] = t["item.events"]
        m._pos_w = torch.from_numpy(t["global.pos_w"].copy()).to(dev)
        m._pos_acc = torch.from_numpy(t["global.pos_acc"].copy()).to(dev)
        m._M = torch.from_numpy(t["global.transition"].copy()).to(dev)
        m._M_acc = torch.from_numpy(t["global.transition_acc"].copy()).to(dev)
        m._step = int(t["global.step"][0])
        tr, wm = int(t["global.t_ref"][0]), int(t["global.watermark"][0])
        m._t_ref = None if tr < 0 and wm < 0 else tr
        m._watermark = None if wm < 0 and tr < 0 else wm
        ptr, items = t["global.seen_indptr"], t["global.seen_items"]
        m._seen = [set(items[ptr[r]:ptr[r + 1]].tolist()) for r in range(nu)]
        for ids, names in ((m._users, state.user_ids), (m._items, state.item_ids)):
            ids.ids = list(names)
            ids.index = {x: r for r, x in enumerate(names) if x}
        m._users.free = t["global.free_users"].tolist()
        m._items.free = t["global.free_items"].tolist()
        m._users.pending = dict(zip(t["global.pending_user_ids"].tolist(),
                                    t["global.pending_user_counts"].tolist()))
        m._items.pending = dict(zip(t["global.pending_item_ids"].tolist(),
                                    t["global.pending_item_counts"].tolist()))
        m._rp_n = m._rp.load(t, "global.replay_")
        m._rp_pos = int(t["global.replay_pos"][0])
        if "global.chunk_fill" in t:  # versions written before chunked training have none
            m._ck_m = m._ck.load(t, "global.chunk_")
            m._ck_fill = int(t["global.chunk_fill"][0])
            m._ck_new_u = t["global.chunk_new_users"].tolist()
            m._ck_new_i = t["global.chunk_new_items"].tolist()
        return m


class _Events:
    """Learned events held between calls: rows, weight, and history with its age buckets.

    The replay ring and the incomplete training chunk keep the same five
    columns; one class lets both be filled, drawn from, snapshotted (as
    ``<prefix>user`` ... ``<prefix>bucket``) and restored by the same code.
    """

    COLUMNS = ("user", "item", "weight", "hist", "bucket")

    def __init__(self, capacity: int, history: int) -> None:
        self.user = np.zeros(capacity, dtype=np.int64)
        self.item = np.zeros(capacity, dtype=np.int64)
        self.weight = np.zeros(capacity, dtype=np.float32)
        self.hist = np.full((capacity, history), -1, dtype=np.int64)
        self.bucket = np.zeros((capacity, history), dtype=np.int64)

    def put(self, at: slice | np.ndarray, u: np.ndarray, i: np.ndarray, w: np.ndarray,
            h: np.ndarray, b: np.ndarray) -> None:
        for col, v in zip(self.COLUMNS, (u, i, w, h, b)):
            getattr(self, col)[at] = v

    def take(self, at: slice | np.ndarray) -> tuple[np.ndarray, ...]:
        """Copies of the five columns at ``at`` (user, item, weight, hist, bucket)."""
        return tuple(getattr(self, col)[at].copy() for col in self.COLUMNS)

    def tables(self, prefix: str, n: int) -> dict[str, np.ndarray]:
        return {prefix + col: getattr(self, col)[:n].copy() for col in self.COLUMNS}

    def load(self, tables: dict[str, np.ndarray], prefix: str) -> int:
        """Restore the first rows from ``tables``; returns how many there were."""
        n = len(tables[prefix + "user"])
        if n:
            for col in self.COLUMNS:
                getattr(self, col)[:n] = tables[prefix + col]
        return n


def _adagrad_rows(table: torch.Tensor, acc: torch.Tensor, rows: torch.Tensor,
                  value: torch.Tensor, grad: torch.Tensor, lr: float, decay: float) -> None:
    """Row-wise Adagrad on the unique ``rows`` (R,) of ``table`` (cap, D).

    ``decay`` < 1 shrinks the accumulator of touched rows first, so step sizes
    stop shrinking for ever -- items keep adapting as tastes drift.
    """
    a = decay * acc[rows] + grad.pow(2).mean(dim=1)
    acc[rows] = a
    table[rows] = value.detach() - lr * grad / (a.sqrt()[:, None] + 1e-8)


def _unique_inverse(x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(x, return_inverse=True)`` for ints in [0, n) in O(len(x) + n)."""
    present = np.zeros(n, dtype=bool)
    present[x] = True
    uniq = np.flatnonzero(present)
    pos = np.cumsum(present) - 1
    return uniq.astype(np.int64), pos[x].astype(np.int64)


def _grow_t(t: torch.Tensor, cap: int) -> torch.Tensor:
    out = torch.zeros((cap,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out


def _grow_np(a: np.ndarray, cap: int, fill: Any) -> np.ndarray:
    out = np.full((cap,) + a.shape[1:], fill, dtype=a.dtype)
    out[: a.shape[0]] = a
    return out
