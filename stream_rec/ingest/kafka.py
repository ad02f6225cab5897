"""Thin kafka-python wrappers: one place that knows how our clients are configured."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError

from stream_rec.settings import KafkaSettings

log = logging.getLogger(__name__)
T = TypeVar("T")


class BrokerUnavailable(RuntimeError):
    """No broker answered at the configured bootstrap address."""


def make_producer(cfg: KafkaSettings, **overrides: Any) -> KafkaProducer:
    """A producer that waits for all replicas and batches briefly (5 ms)."""
    kw: dict[str, Any] = {"acks": "all", "linger_ms": 5, "retries": 5,
                          "max_request_size": 4 * 1024 * 1024}
    kw.update(overrides)
    return _connect(cfg, KafkaProducer, kw)


def make_consumer(cfg: KafkaSettings, group_id: str | None, **overrides: Any) -> KafkaConsumer:
    """A consumer with manual commits: offsets follow durable snapshots, never a timer."""
    kw: dict[str, Any] = {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": cfg.session_timeout_ms,
        "heartbeat_interval_ms": cfg.heartbeat_interval_ms,
        "max_poll_interval_ms": cfg.max_poll_interval_ms,
        "fetch_max_wait_ms": 50,
        "max_partition_fetch_bytes": 4 * 1024 * 1024,
    }
    kw.update(overrides)
    return _connect(cfg, KafkaConsumer, kw)


def make_admin(cfg: KafkaSettings) -> KafkaAdminClient:
    return _connect(cfg, KafkaAdminClient, {})


def _connect(cfg: KafkaSettings, factory: Callable[..., T], kw: dict[str, Any]) -> T:
    """Build a client, turning "nobody answers" into :class:`BrokerUnavailable`."""
    try:
        return factory(**cfg.client_kwargs(), **kw)
    except KafkaTimeoutError as exc:
        raise BrokerUnavailable(
            f"no Kafka broker answers at {cfg.bootstrap} "
            f"(waited {cfg.bootstrap_timeout_ms / 1000:.0f} s)") from exc


def ensure_topics(cfg: KafkaSettings, topics: list[str], partitions: int = 4) -> None:
    """Create ``topics`` if missing (replication 1 suits the local broker)."""
    admin = make_admin(cfg)
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(t, partitions, 1) for t in topics if t not in existing]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
            except KafkaError as exc:  # a racing creator is fine, anything else is not
                if "TopicAlreadyExists" not in repr(exc):
                    raise
            log.info("created topics %s", [t.name for t in missing])
    finally:
        admin.close()


def end_offsets(cfg: KafkaSettings, topic: str, settle_ms: int = 300) -> dict[int, int]:
    """The next offset to be written in each partition of ``topic``, as of now.

    ``KafkaConsumer.end_offsets`` is the broker's answer; some Kafka-compatible
    brokers (the local one among them) answer with the first offset of the last
    record batch rather than the high watermark. So each partition is also read
    from that answer onwards, briefly, and the true end is the offset after the
    last record found there.
    """
    from kafka import TopicPartition

    consumer = make_consumer(cfg, None)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic)
                                                          or ())]
        if not parts:
            return {}
        reported = consumer.end_offsets(parts)
        out = {tp.partition: int(off) for tp, off in reported.items()}
        consumer.assign(parts)
        for tp in parts:
            consumer.seek(tp, out[tp.partition])
        deadline = time.monotonic() + settle_ms / 1000.0
        while time.monotonic() < deadline:
            got = consumer.poll(timeout_ms=100, max_records=10_000)
            if not got:
                break
            for tp, records in got.items():
                out[tp.partition] = max(out[tp.partition], records[-1].offset + 1)
        return out
    finally:
        consumer.close()
