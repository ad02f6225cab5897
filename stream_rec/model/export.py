"""Export and restore: the model as the plain-numpy tables a snapshot carries.

:func:`export_state` copies everything, :func:`export_delta` only the rows that
changed (plus the small global tables); :func:`restore` loads either's result
back so that learning continues as if never interrupted (bitwise on CPU).
Table names are those of :mod:`.tables`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from . import tables as T
from .core import ModelCore
from .delta import StateDelta, select_rows
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


def seen_csr(model: ModelCore, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """CSR ``(indptr (len(rows) + 1,), items)`` int64 of the sorted seen lists of ``rows``."""
    seen = model.fast.seen
    lists = [np.fromiter(sorted(seen[r]), dtype=np.int64, count=len(seen[r])) for r in rows]
    indptr = np.zeros(len(lists) + 1, dtype=np.int64)
    if lists:
        indptr[1:] = np.cumsum([len(s) for s in lists])
    items = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
    return indptr, items


def global_tables(model: ModelCore) -> dict[str, np.ndarray]:
    """The small ``global.*`` tables (everything except the seen CSR), as copies."""
    p, f, chunk = model.params, model.fast, model.chunk
    pu, pi = f.users.pending, f.items.pending

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
        T.PENDING_USER_IDS: np.asarray(list(pu.keys()), dtype=str),
        T.PENDING_USER_COUNTS: np.asarray(list(pu.values()), dtype=np.int64),
        T.PENDING_ITEM_IDS: np.asarray(list(pi.keys()), dtype=str),
        T.PENDING_ITEM_COUNTS: np.asarray(list(pi.values()), dtype=np.int64),
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
    tables[T.SEEN_PTR], tables[T.SEEN_ITEMS] = seen_csr(model, range(nu))
    return ModelState(config=model.cfg.model_dump(), user_ids=list(model.fast.users.ids),
                      item_ids=list(model.fast.items.ids), tables=tables)


def export_delta(model: ModelCore, users: np.ndarray | None,
                 items: np.ndarray | None) -> StateDelta:
    """The delta of rows ``users`` / ``items`` (see :meth:`StreamingModel.delta`)."""
    nu, ni = model.n_users, model.n_items
    urows, irows = select_rows(users, nu), select_rows(items, ni)
    tables = row_tables(model, urows, irows)
    tables.update(global_tables(model))
    ptr, seen = seen_csr(model, urows.tolist())
    uids, iids = model.fast.users.ids, model.fast.items.ids
    return StateDelta(config=model.cfg.model_dump(), n_users=nu, n_items=ni, user_rows=urows,
                      item_rows=irows, user_ids=[uids[r] for r in urows.tolist()],
                      item_ids=[iids[r] for r in irows.tolist()], tables=tables,
                      seen_indptr=ptr, seen_items=seen)


def restore(model: ModelCore, state: ModelState) -> None:
    """Load ``state`` into a freshly built ``model`` of the same config."""
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
    f.seen = [set(items[ptr[r]:ptr[r + 1]].tolist()) for r in range(nu)]
    f.users.restore(state.user_ids, t[T.FREE_USERS].tolist(),
                    dict(zip(t[T.PENDING_USER_IDS].tolist(), t[T.PENDING_USER_COUNTS].tolist())))
    f.items.restore(state.item_ids, t[T.FREE_ITEMS].tolist(),
                    dict(zip(t[T.PENDING_ITEM_IDS].tolist(), t[T.PENDING_ITEM_COUNTS].tolist())))
    model.replay.size = model.replay.buffer.load(t, T.REPLAY)
    model.replay.pos = int(t[T.REPLAY_POS][0])
    if T.CHUNK_FILL in t:  # versions written before chunked training have none
        chunk = model.chunk
        chunk.queued = chunk.buffer.load(t, T.CHUNK)
        chunk.filled = int(t[T.CHUNK_FILL][0])
        chunk.new_users = t[T.CHUNK_NEW_USERS].tolist()
        chunk.new_items = t[T.CHUNK_NEW_ITEMS].tolist()
