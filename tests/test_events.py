"""The click contract, one message at a time: what parses, what is dead-lettered, and why."""

from __future__ import annotations

import math
from collections import namedtuple
from pathlib import Path

import orjson
import pytest

from stream_rec.events import (
    MAX_MESSAGE_BYTES,
    Contract,
    DeadLetter,
    EventSettings,
    InvalidEvent,
    Origin,
    Reason,
    decode_batch,
    parse_event,
)
from stream_rec.metrics import WorkerMetrics, dead_letter_reason_label

Rec = namedtuple("Rec", "topic partition offset key value")
NOW = 1_764_590_400_000  # 2025-12-01T12:00:00Z, the clock every test here decodes at
HOUR = 3_600_000
ML100K_TS = 874_724_710_000  # MovieLens-100K's first event, 1997-09-20


def msg(**fields: object) -> bytes:
    return orjson.dumps({"user_id": "u", "item_id": "i", "ts": NOW, **fields})


def refused(raw: bytes | None, contract: Contract | None = None) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw, contract, now_ms=NOW)
    return info.value


def test_valid_event_normalises_ids_and_defaults() -> None:
    ev = parse_event(b'{"user_id": 5, "item_id": "a", "ts": %d, "extra": 1}' % NOW, now_ms=NOW)
    assert (ev.user_id, ev.item_id, ev.ts, ev.event, ev.weight, ev.produced_at) == (
        "5", "a", NOW, "click", 1.0, None)
    assert parse_event(msg(ts=ML100K_TS), now_ms=NOW).ts == ML100K_TS


def test_event_kind_sets_default_weight_and_explicit_weight_wins() -> None:
    assert parse_event(msg(event="purchase"), now_ms=NOW).weight == 3
    assert parse_event(msg(event="never-seen"), now_ms=NOW).weight == 1
    assert parse_event(msg(weight=0.25), now_ms=NOW).weight == 0.25
    # Null optional fields count as absent, as many producers write them.
    ev = parse_event(msg(event=None, weight=None, produced_at=None), now_ms=NOW)
    assert (ev.event, ev.weight, ev.produced_at) == ("click", 1.0, None)


@pytest.mark.parametrize("raw, code, words", [
    (None, Reason.NULL_VALUE, "empty message"),
    (b"", Reason.NOT_JSON, "not valid UTF-8 JSON"),
    (b"\x80\x81", Reason.NOT_JSON, "not valid UTF-8 JSON"),
    (b"42", Reason.NOT_OBJECT, "expected a JSON object, got int"),
    (b'{"item_id": 1, "ts": 5}', Reason.MISSING_FIELD, "missing field 'user_id'"),
    (b'{"user_id": 1, "item_id": null, "ts": 5}', Reason.MISSING_FIELD, "field 'item_id' is null"),
    (b'{"user_id": true, "item_id": 1, "ts": 1}', Reason.BAD_ID, "user_id must be"),
    (b'{"user_id": 1.5, "item_id": 1, "ts": 1}', Reason.BAD_ID, "user_id must be"),
    (b'{"user_id": "", "item_id": 1, "ts": 1}', Reason.BAD_ID, "1..256 characters, got 0"),
    (b'{"user_id": "' + b"x" * 300 + b'", "item_id": 1, "ts": 1}', Reason.BAD_ID,
     "1..256 characters"),
    (b'{"user_id": 1, "item_id": 1, "ts": "yesterday"}', Reason.BAD_TS,
     "ts must be epoch milliseconds (a number), got str"),
    (b'{"user_id": 1, "item_id": 1, "ts": true}', Reason.BAD_TS, "got bool"),
    (b'{"user_id": 1, "item_id": 1, "ts": NaN}', Reason.NOT_JSON, "not valid UTF-8 JSON"),
    (msg(event=7), Reason.BAD_EVENT, "event must be a string of 1..64"),
    (msg(event=""), Reason.BAD_EVENT, "event must be"),
    (msg(produced_at="now"), Reason.BAD_PRODUCED_AT, "produced_at must be a finite number"),
    (b" " * (MAX_MESSAGE_BYTES + 1), Reason.TOO_LARGE, "exceeds"),
])
def test_invalid_events_have_a_code_and_a_reason(raw: bytes | None, code: Reason,
                                                  words: str) -> None:
    exc = refused(raw)
    assert exc.code is code and words in str(exc)


