"""``stream-rec worker``: consume micro-batches, learn, publish versions, then commit.

The published snapshot is the checkpoint. Its manifest carries the next offset
of every partition whose events it includes; offsets are committed to Kafka
only after that version is durable, and on start the worker restores the
newest valid version and seeks every assigned partition to the offsets it
records (partitions it does not record start from the beginning). A crash at
any instant therefore loses nothing and applies nothing twice relative to the
restored state.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from stream_rec.events import Decoded, decode_batch
from stream_rec.ingest.dlq import DeadLetterWriter
from stream_rec.ingest.kafka import ensure_topics, make_consumer, make_producer
from stream_rec.metrics import WorkerMetrics, dead_letter_reason_label
from stream_rec.model import StreamingModel
from stream_rec.settings import Settings
from stream_rec.snapshot import Manifest, SnapshotStore, delta_from_state
from stream_rec.snapshot.publisher import FullPolicy, Publisher, PublishJob

log = logging.getLogger(__name__)

FIRST_RECORD_WAIT_MS = 500


class _SeekToSnapshot(ConsumerRebalanceListener):
    """On assignment, position each partition where the restored snapshot left it."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        consumer = self.worker.consumer
        fresh = []
        for tp in assigned:
            offset = self.worker.offsets.get(tp.partition)
            if offset is None:
                fresh.append(tp)
            else:
                consumer.seek(tp, offset)
        if fresh:
            consumer.seek_to_beginning(*fresh)
        log.info("partitions assigned: %s (from snapshot offsets %s)",
                 sorted(tp.partition for tp in assigned), self.worker.offsets)


@dataclass(frozen=True)
class Bounds:
    """A bounded run over explicit partitions (replay), instead of following a group.

    ``start`` is where each partition begins when the store has no snapshot yet
    (a snapshot's offsets win, which makes a bounded run resumable and
    idempotent); ``stop`` is each partition's end offset, exclusive.
    """

    start: dict[int, int]
    stop: dict[int, int]


