"""``stream-rec worker``: consume micro-batches, learn, publish versions, then commit.

One writer per store: a worker first takes the store's writer lease
(:mod:`stream_rec.snapshot.lease`). While another live worker holds it, it
waits as a standby -- not in the consumer group, ``/healthz`` saying so --
and takes over when the holder stops renewing. Holding the lease, it
restores the newest version, joins the group and runs one loop, on one thread
(kafka-python's consumer is not thread-safe): poll a micro-batch from the
source, decode it, dead-letter the bad, learn the good, and every
``worker.publish_interval_ms`` hand a copy to the publisher thread through the
:class:`~stream_rec.worker.checkpoint.Checkpoint`, whose docstring gives the
commit sequence. A worker that loses the lease, or loses the race for a
version number to another writer, is fenced: it publishes nothing more and
exits non-zero. Following the live group or replaying a bounded range is the
choice of source (:mod:`.source`), not a branch through the loop.
Before a version is published the :class:`~.topic.TopicGuard` confirms that
the topic is still the one its offsets refer to (:meth:`Worker.confirm_topic`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from stream_rec import shutdown
from stream_rec.events import Batch, Contract, decode_columns
from stream_rec.faults import failpoint
from stream_rec.ingest.dlq import DeadLetterWriter, dead_letter_poisoned
from stream_rec.ingest.kafka import make_producer, require_topics
from stream_rec.metrics import WorkerMetrics, dead_letter_reason_label
from stream_rec.model import StreamingModel
from stream_rec.settings import Settings
from stream_rec.snapshot import Fenced, Manifest, SnapshotStore
from stream_rec.snapshot.lease import Lease
from stream_rec.snapshot.publisher import FullPolicy

from .catalogue import Catalogue
from .checkpoint import Checkpoint, NonFinite
from .health import Health, LeaseKeeper
from .source import BoundedSource, Bounds, GroupSource
from .topic import TopicGuard

log = logging.getLogger(__name__)

FIRST_RECORD_WAIT_MS = 500


class Worker:
    """One source, one model, one snapshot store.

    With ``bounds`` it replays explicit partitions (no consumer group, no
    offset commits), applies exactly the records below ``bounds.stop`` and
    returns once every partition has reached its end.
    """

    def __init__(self, settings: Settings, store: SnapshotStore | None = None,
                 metrics: WorkerMetrics | None = None,
                 on_publish: Callable[[int], None] | None = None,
                 bounds: Bounds | None = None, stop: threading.Event | None = None) -> None:
        self.settings = settings
        self.kafka = settings.kafka
        self.store = store or SnapshotStore(settings.store.path, settings.store.keep_versions,
                                            vector_dtype=settings.store.vector_dtype)
        self.lease = Lease(self.store.backend, ttl_s=settings.worker.lease_ttl_s)
        self.store.writer = self.lease.holder
        self.metrics = metrics or WorkerMetrics()
        self.on_publish = on_publish
        self.stop_requested = stop if stop is not None else threading.Event()
        self.checkpoint = Checkpoint(
            self.store, self.kafka.topic,
            FullPolicy(max_chain=settings.worker.full_every_versions,
                       max_age_s=settings.worker.full_every_s),
            on_durable=self._durable)
        self.health = Health(settings.worker.stall_after_s)
        self.contract = Contract(settings.events)
        self._unpublished: list[Any] = []  # records applied since the last version submitted
        self.guard = TopicGuard(self.kafka, settings.worker.on_offset_out_of_range,
                                held=lambda: self.checkpoint.offsets,
                                held_topic_id=lambda: self.checkpoint.topic_id,
                                reposition=self.checkpoint.reposition,
                                on_wait=self.health.wait_for)
        self.source: GroupSource | BoundedSource = (
            GroupSource(self.kafka, self.guard, self.rewind_to_published)
            if bounds is None else BoundedSource(self.kafka, bounds, self.guard))
        self.model: StreamingModel | None = None
        self.catalogue: Catalogue | None = None   # with content: the items topic
        # Monotonic time consumption began (after lease, restore and start-up), for benchmarks.
        self.consuming_since: float | None = None

    # -- what the checkpoint holds, for callers and tests -------------------
    @property
    def offsets(self) -> dict[int, int]:
        return self.checkpoint.offsets

    @property
    def version(self) -> int | None:
        return self.checkpoint.version

    @property
    def events(self) -> int:
        return self.checkpoint.events

    def reached_end(self) -> bool:
        return self.source.reached_end(self.checkpoint.offsets)

    # -- lifecycle -------------------------------------------------------
    def restore(self) -> StreamingModel:
        return self.checkpoint.restore(self.settings.model, self.settings.worker.device)

    def install_signal_handlers(self) -> None:
        """SIGTERM / Ctrl+C finish the batch in hand, publish, commit; a second one exits."""
        shutdown.install(self.stop_requested)

    def run(self) -> int:
        """Consume until asked to stop; returns the process exit code.

        0 after a requested stop (also while waiting as a standby, or before
        starting); :class:`~stream_rec.snapshot.Fenced` propagates when another
        writer took the store over.
        """
        if not self.await_lease():
            return 0
        keeper = LeaseKeeper(self.lease, self.health).start()
        try:
            return self._run_holding_lease()
        finally:
            keeper.stop()
            self.lease.release()

    def await_lease(self) -> bool:
        """Take the writer lease, waiting as a standby while a live worker holds it.

        Returns ``False`` when asked to stop first. A bounded run (replay)
        does not wait: a store another worker writes is not a replay target.
        """
        poll_s = self.settings.worker.standby_poll_s
        while not self.stop_requested.is_set():
            if self.lease.try_acquire():
                self.health.role = "starting"  # restoring; "active" once consuming
                return True
            holder = self.lease.current()
            if isinstance(self.source, BoundedSource):
                raise Fenced(f"{self.store.url} is being written by {holder and holder.holder}")
            if self.health.role != "standby":
                log.warning("standby: %s holds the writer lease of %s; taking over when it "
                            "stops renewing", holder and holder.holder, self.store.url)
            self.health.standby(holder)
            self.stop_requested.wait(poll_s)
        return False

    def _run_holding_lease(self) -> int:
        wcfg = self.settings.worker
        if wcfg.torch_threads:
            import torch

            torch.set_num_threads(wcfg.torch_threads)
        self.model = self.restore()
        if self.stop_requested.is_set():
            log.info("stop requested while starting: exiting before consuming")
            return 0
        # The consumed topic is never created here: the source waits for it.
        if not self.source.open(self.stop_requested):
            self.guard.close()
            log.info("stopped while waiting for topic %s", self.kafka.topic)
            return 0
        self.health.active()
        self.consuming_since = time.monotonic()
        # Dead letters: their topic is created when missing if kafka.create_topics allows.
        require_topics(self.kafka, [self.kafka.dlq_topic])
        dlq = DeadLetterWriter(make_producer(self.kafka), self.kafka.dlq_topic)
        publisher = self.checkpoint.start_publisher()
        if self.model.cfg.content_dim:
            self.catalogue = Catalogue(self.settings, self.metrics)
        last_publish = last_check = time.monotonic()
        try:
            while not self.stop_requested.is_set() and not self.reached_end():
                self._check_lease()
                records = self.poll_batch(wcfg.batch_max_events, wcfg.batch_max_ms)
                if records:
                    self.apply(records, dlq)
                if self.catalogue is not None:   # never waits: clicks are not held up
                    assert self.model is not None
                    self.catalogue.tick(self.checkpoint, self.model)
                self.commit_published()
                if publisher.busy():
                    continue
                now = time.monotonic()
                publish = self.checkpoint.dirty and self.source.may_publish() \
                    and now - last_publish >= wcfg.publish_interval_ms / 1000.0
                if publish or now - last_check >= wcfg.topic_check_interval_s:
                    last_check = now
                    if self.confirm_topic() and publish:
                        self._check_lease()
                        self.publish(dlq)
                        last_publish = time.monotonic()
            # Shutdown: let the version in flight land, publish the rest, commit.
            publisher.wait_idle()
            if self.checkpoint.dirty and self.source.may_publish() and self.confirm_topic():
                self._check_lease()
                self.publish(dlq)
                publisher.wait_idle()
                if self.checkpoint.dirty:  # a poisoned batch was dead-lettered: record the skip
                    self.publish(dlq)
                    publisher.wait_idle()
            self.commit_published()
        finally:
            publisher.close()
            self.source.close()
            self.guard.close()
            dlq.close()
            if self.catalogue is not None:
                self.catalogue.close()
        log.info("worker stopped at version %s, offsets %s", self.version, self.offsets)
        return 0

    def confirm_topic(self) -> bool:
        """May what the worker holds be published? Only while the topic is the one it read.

        Records read after the topic was deleted and recreated come from the
        new topic at the old offsets (some brokers serve them without an
        error), so on a new topic id nothing since the last version is
        published: under ``worker.on_offset_out_of_range = "fail"`` (and
        always for a bounded run) the worker stops with the offsets it was at
        and the new log's; otherwise it rewinds to the last version and every
        partition resumes at the new topic's start (or end).
        """
        verdict = self.guard.confirm()
        if verdict == "recreated":
            if self.guard.policy == "fail" or not self.source.resets_on_recreation:
                self.guard.recreated(held=self.checkpoint.published_offsets(), policy="fail")
            self.rewind_to_published()
            self.source.seek(self.guard.recreated())
        elif verdict != "same":
            return False
        self.checkpoint.topic_id = self.guard.topic_id()  # what the next version records
        return True

    def publish(self, dlq: DeadLetterWriter) -> None:
        """Hand the next version to the publisher -- unless training made the model non-finite.

        The second line of defence behind event validation: a model with NaN
        or infinite rows is never published (servers would load it, restarts
        restore it and replays reproduce it). The worker returns to its newest
        durable version, dead-letters every record applied since -- the batch
        that poisoned it is among them -- with the reason, and goes on.
        """
        assert self.model is not None
        if self.catalogue is not None:
            self.catalogue.flush()
        try:
            self.checkpoint.publish(self.model, dlq)
        except NonFinite as exc:
            self._quarantine(str(exc), dlq)
            return
        self._unpublished.clear()

    def _quarantine(self, why: str, dlq: DeadLetterWriter) -> None:
        records, self._unpublished = self._unpublished, []
        log.error("training produced %s: returning to version %s and dead-lettering the %d "
                  "records applied since", why, self.checkpoint.publisher
                  and self.checkpoint.publisher.parent and self.checkpoint.publisher.parent.version,
                  len(records))
        assert self.model is not None
        self.model = self.checkpoint.rewind(self.model, self.settings.model,
                                            self.settings.worker.device, force=True)
        self._rewind_catalogue()
        dead_letter_poisoned(records, why, dlq, self.metrics)
        dlq.flush()
        self.checkpoint.advance(records)

    def _check_lease(self) -> None:
        """Fenced once the lease was lost or not renewed for its whole TTL."""
        if not self.lease.held():
            raise Fenced(f"the writer lease of {self.store.url} was lost "
                         f"(not renewed for {self.lease.ttl_s:g} s, or taken over)")

    def rewind_to_published(self) -> None:
        """On losing partitions: back to the newest durable version (see Checkpoint.rewind)."""
        self._unpublished.clear()  # they will be delivered again
        if self.model is not None:
            self.model = self.checkpoint.rewind(self.model, self.settings.model,
                                                self.settings.worker.device)
            self._rewind_catalogue()

    def _rewind_catalogue(self) -> None:
        if self.catalogue is not None:
            self.catalogue.rewound(self.checkpoint)

    # -- the loop's steps ------------------------------------------------
    def poll_batch(self, max_events: int, max_ms: int) -> list[Any]:
        """Records up to ``max_events``, waiting at most ``max_ms`` after the first arrives."""
        records: list[Any] = []
        deadline: float | None = None
        generation = self.source.generation
        while len(records) < max_events and not self.stop_requested.is_set():
            if deadline is None:
                timeout = FIRST_RECORD_WAIT_MS
            else:
                timeout = int((deadline - time.monotonic()) * 1000)
                if timeout <= 0:
                    break
            got = self.source.poll(timeout, max_events - len(records))
            self.metrics.polled(self.source.consumer, self.checkpoint.offsets, got)
            self.health.polled(self.source.consumer, bool(got))
            if self.source.generation != generation:
                # The rebalance rewound to the published offsets and seeks there:
                # records in hand will be delivered again, so keeping them would
                # apply them twice.
                records.clear()
                deadline = None
                generation = self.source.generation
            offsets = self.checkpoint.offsets
            for recs in got.values():
                records.extend(r for r in recs if r.offset >= offsets.get(r.partition, 0))
            if records and deadline is None:
                deadline = time.monotonic() + max_ms / 1000.0
            if not got and deadline is None:
                break
        return records

    def apply(self, records: list[Any], dlq: DeadLetterWriter) -> None:
        """Decode, dead-letter the bad, learn the good, advance the offsets."""
        t0 = time.perf_counter()
        records, done = self.source.admit(records)
        if not records:
            self.checkpoint.advance([], done)
            return
        self._unpublished.extend(records)
        batch = decode_columns(records, self.contract)
        for err in batch.dead_letters:
            dlq.send(err)
            self.metrics.dead_letters.labels(dead_letter_reason_label(err)).inc()
        if len(batch.ts):
            self.learn(batch)
        failpoint("in_batch")  # learnt, offsets not yet advanced
        self.checkpoint.advance(records, done)
        self.metrics.batches.inc()
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)

    def learn(self, batch: Batch) -> None:
        """Learn the accepted events; the watermark moves only with them."""
        assert self.model is not None
        changed = self.model.learn(batch.user_ids, batch.item_ids, batch.ts, batch.weight)
        n = len(batch.ts)
        self.checkpoint.learned(changed, n, batch.max_ts())
        self.metrics.events.inc(n)
        if self.checkpoint.watermark is not None:
            self.metrics.watermark.set(self.checkpoint.watermark)

    def commit_published(self) -> None:
        """Commit the offsets of versions the publisher has made durable."""
        self.checkpoint.commit_durable(self)

    def commit(self, offsets: dict[int, int]) -> bool:
        """Commit through the source; a commit the broker took is contact for health."""
        if self.source.commit(offsets):
            self.health.committed()
            return True
        return False

    def _durable(self, manifest: Manifest) -> None:
        assert self.checkpoint.publisher is not None
        self.metrics.publishes.inc()
        self.metrics.publish_seconds.observe(self.checkpoint.publisher.seconds_last)
        self.metrics.version.set(manifest.version)
        self.metrics.users.set(manifest.counts["users"])
        self.metrics.items.set(manifest.counts["items"])
        log.debug("published %s version %d (%s events, watermark %s)", manifest.kind,
                  manifest.version, manifest.counts.get("events"), manifest.watermark)
        if self.on_publish:
            self.on_publish(manifest.version)