@pytest.mark.parametrize("weight, words", [
    (1e39, "weight 1e+39 is not finite in float32"),  # finite in Python, inf in float32
    (3.5e38, "not finite in float32"),
    (-1, "weight -1 is outside (0, 1000]"),
    (0, "weight 0 is outside"),
    (-0.0, "outside"),
    (1000.5, "weight 1000.5 is outside (0, 1000]"),
    (1e-46, "outside"),  # positive, but 0 in float32
    ("2", "weight must be a number, got str"),
    (True, "got bool"),
    ([1], "got list"),
])
def test_weights_that_could_hurt_the_model_are_refused(weight: object, words: str) -> None:
    exc = refused(msg(weight=weight))
    assert exc.code is Reason.BAD_WEIGHT and words in str(exc)


def test_weight_bounds_are_inclusive_above_and_configurable() -> None:
    assert parse_event(msg(weight=1000), now_ms=NOW).weight == 1000
    assert parse_event(msg(weight=1e-40), now_ms=NOW).weight > 0  # a float32 subnormal
    strict = Contract(EventSettings(weight_min=0.25, weight_max=5))
    assert parse_event(msg(weight=5), strict, now_ms=NOW).weight == 5
    assert refused(msg(weight=0.25), strict).code is Reason.BAD_WEIGHT
    assert refused(msg(event="like", weight=6), strict).code is Reason.BAD_WEIGHT


def test_nan_and_infinity_never_reach_a_weight() -> None:
    # JSON has no NaN or Infinity: orjson refuses the literals and overflowing numbers...
    assert refused(b'{"user_id":1,"item_id":1,"ts":%d,"weight":NaN}' % NOW).code \
        is Reason.NOT_JSON
    assert refused(b'{"user_id":1,"item_id":1,"ts":%d,"weight":1e400}' % NOW).code \
        is Reason.NOT_JSON
    # ...and the weight rule itself refuses them, whatever hands them over.
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(InvalidEvent, match="not finite in float32"):
            Contract().weight_of(bad, "click")


@pytest.mark.parametrize("ts, code, words", [
    (1_700_000_000, Reason.TS_UNIT,
     "ts 1700000000 looks like seconds: expected epoch milliseconds"),
    (1_700_000_000_000_000, Reason.TS_UNIT, "looks like microseconds"),
    (1_700_000_000_000_000_000, Reason.TS_UNIT, "looks like nanoseconds"),
    (874_724_710, Reason.TS_UNIT, "looks like seconds"),  # ML-100K's own unit
    (253_402_300_799_000, Reason.TS_FUTURE,
     "ts 253402300799000 (9999-12-31T23:59:59Z) is in the future by 7974 years"),
    (NOW + HOUR + 1, Reason.TS_FUTURE, "in the future by 1 h: at most 1 h ahead"),
    (1e300, Reason.TS_FUTURE, "in the future by"),
    (2**64 - 1, Reason.TS_FUTURE, "in the future by"),
    (-3, Reason.TS_PAST,
     "ts -3 (1969-12-31T23:59:59.997Z) is before the earliest accepted time 1990-01-01T00:00:00Z"),
    (0, Reason.TS_PAST, "before the earliest"),
    (631_152_000_000 - 1, Reason.TS_PAST, "before the earliest"),
    ("2025-12-01T12:00:00Z", Reason.TS_UNIT, "looks like ISO 8601: expected epoch milliseconds"),
])
def test_times_out_of_bounds_say_why(ts: object, code: Reason, words: str) -> None:
    exc = refused(msg(ts=ts))
    assert exc.code is code and words in str(exc), str(exc)


