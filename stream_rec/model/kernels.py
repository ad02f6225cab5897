"""Compiled (numba) loops of the per-event host state.

The fast path is sequential by nature -- event k of a user sees the history
that events 0..k-1 left -- so it is one loop over the events, compiled, rather
than array operations that rebuild the sequence. Both the bulk call and the
per-event call (with an observer between events) run this same loop, which is
what makes them end in the same state.

Seen lists live in one ``int32`` arena (:class:`~stream_rec.model.seen.SeenLists`):
user ``u`` owns the block at ``off[u]`` of size ``sizes[cls[u]]`` and uses its
first ``length[u]`` slots, oldest item first. Blocks come in size classes
(2, 4, 8, ... up to the cap); a full block moves to the next class, a freed
block goes onto its class's free list, linked through its first two slots.
Functions that may need a new block return early when the arena is full,
before touching any state, so the caller can grow the arena and resume.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_LOGE2 = 0.693147180559945309417232121458176568  # numpy's NPY_LOGE2

# meta[0]: arena slots in use (top); meta[1]: arena size a failed allocation needed
TOP, NEED = 0, 1


@njit(cache=True, inline="always")
def logaddexp(x: float, y: float) -> float:
    """``np.logaddexp`` for float64, the same operations in the same order (bitwise equal)."""
    if x == y:
        return x + _LOGE2
    tmp = x - y
    if tmp > 0:
        return x + math.log1p(math.exp(-tmp))
    if tmp <= 0:
        return y + math.log1p(math.exp(tmp))
    return tmp  # NaN


# ------------------------------------------------------------------ seen arena
@njit(cache=True, inline="always")
def _link_read(arena: np.ndarray, off: int) -> int:
    return (np.int64(arena[off]) | (np.int64(arena[off + 1]) << 31)) - 1


@njit(cache=True, inline="always")
def _link_write(arena: np.ndarray, off: int, nxt: int) -> None:
    v = nxt + 1  # -1 (end of list) is stored as 0
    arena[off] = np.int32(v & 0x7FFFFFFF)
    arena[off + 1] = np.int32(v >> 31)


@njit(cache=True, inline="always")
def _alloc(c: int, sizes: np.ndarray, arena: np.ndarray, free_head: np.ndarray,
           meta: np.ndarray) -> int:
    """Offset of a free block of class ``c``; -1 (and ``meta[NEED]``) when the arena is full."""
    h = free_head[c]
    if h >= 0:
        free_head[c] = _link_read(arena, h)
        return h
    top = meta[TOP]
    if top + sizes[c] > arena.shape[0]:
        meta[NEED] = top + sizes[c]
        return -1
    meta[TOP] = top + sizes[c]
    return top


@njit(cache=True, inline="always")
def _free(off: int, c: int, arena: np.ndarray, free_head: np.ndarray) -> None:
    _link_write(arena, off, free_head[c])
    free_head[c] = off


@njit(cache=True)
def seen_add(u: int, i: int, off: np.ndarray, length: np.ndarray, cls: np.ndarray,
             arena: np.ndarray, sizes: np.ndarray, free_head: np.ndarray, meta: np.ndarray,
             limit: int) -> bool:
    """Make item ``i`` user ``u``'s newest seen item; False (nothing changed) if the arena is full.

    An item already in the list moves to its end; a new one is appended, the
    oldest dropped first when the list holds ``limit`` (> 0) items.
    """
    n = length[u]
    o = off[u]
    for p in range(n):
        if arena[o + p] == i:
            for q in range(p, n - 1):
                arena[o + q] = arena[o + q + 1]
            arena[o + n - 1] = i
            return True
    if limit > 0 and n >= limit:
        for q in range(n - 1):
            arena[o + q] = arena[o + q + 1]
        arena[o + n - 1] = i
        return True
    c = cls[u]
    if c < 0 or n >= sizes[c]:
        new = _alloc(c + 1, sizes, arena, free_head, meta)
        if new < 0:
            return False
        for q in range(n):
            arena[new + q] = arena[o + q]
        if c >= 0:
            _free(o, c, arena, free_head)
        off[u] = new
        cls[u] = c + 1
        o = new
    arena[o + n] = i
    length[u] = n + 1
    return True


@njit(cache=True)
def seen_clear(rows: np.ndarray, off: np.ndarray, length: np.ndarray, cls: np.ndarray,
               arena: np.ndarray, free_head: np.ndarray) -> None:
    """Empty the lists of ``rows`` and give their blocks back."""
    for r in rows:
        if cls[r] >= 0:
            _free(off[r], cls[r], arena, free_head)
        cls[r] = -1
        length[r] = 0
        off[r] = 0


@njit(cache=True)
def seen_gather(rows: np.ndarray, off: np.ndarray, length: np.ndarray, arena: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """CSR ``(indptr (R + 1,), items)`` int64 of the lists of ``rows``, oldest item first."""
    ptr = np.zeros(len(rows) + 1, dtype=np.int64)
    for k in range(len(rows)):
        ptr[k + 1] = ptr[k] + length[rows[k]]
    flat = np.empty(ptr[-1], dtype=np.int64)
    for k in range(len(rows)):
        o = off[rows[k]]
        s = ptr[k]
        for p in range(ptr[k + 1] - s):
            flat[s + p] = arena[o + p]
    return ptr, flat


@njit(cache=True)
def seen_remove(n_users: int, gone: np.ndarray, off: np.ndarray, length: np.ndarray,
                arena: np.ndarray, touched: np.ndarray) -> None:
    """Drop items with ``gone[item]`` from every list (order kept); flags users that lost one."""
    for u in range(n_users):
        n = length[u]
        o = off[u]
        w = 0
        for p in range(n):
            x = arena[o + p]
            if not gone[x]:
                arena[o + w] = x
                w += 1
        if w != n:
            length[u] = w
            touched[u] = True


@njit(cache=True)
def seen_load(indptr: np.ndarray, items: np.ndarray, limit: int, sizes: np.ndarray,
              off: np.ndarray, length: np.ndarray, cls: np.ndarray, arena: np.ndarray,
              meta: np.ndarray) -> np.ndarray:
    """Fill an empty arena from a CSR (oldest first), keeping each list's newest ``limit``.

    Returns a bool mask of the users whose list was cut. The arena must hold
    the blocks (see :meth:`SeenLists.load`).
    """
    n_users = len(indptr) - 1
    cut = np.zeros(n_users, dtype=np.bool_)
    top = meta[TOP]
    for u in range(n_users):
        lo, hi = indptr[u], indptr[u + 1]
        if limit > 0 and hi - lo > limit:
            lo = hi - limit
            cut[u] = True
        n = hi - lo
        if n == 0:
            continue
        c = 0
        while sizes[c] < n:
            c += 1
        off[u] = top
        cls[u] = c
        length[u] = n
        for p in range(n):
            arena[top + p] = items[lo + p]
        top += sizes[c]
    meta[TOP] = top
    return cut


# ------------------------------------------------------------------ fast path
@njit(cache=True, inline="always")
def _user_side(k: int, u: int, i: int, t: int, shared_users: int, shared_items: int,
               hist: np.ndarray, hist_ts: np.ndarray, edges: np.ndarray, hist_out: np.ndarray,
               bucket_out: np.ndarray, off: np.ndarray, length: np.ndarray, cls: np.ndarray,
               arena: np.ndarray, sizes: np.ndarray, free_head: np.ndarray, meta: np.ndarray,
               limit: int) -> bool:
    """Event k's history output and its user's history and seen list; False if the arena is full."""
    H = hist.shape[1]
    if u >= shared_users:
        own_item = i >= shared_items
        if own_item and not seen_add(u, i, off, length, cls, arena, sizes, free_head,
                                     meta, limit):
            return False
        newest = hist_ts[u, 0]
        for h in range(H):
            hist_out[k, h] = hist[u, h]
            age = np.float64(newest - hist_ts[u, h])
            b = 0
            while b < len(edges) and edges[b] <= age:
                b += 1
            bucket_out[k, h] = b
        if own_item:
            for h in range(H - 1, 0, -1):
                hist[u, h] = hist[u, h - 1]
                hist_ts[u, h] = hist_ts[u, h - 1]
            hist[u, 0] = i
            hist_ts[u, 0] = t
    else:
        b = 0
        while b < len(edges) and edges[b] <= 0.0:
            b += 1
        for h in range(H):
            hist_out[k, h] = -1
            bucket_out[k, h] = b
    return True


@njit(cache=True, inline="always")
def _count(u: int, i: int, t: int, x: float, u_events: np.ndarray, i_events: np.ndarray,
           u_last: np.ndarray, i_last: np.ndarray, pop: np.ndarray) -> None:
    """One event's counters: events, newest times, the item's decayed popularity."""
    u_events[u] += 1
    i_events[i] += 1
    u_last[u] = max(u_last[u], t)
    i_last[i] = max(i_last[i], t)
    pop[i] = logaddexp(pop[i], x)


@njit(cache=True)
def apply_events(start: int, stop: int, eu: np.ndarray, ei: np.ndarray, et: np.ndarray,
                 px: np.ndarray, shared_users: int, shared_items: int, hist: np.ndarray,
                 hist_ts: np.ndarray,
                 u_events: np.ndarray, i_events: np.ndarray, u_last: np.ndarray,
                 i_last: np.ndarray, pop: np.ndarray, edges: np.ndarray, hist_out: np.ndarray,
                 bucket_out: np.ndarray, off: np.ndarray, length: np.ndarray, cls: np.ndarray,
                 arena: np.ndarray, sizes: np.ndarray, free_head: np.ndarray,
                 meta: np.ndarray, limit: int) -> int:
    """Apply learned events ``start .. stop - 1`` in order; returns the first one not applied.

    Event k (user row ``eu[k]``, item row ``ei[k]``, time ``et[k]`` ms, log
    popularity mass ``px[k]``) records the user's history before it in
    ``hist_out[k]`` and the age bucket of each slot in ``bucket_out[k]`` (the
    number of ``edges`` (ms, float64) at or below the slot's age relative to
    the newest slot: ``np.searchsorted(edges, age, side="right")``), pushes
    the item onto that history, makes it the newest seen item, and counts it.
    User rows below ``shared_users`` and item rows below ``shared_items`` are
    shared by ids waiting for admission: a shared user keeps no history and no
    seen list, a shared item enters none (the event is learned and counted).
    Stops early (before event k touches anything) when the seen arena is full.
    """
    for k in range(start, stop):
        if not _user_side(k, eu[k], ei[k], et[k], shared_users, shared_items, hist, hist_ts,
                          edges, hist_out, bucket_out, off, length, cls, arena, sizes,
                          free_head, meta, limit):
            return k
        _count(eu[k], ei[k], et[k], px[k], u_events, i_events, u_last, i_last, pop)
    return stop


@njit(cache=True)
def apply_user_events(start: int, stop: int, eu: np.ndarray, ei: np.ndarray, et: np.ndarray,
                      shared_users: int, shared_items: int, hist: np.ndarray,
                      hist_ts: np.ndarray, edges: np.ndarray, hist_out: np.ndarray,
                      bucket_out: np.ndarray, off: np.ndarray, length: np.ndarray,
                      cls: np.ndarray, arena: np.ndarray, sizes: np.ndarray,
                      free_head: np.ndarray, meta: np.ndarray, limit: int) -> int:
    """:func:`apply_events` without the counters: the user side, for a gang rank's own
    events (the counters of every rank's events are :func:`count_events`)."""
    for k in range(start, stop):
        if not _user_side(k, eu[k], ei[k], et[k], shared_users, shared_items, hist, hist_ts,
                          edges, hist_out, bucket_out, off, length, cls, arena, sizes,
                          free_head, meta, limit):
            return k
    return stop


@njit(cache=True)
def count_events(eu: np.ndarray, ei: np.ndarray, et: np.ndarray, px: np.ndarray,
                 u_events: np.ndarray, i_events: np.ndarray, u_last: np.ndarray,
                 i_last: np.ndarray, pop: np.ndarray) -> None:
    """The counters of :func:`apply_events` for events in order (a gang: all ranks', in
    rank order, so that every replica sums the same numbers in the same order)."""
    for k in range(len(eu)):
        _count(eu[k], ei[k], et[k], px[k], u_events, i_events, u_last, i_last, pop)


# ------------------------------------------------------------------ expiry
@njit(cache=True)
def idle_rows(last: np.ndarray, live: np.ndarray, n: int, cut: int) -> np.ndarray:
    """Live rows among the first ``n`` whose newest event is older than ``cut`` (ms)."""
    k = 0
    for r in range(n):
        if live[r] and last[r] < cut:
            k += 1
    out = np.empty(k, dtype=np.int64)
    k = 0
    for r in range(n):
        if live[r] and last[r] < cut:
            out[k] = r
            k += 1
    return out


@njit(cache=True)
def hist_remove(hist: np.ndarray, n_users: int, gone: np.ndarray, touched: np.ndarray) -> None:
    """Empty (-1) every history slot holding a gone item; flags users that lost one."""
    H = hist.shape[1]
    for u in range(n_users):
        for h in range(H):
            x = hist[u, h]
            if x >= 0 and gone[x]:
                hist[u, h] = -1
                touched[u] = True
