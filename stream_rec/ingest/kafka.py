"""Thin kafka-python wrappers: one place that knows how our clients are configured."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError

from stream_rec.ingest.security import ClientKind, options_for
from stream_rec.settings import KafkaSettings

log = logging.getLogger(__name__)
T = TypeVar("T")


class BrokerUnavailable(RuntimeError):
    """No broker answered at the configured bootstrap address."""


class TopicMissing(RuntimeError):
    """A topic stream-rec needs does not exist and it was not asked to create it."""


def make_producer(cfg: KafkaSettings, **overrides: Any) -> KafkaProducer:
    """A producer that waits for all replicas and batches briefly (5 ms).

    Compression and the largest request follow ``kafka.compression_type`` and
    ``kafka.max_request_size``. Sends are asynchronous: callers check each
    future (or flush and check), since a rejected record raises nowhere else.
    """
    kw: dict[str, Any] = {"acks": "all", "linger_ms": 5, "retries": 5,
                          "max_request_size": cfg.max_request_size,
                          "compression_type": cfg.compression_type}
    kw["allow_auto_create_topics"] = cfg.create_topics
    kw.update(overrides)
    return _connect(cfg, KafkaProducer, "producer", kw)


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
    return _connect(cfg, KafkaConsumer, "consumer", kw)


def make_admin(cfg: KafkaSettings) -> KafkaAdminClient:
    return _connect(cfg, KafkaAdminClient, "admin", {})


def client_config(cfg: KafkaSettings, kind: ClientKind, kw: dict[str, Any]) -> dict[str, Any]:
    """Every keyword a ``kind`` client is built with: connection and security from
    settings, then our defaults (``kw``), then the settings' ``client_options`` that
    this kind of client knows (so an operator's option wins over our default)."""
    return {**cfg.client_kwargs(), **kw, **options_for(kind, cfg.client_options)}


def _connect(cfg: KafkaSettings, factory: Callable[..., T], kind: ClientKind,
             kw: dict[str, Any]) -> T:
    """Build a client, turning "nobody answers" into :class:`BrokerUnavailable`."""
    try:
        return factory(**client_config(cfg, kind, kw))
    except KafkaTimeoutError as exc:
        raise BrokerUnavailable(
            f"no Kafka broker answers at {cfg.bootstrap} "
            f"(waited {cfg.bootstrap_timeout_ms / 1000:.0f} s)") from exc


def ensure_topics(cfg: KafkaSettings, topics: list[str], partitions: int | None = None,
                  replication_factor: int | None = None) -> list[str]:
    """Create those of ``topics`` that are missing; returns the names created.

    An explicit request: it creates whatever ``kafka.create_topics`` says, with
    ``partitions`` and ``replication_factor`` defaulting to the settings'. A
    topic another client creates at the same moment counts as existing.
    """
    partitions = partitions or cfg.partitions
    replication = replication_factor or cfg.replication_factor
    admin = make_admin(cfg)
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            spec = {"num_partitions": partitions, "replication_factor": replication}
            try:
                admin.create_topics({t: dict(spec) for t in missing}, wait_for_metadata=True)
            except TopicAlreadyExistsError:
                pass
            except KafkaError as exc:  # a racing creator is fine, anything else is not
                if "TopicAlreadyExists" not in repr(exc):
                    raise
            log.info("created topics %s (%d partitions, replication %d)",
                     missing, partitions, replication)
        return missing
    finally:
        admin.close()


def require_topics(cfg: KafkaSettings, topics: list[str]) -> None:
    """Topics a worker or producer is about to use: created only when settings ask.

    With ``kafka.create_topics`` off (the default) a missing topic is an error
    that names the fix, rather than a topic made with whatever partitions and
    replication the broker would pick.
    """
    if cfg.create_topics:
        ensure_topics(cfg, topics)
        return
    admin = make_admin(cfg)
    try:
        existing = set(admin.list_topics())
    finally:
        admin.close()
    missing = [t for t in topics if t not in existing]
    if missing:
        raise TopicMissing(
            f"topic{'s' if len(missing) > 1 else ''} {', '.join(missing)} not found at "
            f"{cfg.bootstrap}: create {'them' if len(missing) > 1 else 'it'} with "
            f"`stream-rec topics create` or set kafka.create_topics = true "
            f"(STREAM_REC_KAFKA__CREATE_TOPICS=true)")


def describe_topics(cfg: KafkaSettings, topics: list[str] | None = None
                    ) -> list[dict[str, Any]]:
    """Name, partition count and replication factor of ``topics`` (default: all but
    internal ones), sorted by name."""
    admin = make_admin(cfg)
    try:
        names = topics if topics is not None else sorted(
            t for t in admin.list_topics() if not t.startswith("__"))
        if not names:
            return []
        described = admin.describe_topics(names)
    finally:
        admin.close()
    rows = []
    for t in described:
        parts = t.get("partitions") or []
        rows.append({"topic": t["name"], "partitions": len(parts),
                     "replication_factor": max((len(p["replica_nodes"]) for p in parts),
                                               default=0),
                     "in_sync_min": min((len(p["isr_nodes"]) for p in parts), default=0),
                     "error_code": t["error_code"]})
    return sorted(rows, key=lambda r: r["topic"])


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


def read_range(consumer: Any, start: dict[TopicPartition, int],
               stop: dict[TopicPartition, int], idle_s: float = 10.0) -> Iterator[Any]:
    """Records of each partition in ``[start, stop)`` via manual assignment (no group).

    Stops when every partition reaches ``stop`` or nothing arrives for
    ``idle_s`` (a range whose tail was deleted by retention).
    """
    todo = {tp: o for tp, o in stop.items() if start.get(tp, 0) < o}
    if not todo:
        return
    consumer.assign(list(todo))
    for tp in todo:
        consumer.seek(tp, start.get(tp, 0))
    last = time.monotonic()
    while todo:
        got = consumer.poll(timeout_ms=500, max_records=2000)
        if not got:
            if all(consumer.position(tp) >= end for tp, end in todo.items()):
                break
            if time.monotonic() - last > idle_s:
                break
            continue
        last = time.monotonic()
        for tp, recs in got.items():
            end = todo.get(tp)
            if end is None:
                continue
            for rec in recs:
                if rec.offset >= end:
                    break
                yield rec
            if consumer.position(tp) >= end:
                del todo[tp]
                consumer.pause(tp)


def read_again(kafka: KafkaSettings, topic: str, since: dict[int, int],
               upto: dict[int, int]) -> Iterator[Any]:
    """The records of ``topic`` in ``[since[p], upto[p])`` per partition, read by a consumer of
    its own (no group, nothing committed) that is closed when the range is done."""
    reader = make_consumer(kafka, None, auto_offset_reset="none")
    try:
        yield from read_range(reader, {TopicPartition(topic, p): o for p, o in since.items()},
                              {TopicPartition(topic, p): o for p, o in upto.items()})
    finally:
        reader.close()
