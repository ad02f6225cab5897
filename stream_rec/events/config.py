"""Settings of the event contract (``Settings.events``): field names, time unit, bounds.

They live beside the code they configure, as ``ModelConfig`` does, so that
decoding can be used without importing the rest of the settings (and torch).
In the environment, ``STREAM_REC_EVENTS__FIELDS__USER=uid`` renames the user
field and ``STREAM_REC_EVENTS__TIME_UNIT=s`` declares epoch seconds; in a TOML
file they are ``[events.fields] user = "uid"`` and ``[events] time_unit = "s"``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TimeUnit = Literal["s", "ms", "us", "ns", "iso8601"]

#: Weights of the event kinds the product knows; any other kind weighs 1.
KNOWN_EVENTS: dict[str, float] = {"click": 1.0, "view": 0.5, "like": 2.0, "purchase": 3.0}
MAX_MESSAGE_BYTES = 64 * 1024
MAX_KIND_LEN = 64  # characters of an event kind
MAX_FUTURE_LIMIT_S = 10 * 365 * 86_400  # bounds stay far inside int64 in every unit


class EventFields(BaseModel):
    """Where each part of a click is found in a producer's JSON object.

    A dot walks into nested objects (``properties.product_id``), so a top-level
    key that itself contains a dot cannot be named.
    """

    model_config = ConfigDict(extra="forbid")

    user: str = Field("user_id", min_length=1)
    item: str = Field("item_id", min_length=1)
    time: str = Field("ts", min_length=1)
    kind: str = Field("event", min_length=1)
    weight: str = Field("weight", min_length=1)
    produced_at: str = Field("produced_at", min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> EventFields:
        names = list(self.model_dump().values())
        if len(set(names)) != len(names):
            raise ValueError(f"event field names must be distinct, got {names}")
        return self


class EventSettings(BaseModel):
    """What a click message must look like to reach the model.

    ``ts`` is always held as epoch milliseconds (int64) once decoded; the
    declared ``time_unit`` only says how producers write it. A ``ts`` is
    accepted from ``earliest`` up to ``max_future_s`` past the decoding
    process's clock. ``weight`` (explicit, or the kind's weight) must be finite
    as float32 and lie in ``(weight_min, weight_max]``.
    """

    model_config = ConfigDict(extra="forbid")

    fields: EventFields = EventFields()
    time_unit: TimeUnit = "ms"
    max_future_s: float = Field(3600.0, ge=0, le=MAX_FUTURE_LIMIT_S)
    # 1990 accepts MovieLens-100K (1997-1998) and keeps the units apart: a time
    # in seconds since 1990 is never a plausible time in milliseconds.
    earliest: datetime = datetime(1990, 1, 1, tzinfo=UTC)
    weight_min: float = Field(0.0, ge=0)  # exclusive
    weight_max: float = Field(1000.0, gt=0)  # inclusive
    kind_weights: dict[str, float] = Field(default_factory=lambda: dict(KNOWN_EVENTS))
    max_message_bytes: int = Field(MAX_MESSAGE_BYTES, ge=64)

    @field_validator("earliest")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        value = value if value.tzinfo else value.replace(tzinfo=UTC)
        if value.timestamp() < 0 or value.year > 2200:
            raise ValueError("earliest must lie between 1970 and 2200")
        return value

    @model_validator(mode="after")
    def _weights_in_range(self) -> EventSettings:
        if self.weight_min >= self.weight_max:
            raise ValueError(f"weight_min {self.weight_min} must be below weight_max "
                             f"{self.weight_max}")
        for kind, weight in {**self.kind_weights, "<any other kind>": 1.0}.items():
            if not 0 < len(kind) <= MAX_KIND_LEN:
                raise ValueError(f"kind_weights names must be 1..{MAX_KIND_LEN} characters, "
                                 f"got {kind[:80]!r}")
            if not self.weight_min < weight <= self.weight_max:
                raise ValueError(f"kind_weights[{kind!r}] = {weight} is outside "
                                 f"({self.weight_min}, {self.weight_max}]")
        return self
