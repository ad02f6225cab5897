"""Why a message was refused: a fixed set of codes beside the words for people.

The code labels the dead-letter metric (bounded cardinality, stable across
releases); the free text goes into the dead letter's header for whoever reads it.
"""

from __future__ import annotations

from enum import Enum


class Reason(str, Enum):
    """Dead-letter reason codes. Add one only with its documentation in docs/EVENTS.md."""

    NULL_VALUE = "null_value"  # a Kafka message without a value (tombstone)
    TOO_LARGE = "too_large"  # over events.max_message_bytes
    NOT_JSON = "not_json"  # not UTF-8 JSON
    NOT_OBJECT = "not_object"  # JSON, but not an object
    MISSING_FIELD = "missing_field"  # a required field absent or null
    BAD_ID = "bad_id"  # an id neither a string nor an integer, or not 1..256 characters
    BAD_TS = "bad_ts"  # a time of the wrong type or unreadable
    TS_UNIT = "ts_unit"  # a time that is plausible only in another unit
    TS_FUTURE = "ts_future"  # a time ahead of the clock by more than the allowed skew
    TS_PAST = "ts_past"  # a time before events.earliest
    BAD_EVENT = "bad_event"  # an event kind that is not a short string
    BAD_WEIGHT = "bad_weight"  # a weight not a number, not finite in float32, or out of range
    BAD_PRODUCED_AT = "bad_produced_at"  # produced_at not a finite number
    BAD_TITLE = "bad_title"  # catalogue: title not a string or too long
    BAD_CATEGORIES = "bad_categories"  # catalogue: categories not a list of short strings
    BAD_ATTRIBUTES = "bad_attributes"  # catalogue: attributes not an object of scalars
    MODEL_POISONED = "model_poisoned"  # its batch made the model non-finite (worker/loop.py)
    ENCODER_FAILED = "encoder_failed"  # catalogue: the sentence encoder failed on its text
    OTHER = "other"  # a letter written by something other than the contract


class InvalidEvent(ValueError):
    """A refused message: ``code`` for metrics, ``str(exc)`` for the dead-letter header."""

    def __init__(self, code: Reason, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
