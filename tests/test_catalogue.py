"""The item catalogue contract: what an ``items`` message must be, and why one is refused."""

from __future__ import annotations

from collections import namedtuple

import orjson
import pytest

from stream_rec.events import (
    Contract,
    EventSettings,
    InvalidEvent,
    Reason,
    decode_items,
    parse_item,
)
from stream_rec.events.catalogue import (
    MAX_ATTRIBUTES,
    MAX_CATEGORIES,
    MAX_CATEGORY_CHARS,
    MAX_TITLE_CHARS,
)

Rec = namedtuple("Rec", "topic partition offset key value")
NOW = 1_764_590_400_000  # 2025-12-01T12:00:00Z


def item(**fields: object) -> bytes:
    return orjson.dumps({"item_id": 1, "title": "Toy Story (1995)",
                         "categories": ["Animation", "Comedy"],
                         "attributes": {"year": 1995, "imdb": "tt0114709", "rating": 8.3,
                                        "colour": True, "sequel_of": None},
                         "ts": NOW, **fields})


def test_a_catalogue_entry_parses_with_its_metadata() -> None:
    it = parse_item(item(extra="ignored"), now_ms=NOW)
    assert (it.item_id, it.ts, it.title, it.categories) == (
        "1", NOW, "Toy Story (1995)", ("Animation", "Comedy"))
    assert it.attributes == {"year": 1995, "imdb": "tt0114709", "rating": 8.3, "colour": True,
                             "sequel_of": None}


def test_only_id_and_time_are_required() -> None:
    it = parse_item(b'{"item_id": "sku-1", "ts": %d}' % NOW, now_ms=NOW)
    assert (it.item_id, it.title, it.categories, it.attributes) == ("sku-1", "", (), {})
    nulls = parse_item(item(title=None, categories=None, attributes=None), now_ms=NOW)
    assert (nulls.title, nulls.categories, nulls.attributes) == ("", (), {})


@pytest.mark.parametrize("raw, code, words", [
    (None, Reason.NULL_VALUE, "empty message"),
    (b"{", Reason.NOT_JSON, "not valid UTF-8 JSON"),
    (b"[]", Reason.NOT_OBJECT, "expected a JSON object"),
    (b'{"ts": 1}', Reason.MISSING_FIELD, "missing field 'item_id'"),
    (item(item_id=True), Reason.BAD_ID, "item_id must be a string or an integer"),
    (item(item_id="x" * 257), Reason.BAD_ID, "1..256 characters"),
    (b'{"item_id": 1}', Reason.MISSING_FIELD, "missing field 'ts'"),
    (item(ts=1_764_590_400), Reason.TS_UNIT, "looks like seconds: expected epoch milliseconds"),
    (item(ts=253_402_300_799_000), Reason.TS_FUTURE, "in the future by"),
    (item(ts=5), Reason.TS_PAST, "before the earliest accepted time"),
    (item(ts="2025-12-01T12:00:00Z"), Reason.TS_UNIT, "looks like ISO 8601"),
    (item(title=5), Reason.BAD_TITLE, "title must be a string, got int"),
    (item(title="t" * (MAX_TITLE_CHARS + 1)), Reason.BAD_TITLE, "exceeds"),
    (item(categories="Comedy"), Reason.BAD_CATEGORIES, "must be a list of strings, got str"),
    (item(categories=["ok", 3]), Reason.BAD_CATEGORIES, "got int"),
    (item(categories=[""]), Reason.BAD_CATEGORIES, f"1..{MAX_CATEGORY_CHARS} characters"),
    (item(categories=["c"] * (MAX_CATEGORIES + 1)), Reason.BAD_CATEGORIES, "exceed"),
    (item(attributes=[1]), Reason.BAD_ATTRIBUTES, "attributes must be an object, got list"),
    (item(attributes={"tags": ["a"]}), Reason.BAD_ATTRIBUTES,
     "attribute 'tags' must be a string, number, boolean or null, got list"),
    (item(attributes={"": 1}), Reason.BAD_ATTRIBUTES, "attribute names must be"),
    (item(attributes={f"k{n}": n for n in range(MAX_ATTRIBUTES + 1)}), Reason.BAD_ATTRIBUTES,
     "exceed"),
    (item(attributes={"plot": "p" * 1001}), Reason.BAD_ATTRIBUTES, "exceeds"),
])
def test_invalid_catalogue_entries_have_a_code_and_a_reason(raw: bytes | None, code: Reason,
                                                             words: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_item(raw, now_ms=NOW)
    assert info.value.code is code and words in str(info.value), str(info.value)


def test_catalogue_time_bounds_follow_the_event_settings() -> None:
    strict = Contract(EventSettings(earliest="2025-01-01T00:00:00Z", max_future_s=0))
    assert parse_item(item(ts=NOW), strict, now_ms=NOW).ts == NOW
    with pytest.raises(InvalidEvent, match="in the future by 1 s"):
        parse_item(item(ts=NOW + 1000), strict, now_ms=NOW)
    # The catalogue's unit is fixed: a clicks topic declared in seconds changes nothing here.
    seconds = Contract(EventSettings(time_unit="s"))
    assert parse_item(item(ts=NOW), seconds, now_ms=NOW).ts == NOW


def test_decode_items_keeps_order_and_dead_letters_the_bad() -> None:
    values = [item(item_id=1), item(title=7), None, item(item_id="2", ts=NOW - 1)]
    oks, errs = decode_items([Rec("items", 0, k, b"k", v) for k, v in enumerate(values)],
                             now_ms=NOW)
    assert [(d.item.item_id, d.origin.offset) for d in oks] == [("1", 0), ("2", 3)]
    assert [(e.origin.topic, e.origin.offset, e.code) for e in errs] == [
        ("items", 1, Reason.BAD_TITLE), ("items", 2, Reason.NULL_VALUE)]
    assert errs[0].value == values[1] and errs[0].key == b"k"
