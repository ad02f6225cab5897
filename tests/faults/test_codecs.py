"""Every standard codec, as two different clients write it, is consumed and applied once.

One partition per (client, codec): kafka-python and librdkafka (through
``confluent-kafka``) each write gzip, snappy, lz4 and zstd batches. Reading
each partition back with a spy on kafka-python's record batches shows that the
broker kept the batches as sent (the worker really decodes that codec, not a
batch the broker recompressed); then one worker run must apply every event
exactly once. ``kafka.compression_type`` is what the kafka-python producer
used, through ``make_producer``.
"""

from __future__ import annotations

import itertools
import signal
from pathlib import Path

import confluent_kafka
import orjson
import pytest
from kafka import TopicPartition
from kafka.admin import NewTopic
from kafka.record.default_records import DefaultRecordBatch

from stream_rec import datasets
from stream_rec.events import encode_event
from stream_rec.ingest.kafka import make_admin, make_consumer, make_producer
from stream_rec.settings import KafkaSettings
from tests.faults.common import SMALL_MODEL, assert_exactly_once, caught_up, send_acked
from tests.support import env_for, spawn, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.kafka]

CODECS = ["gzip", "snappy", "lz4", "zstd"]
CODEC_IDS = {"gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}  # the record batch attribute
PER_CASE = 150


def _librdkafka_send(cfg: KafkaSettings, codec: str, partition: int, events: list[dict]
                     ) -> tuple[list[tuple[str, str]], int]:
    """Send ``events`` with librdkafka; the (user, item) of each delivered one, and the end."""
    producer = confluent_kafka.Producer({"bootstrap.servers": cfg.bootstrap,
                                         "compression.type": codec, "linger.ms": 5,
                                         "acks": "all"})
    acked: list[tuple[str, str]] = []
    errors: list[object] = []
    end = 0

    def delivered(err: object, msg: confluent_kafka.Message) -> None:
        nonlocal end
        if err is not None:
            errors.append(err)
            return
        ev = orjson.loads(msg.value())
        acked.append((ev["user_id"], ev["item_id"]))
        end = max(end, msg.offset() + 1)

    for ev in events:
        producer.produce(cfg.topic, key=ev["user_id"].encode(), value=encode_event(ev),
                         partition=partition, on_delivery=delivered)
    assert producer.flush(30) == 0, "librdkafka did not deliver everything"
    assert not errors, errors[:3]
    return acked, end


def _codecs_by_partition(cfg: KafkaSettings, partitions: int) -> dict[int, set[int]]:
    """The compression of every record batch the broker returns, per partition."""
    seen: dict[int, set[int]] = {}
    current = [-1]
    original = DefaultRecordBatch._maybe_uncompress

    def spy(batch: DefaultRecordBatch) -> None:
        seen.setdefault(current[0], set()).add(batch.compression_type)
        original(batch)

    consumer = make_consumer(cfg, None, consumer_timeout_ms=1000)
    DefaultRecordBatch._maybe_uncompress = spy  # type: ignore[method-assign]
    try:
        for p in range(partitions):
            current[0] = p
            tp = TopicPartition(cfg.topic, p)
            consumer.assign([tp])
            consumer.seek(tp, 0)
            n = sum(1 for _ in itertools.islice(consumer, PER_CASE))
            assert n == PER_CASE, f"partition {p}: read {n} records"
    finally:
        DefaultRecordBatch._maybe_uncompress = original  # type: ignore[method-assign]
        consumer.close()
    return seen


def test_every_codec_from_two_clients_is_applied_exactly_once(
        kafka_cfg: KafkaSettings, tmp_path: Path) -> None:
    cases = [("kafka-python", c) for c in CODECS] + [("librdkafka", c) for c in CODECS]
    make_admin(kafka_cfg).create_topics([NewTopic(kafka_cfg.topic, len(cases), 1)])
    stream = datasets.iter_synthetic(seed=21)
    acked: list[tuple[str, str]] = []
    ends: dict[int, int] = {}
    for p, (client, codec) in enumerate(cases):
        events = list(itertools.islice(stream, PER_CASE))
        if client == "kafka-python":
            cfg = kafka_cfg.model_copy(update={"compression_type": codec})
            producer = make_producer(cfg)
            assert producer.config["compression_type"] == codec
            got, end = send_acked(cfg, events, partition=p, producer=producer)
            producer.close()
            ends[p] = end[p]
        else:
            got, ends[p] = _librdkafka_send(kafka_cfg, codec, p, events)
        acked += got
    assert _codecs_by_partition(kafka_cfg, len(cases)) == {
        p: {CODEC_IDS[codec]} for p, (_client, codec) in enumerate(cases)}

    store = tmp_path / "store"
    worker = spawn(["worker"], env_for(kafka_cfg, store, **SMALL_MODEL), tmp_path / "worker.log")
    try:
        wait_until(lambda: caught_up(store, kafka_cfg.topic, ends), 60, what="every partition")
        assert worker.poll() is None, "the worker exited"
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    assert "Traceback" not in (tmp_path / "worker.log").read_text(errors="replace")
    assert_exactly_once(store, acked)
