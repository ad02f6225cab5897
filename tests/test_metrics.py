"""Metrics behind the alerts: worker lag and fetch age from a real consumer, serving delay."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from kafka import TopicPartition
from prometheus_client import CollectorRegistry

from stream_rec.ingest.kafka import ensure_topics, make_consumer, make_producer
from stream_rec.metrics import ServingMetrics, WorkerMetrics
from stream_rec.settings import KafkaSettings


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels or None)


@pytest.mark.kafka
def test_lag_per_partition_and_fetch_age_from_a_real_consumer(kafka_cfg: KafkaSettings) -> None:
    ensure_topics(kafka_cfg, [kafka_cfg.topic], partitions=2)
    producer = make_producer(kafka_cfg)
    old_ms = int(time.time() * 1000) - 30_000  # records stamped 30 s ago
    for i in range(10):
        producer.send(kafka_cfg.topic, value=b"x", partition=0, timestamp_ms=old_ms)
    for i in range(4):
        producer.send(kafka_cfg.topic, value=b"y", partition=1)
    producer.flush(10)
    producer.close()

    metrics = WorkerMetrics(CollectorRegistry())
    reg = metrics.registry
    consumer = make_consumer(kafka_cfg, None)
    tps = [TopicPartition(kafka_cfg.topic, p) for p in (0, 1)]
    try:
        consumer.assign(tps)
        consumer.seek_to_beginning()
        got: dict = {}
        deadline = time.monotonic() + 15
        while sum(len(r) for r in got.values()) < 14 and time.monotonic() < deadline:
            for tp, recs in consumer.poll(timeout_ms=500).items():
                got.setdefault(tp, []).extend(recs)
        assert sum(len(r) for r in got.values()) == 14
        # Nothing applied yet: the whole partitions are lag.
        metrics.polled(consumer, {}, got)
        assert _sample(reg, "stream_rec_worker_lag_records", partition="0") == 10
        assert _sample(reg, "stream_rec_worker_lag_records", partition="1") == 4
        age_sum = _sample(reg, "stream_rec_worker_fetch_age_seconds_sum")
        assert _sample(reg, "stream_rec_worker_fetch_age_seconds_count") == 1
        assert age_sum is not None and 29 < age_sum < 60  # the oldest record of the poll
        # Applied up to offset 7 on partition 0 and all of partition 1.
        metrics.polled(consumer, {0: 7, 1: 4}, {})
        assert _sample(reg, "stream_rec_worker_lag_records", partition="0") == 3
        assert _sample(reg, "stream_rec_worker_lag_records", partition="1") == 0
        assert _sample(reg, "stream_rec_worker_fetch_age_seconds_count") == 1  # empty poll
        # Partition 1 revoked: its series goes, another worker reports it now.
        consumer.assign(tps[:1])
        metrics.polled(consumer, {0: 10}, {})
        assert _sample(reg, "stream_rec_worker_lag_records", partition="0") == 0
        assert _sample(reg, "stream_rec_worker_lag_records", partition="1") is None
        assert (_sample(reg, "stream_rec_worker_last_poll_seconds") or 0) > time.time() - 5
    finally:
        consumer.close()


def test_serving_records_how_long_a_version_took_to_reach_it() -> None:
    metrics = ServingMetrics(CollectorRegistry())
    manifest = SimpleNamespace(version=7, created_at=time.time() - 2.0, watermark=123)
    metrics.observe_swap(SimpleNamespace(manifest=manifest), 0.01)
    reg = metrics.registry
    assert _sample(reg, "stream_rec_snapshot_visible_delay_seconds_count") == 1
    assert 2.0 <= (_sample(reg, "stream_rec_snapshot_visible_delay_seconds_sum") or 0) < 10
    assert _sample(reg, "stream_rec_snapshot_version") == 7
