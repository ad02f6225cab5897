"""The click-event contract: decode and validate Kafka messages, good and bad apart.

Bad messages are data, not crashes: :func:`decode_batch` returns ``(oks, errs)``
so that the worker routes errors to the dead-letter topic and applies every
valid neighbour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

MAX_ID_LEN = 256
MAX_MESSAGE_BYTES = 64 * 1024
KNOWN_EVENTS = {"click": 1.0, "view": 0.5, "like": 2.0, "purchase": 3.0}


@dataclass(frozen=True, slots=True)
class Event:
    """A validated event. Ids are normalised to strings (``5`` and ``"5"`` are one id)."""

    user_id: str
    item_id: str
    ts: int  # event time, epoch ms
    event: str = "click"
    weight: float = 1.0
    produced_at: float | None = None  # epoch seconds, for latency measurement


@dataclass(frozen=True, slots=True)
class Origin:
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Decoded:
    event: Event
    origin: Origin


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that failed, with why and where it came from."""

    reason: str
    origin: Origin
    key: bytes | None
    value: bytes | None


class InvalidEvent(ValueError):
    """Raised by :func:`parse_event` with a reason fit for a dead-letter header."""


def _id(obj: dict[str, Any], field: str) -> str:
    if field not in obj:
        raise InvalidEvent(f"missing field {field!r}")
    value = obj[field]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidEvent(f"{field} must be a string or an integer, got {type(value).__name__}")
    text = str(value)
    if not text or len(text) > MAX_ID_LEN:
        raise InvalidEvent(f"{field} must be 1..{MAX_ID_LEN} characters, got {len(text)}")
    return text


def parse_event(value: bytes | None) -> Event:
    """Decode one message value into an :class:`Event` or raise :class:`InvalidEvent`."""
    if value is None:
        raise InvalidEvent("empty message (null value)")
    if len(value) > MAX_MESSAGE_BYTES:
        raise InvalidEvent(f"message of {len(value)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(f"not valid UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidEvent(f"expected a JSON object, got {type(obj).__name__}")
    user_id = _id(obj, "user_id")
    item_id = _id(obj, "item_id")
    if "ts" not in obj:
        raise InvalidEvent("missing field 'ts'")
    ts = obj["ts"]
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        raise InvalidEvent(f"ts must be epoch milliseconds (a number), got {type(ts).__name__}")
    if not math.isfinite(ts) or ts < 0 or ts > 2**53:
        raise InvalidEvent(f"ts out of range: {ts!r}")
    kind = obj.get("event", "click")
    if not isinstance(kind, str) or not kind or len(kind) > 64:
        raise InvalidEvent("event must be a non-empty string")
    weight = obj.get("weight", KNOWN_EVENTS.get(kind, 1.0))
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
            or not math.isfinite(weight) or weight < 0:
        raise InvalidEvent(f"weight must be a finite number >= 0, got {weight!r}")
    produced_at = obj.get("produced_at")
    if produced_at is not None and (isinstance(produced_at, bool)
                                    or not isinstance(produced_at, (int, float))
                                    or not math.isfinite(produced_at)):
        raise InvalidEvent("produced_at must be a finite number (epoch seconds)")
    return Event(user_id, item_id, int(ts), kind, float(weight),
                 None if produced_at is None else float(produced_at))


def decode_batch(records: list[Any]) -> tuple[list[Decoded], list[DeadLetter]]:
    """Split kafka-python ``ConsumerRecord``s into valid events and dead letters."""
    oks: list[Decoded] = []
    errs: list[DeadLetter] = []
    for rec in records:
        origin = Origin(rec.topic, rec.partition, rec.offset)
        try:
            oks.append(Decoded(parse_event(rec.value), origin))
        except InvalidEvent as exc:
            errs.append(DeadLetter(str(exc), origin, rec.key, rec.value))
    return oks, errs


def encode_event(event: dict[str, Any]) -> bytes:
    """Serialise an event dict for producing (compact JSON, UTF-8)."""
    return orjson.dumps(event)
