"""Dead letters: bad messages routed to ``<topic>.dlq`` with why and where from.

Like Kafka Streams' dead-letter queues, the original key and value travel
unchanged (values over 1 MiB are cut, and the header says so) and the reason,
exception class and origin topic/partition/offset travel as headers, so an
operator can read them and re-drive the message after a fix.
"""

from __future__ import annotations

import logging

from kafka import KafkaProducer

from stream_rec.events import DeadLetter

log = logging.getLogger(__name__)

MAX_DLQ_VALUE = 1024 * 1024


def dead_letter_headers(err: DeadLetter, truncated: bool) -> list[tuple[str, bytes]]:
    headers = [
        ("error.reason", err.reason.encode("utf-8", "replace")[:4096]),
        ("origin.topic", err.origin.topic.encode()),
        ("origin.partition", str(err.origin.partition).encode()),
        ("origin.offset", str(err.origin.offset).encode()),
    ]
    if truncated:
        headers.append(("value.truncated", b"true"))
    return headers


class DeadLetterWriter:
    """Sends dead letters; :meth:`flush` before committing the offsets they cover."""

    def __init__(self, producer: KafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self.sent = 0

    def send(self, err: DeadLetter) -> None:
        value = err.value
        truncated = False
        if value is not None and len(value) > MAX_DLQ_VALUE:
            value, truncated = value[:MAX_DLQ_VALUE], True
        self.producer.send(self.topic, key=err.key, value=value,
                           headers=dead_letter_headers(err, truncated))
        self.sent += 1
        log.debug("dead letter %s/%d@%d: %s", err.origin.topic, err.origin.partition,
                  err.origin.offset, err.reason)

    def flush(self, timeout_s: float = 30.0) -> None:
        self.producer.flush(timeout=timeout_s)

    def close(self) -> None:
        self.producer.close(timeout=10)