def test_time_bounds_are_inclusive_and_configurable() -> None:
    assert parse_event(msg(ts=NOW + HOUR), now_ms=NOW).ts == NOW + HOUR
    assert parse_event(msg(ts=631_152_000_000), now_ms=NOW).ts == 631_152_000_000  # 1990-01-01
    assert parse_event(msg(ts=1_700_000_000_000.4), now_ms=NOW).ts == 1_700_000_000_000
    loose = Contract(EventSettings(max_future_s=86_400, earliest="2020-01-01T00:00:00"))
    assert parse_event(msg(ts=NOW + 20 * HOUR), loose, now_ms=NOW).ts == NOW + 20 * HOUR
    exc = refused(msg(ts=ML100K_TS), loose)
    assert exc.code is Reason.TS_PAST and "2020-01-01T00:00:00Z" in str(exc)


@pytest.mark.parametrize("unit, raw, want", [
    ("s", 1_764_590_400, NOW),
    ("s", 1_764_590_400.123, NOW + 123),
    ("s", 874_724_710, ML100K_TS),
    ("us", 1_764_590_400_123_999, NOW + 123),  # sub-millisecond parts are floored away
    ("ns", 1_764_590_400_123_456_789, NOW + 123),
    ("iso8601", "2025-12-01T12:00:00Z", NOW),
    ("iso8601", "2025-12-01T14:00:00+02:00", NOW),
    ("iso8601", "2025-12-01T12:00:00.5", NOW + 500),  # naive means UTC
    ("iso8601", "2025-12-01", NOW - 12 * HOUR),
    ("iso8601", "1997-09-20T05:05:10+02:00", ML100K_TS),
])
def test_declared_time_units_become_epoch_ms(unit: str, raw: object, want: int) -> None:
    contract = Contract(EventSettings(time_unit=unit))
    assert parse_event(msg(ts=raw), contract, now_ms=NOW).ts == want


