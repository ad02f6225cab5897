"""Expiry: ids idle too long, or beyond the cap on live rows, give their rows back.

At the end of each training chunk two rules pick rows to free:

* ``ttl_ms`` (0 = off): ids whose newest event is older than
  ``watermark - ttl_ms`` (event time);
* ``max_users`` / ``max_items`` (0 = no cap): when more ids than the cap are
  live, the least recently seen (newest event time, then lowest row) expire
  until 15/16 of the cap are left. Evicting a batch at once keeps the cost of
  a round -- items leave every history and seen list -- off most chunks.

An expired row's id becomes ``""`` (so a delta publishes the removal), its
parameters, counters, history and seen list are cleared, and it leaves every
seen list, history and replayed event that referred to it; the row is reused
by a later new id. Shared rows (``shared_rows``) are never live and never
expire.
"""

from __future__ import annotations

import numpy as np

from . import kernels
from .core import ModelCore
from .ids import IdTable

_EMPTY = np.zeros(0, dtype=np.int64)


def _pick(ids: IdTable, last: np.ndarray, cut: int | None, cap: int) -> np.ndarray:
    """Sorted rows to expire: idle before ``cut`` (None: no TTL), then beyond ``cap``."""
    n = len(ids)
    live = ids.live()
    idle = _EMPTY if cut is None else kernels.idle_rows(last, live, n, cut)
    left = ids.n_live - len(idle)
    if cap <= 0 or left <= cap:
        return idle
    keep = live.copy()
    keep[idle] = False
    cand = np.flatnonzero(keep)
    order = np.argsort(last[cand], kind="stable")       # oldest first, lowest row on ties
    evict = cand[order[: left - (cap - cap // 16)]]
    return np.sort(np.concatenate([idle, evict]))


def expire(model: ModelCore) -> tuple[np.ndarray, np.ndarray]:
    """Free the rows the TTL and the caps pick (see the module docstring).

    Returns the expired (user rows, item rows); users whose seen list or
    history lost an expired item are added to ``model.touched_users``.
    """
    cfg, fast = model.cfg, model.fast
    cut = None
    if cfg.ttl_ms > 0 and fast.watermark is not None:
        cut = fast.watermark - cfg.ttl_ms
    if cut is None and not _over(fast.users, cfg.max_users) \
            and not _over(fast.items, cfg.max_items):
        return _EMPTY, _EMPTY
    nu, ni = model.n_users, model.n_items
    exp_u = _pick(fast.users, fast.u_last, cut, cfg.max_users)
    exp_i = _pick(fast.items, fast.i_last, cut, cfg.max_items)
    if len(exp_u):
        for r in exp_u.tolist():
            fast.users.release(r)
        fast.seen.clear(exp_u)
        fast.hist[exp_u] = -1
        fast.hist_ts[exp_u] = 0
        fast.u_last[exp_u] = 0
        fast.u_events[exp_u] = 0
        model.params.clear_users(exp_u)
    if len(exp_i):
        for r in exp_i.tolist():
            fast.items.release(r)
        gone = np.zeros(ni, dtype=bool)
        gone[exp_i] = True
        touched = np.zeros(nu, dtype=bool)
        fast.seen.remove_items(nu, gone, touched)
        kernels.hist_remove(fast.hist, nu, gone, touched)
        model.touched_users.extend(np.flatnonzero(touched).tolist())
        fast.i_last[exp_i] = 0
        fast.i_events[exp_i] = 0
        fast.pop[exp_i] = -np.inf
        model.params.clear_items(exp_i)
    if len(exp_u) or len(exp_i):
        model.replay.forget(exp_u, exp_i)
    return exp_u, exp_i


def _over(ids: IdTable, cap: int) -> bool:
    return cap > 0 and ids.n_live > cap
