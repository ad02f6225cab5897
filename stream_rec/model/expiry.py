"""Expiry: ids idle for longer than ``ttl_ms`` of event time give their rows back.

An expired row's id becomes ``""`` (so a delta publishes the removal), its
parameters and counters are zeroed, and it leaves every seen set, history and
replayed event that referred to it; the row is reused by a later new id.
"""

from __future__ import annotations

import numpy as np

from .core import ModelCore


def expire(model: ModelCore) -> tuple[np.ndarray, np.ndarray]:
    """Free rows idle for more than ``ttl_ms`` of event time (off when 0).

    Returns the expired (user rows, item rows); users whose seen set or
    history lost an expired item are added to ``model.expiry_touched``.
    """
    ttl = model.cfg.ttl_ms
    fast = model.fast
    empty = np.zeros(0, dtype=np.int64)
    if ttl <= 0 or fast.watermark is None:
        return empty, empty
    cut = fast.watermark - ttl
    nu, ni = model.n_users, model.n_items
    exp_u = np.flatnonzero(fast.users.live() & (fast.u_last[:nu] < cut)).astype(np.int64)
    exp_i = np.flatnonzero(fast.items.live() & (fast.i_last[:ni] < cut)).astype(np.int64)
    if len(exp_u):
        for r in exp_u.tolist():
            fast.users.release(r)
            fast.seen[r] = set()
        fast.hist[exp_u] = -1
        fast.hist_ts[exp_u] = 0
        fast.u_last[exp_u] = 0
        fast.u_events[exp_u] = 0
        model.params.clear_users(exp_u)
    if len(exp_i):
        for r in exp_i.tolist():
            fast.items.release(r)
        gone = set(exp_i.tolist())
        for r, s in enumerate(fast.seen):
            if s and not s.isdisjoint(gone):
                s -= gone
                model.expiry_touched.append(r)
        hist = fast.hist[:nu]
        in_hist = np.isin(hist, exp_i)
        hist[in_hist] = -1
        model.expiry_touched.extend(np.flatnonzero(in_hist.any(axis=1)).tolist())
        fast.i_last[exp_i] = 0
        fast.i_events[exp_i] = 0
        fast.pop[exp_i] = -np.inf
        model.params.clear_items(exp_i)
    if len(exp_u) or len(exp_i):
        model.replay.forget(exp_u, exp_i)
    return exp_u, exp_i
