"""The event contract: decode and validate Kafka messages, good and bad apart.

Bad messages are data, not crashes: every decoder returns the accepted events
and the dead letters (reason text for the header, :class:`Reason` code for the
metric label, origin topic/partition/offset) side by side, so that one bad
message never takes its neighbours down.

- :func:`decode_columns` (the worker's path): records to a :class:`Batch` of
  numpy columns plus dead letters.
- :func:`parse_event`: one message, the reference the batch agrees with
  (``dlq redrive`` and other single-message callers).
- :func:`parse_item` / :func:`decode_items`: the item catalogue topic.
- :class:`Contract`: ``Settings.events`` made ready for decoding; build one per
  process and pass it to every call.

Watermark rule for callers: the watermark advances only from accepted events
(``Batch.ts``, ``Batch.max_ts()``); offsets advance over every record.
"""

from stream_rec.events.catalogue import DecodedItem, ItemEvent, decode_items, parse_item
from stream_rec.events.columns import Batch, decode_columns
from stream_rec.events.config import (
    KNOWN_EVENTS,
    MAX_MESSAGE_BYTES,
    EventFields,
    EventSettings,
    TimeUnit,
)
from stream_rec.events.contract import (
    MAX_ID_LEN,
    Contract,
    DeadLetter,
    Decoded,
    Event,
    Origin,
    clock_ms,
    decode_batch,
    default_contract,
    encode_event,
    parse_event,
)
from stream_rec.events.reasons import InvalidEvent, Reason

__all__ = [
    "KNOWN_EVENTS", "MAX_ID_LEN", "MAX_MESSAGE_BYTES", "Batch", "Contract", "DeadLetter",
    "Decoded", "DecodedItem", "Event", "EventFields", "EventSettings", "InvalidEvent",
    "ItemEvent", "Origin", "Reason", "TimeUnit", "clock_ms", "decode_batch", "decode_columns",
    "decode_items", "default_contract", "encode_event", "parse_event", "parse_item",
]
