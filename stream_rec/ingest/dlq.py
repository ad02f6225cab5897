"""Dead letters: bad messages routed to ``<topic>.dlq`` with why and where from.

Like Kafka Streams' dead-letter queues, the original key and value travel
unchanged and the reason, exception class and origin topic/partition/offset
travel as headers, so an operator can read them and re-drive the message after
a fix. A letter that would not fit the producer's ``max_request_size`` (which
matches the broker's record limit by default) is cut to fit and flagged
``value.truncated`` (``key.truncated`` for an oversized key), so an oversized
poison message is recorded instead of failing every attempt to record it.

Every send is checked: :meth:`DeadLetterWriter.flush` raises
:class:`DeadLetterSendFailed` if any letter since the previous flush was not
acknowledged, and the worker flushes before publishing, so offsets that skip a
bad message are never committed unless its letter is durable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError
from kafka.record.default_records import DefaultRecordBatchBuilder

from stream_rec.errors import Fatal, describe
from stream_rec.events import DeadLetter, Origin, Reason

log = logging.getLogger(__name__)

# Bytes kept free below max_request_size: kafka-python's size estimate covers
# the record batch header and the record's own framing, this covers the
# varint growth of the cut value's length and leaves a little slack.
HEADROOM = 64
MAX_KEY = 1024  # an oversized key is cut to this many bytes


class DeadLetterSendFailed(Fatal):
    """Letters the broker did not acknowledge: the batch holding them must not be committed."""


def dead_letter_headers(err: DeadLetter) -> list[tuple[str, bytes]]:
    return [
        ("error.reason", err.reason.encode("utf-8", "replace")[:4096]),
        ("origin.topic", err.origin.topic.encode()),
        ("origin.partition", str(err.origin.partition).encode()),
        ("origin.offset", str(err.origin.offset).encode()),
    ]


def fit_record(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]],
               max_bytes: int) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """``key``, ``value`` and ``headers`` cut so the record fits ``max_bytes``, and flagged.

    Sizes are kafka-python's own upper-bound estimate, the one the producer
    compares with ``max_request_size`` before it sends.
    """
    def size(k: bytes | None, v: bytes | None, h: list[tuple[str, bytes]]) -> int:
        return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(k, v, h))

    if size(key, value, headers) <= max_bytes:
        return key, value, headers
    headers = list(headers)
    if key is not None and len(key) > MAX_KEY:
        key = key[:MAX_KEY]
        headers.append(("key.truncated", b"true"))
    if value is not None and size(key, value, headers) > max_bytes:
        headers.append(("value.truncated", b"true"))
        room = max_bytes - HEADROOM - size(key, b"", headers)
        value = value[:max(room, 0)]
    return key, value, headers


class DeadLetterWriter:
    """Sends dead letters and remembers each send until :meth:`flush` has checked it."""

    def __init__(self, producer: KafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self.max_bytes = int(producer.config["max_request_size"])
        self.sent = 0
        self._pending: list[tuple[DeadLetter, Any]] = []

    def send(self, err: DeadLetter) -> None:
        key, value, headers = fit_record(err.key, err.value, dead_letter_headers(err),
                                         self.max_bytes)
        try:
            future = self.producer.send(self.topic, key=key, value=value, headers=headers)
        except KafkaError as exc:  # refused before sending (metadata timeout, size)
            raise DeadLetterSendFailed(
                f"dead letter for {_origin(err)} could not be sent to {self.topic}: "
                f"{describe(exc)}; the batch holding it was not published or committed") from exc
        self._pending.append((err, future))
        self.sent += 1
        log.debug("dead letter %s: %s", _origin(err), err.reason)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for every letter since the last flush; raise if any was not acknowledged."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            self.producer.flush(timeout=timeout_s)
        except KafkaError:
            pass  # the unfinished sends are counted below
        failed = [(err, fut) for err, fut in pending if not fut.is_done or fut.failed()]
        if failed:
            err, fut = failed[0]
            why = describe(fut.exception) if fut.is_done else f"not acknowledged in {timeout_s:g} s"
            raise DeadLetterSendFailed(
                f"{len(failed)} of {len(pending)} dead letters could not be sent to {self.topic} "
                f"(first: {_origin(err)}: {why}); the batch holding them was not published "
                "and its offsets were not committed")

    def close(self) -> None:
        self.producer.close(timeout=10)


def _origin(err: DeadLetter) -> str:
    return f"{err.origin.topic}/{err.origin.partition}@{err.origin.offset}"


def dead_letter_poisoned(records: Iterable[Any], why: str, dlq: DeadLetterWriter,
                         metrics: Any) -> int:
    """Send each of ``records`` (Kafka records) as a dead letter of a batch that made the model
    non-finite, counted in ``metrics.dead_letters``; returns how many. The caller flushes."""
    reason = f"training on this record's batch made the model non-finite ({why})"
    n = 0
    for rec in records:
        dlq.send(DeadLetter(reason, Origin(rec.topic, rec.partition, rec.offset),
                            rec.key, rec.value, Reason.MODEL_POISONED))
        metrics.dead_letters.labels(Reason.MODEL_POISONED.value).inc()
        n += 1
    return n
