"""Batched decoding: columns, record order, the watermark rule, and agreement with parse_event."""

from __future__ import annotations

import json
import math
from collections import namedtuple
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_rec.events import (
    Batch,
    Contract,
    Event,
    EventSettings,
    InvalidEvent,
    Reason,
    decode_columns,
    parse_event,
)
from stream_rec.events.columns import _merge
from stream_rec.events.timestamps import ms_to_iso

Rec = namedtuple("Rec", "topic partition offset key value")
NOW = 1_764_590_400_000  # 2025-12-01T12:00:00Z
HOUR = 3_600_000


def recs(values: list[bytes | None]) -> list[Rec]:
    return [Rec("clicks", k % 3, 100 + k, b"key", v) for k, v in enumerate(values)]


def ev(**fields: Any) -> bytes:
    return orjson.dumps({"user_id": "u", "item_id": "i", "ts": NOW, **fields})


def test_typical_batch_becomes_typed_columns() -> None:
    b = decode_columns(recs([ev(user_id=196, item_id=242, ts=874_724_710_000, event="click"),
                             ev(user_id="a", event="purchase", produced_at=1.7e9),
                             ev(weight=2, event="view")]), now_ms=NOW)
    assert (b.user_ids, b.item_ids) == (["196", "a", "u"], ["242", "i", "i"])
    assert b.ts.dtype == np.int64 and b.ts.tolist() == [874_724_710_000, NOW, NOW]
    assert b.weight.dtype == np.float32 and b.weight.tolist() == [1.0, 3.0, 2.0]
    assert b.partition.dtype == np.int32 and b.partition.tolist() == [0, 1, 2]
    assert b.offset.dtype == np.int64 and b.offset.tolist() == [100, 101, 102]
    assert math.isnan(b.produced_at[0]) and b.produced_at[1] == 1.7e9
    assert len(b) == 3 and b.dead_letters == []


def test_bad_neighbours_are_dead_lettered_and_never_move_the_watermark() -> None:
    values = [ev(ts=NOW - 5), ev(weight=1e39), ev(ts=1_764_590_400_000_000),
              ev(ts=253_402_300_799_000), b"nope", None, ev(ts=NOW - 2)]
    b = decode_columns(recs(values), now_ms=NOW)
    assert b.offset.tolist() == [100, 106] and b.max_ts() == NOW - 2
    assert [(d.origin.offset, d.code) for d in b.dead_letters] == [
        (101, Reason.BAD_WEIGHT), (102, Reason.TS_UNIT), (103, Reason.TS_FUTURE),
        (104, Reason.NOT_JSON), (105, Reason.NULL_VALUE)]
    assert "looks like microseconds" in b.dead_letters[1].reason
    assert b.dead_letters[2].origin.topic == "clicks" and b.dead_letters[2].key == b"key"
    empty = decode_columns(recs([ev(weight=-1)]), now_ms=NOW)
    assert len(empty) == 0 and empty.max_ts() is None and empty.ts.dtype == np.int64


def test_times_of_mixed_types_and_out_of_int64_range() -> None:
    seconds = Contract(EventSettings(time_unit="s"))
    b = decode_columns(recs([ev(ts=1_764_590_400), ev(ts=1_764_590_400.25),
                             ev(ts=2**64 - 1), ev(ts=-2**63), ev(ts=1_764_590_399)]),
                       seconds, now_ms=NOW)
    assert b.ts.tolist() == [NOW, NOW + 250, NOW - 1000]
    assert [d.code for d in b.dead_letters] == [Reason.TS_FUTURE, Reason.TS_PAST]


def test_merge_keeps_record_order() -> None:
    late = [(1, Event("b", "y", 5, "click", 2.0, 1.5)), (3, Event("d", "w", 7))]
    users, items, ts, w, pa, rows = _merge(
        late, ["a", "c"], ["x", "z"], np.array([4, 6]), np.array([1, 1], np.float32),
        np.array([np.nan, np.nan]), np.array([0, 2]))
    assert (users, items, ts.tolist(), w.tolist(), rows.tolist()) == (
        ["a", "b", "c", "d"], ["x", "y", "z", "w"], [4, 5, 6, 7], [1, 2, 1, 1], [0, 1, 2, 3])
    assert pa[1] == 1.5 and np.isnan(pa[[0, 2, 3]]).all()


