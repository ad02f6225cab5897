"""The item catalogue contract: item metadata on its own topic (``kafka.items_topic``).

One JSON object per message, key = item id::

    {"item_id": 42, "title": "Toy Story (1995)", "categories": ["Animation", "Comedy"],
     "attributes": {"year": 1995}, "ts": 1764547200000}

Validated under the click rules where they overlap (message size, JSON object,
id, ``ts`` in epoch ms within the same bounds and with the same unit
detection) and refused with the same reason codes; a refused message goes to
``<items_topic><dlq_suffix>``. The catalogue is written by an adapter made for
this product, so its field names and time unit are fixed, not configured.
``ts`` is the time the metadata was last changed: of two versions of an item,
the later ``ts`` wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stream_rec.events.contract import (
    Contract,
    DeadLetter,
    Origin,
    clock_ms,
    default_contract,
    id_of,
    load_object,
    required,
)
from stream_rec.events.reasons import InvalidEvent, Reason
from stream_rec.events.timestamps import check_ts

MAX_TITLE_CHARS = 1000
MAX_CATEGORIES = 64
MAX_CATEGORY_CHARS = 128
MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_KEY_CHARS = 128
MAX_ATTRIBUTE_TEXT_CHARS = 1000

Scalar = str | int | float | bool | None


@dataclass(frozen=True, slots=True)
class ItemEvent:
    """A validated catalogue entry. ``item_id`` is normalised as a click's is."""

    item_id: str
    ts: int  # when the metadata last changed, epoch ms
    title: str = ""
    categories: tuple[str, ...] = ()
    attributes: dict[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DecodedItem:
    item: ItemEvent
    origin: Origin


def parse_item(value: bytes | None, contract: Contract | None = None, *,
               now_ms: int | None = None) -> ItemEvent:
    """Decode one catalogue message or raise :class:`InvalidEvent`.

    Checks run in this order: value present, size, JSON, object, ``item_id``,
    ``ts``, ``title``, ``categories``, ``attributes``. ``title``,
    ``categories`` and ``attributes`` are optional (absent or null: empty).
    Unknown fields are ignored.
    """
    c = contract if contract is not None else default_contract()
    obj = load_object(value, c.max_bytes)
    item_id = id_of(obj, "item_id")
    now = now_ms if now_ms is not None else clock_ms()
    ts = check_ts(required(obj, "ts"), "ms", "ts", c.earliest_ms, c.max_future_ms, now)
    return ItemEvent(item_id, ts, _title(obj.get("title")), _categories(obj.get("categories")),
                     _attributes(obj.get("attributes")))


def _title(value: Any) -> str:
    if value is None:
        return ""
    if type(value) is not str:
        raise InvalidEvent(Reason.BAD_TITLE, f"title must be a string, got {_kind(value)}")
    if len(value) > MAX_TITLE_CHARS:
        raise InvalidEvent(Reason.BAD_TITLE, f"title of {len(value)} characters exceeds "
                           f"{MAX_TITLE_CHARS}")
    return value


def _categories(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if type(value) is not list:
        raise InvalidEvent(Reason.BAD_CATEGORIES, "categories must be a list of strings, "
                           f"got {_kind(value)}")
    if len(value) > MAX_CATEGORIES:
        raise InvalidEvent(Reason.BAD_CATEGORIES, f"{len(value)} categories exceed "
                           f"{MAX_CATEGORIES}")
    for cat in value:
        if type(cat) is not str or not 0 < len(cat) <= MAX_CATEGORY_CHARS:
            raise InvalidEvent(Reason.BAD_CATEGORIES, "each category must be a string of "
                               f"1..{MAX_CATEGORY_CHARS} characters, got {_show(cat)}")
    return tuple(value)


def _attributes(value: Any) -> dict[str, Scalar]:
    if value is None:
        return {}
    if type(value) is not dict:
        raise InvalidEvent(Reason.BAD_ATTRIBUTES, "attributes must be an object, "
                           f"got {_kind(value)}")
    if len(value) > MAX_ATTRIBUTES:
        raise InvalidEvent(Reason.BAD_ATTRIBUTES, f"{len(value)} attributes exceed "
                           f"{MAX_ATTRIBUTES}")
    for key, v in value.items():
        if not 0 < len(key) <= MAX_ATTRIBUTE_KEY_CHARS:
            raise InvalidEvent(Reason.BAD_ATTRIBUTES, "attribute names must be 1.."
                               f"{MAX_ATTRIBUTE_KEY_CHARS} characters, got {len(key)}")
        if type(v) is str:
            if len(v) > MAX_ATTRIBUTE_TEXT_CHARS:
                raise InvalidEvent(Reason.BAD_ATTRIBUTES, f"attribute {key[:40]!r} of "
                                   f"{len(v)} characters exceeds {MAX_ATTRIBUTE_TEXT_CHARS}")
        elif v is not None and type(v) not in (bool, int, float):
            raise InvalidEvent(Reason.BAD_ATTRIBUTES, f"attribute {key[:40]!r} must be a "
                               f"string, number, boolean or null, got {_kind(v)}")
    return value


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _show(value: object) -> str:
    return f"{value[:40]!r}" if type(value) is str else _kind(value)


def decode_items(records: list[Any], contract: Contract | None = None, *,
                 now_ms: int | None = None) -> tuple[list[DecodedItem], list[DeadLetter]]:
    """Split catalogue records into items and dead letters, keeping record order.

    The catalogue changes far less often than clicks arrive, so one message at
    a time is fast enough here.
    """
    c = contract if contract is not None else default_contract()
    now = now_ms if now_ms is not None else clock_ms()
    oks: list[DecodedItem] = []
    errs: list[DeadLetter] = []
    for rec in records:
        origin = Origin(rec.topic, rec.partition, rec.offset)
        try:
            oks.append(DecodedItem(parse_item(rec.value, c, now_ms=now), origin))
        except InvalidEvent as exc:
            errs.append(DeadLetter(exc.reason, origin, rec.key, rec.value, exc.code))
    return oks, errs