class Worker:
    """One consumer, one model, one snapshot store.

    With ``bounds`` it assigns the partitions itself (no consumer group, no
    offset commits), applies exactly the records below ``bounds.stop`` and
    returns once every partition has reached its end.
    """

    def __init__(self, settings: Settings, store: SnapshotStore | None = None,
                 metrics: WorkerMetrics | None = None,
                 on_publish: Callable[[int], None] | None = None,
                 bounds: Bounds | None = None) -> None:
        self.settings = settings
        self.bounds = bounds
        self.kafka = settings.kafka
        self.store = store or SnapshotStore(settings.store.path, settings.store.keep_versions)
        self.metrics = metrics or WorkerMetrics()
        self.on_publish = on_publish
        self.stop_requested = threading.Event()
        self.offsets: dict[int, int] = {}
        self.watermark: int | None = None
        self.version: int | None = None
        self.dirty = False
        self.events = 0  # valid events in the model (restored from the snapshot)
        self.consumer: Any = None
        self.model: StreamingModel | None = None
        self.publisher: Publisher | None = None
        self.policy = FullPolicy(max_chain=settings.worker.full_every_versions,
                                 max_age_s=settings.worker.full_every_s)
        self._changed_users: list[np.ndarray] = []
        self._changed_items: list[np.ndarray] = []
        self._restored: Manifest | None = None

    # -- lifecycle -------------------------------------------------------
    def restore(self) -> StreamingModel:
        snapshot = self.store.load_latest_valid()
        device = self.settings.worker.device
        if snapshot is None:
            log.info("no snapshot in %s: starting from an empty model", self.store.url)
            return StreamingModel(self.settings.model, device=device)
        m = snapshot.manifest
        self.offsets = dict(m.offsets.get(self.kafka.topic, {}))
        self.watermark = m.watermark
        self.version = m.version
        self.events = int(m.counts.get("events", 0))
        self._restored = m
        log.info("restored version %d: %s events, offsets %s", m.version,
                 m.counts.get("events"), self.offsets)
        return StreamingModel.from_state(snapshot.state, device=device)

    def request_stop(self, *_: object) -> None:
        if self.stop_requested.is_set():
            log.warning("second stop request: exiting now")
            raise SystemExit(130)
        log.info("stop requested: finishing the batch in hand, publishing, committing")
        self.stop_requested.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> int:
        """Consume until asked to stop; returns the process exit code."""
        wcfg = self.settings.worker
        self.model = self.restore()
        ensure_topics(self.kafka, [self.kafka.topic, self.kafka.dlq_topic])
        dlq = DeadLetterWriter(make_producer(self.kafka), self.kafka.dlq_topic)
        self.consumer = self._open_consumer()
        self.publisher = Publisher(self.store, self._restored)
        last_publish = time.monotonic()
        try:
            while not self.stop_requested.is_set() and not self.reached_end():
                records = self.poll_batch(wcfg.batch_max_events, wcfg.batch_max_ms)
                if records:
                    self.apply(records, dlq)
                self.commit_published()
                due = time.monotonic() - last_publish >= wcfg.publish_interval_ms / 1000.0
                if self.dirty and due and not self.publisher.busy():
                    self.checkpoint(dlq)
                    last_publish = time.monotonic()
            # Shutdown: let the version in flight land, publish the rest, commit.
            self.publisher.wait_idle()
            if self.dirty:
                self.checkpoint(dlq)
                self.publisher.wait_idle()
            self.commit_published()
        finally:
            self.publisher.close()
            self.consumer.close(autocommit=False)
            dlq.close()
        log.info("worker stopped at version %s, offsets %s", self.version, self.offsets)
        return 0

    def _open_consumer(self) -> Any:
        if self.bounds is None:
            consumer = make_consumer(self.kafka, self.kafka.group_id)
            consumer.subscribe([self.kafka.topic], listener=_SeekToSnapshot(self))
            return consumer
        consumer = make_consumer(self.kafka, None)
        parts = [TopicPartition(self.kafka.topic, p) for p in sorted(self.bounds.stop)]
        consumer.assign(parts)
        for tp in parts:
            consumer.seek(tp, self.offsets.get(tp.partition, self.bounds.start.get(tp.partition, 0)))
        return consumer

    def reached_end(self) -> bool:
        """For a bounded run: has every partition reached its stop offset?"""
        if self.bounds is None:
            return False
        return all(self.offsets.get(p, self.bounds.start.get(p, 0)) >= end
                   for p, end in self.bounds.stop.items())

    # -- the loop's steps ------------------------------------------------
    def poll_batch(self, max_events: int, max_ms: int) -> list[Any]:
        """Records up to ``max_events``, waiting at most ``max_ms`` after the first arrives."""
        records: list[Any] = []
        deadline: float | None = None
        while len(records) < max_events and not self.stop_requested.is_set():
            if deadline is None:
                timeout = FIRST_RECORD_WAIT_MS
            else:
                timeout = int((deadline - time.monotonic()) * 1000)
                if timeout <= 0:
                    break
            got = self.consumer.poll(timeout_ms=timeout, max_records=max_events - len(records))
            self.metrics.polled()
            for recs in got.values():
                records.extend(recs)
            if records and deadline is None:
                deadline = time.monotonic() + max_ms / 1000.0
            if not got and deadline is None:
                break
        return records

    def apply(self, records: list[Any], dlq: DeadLetterWriter) -> None:
        """Decode, dead-letter the bad, learn the good, advance the offsets."""
        t0 = time.perf_counter()
        if self.bounds is not None:
            stop = self.bounds.stop
            records = [r for r in records if r.offset < stop.get(r.partition, 0)]
            for p, end in stop.items():  # a partition whose range is done stays done
                if self.consumer.position(TopicPartition(self.kafka.topic, p)) >= end:
                    self.offsets[p] = max(self.offsets.get(p, 0), end)
            if not records:
                return
        oks, errs = decode_batch(records)
        for err in errs:
            dlq.send(err)
            self.metrics.dead_letters.labels(dead_letter_reason_label(err.reason)).inc()
        if oks:
            self.learn(oks)
        for rec in records:
            if rec.offset + 1 > self.offsets.get(rec.partition, -1):
                self.offsets[rec.partition] = rec.offset + 1
        self.dirty = True
        self.metrics.batches.inc()
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)

    def learn(self, oks: list[Decoded]) -> None:
        assert self.model is not None
        users = [d.event.user_id for d in oks]
        items = [d.event.item_id for d in oks]
        ts = np.fromiter((d.event.ts for d in oks), dtype=np.int64, count=len(oks))
        weights = np.fromiter((d.event.weight for d in oks), dtype=np.float32, count=len(oks))
        changed = self.model.learn(users, items, ts, weights)
        self._changed_users.append(changed.users)
        self._changed_items.append(changed.items)
        top = int(ts.max())
        self.watermark = top if self.watermark is None else max(self.watermark, top)
        self.events += len(oks)
        self.metrics.events.inc(len(oks))
        self.metrics.watermark.set(self.watermark)

    def checkpoint(self, dlq: DeadLetterWriter) -> None:
        """Hand a consistent copy of the model to the publisher (full or delta).

        Runs on the polling thread between batches, so the copy is consistent;
        its cost follows the rows changed since the previous version (a delta)
        unless the full-version policy asks for the whole state.
        """
        assert self.model is not None and self.publisher is not None
        dlq.flush()  # dead letters are durable before the offsets that skip them
        users = np.unique(np.concatenate(self._changed_users)) if self._changed_users \
            else np.zeros(0, np.int64)
        items = np.unique(np.concatenate(self._changed_items)) if self._changed_items \
            else np.zeros(0, np.int64)
        self._changed_users.clear()
        self._changed_items.clear()
        job = PublishJob(offsets={self.kafka.topic: dict(self.offsets)},
                         watermark=self.watermark, events=self.events)
        total = self.model.n_users + self.model.n_items
        if self.policy.wants_full(self.publisher.parent, self.publisher.full_at,
                                  len(users) + len(items), total):
            job.state = self.model.state()
        else:
            job.delta = delta_from_state(self.model.state(), users, items)
        self.publisher.submit(job)
        self.dirty = False

    def commit_published(self) -> None:
        """Commit the offsets of versions the publisher has made durable."""
        assert self.publisher is not None
        done = self.publisher.completed()
        if not done:
            return
        for manifest in done:
            self.metrics.publishes.inc()
            self.metrics.publish_seconds.observe(self.publisher.seconds_last)
            log.debug("published %s version %d (%s events, watermark %s)", manifest.kind,
                      manifest.version, manifest.counts.get("events"), manifest.watermark)
            if self.on_publish:
                self.on_publish(manifest.version)
        last = done[-1]
        self.version = last.version
        self.metrics.version.set(last.version)
        self.metrics.users.set(last.counts["users"])
        self.metrics.items.set(last.counts["items"])
        self.commit(last.offsets.get(self.kafka.topic, {}))

    def commit(self, offsets: dict[int, int]) -> None:
        if self.bounds is not None:
            return  # a bounded run has no group: its snapshot alone records progress
        to_commit = {TopicPartition(self.kafka.topic, p): OffsetAndMetadata(o, "", -1)
                     for p, o in offsets.items()}
        try:
            self.consumer.commit(to_commit)
        except (CommitFailedError, KafkaError) as exc:
            # The snapshot already holds these offsets; a failed commit only
            # means a restart will seek from the snapshot instead.
            log.warning("offset commit failed (the snapshot keeps them): %s", exc)


def run_worker(settings: Settings) -> int:
    worker = Worker(settings)
    worker.install_signal_handlers()
    if settings.worker.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.worker.metrics_port, registry=worker.metrics.registry)
    return worker.run()
