"""Export and restore: the model as the plain-numpy tables a snapshot carries.

:func:`export_state` copies everything, :func:`export_delta` only the rows that
changed (plus the small global tables); :func:`restore` loads either's result
back so that learning continues as if never interrupted (bitwise on CPU).
Table names are those of :mod:`.tables`.
"""

from __future__ import annotations

import numpy as np
import torch

from . import tables as T
from .config import ModelConfig
from .core import ModelCore
from .delta import StateDelta, select_rows
from .fastpath import FastPath
from .ids import id_hash
from .params import to_numpy
from .scoring import item_vectors
from .state import ModelState


def row_tables(model: ModelCore, urows: np.ndarray | slice, irows: np.ndarray | slice
               ) -> dict[str, np.ndarray]:
    """``user.*`` tables at ``urows`` and ``item.*`` tables at ``irows`` as CPU copies.

    Rows are either slices (the whole state) or sorted int64 arrays (a delta);
    both go through the same element-wise arithmetic, so a row's values are
    bitwise identical either way.
    """
    p, f, dev = model.params, model.fast, model.device

    def pick(t: torch.Tensor, rows: np.ndarray | slice) -> np.ndarray:
        if isinstance(rows, slice):
            return to_numpy(t[rows])
        return t[torch.as_tensor(rows, device=dev)].detach().to("cpu").numpy()

    out = {
        T.USER_VEC: pick(p.user_vec, urows),
        T.USER_ACC: pick(p.user_acc, urows),
        T.USER_HIST: f.hist[urows].copy(),
        T.USER_HIST_TS: f.hist_ts[urows].copy(),
        T.USER_LAST_TS: f.u_last[urows].copy(),
        T.USER_EVENTS: f.u_events[urows].copy(),
        T.ITEM_VECTORS: to_numpy(item_vectors(model, irows)),
        T.ITEM_IN: pick(p.item_in, irows),
        T.ITEM_OUT: pick(p.item_out, irows),
        T.ITEM_BIAS: pick(p.item_bias, irows),
        T.ITEM_ACC_IN: pick(p.acc_in, irows),
        T.ITEM_ACC_OUT: pick(p.acc_out, irows),
        T.ITEM_ACC_BIAS: pick(p.acc_bias, irows),
        T.ITEM_POP_LOG: f.pop[irows].copy(),
        T.ITEM_LAST_TS: f.i_last[irows].copy(),
        T.ITEM_EVENTS: f.i_events[irows].copy(),
    }
    if model.cfg.content_dim:
        out[T.ITEM_TEXT] = pick(p.item_text, irows)
    return out


