"""Thin kafka-python wrappers: one place that knows how our clients are configured."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError

from stream_rec.settings import KafkaSettings

log = logging.getLogger(__name__)
T = TypeVar("T")


class BrokerUnavailable(RuntimeError):
    """No broker answered at the configured bootstrap address."""


def make_producer(cfg: KafkaSettings, **overrides: Any) -> KafkaProducer:
    """A producer that waits for all replicas and batches briefly (5 ms).

    Compression and the largest request follow ``kafka.compression_type`` and
    ``kafka.max_request_size``. Sends are asynchronous: callers check each
    future (or flush and check), since a rejected record raises nowhere else.
    """
    kw: dict[str, Any] = {"acks": "all", "linger_ms": 5, "retries": 5,
                          "max_request_size": cfg.max_request_size,
                          "compression_type": cfg.compression_type}
    kw.update(overrides)
    return _connect(cfg, KafkaProducer, kw)


def make_consumer(cfg: KafkaSettings, group_id: str | None, **overrides: Any) -> KafkaConsumer:
    """A consumer with manual commits: offsets follow durable snapshots, never a timer.

    Consumers never create topics (a broker with auto-creation on would
    otherwise create any topic a consumer merely looks up). Every codec
    (gzip, snappy, lz4, zstd) is read: the libraries are dependencies.
    """
    kw: dict[str, Any] = {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "allow_auto_create_topics": False,
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


def end_offsets(consumer: Any, tps: list[TopicPartition], probe_s: float = 3.0
                ) -> dict[TopicPartition, int]:
    """Each partition's end offset (next offset to be written), checked by reading.

    Some Kafka-compatible brokers (the local one among them) answer ListOffsets
    with the base offset of the last record batch plus one, which undercounts
    when a batch holds several records. So the reported end is confirmed by
    reading from ``end - 1`` until nothing more arrives (at most ``probe_s``),
    and the true end is the last offset read plus one. On a broker that reports
    exact ends this only reads the newest record. Leaves nothing assigned.
    """
    ends = dict(consumer.end_offsets(tps))
    begins = consumer.beginning_offsets(tps)
    probe = [tp for tp in tps if ends[tp] > begins[tp]]
    if not probe:
        return ends
    consumer.assign(probe)
    for tp in probe:
        consumer.seek(tp, ends[tp] - 1)
    seen: set[TopicPartition] = set()
    deadline = time.monotonic() + probe_s
    while time.monotonic() < deadline:
        got = consumer.poll(timeout_ms=300 if len(seen) == len(probe) else 1000,
                            max_records=10_000)
        if not got and len(seen) == len(probe):
            break
        for tp, recs in got.items():
            if recs:
                seen.add(tp)
                ends[tp] = max(ends[tp], recs[-1].offset + 1)
    consumer.unsubscribe()
    return ends


def topic_end_offsets(cfg: KafkaSettings, topic: str) -> dict[int, int]:
    """:func:`end_offsets` of every partition of ``topic``, by partition number.

    Opens and closes its own consumer; for callers that hold none.
    """
    consumer = make_consumer(cfg, None)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        return {tp.partition: off for tp, off in end_offsets(consumer, tps).items()} if tps else {}
    finally:
        consumer.close()
