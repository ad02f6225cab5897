"""The click contract, one message at a time: the reference every other decoder agrees with.

:func:`parse_event` is the rule book: it checks, in a fixed order, what a
message must be, and the first failure is the dead letter's reason.
:func:`stream_rec.events.columns.decode_columns` applies the same rules to a
whole batch at once and asks this module for the words of every refusal.
"""

from __future__ import annotations

import math
import time
from array import array
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson

from stream_rec.events.config import MAX_KIND_LEN, EventSettings
from stream_rec.events.reasons import InvalidEvent, Reason
from stream_rec.events.timestamps import EPOCH, check_ts

MAX_ID_LEN = 256
_MISSING = object()


@dataclass(frozen=True, slots=True)
class Event:
    """A validated event. Ids are normalised to strings (``5`` and ``"5"`` are one id)."""

    user_id: str
    item_id: str
    ts: int  # event time, epoch ms
    event: str = "click"
    weight: float = 1.0  # a float32 value, inside the configured range
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
    """A message that failed: why (words for the header, ``code`` for metrics) and where from."""

    reason: str
    origin: Origin
    key: bytes | None
    value: bytes | None
    code: Reason = Reason.OTHER


def epoch_ms(dt: datetime) -> int:
    """Exact epoch milliseconds of an aware datetime."""
    return (dt - EPOCH) // timedelta(milliseconds=1)


def clock_ms() -> int:
    """This process's clock, epoch ms: the default ``now_ms`` of every decode call."""
    return time.time_ns() // 1_000_000


