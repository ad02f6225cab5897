"""Dead letters that do not fit: cut to the producer's limit, flagged, and sent.

Against the real broker: a letter larger than ``kafka.max_request_size`` is
cut so the producer accepts it (kafka-python's own size estimate), its value
is a prefix of the original and the ``value.truncated`` header says so; a
letter that fits travels unchanged; an oversized key is cut too.
"""

from __future__ import annotations

import pytest
from kafka import TopicPartition
from kafka.record.default_records import DefaultRecordBatchBuilder

from stream_rec.events import DeadLetter, Origin
from stream_rec.ingest.dlq import MAX_KEY, DeadLetterWriter, dead_letter_headers, fit_record
from stream_rec.ingest.kafka import ensure_topics, make_consumer, make_producer
from stream_rec.settings import KafkaSettings

LIMIT = 64 * 1024


def _letter(offset: int, value: bytes, key: bytes | None = b"u1") -> DeadLetter:
    return DeadLetter(key=key, value=value, reason="not JSON",
                      origin=Origin("clicks", 0, offset))


@pytest.mark.parametrize("key_size, value_size, flags", [
    (2, 10, set()),
    (2, LIMIT, {"value.truncated"}),  # the value alone fits, not with key and headers
    (2, 5 * LIMIT, {"value.truncated"}),
    (3 * LIMIT, 100, {"key.truncated"}),
    (3 * LIMIT, 3 * LIMIT, {"key.truncated", "value.truncated"}),
])
def test_a_cut_record_fits_the_limit_and_says_what_was_cut(
        key_size: int, value_size: int, flags: set[str]) -> None:
    key = b"k" * key_size
    value = (bytes(range(256)) * (value_size // 256 + 1))[:value_size]
    headers = dead_letter_headers(_letter(7, value, key))
    k, v, h = fit_record(key, value, headers, LIMIT)
    assert DefaultRecordBatchBuilder.estimate_size_in_bytes(k, v, h) <= LIMIT
    assert k is not None and v is not None and key.startswith(k) and value.startswith(v)
    assert {name for name, _ in h} - {name for name, _ in headers} == flags
    assert len(k) == (MAX_KEY if "key.truncated" in flags else key_size)
    assert (len(v) < value_size) == ("value.truncated" in flags)
    if "value.truncated" in flags:  # cut no more than needed
        assert len(v) > LIMIT - len(k) - 1024


@pytest.mark.kafka
def test_letters_over_the_limit_are_cut_flagged_and_sent(kafka_cfg: KafkaSettings) -> None:
    cfg = kafka_cfg.model_copy(update={"max_request_size": LIMIT})
    ensure_topics(cfg, [cfg.dlq_topic])
    big, small = b"x" * (3 * LIMIT), b"y" * 1000
    writer = DeadLetterWriter(make_producer(cfg), cfg.dlq_topic)
    writer.send(_letter(1, big))
    writer.send(_letter(2, small))
    writer.flush()
    writer.close()
    consumer = make_consumer(cfg, None, consumer_timeout_ms=1500)
    consumer.assign([TopicPartition(cfg.dlq_topic, p)
                     for p in consumer.partitions_for_topic(cfg.dlq_topic)])
    consumer.seek_to_beginning()
    got = {int(dict(r.headers)["origin.offset"]): r for r in consumer}
    consumer.close()
    cut, whole = got[1], got[2]
    assert dict(cut.headers)["value.truncated"] == b"true"
    assert big.startswith(cut.value) and LIMIT - 1024 < len(cut.value) < LIMIT
    assert whole.value == small and "value.truncated" not in dict(whole.headers)
    assert dict(cut.headers)["error.reason"] == b"not JSON" and cut.key == b"u1"