@pytest.mark.parametrize("unit, raw, code, words", [
    ("s", NOW, Reason.TS_UNIT, f"ts {NOW} looks like milliseconds: expected epoch seconds"),
    ("s", NOW * 1000, Reason.TS_UNIT, "looks like microseconds: expected epoch seconds"),
    ("us", NOW, Reason.TS_UNIT, "looks like milliseconds: expected epoch microseconds"),
    ("ns", NOW // 1000, Reason.TS_UNIT, "looks like seconds: expected epoch nanoseconds"),
    ("s", 253_402_300_799, Reason.TS_FUTURE, "(9999-12-31T23:59:59Z) is in the future by"),
    ("iso8601", NOW, Reason.TS_UNIT,
     f"ts {NOW} looks like epoch milliseconds: expected an ISO 8601 time"),
    ("iso8601", NOW // 1000, Reason.TS_UNIT, "looks like epoch seconds"),
    ("iso8601", 5, Reason.BAD_TS, "ts must be an ISO 8601 time (a string), got int"),
    ("iso8601", "yesterday", Reason.BAD_TS, "ts 'yesterday' is not an ISO 8601 time"),
    ("iso8601", "9999-12-31T23:59:59Z", Reason.TS_FUTURE, "in the future by"),
    ("iso8601", "1970-01-01T00:00:00Z", Reason.TS_PAST, "before the earliest"),
])
def test_unit_detection_speaks_of_the_declared_unit(unit: str, raw: object, code: Reason,
                                                    words: str) -> None:
    exc = refused(msg(ts=raw), Contract(EventSettings(time_unit=unit)))
    assert exc.code is code and words in str(exc), str(exc)


def test_field_names_come_from_settings_and_may_be_nested() -> None:
    contract = Contract(EventSettings.model_validate({
        "fields": {"user": "uid", "item": "properties.product_id", "time": "timestamp",
                   "kind": "type", "weight": "properties.qty", "produced_at": "sent_at"},
        "time_unit": "iso8601", "kind_weights": {"order": 3.0}}))
    raw = orjson.dumps({"uid": 7, "type": "order", "timestamp": "2025-12-01T12:00:00Z",
                        "properties": {"product_id": "sku-1", "qty": 2}, "sent_at": 1.5,
                        "user_id": "ignored"})
    ev = parse_event(raw, contract, now_ms=NOW)
    assert (ev.user_id, ev.item_id, ev.ts, ev.event, ev.weight, ev.produced_at) == (
        "7", "sku-1", NOW, "order", 2.0, 1.5)
    no_qty = orjson.dumps({"uid": 7, "type": "order", "timestamp": "2025-12-01T12:00:00Z",
                           "properties": {"product_id": "sku-1"}})
    assert parse_event(no_qty, contract, now_ms=NOW).weight == 3.0
    exc = refused(orjson.dumps({"uid": 7, "timestamp": "2025-12-01", "properties": 5}), contract)
    assert exc.code is Reason.MISSING_FIELD and "'properties.product_id'" in str(exc)
    exc = refused(msg(), contract)  # the contract's own names mean nothing to this topic
    assert exc.code is Reason.MISSING_FIELD and "'uid'" in str(exc)


def test_event_settings_refuse_what_would_refuse_every_event() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="weight_min"):
        EventSettings(weight_min=5, weight_max=5)
    with pytest.raises(ValidationError, match="kind_weights"):
        EventSettings(weight_max=2)  # purchase weighs 3
    with pytest.raises(ValidationError, match="distinct"):
        EventSettings.model_validate({"fields": {"user": "id", "item": "id"}})
    with pytest.raises(ValidationError, match="time_unit"):
        EventSettings(time_unit="minutes")


def test_event_settings_from_file_and_environment(monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    from stream_rec.settings import load_settings

    toml = tmp_path / "events.toml"
    toml.write_text('[events]\ntime_unit = "iso8601"\nearliest = 1995-01-01T00:00:00Z\n'
                    '[events.fields]\nitem = "sku"\n')
    monkeypatch.setenv("STREAM_REC_CONFIG", str(toml))
    monkeypatch.setenv("STREAM_REC_EVENTS__FIELDS__USER", "uid")
    monkeypatch.setenv("STREAM_REC_EVENTS__TIME_UNIT", "s")  # the environment beats the file
    monkeypatch.setenv("STREAM_REC_EVENTS__KIND_WEIGHTS", '{"click": 1, "cart": 1.5}')
    s = load_settings()
    assert (s.events.fields.user, s.events.fields.item, s.events.time_unit) == (
        "uid", "sku", "s")
    assert s.events.earliest.year == 1995
    ev = parse_event(b'{"uid": 1, "sku": 2, "ts": 1764590400, "event": "cart"}',
                     Contract(s.events), now_ms=NOW)
    assert (ev.user_id, ev.ts, ev.weight) == ("1", NOW, 1.5)
    assert (s.kafka.items_topic, s.kafka.items_dlq_topic) == ("items", "items.dlq")


def test_bad_messages_never_take_good_neighbours_down() -> None:
    recs = [Rec("t", 0, i, b"k", v) for i, v in enumerate(
        [msg(user_id=1), b"oops", msg(user_id=2, ts=NOW - 1), None, msg(weight=1e39)])]
    oks, errs = decode_batch(recs, now_ms=NOW)
    assert [d.origin.offset for d in oks] == [0, 2]
    assert [(e.origin.offset, e.code, e.value) for e in errs] == [
        (1, Reason.NOT_JSON, b"oops"), (3, Reason.NULL_VALUE, None),
        (4, Reason.BAD_WEIGHT, msg(weight=1e39))]


def test_dead_letter_metric_labels_come_from_the_fixed_set() -> None:
    letter = DeadLetter("ts 1700000000 looks like seconds: expected epoch milliseconds",
                        Origin("t", 0, 1), None, b"{}", Reason.TS_UNIT)
    assert dead_letter_reason_label(letter) == "ts_unit"
    assert dead_letter_reason_label("free text from a message: 12345") == "other"
    metrics = WorkerMetrics()
    metrics.dead_letters.labels(dead_letter_reason_label(letter)).inc()
    labels = {s.labels["reason"] for m in metrics.registry.collect()
              if m.name == "stream_rec_worker_dead_letters" for s in m.samples}
    assert labels == {r.value for r in Reason}
