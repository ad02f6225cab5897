"""The event contract: what parses, what is dead-lettered and why."""

from __future__ import annotations

from collections import namedtuple

import pytest

from stream_rec.events import MAX_MESSAGE_BYTES, InvalidEvent, decode_batch, parse_event

Rec = namedtuple("Rec", "topic partition offset key value")


def test_valid_event_normalises_ids_and_defaults() -> None:
    ev = parse_event(b'{"user_id": 5, "item_id": "a", "ts": 1700000000000, "extra": 1}')
    assert (ev.user_id, ev.item_id, ev.ts, ev.event, ev.weight) == ("5", "a", 1700000000000,
                                                                    "click", 1.0)


def test_event_kind_sets_default_weight_and_explicit_weight_wins() -> None:
    assert parse_event(b'{"user_id": 1, "item_id": 2, "ts": 3, "event": "purchase"}').weight == 3
    assert parse_event(b'{"user_id": 1, "item_id": 2, "ts": 3, "weight": 0.25}').weight == 0.25


@pytest.mark.parametrize("raw, reason", [
    (None, "empty message"),
    (b"", "not valid UTF-8 JSON"),
    (b"\x80\x81", "not valid UTF-8 JSON"),
    (b"42", "expected a JSON object"),
    (b'{"user_id": true, "item_id": 1, "ts": 1}', "user_id must be"),
    (b'{"user_id": 1.5, "item_id": 1, "ts": 1}', "user_id must be"),
    (b'{"user_id": 1, "item_id": null, "ts": 1}', "item_id must be"),
    (b'{"user_id": 1, "item_id": 1, "ts": 1e300}', "ts out of range"),
    (b'{"user_id": 1, "item_id": 1, "ts": 1, "weight": -1}', "weight must be"),
    (b'{"user_id": 1, "item_id": 1, "ts": 1, "event": 7}', "event must be"),
    (b'{"user_id": 1, "item_id": 1, "ts": 1, "produced_at": "now"}', "produced_at"),
    (b'{"user_id": "' + b"x" * 300 + b'", "item_id": 1, "ts": 1}', "1..256 characters"),
    (b" " * (MAX_MESSAGE_BYTES + 1), "exceeds"),
])
def test_invalid_events_have_a_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        parse_event(raw)


def test_bad_messages_never_take_good_neighbours_down() -> None:
    recs = [Rec("t", 0, i, b"k", v) for i, v in enumerate(
        [b'{"user_id": 1, "item_id": 1, "ts": 1}', b"oops",
         b'{"user_id": 2, "item_id": 3, "ts": 2}', None])]
    oks, errs = decode_batch(recs)
    assert [d.origin.offset for d in oks] == [0, 2]
    assert [(e.origin.offset, e.value) for e in errs] == [(1, b"oops"), (3, None)]
