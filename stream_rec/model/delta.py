"""Deltas between model states: the rows that changed, and how to apply them.

A :class:`StateDelta` carries, for the user and item rows that changed since
its parent version, every row-aligned table (``user.*``, ``item.*``), the ids
of those rows (new ids and expiries included, since an expired row's id
becomes ``""``), each changed user's seen list, and the small ``global.*``
tables whole. Applying a chain of deltas to the full version at its root gives
exactly the state a full snapshot would have recorded at the same point
(``tests/test_snapshot_delta.py`` checks this property).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import quant
from .state import ModelState
from .tables import RAGGED, SEEN_ITEMS, SEEN_PTR, kind


@dataclass
class StateDelta:
    """Changed rows of a state, plus what it takes to rebuild the whole."""

    config: dict
    n_users: int
    n_items: int
    user_rows: np.ndarray  # (Bu,) int64, sorted unique
    item_rows: np.ndarray  # (Bi,) int64, sorted unique
    user_ids: list[str]  # ids of user_rows
    item_ids: list[str]
    tables: dict[str, np.ndarray]  # user.* (Bu, ...), item.* (Bi, ...), global.* whole
    seen_indptr: np.ndarray  # (Bu + 1,) CSR over user_rows
    seen_items: np.ndarray


def select_rows(rows: np.ndarray | None, n: int) -> np.ndarray:
    """Sorted unique rows in ``[0, n)`` of ``rows`` (any order, duplicates and strays
    ignored); ``None`` means all ``n``."""
    if rows is None:
        return np.arange(n, dtype=np.int64)
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    return rows[(rows >= 0) & (rows < n)]


def seen_slices(indptr: np.ndarray, items: np.ndarray, rows: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """The CSR ``(indptr, items)`` restricted to ``rows`` (vectorised, no Python loop)."""
    n = len(indptr) - 1
    inside = rows[rows < n]
    lens = np.zeros(len(rows), dtype=np.int64)
    lens[: len(inside)] = indptr[inside + 1] - indptr[inside]  # rows are sorted
    ptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lens, out=ptr[1:])
    if ptr[-1] == 0:
        return ptr, np.zeros(0, dtype=items.dtype)
    starts = np.repeat(indptr[inside] - ptr[: len(inside)], lens[: len(inside)])
    return ptr, items[starts + np.arange(ptr[-1])]


def delta_from_state(state: ModelState, users: np.ndarray | None,
                     items: np.ndarray | None) -> StateDelta:
    """The delta of ``state`` restricted to rows ``users`` and ``items`` (None = all)."""
    nu, ni = len(state.user_ids), len(state.item_ids)
    urows, irows = select_rows(users, nu), select_rows(items, ni)
    tables: dict[str, np.ndarray] = {}
    for name, arr in state.tables.items():
        k = kind(name)
        if k == "user":
            tables[name] = arr[urows]
        elif k == "item":
            tables[name] = arr[irows]
        elif name not in RAGGED:
            tables[name] = arr
    ptr, seen = seen_slices(state.tables[SEEN_PTR], state.tables[SEEN_ITEMS], urows)
    return StateDelta(config=dict(state.config), n_users=nu, n_items=ni, user_rows=urows,
                      item_rows=irows, user_ids=[state.user_ids[r] for r in urows],
                      item_ids=[state.item_ids[r] for r in irows], tables=tables,
                      seen_indptr=ptr, seen_items=seen)


def _grow_rows(base: np.ndarray, n: int, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A new array of ``n`` rows: ``base`` with ``rows`` overwritten (never mutates ``base``)."""
    out = np.empty((n, *base.shape[1:]), dtype=base.dtype)
    m = min(n, len(base))
    out[:m] = base[:m]
    if len(rows):
        out[rows] = values
    return out


