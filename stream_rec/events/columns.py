"""Batched decoding: Kafka records straight to the numpy columns the model learns from.

The common message takes a fast path: ``orjson.loads``, a few type checks in
one Python loop, then the time and weight bounds checked for the whole batch
in numpy. Any message the fast path does not accept is handed, on its own, to
:func:`stream_rec.events.contract.parse_event`, the reference, which words the
dead letter (or, should the two ever disagree, accepts it). So the batch
refuses exactly what the reference refuses, with the same reason; a property
test (``tests/test_events_columns.py``) holds the two together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import compress
from operator import attrgetter
from typing import Any

import numpy as np
import orjson

from stream_rec.events.contract import (
    MAX_ID_LEN,
    MAX_KIND_LEN,
    Contract,
    DeadLetter,
    Event,
    Origin,
    clock_ms,
    default_contract,
    parse_event,
)
from stream_rec.events.reasons import InvalidEvent
from stream_rec.events.timestamps import epoch_ms_columns, iso_to_ms

_I64 = 2**63
_VALUE, _PARTITION, _OFFSET = (attrgetter(a) for a in ("value", "partition", "offset"))
# The text of integer ids seen lately: looking it up costs less than str() (ids recur).
_ID_TEXT: dict[int, str] = {}
_ID_TEXT_MAX = 1 << 20


def _remember(value: int) -> str:
    if len(_ID_TEXT) >= _ID_TEXT_MAX:
        _ID_TEXT.clear()
    text = _ID_TEXT[value] = str(value)
    return text


@dataclass(frozen=True, slots=True)
class Batch:
    """The accepted events of a batch of records, as columns in record order.

    Watermark rule: the watermark advances only from accepted events, i.e.
    from ``ts`` here (see :meth:`max_ts`); a dead-lettered message never moves
    it. Offsets, on the other hand, advance over every record, good or bad.
    """

    user_ids: list[str]
    item_ids: list[str]
    ts: np.ndarray  # (N,) int64 event time, epoch ms
    weight: np.ndarray  # (N,) float32, finite, inside the configured range
    partition: np.ndarray  # (N,) int32
    offset: np.ndarray  # (N,) int64
    produced_at: np.ndarray  # (N,) float64 epoch s, nan when the message had none
    dead_letters: list[DeadLetter]

    def __len__(self) -> int:
        return len(self.user_ids)

    def max_ts(self) -> int | None:
        """The largest accepted event time (epoch ms), None when nothing was accepted."""
        return int(self.ts.max()) if len(self.ts) else None


def decode_columns(records: list[Any], contract: Contract | None = None, *,
                   now_ms: int | None = None) -> Batch:
    """Decode kafka-python ``ConsumerRecord``s (anything with ``topic``, ``partition``,
    ``offset``, ``key``, ``value``) into a :class:`Batch` of columns and dead letters.

    ``now_ms``: the clock (epoch ms) that bounds how far ahead an event time may
    be; this process's clock when None. Nothing valid is dropped because a
    neighbour was bad, and the accepted rows keep record order.
    """
    c = contract if contract is not None else default_contract()
    now = now_ms if now_ms is not None else clock_ms()
    loads, int_, str_, float_ = orjson.loads, int, str, float
    uf, itf, tf, kf, wf, pf = c.user, c.item, c.time, c.kind, c.weight, c.produced_at
    lift = c.lift if c.nested else None
    iso = c.unit == "iso8601"
    time_class = str if iso else int
    max_id, max_kind, id_text = MAX_ID_LEN, MAX_KIND_LEN, _ID_TEXT.get
    weight_of_kind: dict[str | None, float] = {**c.kind_weights, None: c.click_weight}
    values = list(map(_VALUE, records))
    try:
        too_big = max(map(len, values), default=0) > c.max_bytes
    except TypeError:  # a null value (orjson refuses it below)
        too_big = max(map(len, filter(None, values)), default=0) > c.max_bytes
    if too_big:  # left for the reference parser, which names the reason
        values = [v if v is not None and len(v) <= c.max_bytes else None for v in values]
    users: list[str] = []
    items: list[str] = []
    times: list[Any] = []
    weights: list[Any] = []
    produced: list[tuple[int, Any]] = []  # (fast-path row, produced_at) where present
    slow: list[int] = []  # records for the reference parser
    n_float = 0
    for k, value in enumerate(values):
        try:
            obj = loads(value)
            if lift is not None:
                obj = lift(obj)
            u, i, t = obj[uf], obj[itf], obj[tf]
            kind, w, p = obj.get(kf), obj.get(wf), obj.get(pf)
            default_w = weight_of_kind.get(kind)  # TypeError for a list or object
        except (TypeError, KeyError, ValueError, AttributeError):
            slow.append(k)  # null value, not JSON, not an object, a field missing
            continue
        cls = u.__class__
        if cls is int_:
            u = id_text(u) or _remember(u)
        elif cls is not str_ or not 0 < len(u) <= max_id:
            slow.append(k)
            continue
        cls = i.__class__
        if cls is int_:
            i = id_text(i) or _remember(i)
        elif cls is not str_ or not 0 < len(i) <= max_id:
            slow.append(k)
            continue
        cls = t.__class__
        if cls is not time_class:
            if cls is float_ and not iso:
                n_float += 1
            else:
                slow.append(k)
                continue
        if default_w is None:  # a kind without a configured weight
            if kind.__class__ is not str_ or not 0 < len(kind) <= max_kind:
                slow.append(k)
                continue
            default_w = 1.0
        if w is None:
            w = default_w
        elif w.__class__ is not float_ and w.__class__ is not int_:
            slow.append(k)
            continue
        if p is not None:
            if p.__class__ is not float_ and p.__class__ is not int_:
                slow.append(k)
                continue
            produced.append((len(users), p))
        users.append(u)
        items.append(i)
        times.append(t)
        weights.append(w)

    ts, ok = _times(times, iso, n_float, c, now)
    w64 = np.array(weights, dtype=np.float64)
    with np.errstate(over="ignore"):
        w32 = w64.astype(np.float32)
    w_back = w32.astype(np.float64)
    ok &= np.isfinite(w32) & (w_back > c.weight_min) & (w_back <= c.weight_max)
    produced_at = np.full(len(users), np.nan)
    if produced:
        at, pa = zip(*produced)
        produced_at[list(at)] = pa
    fast = np.ones(len(records), dtype=bool)
    fast[slow] = False
    row_index = np.flatnonzero(fast)
    if not ok.all():
        bad = np.flatnonzero(~ok)
        slow.extend(row_index[bad].tolist())
        keep, flags = np.flatnonzero(ok), ok.tolist()
        users, items = list(compress(users, flags)), list(compress(items, flags))
        ts, w32, produced_at, row_index = ts[keep], w32[keep], produced_at[keep], row_index[keep]
    dead: list[DeadLetter] = []
    late: list[tuple[int, Event]] = []
    for k in sorted(slow):
        rec = records[k]
        try:
            late.append((k, parse_event(rec.value, c, now_ms=now)))
        except InvalidEvent as exc:
            dead.append(DeadLetter(exc.reason, Origin(rec.topic, rec.partition, rec.offset),
                                   rec.key, rec.value, exc.code))
    if late:
        users, items, ts, w32, produced_at, row_index = _merge(
            late, users, items, ts, w32, produced_at, row_index)
    n = len(records)
    partition = np.fromiter(map(_PARTITION, records), np.int32, n)[row_index]
    offset = np.fromiter(map(_OFFSET, records), np.int64, n)[row_index]
    return Batch(users, items, ts, w32, partition, offset, produced_at, dead)


def _times(times: list[Any], iso: bool, n_float: int, c: Contract, now_ms: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """``(ts ms (M,) int64, ok (M,) bool)`` for the fast-path rows' raw times."""
    m = len(times)
    latest = now_ms + c.max_future_ms
    no_float = np.zeros(m, dtype=bool)
    if iso:
        ms = [iso_to_ms(t) for t in times]
        unreadable = [j for j, v in enumerate(ms) if v is None]
        ints, bad = _int64([0 if v is None else v for v in ms])
        ts, ok = epoch_ms_columns(ints, None, no_float, "ms", c.earliest_ms, latest)
        ok[unreadable + bad] = False
        return ts, ok
    if n_float == 0:
        ints, bad = _int64(times)
        ts, ok = epoch_ms_columns(ints, None, no_float, c.unit, c.earliest_ms, latest)
        ok[bad] = False
        return ts, ok
    if n_float == m:
        floats = np.array(times, dtype=np.float64)
        return epoch_ms_columns(None, floats, ~no_float, c.unit, c.earliest_ms, latest)
    is_float = np.fromiter((t.__class__ is float for t in times), bool, m)
    ints, bad = _int64([0 if t.__class__ is float else t for t in times])
    floats = np.array([t if t.__class__ is float else 0.0 for t in times], dtype=np.float64)
    ts, ok = epoch_ms_columns(ints, floats, is_float, c.unit, c.earliest_ms, latest)
    ok[bad] = False
    return ts, ok