# --- agreement: the batch refuses exactly what parse_event refuses, with the same reason ---

CONTRACTS = {
    "ms": Contract(EventSettings(max_message_bytes=400)),
    "s": Contract(EventSettings(time_unit="s")),
    "us": Contract(EventSettings(time_unit="us", weight_max=10, kind_weights={"click": 1})),
    "ns": Contract(EventSettings(time_unit="ns", max_future_s=0)),
    "iso": Contract(EventSettings(time_unit="iso8601", earliest="2020-01-01T00:00:00Z")),
    "mapped": Contract(EventSettings.model_validate({
        "fields": {"user": "uid", "item": "p.sku", "time": "when", "kind": "type",
                   "weight": "p.qty", "produced_at": "meta.sent"},
        "weight_min": 0.25, "max_message_bytes": 300})),
}
WEIGHT_EDGES = [0, -0.0, 1e-46, 1e-45, 1e-40, 0.25, 0.25000001, 0.5, 1, 10, 10.000001, 1000,
                1000.0000001, 1000.0001, 1001, 3.4028234e38, 3.4028235e38, 3.4028236e38,
                3.5e38, 1e39, -1, 2**63, 2**64 - 1, -2**63]
KIND_EDGES = ["click", "view", "like", "purchase", "other", "", "k" * 64, "k" * 65]
ID_EDGES = [0, -1, 2**63, 2**64 - 1, -2**63, "", "x", "x" * 256, "x" * 257, "ü", True, 1.0,
            None, [], {}]