def seen_csr(model: ModelCore, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR ``(indptr (len(rows) + 1,), items)`` int64 of the seen lists of ``rows``, oldest first."""
    return model.fast.seen.gather(rows)


def global_tables(model: ModelCore) -> dict[str, np.ndarray]:
    """The small ``global.*`` tables (everything except the seen CSR), as copies."""
    p, f, chunk = model.params, model.fast, model.chunk
    pu_keys, pu_counts = f.users.pending_tables()
    pi_keys, pi_counts = f.items.pending_tables()

    def one(x: int | None) -> np.ndarray:
        return np.array([-1 if x is None else x], dtype=np.int64)

    return {
        T.POS_W: to_numpy(p.pos_w),
        T.POS_ACC: to_numpy(p.pos_acc),
        T.TRANSITION: to_numpy(p.transition),
        T.TRANSITION_ACC: to_numpy(p.transition_acc),
        T.STEP: one(model.step),
        T.T_REF: one(f.t_ref),
        T.WATERMARK: one(f.watermark),
        **model.replay.buffer.tables(T.REPLAY, model.replay.size),
        T.REPLAY_POS: one(model.replay.pos),
        T.FREE_USERS: np.asarray(f.users.free, dtype=np.int64),
        T.FREE_ITEMS: np.asarray(f.items.free, dtype=np.int64),
        T.PENDING_USER_KEYS: pu_keys,
        T.PENDING_USER_COUNTS: pu_counts,
        T.PENDING_ITEM_KEYS: pi_keys,
        T.PENDING_ITEM_COUNTS: pi_counts,
        **chunk.buffer.tables(T.CHUNK, chunk.queued),
        T.CHUNK_FILL: one(chunk.filled),
        T.CHUNK_NEW_USERS: np.asarray(chunk.new_users, dtype=np.int64),
        T.CHUNK_NEW_ITEMS: np.asarray(chunk.new_items, dtype=np.int64),
        **({T.CONTENT_W: to_numpy(p.content_w), T.CONTENT_ACC: to_numpy(p.content_acc)}
           if model.cfg.content_dim else {}),
    }


def export_state(model: ModelCore) -> ModelState:
    """A consistent CPU numpy copy of everything (see :class:`ModelState`)."""
    nu, ni = model.n_users, model.n_items
    tables = row_tables(model, slice(0, nu), slice(0, ni))
    tables.update(global_tables(model))
    tables[T.SEEN_PTR], tables[T.SEEN_ITEMS] = seen_csr(model, np.arange(nu, dtype=np.int64))
    return ModelState(config=model.cfg.model_dump(), user_ids=list(model.fast.users.ids),
                      item_ids=list(model.fast.items.ids), tables=tables)


def export_delta(model: ModelCore, users: np.ndarray | None,
                 items: np.ndarray | None) -> StateDelta:
    """The delta of rows ``users`` / ``items`` (see :meth:`StreamingModel.delta`)."""
    nu, ni = model.n_users, model.n_items
    urows, irows = select_rows(users, nu), select_rows(items, ni)
    tables = row_tables(model, urows, irows)
    tables.update(global_tables(model))
    ptr, seen = seen_csr(model, urows)
    uids, iids = model.fast.users.ids, model.fast.items.ids
    return StateDelta(config=model.cfg.model_dump(), n_users=nu, n_items=ni, user_rows=urows,
                      item_rows=irows, user_ids=[uids[r] for r in urows.tolist()],
                      item_ids=[iids[r] for r in irows.tolist()], tables=tables,
                      seen_indptr=ptr, seen_items=seen)


def chunk_filled(state: ModelState) -> int:
    """Stream events in the state's incomplete training chunk."""
    fill = state.tables.get(T.CHUNK_FILL)
    return 0 if fill is None else int(fill[0])


def _pending(t: dict[str, np.ndarray], keys: str, legacy_ids: str, counts: str
             ) -> tuple[np.ndarray, np.ndarray]:
    """Admission counts as (hash keys, counts); older states recorded the ids themselves."""
    if keys in t:
        return t[keys], t[counts]
    ids = t.get(legacy_ids, np.zeros(0, dtype=str)).tolist()
    return (np.asarray([id_hash(x) for x in ids], dtype=np.uint64),
            t.get(counts, np.zeros(0, dtype=np.int64)))


def _legacy_seen_order(f: FastPath, ptr: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Seen lists of a state from before ``seen_max``: sorted by row, order of clicks lost.

    Each over-long list is reordered so that its items still in the history
    come last (newest), in the history's order; a cap then keeps those.
    """
    limit = f.cfg.seen_max
    items = items.copy()
    lens = np.diff(ptr)
    for u in np.flatnonzero(lens > limit).tolist() if limit > 0 else []:
        lo, hi = int(ptr[u]), int(ptr[u + 1])
        recent = list(dict.fromkeys(x for x in f.hist[u].tolist() if x >= 0))[::-1]
        lst = items[lo:hi]
        older = lst[~np.isin(lst, recent)]
        items[lo:hi] = np.concatenate([older, np.asarray(recent, dtype=np.int64)])[-(hi - lo):]
    return items


def restore(model: ModelCore, state: ModelState, built_with: ModelConfig) -> None:
    """Load ``state`` (built under ``built_with``) into a freshly built ``model``.

    ``model.cfg`` may differ from ``built_with`` in the fields that
    :func:`~stream_rec.model.config.restore_changes` lets change: seen lists
    are cut to ``seen_max``, admission counts to ``pending_max``, the replay
    ring to ``replay``; rows whose exported values change at once are added to
    ``model.touched_users`` / ``touched_items``.
    """
    t = state.tables
    p, f = model.params, model.fast
    nu, ni = len(state.user_ids), len(state.item_ids)
    f.grow_users(nu)
    f.grow_items(ni)
    dev = model.device

    def put(dst: torch.Tensor, src: np.ndarray) -> None:
        dst[: len(src)] = torch.from_numpy(np.ascontiguousarray(src)).to(dev)

    def whole(src: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(src.copy()).to(dev)

    put(p.user_vec, t[T.USER_VEC])
    put(p.user_acc, t[T.USER_ACC])
    f.hist[:nu] = t[T.USER_HIST]
    f.hist_ts[:nu] = t[T.USER_HIST_TS]
    f.u_last[:nu] = t[T.USER_LAST_TS]
    f.u_events[:nu] = t[T.USER_EVENTS]
    put(p.item_in, t[T.ITEM_IN])
    put(p.item_out, t[T.ITEM_OUT])
    put(p.item_bias, t[T.ITEM_BIAS])
    put(p.acc_in, t[T.ITEM_ACC_IN])
    put(p.acc_out, t[T.ITEM_ACC_OUT])
    put(p.acc_bias, t[T.ITEM_ACC_BIAS])
    f.pop[:ni] = t[T.ITEM_POP_LOG]
    f.i_last[:ni] = t[T.ITEM_LAST_TS]
    f.i_events[:ni] = t[T.ITEM_EVENTS]
    p.pos_w = whole(t[T.POS_W])
    p.pos_acc = whole(t[T.POS_ACC])
    p.transition = whole(t[T.TRANSITION])
    p.transition_acc = whole(t[T.TRANSITION_ACC])
    if model.cfg.content_dim:
        put(p.item_text, t[T.ITEM_TEXT])
        p.has_text[:ni] = t[T.ITEM_TEXT].any(axis=1)
        p.n_text = int(p.has_text.sum())
        p.content_w = whole(t[T.CONTENT_W])
        p.content_acc = whole(t[T.CONTENT_ACC])
    model.step = int(t[T.STEP][0])
    tr, wm = int(t[T.T_REF][0]), int(t[T.WATERMARK][0])
    f.t_ref = None if tr < 0 and wm < 0 else tr
    f.watermark = None if wm < 0 and tr < 0 else wm
    ptr, items = t[T.SEEN_PTR], t[T.SEEN_ITEMS]
    if "seen_max" not in state.config:
        items = _legacy_seen_order(f, ptr, items)
    model.touched_users.extend(f.seen.load(ptr, items).tolist())
    f.users.restore(state.user_ids, t[T.FREE_USERS].tolist(),
                    *_pending(t, T.PENDING_USER_KEYS, T.LEGACY_PENDING_USER_IDS,
                              T.PENDING_USER_COUNTS))
    f.items.restore(state.item_ids, t[T.FREE_ITEMS].tolist(),
                    *_pending(t, T.PENDING_ITEM_KEYS, T.LEGACY_PENDING_ITEM_IDS,
                              T.PENDING_ITEM_COUNTS))
    model.replay.load(t, T.REPLAY, int(t[T.REPLAY_POS][0]), built_with.replay)
    if model.cfg.pop_weight != built_with.pop_weight:   # every item vector changes
        model.touched_items.extend(range(ni))
    if T.CHUNK_FILL in t:  # versions written before chunked training have none
        chunk = model.chunk
        chunk.queued = chunk.buffer.load(t, T.CHUNK)
        chunk.filled = int(t[T.CHUNK_FILL][0])
        chunk.new_users = t[T.CHUNK_NEW_USERS].tolist()
        chunk.new_items = t[T.CHUNK_NEW_ITEMS].tolist()