def _merge_seen(indptr: np.ndarray, items: np.ndarray, n: int, rows: np.ndarray,
                d_ptr: np.ndarray, d_items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR over ``n`` users: the base lists, with ``rows`` replaced by the delta's lists."""
    old_n = len(indptr) - 1
    old_len = np.zeros(n, dtype=np.int64)
    old_len[:old_n] = np.diff(indptr)[:n]
    new_len = old_len.copy()
    new_len[rows] = np.diff(d_ptr)
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(new_len, out=ptr[1:])
    out = np.empty(ptr[-1], dtype=items.dtype if len(items) else d_items.dtype)
    keep = np.ones(n, dtype=bool)
    keep[rows] = False
    keep_old = keep[:old_n]
    old_items_keep = np.repeat(keep_old, old_len[:old_n])
    if old_items_keep.any():
        shift = np.repeat(ptr[:old_n] - indptr[:old_n], old_len[:old_n])
        pos = shift + np.arange(len(shift))
        out[pos[old_items_keep]] = items[: len(shift)][old_items_keep]
    if len(d_items):
        dlen = np.diff(d_ptr)
        pos = np.repeat(ptr[rows] - d_ptr[:-1], dlen) + np.arange(len(d_items))
        out[pos] = d_items
    return ptr, out


def apply_delta(base: ModelState, delta: StateDelta) -> ModelState:
    """``base`` with ``delta`` applied, as a new state (``base`` is left untouched).

    Row-aligned tables are copied once and the changed rows overwritten; tables
    grow to the delta's row counts. Rows beyond the base must all be in the delta.
    The delta's vector rows take the encoding the base holds them in
    (:func:`~stream_rec.model.quant.conform`): a reader keeps its own.
    """
    nu, ni = delta.n_users, delta.n_items
    for rows, n_old, n_new, what in ((delta.user_rows, len(base.user_ids), nu, "user"),
                                     (delta.item_rows, len(base.item_ids), ni, "item")):
        if n_new > n_old and not np.array_equal(rows[rows >= n_old],
                                                np.arange(n_old, n_new)):
            raise ValueError(f"delta grows {what} rows {n_old}->{n_new} without all new rows")
    tables: dict[str, np.ndarray] = {}
    rows_in = quant.conform(delta.tables, base.tables)
    for name, arr in base.tables.items():
        k = kind(name)
        if k == "user":
            tables[name] = _grow_rows(arr, nu, delta.user_rows, rows_in[name])
        elif k == "item":
            tables[name] = _grow_rows(arr, ni, delta.item_rows, rows_in[name])
    for name, arr in delta.tables.items():
        if kind(name) == "global":
            tables[name] = arr
    tables[SEEN_PTR], tables[SEEN_ITEMS] = _merge_seen(
        base.tables[SEEN_PTR], base.tables[SEEN_ITEMS], nu, delta.user_rows,
        delta.seen_indptr, delta.seen_items)
    user_ids = list(base.user_ids[:nu]) + [""] * max(0, nu - len(base.user_ids))
    item_ids = list(base.item_ids[:ni]) + [""] * max(0, ni - len(base.item_ids))
    for r, uid in zip(delta.user_rows.tolist(), delta.user_ids):
        user_ids[r] = uid
    for r, iid in zip(delta.item_rows.tolist(), delta.item_ids):
        item_ids[r] = iid
    return ModelState(config=dict(delta.config), user_ids=user_ids, item_ids=item_ids,
                      tables=tables)


def merge_deltas(deltas: list[StateDelta]) -> StateDelta:
    """Consecutive deltas as one (later rows win), so a chain is applied with one copy.

    Applying ``merge_deltas([d1, …, dn])`` equals applying d1, …, dn in turn,
    at the cost of one pass over the base instead of one per delta. A vector
    table the deltas hold in different encodings is merged as float32.
    """
    if len(deltas) == 1:
        return deltas[0]
    last = deltas[-1]
    parts = quant.uniform([d.tables for d in deltas])
    urows = np.unique(np.concatenate([d.user_rows for d in deltas]))
    irows = np.unique(np.concatenate([d.item_rows for d in deltas]))
    tables: dict[str, np.ndarray] = {n: a for n, a in parts[-1].items()
                                     if kind(n) == "global"}
    user_ids = [""] * len(urows)
    item_ids = [""] * len(irows)
    owner = np.full(len(urows), -1, dtype=np.int64)  # which delta last wrote each user row
    slot = np.zeros(len(urows), dtype=np.int64)  # that row's position in that delta
    for k, d in enumerate(deltas):
        upos = np.searchsorted(urows, d.user_rows)
        ipos = np.searchsorted(irows, d.item_rows)
        for name, arr in parts[k].items():
            aligned = kind(name)
            if aligned != "global":
                rows, pos = (urows, upos) if aligned == "user" else (irows, ipos)
                if name not in tables:
                    tables[name] = np.empty((len(rows), *arr.shape[1:]), dtype=arr.dtype)
                tables[name][pos] = arr
        for p, uid in zip(upos.tolist(), d.user_ids):
            user_ids[p] = uid
        for p, iid in zip(ipos.tolist(), d.item_ids):
            item_ids[p] = iid
        owner[upos] = k
        slot[upos] = np.arange(len(upos))
    lens = np.zeros(len(urows), dtype=np.int64)
    pieces = []
    for p in range(len(urows)):
        d = deltas[owner[p]]
        lo, hi = d.seen_indptr[slot[p]], d.seen_indptr[slot[p] + 1]
        lens[p] = hi - lo
        pieces.append(d.seen_items[lo:hi])
    ptr = np.zeros(len(urows) + 1, dtype=np.int64)
    np.cumsum(lens, out=ptr[1:])
    seen = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return StateDelta(config=dict(last.config), n_users=last.n_users, n_items=last.n_items,
                      user_rows=urows, item_rows=irows, user_ids=user_ids, item_ids=item_ids,
                      tables=tables, seen_indptr=ptr, seen_items=seen)
