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
from stream_rec.faults import failpoint
from stream_rec.ingest.dlq import DeadLetterWriter
from stream_rec.ingest.kafka import make_consumer, make_producer, require_topics
from stream_rec.metrics import WorkerMetrics, dead_letter_reason_label
from stream_rec.model import StreamingModel
from stream_rec.settings import Settings
from stream_rec.snapshot import Manifest, SnapshotStore
from stream_rec.snapshot.publisher import FullPolicy, Publisher, PublishJob

log = logging.getLogger(__name__)

FIRST_RECORD_WAIT_MS = 500


class _SeekToSnapshot(ConsumerRebalanceListener):
    """On assignment, position each partition where the restored snapshot left it."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))
        if revoked:
            self.worker.rewind_to_published()

    def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        log.warning("partitions lost (evicted from the group): %s",
                    sorted(tp.partition for tp in lost))
        if lost:
            self.worker.rewind_to_published()

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


class Health:
    """Liveness as the broker side sees it, for ``/healthz`` and the log.

    A stalled broker does not make ``poll`` fail: it returns nothing, as an
    idle topic does. So contact is counted only from evidence that the broker
    answered: a poll that returned records, a successful offset commit, or a
    group heartbeat response (kafka-python's coordinator records its time).
    A polling loop that is itself stuck stops refreshing all three.
    """

    def __init__(self, stall_after_s: float) -> None:
        self.stall_after_s = stall_after_s
        self.last_contact = time.monotonic()
        self.last_records: float | None = None
        self.last_commit: float | None = None
        self._reported = False

    def polled(self, consumer: Any, got_records: bool) -> None:
        now = time.monotonic()
        self._log_transition(now)  # a poll blocked through the stall still reports it
        if got_records:
            self.last_records = self.last_contact = now
        heartbeat = getattr(getattr(consumer, "_coordinator", None), "heartbeat", None)
        answered = getattr(heartbeat, "last_receive", None)
        if isinstance(answered, float) and answered != float("inf") \
                and answered > self.last_contact:
            self.last_contact = answered
        self._log_transition(now)

    def committed(self) -> None:
        self.last_commit = self.last_contact = time.monotonic()

    def _log_transition(self, now: float) -> None:
        stalled = now - self.last_contact > self.stall_after_s
        if stalled and not self._reported:
            log.warning("stalled: no answer from the broker for %.0f s", now - self.last_contact)
        elif not stalled and self._reported:
            log.warning("broker answers again: resuming")
        self._reported = stalled

    def check(self) -> tuple[bool, dict[str, Any]]:
        """:meth:`status`, logging a stall the moment it is seen (from any thread)."""
        self._log_transition(time.monotonic())
        return self.status()

    def status(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, details) for the health endpoint."""
        now = time.monotonic()
        age = now - self.last_contact
        body: dict[str, Any] = {
            "status": "ok", "seconds_since_broker_contact": round(age, 1),
            "seconds_since_records": None if self.last_records is None
            else round(now - self.last_records, 1),
            "seconds_since_commit": None if self.last_commit is None
            else round(now - self.last_commit, 1)}
        if age > self.stall_after_s:
            body["status"] = "stalled"
            body["reason"] = (f"no successful poll, heartbeat or commit for {age:.0f} s "
                              f"(limit {self.stall_after_s:g} s): broker unreachable or stalled")
            return False, body
        return True, body


def serve_health(worker: Worker, port: int, host: str = "0.0.0.0") -> Any:
    """``/healthz`` (200, or 503 with the reason) and ``/metrics`` on a daemon thread."""
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] == "/healthz":
                ok, body = worker.health.check()
                data, ctype, code = json.dumps(body).encode(), "application/json", \
                    200 if ok else 503
            elif self.path.split("?", 1)[0] == "/metrics":
                data, ctype, code = generate_latest(worker.metrics.registry), \
                    CONTENT_TYPE_LATEST, 200
            else:
                data, ctype, code = b"not found", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="worker-health", daemon=True).start()
    return server


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
        self.rebalances = 0  # partitions revoked or lost so far (records in hand are stale)
        self._last_poll = time.monotonic()  # when the consumer was last polled
        self.health = Health(settings.worker.stall_after_s)

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
        if wcfg.torch_threads:
            import torch

            torch.set_num_threads(wcfg.torch_threads)
        self.model = self.restore()
        require_topics(self.kafka, [self.kafka.topic, self.kafka.dlq_topic])
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
                if self.dirty and due and not self.publisher.busy() and self.still_member():
                    self.checkpoint(dlq)
                    last_publish = time.monotonic()
            # Shutdown: let the version in flight land, publish the rest, commit.
            self.publisher.wait_idle()
            if self.dirty and self.still_member():
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

    def still_member(self) -> bool:
        """May the worker publish what it holds? Not after overrunning the poll interval.

        A batch that took longer than ``max_poll_interval_ms`` got this member
        evicted: its partitions may already be someone else's, who starts from
        the committed (= published) offsets. Publishing the batch would then
        apply its events twice across the group. The next poll rejoins, the
        rebalance rewinds to the published version, and the events are read
        again by whoever owns them now.
        """
        if self.bounds is not None:
            return True
        overran = time.monotonic() - self._last_poll > self.kafka.max_poll_interval_ms / 1000.0
        if overran:
            log.warning("batch overran max_poll_interval_ms: not publishing before rejoining")
        return not overran

    def rewind_to_published(self) -> None:
        """On losing partitions, drop what was learnt since the newest durable version.

        Unpublished events may come from partitions that now belong to another
        member, which will read them from the committed offsets; keeping them
        would put them in a later version as well. The worker returns to its
        own last published version (model, offsets, counts) and the assignment
        that follows seeks every partition to that version's offsets.
        """
        self.rebalances += 1
        if self.publisher is None or self.model is None:
            return
        self.publisher.wait_idle()
        published = self.publisher.parent
        target = dict(published.offsets.get(self.kafka.topic, {})) if published else {}
        if target == self.offsets:
            return  # nothing learnt since the last durable version
        log.warning("rebalance: discarding events learnt after version %s (offsets %s -> %s)",
                    published.version if published else None, self.offsets, target)
        device = self.settings.worker.device
        snapshot = self.store.load(published.version) if published else None
        if snapshot is None:
            self.model = StreamingModel(self.settings.model, device=device)
            self.watermark, self.events = None, 0
        else:
            self.model = StreamingModel.from_state(snapshot.state, device=device)
            self.watermark = snapshot.manifest.watermark
            self.events = int(snapshot.manifest.counts.get("events", 0))
        self.offsets = target
        self._changed_users.clear()
        self._changed_items.clear()
        self.dirty = False

    # -- the loop's steps ------------------------------------------------
    def poll_batch(self, max_events: int, max_ms: int) -> list[Any]:
        """Records up to ``max_events``, waiting at most ``max_ms`` after the first arrives."""
        records: list[Any] = []
        deadline: float | None = None
        generation = self.rebalances
        while len(records) < max_events and not self.stop_requested.is_set():
            if deadline is None:
                timeout = FIRST_RECORD_WAIT_MS
            else:
                timeout = int((deadline - time.monotonic()) * 1000)
                if timeout <= 0:
                    break
            got = self.consumer.poll(timeout_ms=timeout, max_records=max_events - len(records))
            self._last_poll = time.monotonic()
            self.metrics.polled(self.consumer, self.offsets, got)
            self.health.polled(self.consumer, bool(got))
            if self.rebalances != generation:
                # The rebalance rewound to the published offsets and seeks there:
                # records in hand will be delivered again, so keeping them would
                # apply them twice.
                records.clear()
                deadline = None
                generation = self.rebalances
            for recs in got.values():
                records.extend(r for r in recs if r.offset >= self.offsets.get(r.partition, 0))
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
        failpoint("in_batch")  # learnt, offsets not yet advanced
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
            job.delta = self.model.delta(users, items)
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
        failpoint("before_commit")  # durable version, offsets not yet committed
        self.commit(last.offsets.get(self.kafka.topic, {}))

    def commit(self, offsets: dict[int, int]) -> None:
        if self.bounds is not None:
            return  # a bounded run has no group: its snapshot alone records progress
        # Only partitions this member owns: committing a lost partition's older
        # offset would move its new owner's committed position backwards.
        owned = {tp.partition for tp in self.consumer.assignment()}
        to_commit = {TopicPartition(self.kafka.topic, p): OffsetAndMetadata(o, "", -1)
                     for p, o in offsets.items() if p in owned}
        if not to_commit:
            return
        try:
            self.consumer.commit(to_commit)
            self.health.committed()
        except (CommitFailedError, KafkaError) as exc:
            # The snapshot already holds these offsets; a failed commit only
            # means a restart will seek from the snapshot instead.
            log.warning("offset commit failed (the snapshot keeps them): %s", exc)


def run_worker(settings: Settings) -> int:
    worker = Worker(settings)
    worker.install_signal_handlers()
    if settings.worker.metrics_port:
        serve_health(worker, settings.worker.metrics_port)
    return worker.run()