class Contract:
    """:class:`EventSettings` made ready for decoding: names resolved, bounds in ms.

    Build one per process (``Contract(settings.events)``) and pass it to every
    decode call; building it per message would cost more than the decoding.
    """

    __slots__ = ("click_weight", "earliest_ms", "item", "kind", "kind_weights", "max_bytes",
                 "max_future_ms", "nested", "produced_at", "settings", "time", "unit", "user",
                 "weight", "weight_max", "weight_min")

    def __init__(self, cfg: EventSettings | None = None) -> None:
        cfg = cfg if cfg is not None else EventSettings()
        self.settings = cfg
        f = cfg.fields
        self.user, self.item, self.time = f.user, f.item, f.time
        self.kind, self.weight, self.produced_at = f.kind, f.weight, f.produced_at
        names = (f.user, f.item, f.time, f.kind, f.weight, f.produced_at)
        self.nested = tuple((n, tuple(n.split("."))) for n in names if "." in n)
        self.unit = cfg.time_unit
        self.earliest_ms = epoch_ms(cfg.earliest)
        self.max_future_ms = round(cfg.max_future_s * 1000)
        self.weight_min, self.weight_max = float(cfg.weight_min), float(cfg.weight_max)
        self.kind_weights = {k: float(w) for k, w in cfg.kind_weights.items()}
        self.click_weight = self.kind_weights.get("click", 1.0)
        self.max_bytes = cfg.max_message_bytes

    def lift(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Copy nested fields up to their dotted names so each is one lookup (in place)."""
        if type(obj) is not dict:
            return obj
        for name, path in self.nested:
            node: Any = obj
            for key in path:
                if type(node) is not dict or key not in node:
                    node = _MISSING
                    break
                node = node[key]
            if node is _MISSING:
                obj.pop(name, None)
            else:
                obj[name] = node
        return obj

    def ts_ms(self, raw: object, now_ms: int) -> int:
        return check_ts(raw, self.unit, self.time, self.earliest_ms, self.max_future_ms, now_ms)

    def weight_of(self, raw: object, kind: str) -> float:
        """The event's weight as the float32 the model will hold, or :class:`InvalidEvent`."""
        if raw is None:
            raw = self.kind_weights.get(kind, 1.0)
        elif type(raw) not in (int, float):
            raise InvalidEvent(Reason.BAD_WEIGHT, f"{self.weight} must be a number, got "
                               f"{type(raw).__name__}")
        w32 = array("f", [float(raw)])[0]  # type: ignore[arg-type]
        if not math.isfinite(w32):
            raise InvalidEvent(Reason.BAD_WEIGHT, f"{self.weight} {raw!r} is not finite in "
                               "float32")
        if not self.weight_min < w32 <= self.weight_max:
            raise InvalidEvent(Reason.BAD_WEIGHT, f"{self.weight} {raw!r} is outside "
                               f"({self.weight_min:g}, {self.weight_max:g}]")
        return w32


def load_object(value: bytes | None, max_bytes: int) -> dict[str, Any]:
    """The JSON object a message holds, or :class:`InvalidEvent` (null, size, JSON, type)."""
    if value is None:
        raise InvalidEvent(Reason.NULL_VALUE, "empty message (null value)")
    if len(value) > max_bytes:
        raise InvalidEvent(Reason.TOO_LARGE, f"message of {len(value)} bytes exceeds "
                           f"{max_bytes}")
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(Reason.NOT_JSON, f"not valid UTF-8 JSON: {exc}") from None
    if type(obj) is not dict:
        raise InvalidEvent(Reason.NOT_OBJECT, f"expected a JSON object, got {_kind(obj)}")
    return obj


def required(obj: dict[str, Any], name: str) -> Any:
    value = obj.get(name)
    if value is None:
        raise InvalidEvent(Reason.MISSING_FIELD, f"field {name!r} is null" if name in obj
                           else f"missing field {name!r}")
    return value


def id_of(obj: dict[str, Any], name: str) -> str:
    """An id field as a string: a string or an integer (not a bool), 1..256 characters."""
    value = required(obj, name)
    if type(value) is int:
        return str(value)
    if type(value) is not str:
        raise InvalidEvent(Reason.BAD_ID, f"{name} must be a string or an integer, "
                           f"got {_kind(value)}")
    if not 0 < len(value) <= MAX_ID_LEN:
        raise InvalidEvent(Reason.BAD_ID, f"{name} must be 1..{MAX_ID_LEN} characters, "
                           f"got {len(value)}")
    return value


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def parse_event(value: bytes | None, contract: Contract | None = None, *,
                now_ms: int | None = None) -> Event:
    """Decode one message value into an :class:`Event` or raise :class:`InvalidEvent`.

    ``now_ms``: the clock (epoch ms) the time's future skew is measured from;
    the process's clock when None. Checks run in this order, and the first
    failure is the reason: value present, size, JSON, object, user id, item id,
    time, kind, weight, ``produced_at``. Unknown fields are ignored; null
    optional fields count as absent.
    """
    c = contract if contract is not None else default_contract()
    obj = load_object(value, c.max_bytes)
    if c.nested:
        c.lift(obj)
    user_id = id_of(obj, c.user)
    item_id = id_of(obj, c.item)
    ts = c.ts_ms(required(obj, c.time), now_ms if now_ms is not None else clock_ms())
    kind = obj.get(c.kind)
    if kind is None:
        kind = "click"
    elif type(kind) is not str or not 0 < len(kind) <= MAX_KIND_LEN:
        raise InvalidEvent(Reason.BAD_EVENT, f"{c.kind} must be a string of 1..{MAX_KIND_LEN} "
                           f"characters, got {_kind(kind)}")
    weight = c.weight_of(obj.get(c.weight), kind)
    produced_at = obj.get(c.produced_at)
    if produced_at is not None:
        if type(produced_at) not in (int, float) or not math.isfinite(produced_at):
            raise InvalidEvent(Reason.BAD_PRODUCED_AT, f"{c.produced_at} must be a finite "
                               f"number (epoch seconds), got {_kind(produced_at)}")
        produced_at = float(produced_at)
    return Event(user_id, item_id, ts, kind, weight, produced_at)


_DEFAULT: Contract | None = None


def default_contract() -> Contract:
    """The contract under default settings (built once)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Contract()
    return _DEFAULT


def decode_batch(records: list[Any], contract: Contract | None = None, *,
                 now_ms: int | None = None) -> tuple[list[Decoded], list[DeadLetter]]:
    """Split kafka-python ``ConsumerRecord``s into events and dead letters, one at a time.

    Kept for callers that want :class:`Event` objects; the worker's path is
    :func:`stream_rec.events.columns.decode_columns`, which returns columns.
    """
    c = contract if contract is not None else default_contract()
    now = now_ms if now_ms is not None else clock_ms()
    oks: list[Decoded] = []
    errs: list[DeadLetter] = []
    for rec in records:
        origin = Origin(rec.topic, rec.partition, rec.offset)
        try:
            oks.append(Decoded(parse_event(rec.value, c, now_ms=now), origin))
        except InvalidEvent as exc:
            errs.append(DeadLetter(exc.reason, origin, rec.key, rec.value, exc.code))
    return oks, errs


def encode_event(event: dict[str, Any]) -> bytes:
    """Serialise an event dict for producing (compact JSON, UTF-8)."""
    return orjson.dumps(event)
