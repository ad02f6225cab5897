"""Event time: a producer's unit to epoch milliseconds, its bounds, and naming a wrong unit.

One time rule, two forms that must agree: :func:`check_ts` judges one value
and words the dead letter; :func:`epoch_ms_columns` judges a column at once.
Integer times are converted exactly (sub-millisecond parts are floored away);
fractional ones are rounded to the nearest millisecond. The column form checks
integers against the bounds expressed in the producer's unit, so no
conversion can overflow int64.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np

from stream_rec.events.reasons import InvalidEvent, Reason

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EPOCH_UNITS = ("ms", "s", "us", "ns")  # the order in which a wrong unit is guessed
UNIT_WORDS = {"s": "seconds", "ms": "milliseconds", "us": "microseconds",
              "ns": "nanoseconds"}
EXPECTED = {"s": "epoch seconds", "ms": "epoch milliseconds", "us": "epoch microseconds",
            "ns": "epoch nanoseconds", "iso8601": "an ISO 8601 time"}
MAX_ISO_CHARS = 64
_ONE_MS = timedelta(milliseconds=1)
_INT64_MAX = 2**63 - 1


def number_to_ms(raw: float, unit: str) -> int | None:
    """Epoch ms of a number of ``unit`` since the epoch; None when not finite."""
    if type(raw) is int:
        if unit == "s":
            return raw * 1000
        if unit == "ms":
            return raw
        return raw // (1000 if unit == "us" else 1_000_000)
    x = raw * 1000.0 if unit == "s" else raw if unit == "ms" else (
        raw / 1000.0 if unit == "us" else raw / 1e6)
    return round(x) if math.isfinite(x) else None


def iso_to_ms(text: str) -> int | None:
    """Epoch ms of an ISO 8601 time (``2026-06-01T12:00:00Z``, offsets; naive = UTC)."""
    if not 0 < len(text) <= MAX_ISO_CHARS:
        return None
    if text.endswith(("Z", "z")):  # Python 3.10's parser does not know the suffix
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - EPOCH) // _ONE_MS


def ms_to_iso(ms: int) -> str | None:
    """``2026-06-01T12:00:00Z`` (with ``.fff`` when needed), None outside years 1..9999."""
    try:
        dt = EPOCH + timedelta(milliseconds=ms)
    except OverflowError:
        return None
    text = dt.strftime("%Y-%m-%dT%H:%M:%S")
    return text + (f".{ms % 1000:03d}Z" if ms % 1000 else "Z")


def span(ms: float) -> str:
    """A duration for people: ``1 h``, ``3.5 days``, ``7973 years``."""
    s = ms / 1000.0
    for size, word in ((31_557_600.0, "years"), (86_400.0, "days"), (3600.0, "h"),
                       (60.0, "min")):
        if s >= size:
            return f"{s / size:.4g} {word}"
    return f"{s:.3g} s"


def check_ts(raw: object, unit: str, name: str, earliest_ms: int, max_future_ms: int,
             now_ms: int) -> int:
    """Epoch ms of a message's time, or :class:`InvalidEvent` saying what is wrong.

    A value outside the bounds in the declared unit, but inside them in another,
    is named as such ("looks like seconds") rather than as far past or future.
    """
    latest_ms = now_ms + max_future_ms
    if unit == "iso8601":
        if type(raw) is str:
            ms = iso_to_ms(raw)
            if ms is None:
                raise InvalidEvent(Reason.BAD_TS, f"{name} {raw[:80]!r} is not an ISO 8601 time")
            return _bounded(ms, ms, repr(raw), name, earliest_ms, latest_ms, now_ms, max_future_ms)
        if type(raw) in (int, float):
            for alt in EPOCH_UNITS:
                ms = number_to_ms(raw, alt)  # type: ignore[arg-type]
                if ms is not None and earliest_ms <= ms <= latest_ms:
                    raise InvalidEvent(Reason.TS_UNIT, f"{name} {raw!r} looks like epoch "
                                       f"{UNIT_WORDS[alt]}: expected {EXPECTED[unit]}")
        raise InvalidEvent(Reason.BAD_TS, f"{name} must be {EXPECTED[unit]} (a string), "
                           f"got {_kind(raw)}")
    if type(raw) not in (int, float):
        if type(raw) is str:
            ms = iso_to_ms(raw)
            if ms is not None and earliest_ms <= ms <= latest_ms:
                raise InvalidEvent(Reason.TS_UNIT, f"{name} {raw!r} looks like ISO 8601: "
                                   f"expected {EXPECTED[unit]}")
        raise InvalidEvent(Reason.BAD_TS, f"{name} must be {EXPECTED[unit]} (a number), "
                           f"got {_kind(raw)}")
    ms = number_to_ms(raw, unit)  # type: ignore[arg-type]
    if ms is not None and earliest_ms <= ms <= latest_ms:
        return ms
    for alt in EPOCH_UNITS:
        if alt == unit:
            continue
        other = number_to_ms(raw, alt)  # type: ignore[arg-type]
        if other is not None and earliest_ms <= other <= latest_ms:
            raise InvalidEvent(Reason.TS_UNIT, f"{name} {raw!r} looks like {UNIT_WORDS[alt]}: "
                               f"expected {EXPECTED[unit]}")
    return _bounded(ms, raw, repr(raw), name, earliest_ms, latest_ms, now_ms, max_future_ms)


def _bounded(ms: int | None, raw: object, text: str, name: str, earliest_ms: int,
             latest_ms: int, now_ms: int, max_future_ms: int) -> int:
    if ms is not None and earliest_ms <= ms <= latest_ms:
        return ms
    when = ms_to_iso(ms) if ms is not None else None
    shown = f"{name} {text}" + (f" ({when})" if when else "")
    future = ms > latest_ms if ms is not None else raw > 0  # type: ignore[operator]
    if future:
        ahead = "beyond any calendar" if ms is None else span(ms - now_ms)
        raise InvalidEvent(Reason.TS_FUTURE, f"{shown} is in the future by {ahead}: at most "
                           f"{span(max_future_ms)} ahead of the clock is accepted")
    raise InvalidEvent(Reason.TS_PAST, f"{shown} is before the earliest accepted time "
                       f"{ms_to_iso(earliest_ms)}")


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def raw_bounds(unit: str, earliest_ms: int, latest_ms: int) -> tuple[int, int]:
    """Inclusive bounds for an integer time written in ``unit`` (clamped to int64).

    ``number_to_ms(raw, unit)`` lies in ``[earliest_ms, latest_ms]`` exactly when
    ``raw`` lies in these bounds.
    """
    if unit == "s":
        lo, hi = -(-earliest_ms // 1000), latest_ms // 1000
    elif unit == "ms":
        lo, hi = earliest_ms, latest_ms
    else:
        k = 1000 if unit == "us" else 1_000_000
        lo, hi = earliest_ms * k, latest_ms * k + k - 1
    return max(lo, -_INT64_MAX), min(hi, _INT64_MAX)


def epoch_ms_columns(ints: np.ndarray | None, floats: np.ndarray | None, is_float: np.ndarray,
                     unit: str, earliest_ms: int, latest_ms: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The column form of the time rule: ``(ms (N,) int64, ok (N,) bool)``.

    ``ints`` (int64) holds the rows where ``is_float`` is False, ``floats``
    (float64) the others; either may be None when it holds no row. Rows not ok
    hold 0.
    """
    n = len(is_float)
    ms = np.zeros(n, dtype=np.int64)
    ok = np.zeros(n, dtype=bool)
    if ints is not None:
        lo, hi = raw_bounds(unit, earliest_ms, latest_ms)
        good = ~is_float & (ints >= lo) & (ints <= hi)
        raw = np.where(good, ints, 0)
        if unit == "s":
            conv = raw * 1000
        elif unit == "ms":
            conv = raw
        else:
            conv = raw // (1000 if unit == "us" else 1_000_000)
        ms = np.where(good, conv, ms)
        ok |= good
    if floats is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            x = floats * 1000.0 if unit == "s" else floats if unit == "ms" else (
                floats / 1000.0 if unit == "us" else floats / 1e6)
            r = np.rint(x)
            good = is_float & (r >= float(earliest_ms)) & (r <= float(latest_ms))
        ms = np.where(good, np.where(good, r, 0.0).astype(np.int64), ms)
        ok |= good
    return ms, ok
