"""The worker as a pipeline of two processes: this one consumes, a trainer process learns.

Consuming and decoding (kafka-python, about 7 µs of a core per event) and
training (the fast path and the training step) each keep a core busy; in one
process they take turns under one GIL. Here the consumer process polls,
validates with the batched decoder, sends and flushes dead letters and puts
each micro-batch on a shared-memory ring (:mod:`.ring`); the trainer process
(:mod:`.trainer`) learns from the ring and publishes. Offsets of a version are
committed by this process only after the trainer reports it durable, so the
snapshot stays the checkpoint and every guarantee of the serial worker holds:

- a rebalance bumps the source's generation; the trainer rewinds to its
  newest durable version and answers with that version's offsets, where the
  assignment seeks (records in hand, in the ring or in flight are dropped);
- dead letters are flushed before their batch reaches the trainer, so they
  are durable before any version skips them;
- the trainer publishes only batches whose topic this process has confirmed
  since (a recreated topic is never published), only while this process
  holds the writer lease and has not overrun ``kafka.max_poll_interval_ms``;
- the two live and die together: the trainer dies with this process
  (``PR_SET_PDEATHSIG``), and this one dies of the signal that killed the
  trainer (or exits 1 when it failed), publishing nothing more.

SIGTERM finishes the batch in hand: the trainer drains the ring, publishes,
and this process commits, then exits 0.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import time
from typing import Any

from stream_rec.errors import Fatal
from stream_rec.events import decode_columns
from stream_rec.ingest.dlq import DeadLetterWriter, dead_letter_poisoned
from stream_rec.ingest.kafka import (
    make_producer,
    read_again,
    require_topics,
)
from stream_rec.metrics import dead_letter_reason_label

from .loop import Worker
from .ring import Ring
from .trainer import Shared, trainer_main

log = logging.getLogger(__name__)

# Bytes of id text per slot: 64 per id on average; a batch with longer ids goes in pieces.
ID_BYTES_PER_EVENT = 128


class PipelineWorker(Worker):
    """A :class:`~stream_rec.worker.loop.Worker` whose model lives in a trainer process."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard.reposition = self._reposition
        self._ring: Ring | None = None
        self._out: Any = None
        self._shared: Shared | None = None
        self._proc: Any = None
        self._pending: list[tuple[Any, ...]] = []  # trainer messages read while waiting
        # CPU and wait times the trainer reports when it stops (for benchmarks)
        self.trainer_stats: dict[str, float] = {}
        self.checkpoint.durable_offsets = {}

    # -- the process pair ------------------------------------------------------
    def _run_holding_lease(self) -> int:
        wcfg = self.settings.worker
        ctx = mp.get_context("spawn")
        self._ring = Ring(wcfg.ring_slots, wcfg.batch_max_events,
                          wcfg.batch_max_events * ID_BYTES_PER_EVENT)
        self._out = ctx.Queue()
        self._shared = Shared(ctx)
        self._proc = ctx.Process(
            target=trainer_main, name="stream-rec-trainer",
            args=(self.settings, (self.store.url, self.store.keep_versions,
                                  self.store.vector_dtype), self.lease.holder,
                  self._ring.handle(), self._out, self._shared, self.lease.ttl_s,
                  os.getpid()))
        self._proc.start()
        dlq: DeadLetterWriter | None = None
        try:
            _, version, offsets, topic_id = self._expect("restored")
            self.checkpoint.offsets = dict(offsets)
            self.checkpoint.topic_id = topic_id
            self.checkpoint.durable_offsets = dict(offsets)
            self.checkpoint.version = version
            if self.stop_requested.is_set():
                log.info("stop requested while starting: exiting before consuming")
                return self._stop_trainer()
            if not self.source.open(self.stop_requested):
                log.info("stopped while waiting for topic %s", self.kafka.topic)
                return self._stop_trainer()
            self.health.active()
            self.consuming_since = time.monotonic()
            require_topics(self.kafka, [self.kafka.dlq_topic])
            dlq = DeadLetterWriter(make_producer(self.kafka), self.kafka.dlq_topic)
            self._loop(dlq)
            self._messages(dlq)
            if self.confirm_topic():
                self._ring.send(("confirmed", self.checkpoint.topic_id))
            return self._stop_trainer(dlq)
        finally:
            self.source.close()
            self.guard.close()
            if dlq is not None:
                dlq.close()
            if self._proc.is_alive():
                self._proc.join(timeout=10)
                if self._proc.is_alive():
                    self._proc.kill()
            self._ring.close()

    def _loop(self, dlq: DeadLetterWriter) -> None:
        wcfg = self.settings.worker
        assert self._ring is not None and self._shared is not None
        # The trainer publishes at confirmed points: twice per publish interval keeps the
        # versions' cadence close to the interval (a confirmation is one metadata request).
        interval = min(wcfg.publish_interval_ms / 2000.0, wcfg.topic_check_interval_s)
        last_confirm = time.monotonic()
        while not self.stop_requested.is_set() and not self.reached_end():
            self._check_lease()
            self._shared.lease_renewed.value = self.lease.renewed_at
            self._messages(dlq)
            records = self.poll_batch(wcfg.batch_max_events, wcfg.batch_max_ms)
            if records:
                self.apply(records, dlq)
            if time.monotonic() - last_confirm >= interval:
                last_confirm = time.monotonic()
                self._messages(dlq)  # the newest durable offsets, should the topic be new
                if self.confirm_topic():
                    self._ring.send(("confirmed", self.checkpoint.topic_id))

    def _stop_trainer(self, dlq: DeadLetterWriter | None = None) -> int:
        """Ask the trainer to drain the ring, publish and stop; commit what it made durable."""
        assert self._ring is not None
        self._ring.send(("stop",))
        stopped = self._expect("stopped")
        self._messages(dlq)
        self.checkpoint.version = stopped[1]
        self.trainer_stats = stopped[3]
        log.info("worker stopped at version %s, offsets %s", self.version,
                 self.checkpoint.durable_offsets)
        return 0

    # -- messages from the trainer -----------------------------------------------
    def _trainer_alive(self) -> None:
        """A trainer that died takes this process with it (publishing nothing more)."""
        if self._proc.is_alive():
            return
        code = self._proc.exitcode
        if code is not None and code < 0:
            log.error("the trainer process died of signal %d: so does the worker", -code)
            os.kill(os.getpid(), -code)
            time.sleep(5)  # a caught signal: fall through to the error
        raise Fatal(f"the trainer process exited with code {code}")

    def _expect(self, kind: str) -> tuple[Any, ...]:
        """Wait for the trainer's ``kind`` message, keeping the others for later."""
        while True:
            self._trainer_alive()
            try:
                msg = self._out.get(timeout=0.1)
            except queue.Empty:
                continue
            if msg[0] == kind:
                return msg
            if msg[0] == "error":
                raise Fatal(f"the trainer failed: {msg[1]}")
            self._pending.append(msg)

    def _messages(self, dlq: DeadLetterWriter | None) -> None:
        """Handle what the trainer said: commit durable versions, dead-letter poisoned ranges."""
        self._trainer_alive()
        while True:
            if self._pending:
                msg = self._pending.pop(0)
            else:
                try:
                    msg = self._out.get_nowait()
                except queue.Empty:
                    return
            kind = msg[0]
            if kind == "durable":
                _, version, offsets, counts, seconds = msg
                self.checkpoint.durable_offsets = dict(offsets)
                self.checkpoint.version = version
                self.checkpoint.events = int(counts.get("events", self.checkpoint.events))
                self.metrics.publishes.inc()
                self.metrics.publish_seconds.observe(seconds)
                self.metrics.version.set(version)
                self.metrics.users.set(counts.get("users", 0))
                self.metrics.items.set(counts.get("items", 0))
                if self.on_publish:
                    self.on_publish(version)
                self.commit(offsets)
            elif kind == "poisoned" and dlq is not None:
                self._dead_letter_range(msg[1], msg[2], msg[3], dlq)
            elif kind == "error":
                raise Fatal(f"the trainer failed: {msg[1]}")

    def _dead_letter_range(self, since: dict[int, int], upto: dict[int, int], why: str,
                           dlq: DeadLetterWriter) -> None:
        """The records of a batch that made the model non-finite, read again and dead-lettered."""
        n = dead_letter_poisoned(read_again(self.kafka, self.kafka.topic, since, upto), why,
                                 dlq, self.metrics)
        dlq.flush()
        log.error("dead-lettered the %d records the trainer's model could not learn", n)
        assert self._ring is not None
        self._ring.send(("letters",))

    # -- the loop's steps, as the consumer does them ---------------------------
    def poll_batch(self, max_events: int, max_ms: int) -> list[Any]:
        records = super().poll_batch(max_events, max_ms)
        if self._shared is not None:
            self._shared.last_poll.value = time.monotonic()
        return records

    def apply(self, records: list[Any], dlq: DeadLetterWriter) -> None:
        """Decode, dead-letter the bad (durably), hand the batch to the trainer."""
        t0 = time.perf_counter()
        assert self._ring is not None
        records, done = self.source.admit(records)
        batch = decode_columns(records, self.contract)
        for err in batch.dead_letters:
            dlq.send(err)
            self.metrics.dead_letters.labels(dead_letter_reason_label(err)).inc()
        if batch.dead_letters:
            dlq.flush()  # durable before any version can skip them
        ends = dict(done)
        for rec in records:
            if rec.offset + 1 > ends.get(rec.partition, 0):
                ends[rec.partition] = rec.offset + 1
        if not ends:
            return
        if not self._ring.put(batch, ends, self.source.generation, self.stop_requested,
                              self._trainer_alive):
            return  # stopping while the ring was full: read again after the restart
        self.checkpoint.advance(records, done)
        self.metrics.events.inc(len(batch.ts))
        self.metrics.batches.inc()
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)

    def rewind_to_published(self) -> None:
        """Partitions revoked or lost: the trainer rewinds; the assignment seeks there."""
        if self._ring is None or self._proc is None or not self._proc.is_alive():
            return
        generation = self.source.generation
        self._ring.send(("rewind", generation))
        while (reply := self._expect("rewound"))[1] != generation:
            pass
        self.checkpoint.offsets = dict(reply[2])
        self.checkpoint.durable_offsets = dict(reply[2])

    def _reposition(self, offsets: dict[int, int]) -> None:
        self.checkpoint.reposition(offsets)
        if self._ring is not None:
            self._ring.send(("reposition", dict(offsets)))

    def ring_waits(self) -> dict[str, float]:
        """Seconds the consumer waited for a free slot (the trainer is the bottleneck)."""
        return {"ring_full_s": self._ring.waited_full_s if self._ring else 0.0}


def make_worker(settings: Any, *args: Any, **kwargs: Any) -> Worker:
    """The pipelined worker when ``worker.pipeline`` is on (the default), else the serial one."""
    cls = PipelineWorker if settings.worker.pipeline else Worker
    return cls(settings, *args, **kwargs)