def _int64(values: list[int]) -> tuple[np.ndarray, list[int]]:
    """An int64 column, and the rows whose value int64 cannot hold (they hold 0)."""
    try:
        return np.array(values, dtype=np.int64), []
    except OverflowError:
        bad = [j for j, v in enumerate(values) if not -_I64 <= v < _I64]
        return np.array([0 if not -_I64 <= v < _I64 else v for v in values],
                        dtype=np.int64), bad


def _merge(late: list[tuple[int, Event]], users: list[str], items: list[str], ts: np.ndarray,
           w32: np.ndarray, produced_at: np.ndarray, row_index: np.ndarray
           ) -> tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fold events the reference accepted back in, in record order."""
    row_index = np.concatenate([row_index, np.array([k for k, _ in late], dtype=np.int64)])
    order = np.argsort(row_index, kind="stable")
    users = users + [e.user_id for _, e in late]
    items = items + [e.item_id for _, e in late]
    ts = np.concatenate([ts, np.array([e.ts for _, e in late], dtype=np.int64)])
    w32 = np.concatenate([w32, np.array([e.weight for _, e in late], dtype=np.float32)])
    pa = np.array([math.nan if e.produced_at is None else e.produced_at for _, e in late],
                  dtype=np.float64)
    produced_at = np.concatenate([produced_at, pa])
    pick = order.tolist()
    return ([users[j] for j in pick], [items[j] for j in pick], ts[order], w32[order],
            produced_at[order], row_index[order])