def _times(contract: Contract) -> st.SearchStrategy[Any]:
    """Times around every bound, written in every unit, plus junk (big integers included:
    JSON allows them and orjson reads those past 64 bits as floats)."""
    latest = NOW + contract.max_future_ms
    edge_ms = st.sampled_from([contract.earliest_ms - 1, contract.earliest_ms,
                               contract.earliest_ms + 1, latest - 1, latest, latest + 1, NOW,
                               874_724_710_000, 253_402_300_799_000, 0])
    ms = st.one_of(edge_ms, st.integers(contract.earliest_ms - HOUR, latest + HOUR),
                   st.integers(0, 2**45))

    def write(m: int, unit: str, frac: bool) -> Any:
        if unit == "iso":
            return ms_to_iso(m) or "x"
        k = {"s": 0.001, "ms": 1, "us": 1000, "ns": 1_000_000}[unit]
        return m * k if frac else (m // 1000 if unit == "s" else m * int(k))

    written = st.builds(write, ms, st.sampled_from(["s", "ms", "us", "ns", "iso"]),
                        st.booleans())
    junk = st.one_of(st.sampled_from([None, True, "", "yesterday", "2025-13-01T00:00:00Z",
                                      2**63, 2**64 - 1, -2**63, 2**64, 10**30, 1e300, -1e300,
                                      0.5, [], {}]),
                     st.floats(allow_nan=False, allow_infinity=False), st.integers())
    offset = st.sampled_from(["", "+02:00", "-05:30", "Z"])
    iso = st.builds(lambda m, o: (ms_to_iso(m) or "x").rstrip("Z") + o, ms, offset)
    return st.one_of(written, written, iso, junk)


_ABSENT = object()


def _good(contract: Contract) -> st.SearchStrategy[dict[str, Any]]:
    """A valid click in the contract's names and time unit (before nesting)."""
    ms = st.integers(contract.earliest_ms, NOW + contract.max_future_ms)
    if contract.unit == "iso8601":
        when = st.builds(lambda m, o: (ms_to_iso(m) or "x").rstrip("Z") + o, ms,
                         st.sampled_from(["", "Z", "+00:00"]))
    else:
        k = {"s": 1000, "ms": 1, "us": 1 / 1000, "ns": 1 / 1_000_000}[contract.unit]
        when = st.builds(lambda m, frac: m / k if frac else int(m // k) if k >= 1
                         else m * round(1 / k), ms, st.booleans())
    ids = st.one_of(st.integers(0, 10**6), st.text(min_size=1, max_size=8))
    return st.fixed_dictionaries(
        {contract.user: ids, contract.item: ids, contract.time: when},
        optional={contract.kind: st.sampled_from(["click", "view", "like", "purchase", "x"]),
                  contract.weight: st.one_of(st.integers(1, 10), st.floats(0.5, 10)),
                  contract.produced_at: st.floats(1e9, 2e9), "extra": st.text(max_size=5)})


def _mutations(contract: Contract) -> st.SearchStrategy[list[tuple[str, Any]]]:
    """Up to two fields replaced by an edge value, junk, null or nothing at all."""
    names = [contract.user, contract.item, contract.time, contract.time, contract.kind,
             contract.weight, contract.produced_at, "extra"]
    value = st.one_of(_times(contract), st.sampled_from(ID_EDGES + WEIGHT_EDGES + KIND_EDGES),
                      st.floats(allow_nan=False, allow_infinity=False),
                      st.integers(-2**63, 2**64 - 1), st.just(_ABSENT), st.none(),
                      st.integers(0, 400).map(lambda n: "x" * n))
    return st.lists(st.tuples(st.sampled_from(names), value), max_size=2)


def _mutated(good: dict[str, Any], changes: list[tuple[str, Any]]) -> bytes:
    fields = dict(good)
    for name, value in changes:
        fields[name] = value
    return json.dumps(_nest({k: v for k, v in fields.items() if v is not _ABSENT})).encode()


def _message(contract: Contract) -> st.SearchStrategy[bytes | None]:
    fields = st.builds(_mutated, _good(contract), _mutations(contract))
    junk = st.one_of(st.none(), st.binary(max_size=30),
                     st.sampled_from([b"[]", b"1", b'"s"', b"null", b"{}",
                                      b'{"uid": 1, "p": 7}', b'{"p": []}']))
    return st.tuples(st.integers(0, 9), fields, junk).map(lambda t: t[2] if t[0] == 0 else t[1])


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"p.sku": 1}`` -> ``{"p": {"sku": 1}}``, as a producer with nested objects sends."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a)
                      and math.isnan(b))


@pytest.mark.parametrize("name", list(CONTRACTS))
def test_batch_and_single_message_decoding_agree(name: str) -> None:
    contract = CONTRACTS[name]

    @settings(max_examples=75, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(_message(contract), max_size=24))
    def check(values: list[bytes | None]) -> None:
        records = recs(values)
        batch: Batch = decode_columns(records, contract, now_ms=NOW)
        oks: list[tuple[int, Event]] = []
        errs: list[tuple[int, Reason, str]] = []
        for rec in records:
            try:
                oks.append((rec.offset, parse_event(rec.value, contract, now_ms=NOW)))
            except InvalidEvent as exc:
                errs.append((rec.offset, exc.code, exc.reason))
        assert [(d.origin.offset, d.code, d.reason) for d in batch.dead_letters] == errs
        assert batch.offset.tolist() == [o for o, _ in oks]
        assert batch.partition.tolist() == [(o - 100) % 3 for o, _ in oks]
        assert batch.user_ids == [e.user_id for _, e in oks]
        assert batch.item_ids == [e.item_id for _, e in oks]
        assert batch.ts.tolist() == [e.ts for _, e in oks]
        assert batch.weight.tolist() == [e.weight for _, e in oks]
        want_pa = [math.nan if e.produced_at is None else e.produced_at for _, e in oks]
        assert all(_same(a, b) for a, b in zip(batch.produced_at.tolist(), want_pa))
        assert batch.max_ts() == (max(e.ts for _, e in oks) if oks else None)

    check()
