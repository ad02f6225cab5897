"""The worker's catalogue stage: item metadata in, text vectors out, announced to the model.

A model with content (``model.content_dim`` > 0) reads ``kafka.items_topic``
beside the clicks. The process that holds the model -- the serial worker's loop,
or a pipelined worker's trainer -- calls :meth:`Catalogue.tick` between
micro-batches; it never waits, neither for the topic nor for the encoder:

1. **Read** what the topic has (a non-blocking poll of its own group-less
   consumer, assigned every partition: every worker needs the whole
   catalogue), at most as many records as the featurizer has room for, so
   no item is ever dropped.
2. **Decode** with the catalogue contract; refused messages go to
   ``kafka.items_dlq_topic`` with their reason.
3. **Submit** each item to the :class:`~stream_rec.content.Featurizer`, which
   answers cached texts at once and encodes the rest on its own thread.
4. **Announce** the vectors finished since the last call (``take_ready``):
   the model gives new items a row (``model.announce``); an item whose text
   the encoder failed on is dead-lettered (``encoder_failed``).

Offsets: the snapshot records, for each catalogue partition, the oldest
offset whose item is not in the model yet (:meth:`Catalogue.offsets`), in
the manifest's ``offsets`` beside the clicks'. A restart or a rewind reads
from there: items still in the featurizer are read again, never skipped, and
an item read twice is announced twice with the same vector (no change). Dead
letters are flushed before a version records offsets past them
(:meth:`flush`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
from kafka import TopicPartition
from kafka.errors import KafkaError, OffsetOutOfRangeError

from stream_rec.content import Featurizer, featurizer_from_settings
from stream_rec.events import Contract, DeadLetter, Origin, Reason
from stream_rec.events.catalogue import decode_items
from stream_rec.ingest.dlq import DeadLetterWriter
from stream_rec.ingest.kafka import TopicMissing, make_consumer, make_producer, require_topics
from stream_rec.metrics import WorkerMetrics, dead_letter_reason_label
from stream_rec.settings import Settings

if TYPE_CHECKING:
    from stream_rec.model import StreamingModel

    from .checkpoint import Checkpoint

log = logging.getLogger(__name__)

Offsets = dict[int, int]
MAX_RECORDS = 500  # per read: a burst of the catalogue never holds up a click batch long


class Catalogue:
    """Catalogue topic -> featurizer -> ``model.announce``, one step between micro-batches.

    ``featurizer`` defaults to the one ``settings.content`` describes (its
    encoder loaded on first need, on its own thread). Used from the worker's
    polling thread only.
    """

    def __init__(self, settings: Settings, metrics: WorkerMetrics | None = None,
                 featurizer: Featurizer | None = None) -> None:
        self.kafka = settings.kafka
        self.topic = settings.kafka.items_topic
        self.contract = Contract(settings.events)
        self.metrics = metrics
        self.featurizer = featurizer or featurizer_from_settings(settings.content)
        self.consumer: Any = None
        self.dlq: DeadLetterWriter | None = None
        self.read: Offsets = {}            # next offset to read, per partition
        # item id -> (partition, offset, record) of its oldest message not yet in the model
        self.waiting: dict[str, tuple[int, int, Any]] = {}
        self.announced = 0                 # items announced since start (one per vector)
        self.refused = 0                   # dead letters written
        self.retry_s = settings.worker.topic_check_interval_s
        self._retry_at = 0.0

    # -- positions ------------------------------------------------------------
    def open(self, held: Offsets) -> bool:
        """Assign every partition of the topic at ``held`` (the version's offsets).

        Partitions the version does not record start at the log's beginning;
        an offset outside the log (compaction or retention moved its start,
        or the topic was recreated) starts at the beginning too, with a
        warning: re-announcing is harmless, skipping is not. Returns False
        while the topic does not exist (with ``kafka.create_topics`` off);
        call again later.
        """
        try:
            require_topics(self.kafka, [self.topic, self.kafka.items_dlq_topic])
        except TopicMissing as exc:
            log.warning("catalogue not read yet: %s", exc)
            return False
        consumer = make_consumer(self.kafka, None, auto_offset_reset="none")
        parts = consumer.partitions_for_topic(self.topic) or set()
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        self.consumer = consumer
        self.dlq = DeadLetterWriter(make_producer(self.kafka), self.kafka.items_dlq_topic)
        self.seek(held)
        log.info("reading the catalogue %s from %s", self.topic, self.read)
        return True

    def seek(self, held: Offsets) -> None:
        """Read every partition from ``held`` again (see :meth:`open`)."""
        tps = list(self.consumer.assignment())
        first = self.consumer.beginning_offsets(tps)
        last = self.consumer.end_offsets(tps)
        self.read = {}
        for tp in tps:
            want = held.get(tp.partition, first[tp])
            if not first[tp] <= want <= last[tp]:
                log.warning("catalogue %s partition %d: offset %d outside its log [%d, %d]; "
                            "reading it from the start", self.topic, tp.partition, want,
                            first[tp], last[tp])
                want = first[tp]
            self.consumer.seek(tp, want)
            self.read[tp.partition] = want

    def offsets(self) -> Offsets:
        """Per partition, the oldest offset whose item is not in the model yet."""
        out = dict(self.read)
        for p, o, _ in self.waiting.values():
            out[p] = min(out.get(p, o), o)
        return out

    def rewind(self, held: Offsets) -> None:
        """The model went back to a version: read the catalogue again from its offsets.

        Vectors finished meanwhile are dropped; the items are read, and
        answered from the cache, again.
        """
        self.featurizer.take_ready()
        self.featurizer.take_failed()
        self.waiting.clear()
        if self.consumer is not None:
            self.seek(held)

    # -- the step ---------------------------------------------------------------
    def step(self, announce: Callable[[list[str], np.ndarray], None],
             timeout_ms: int = 0) -> int:
        """Read what is there (waiting at most ``timeout_ms``), then announce what is ready.

        ``announce(ids, vectors (B, K))`` hands the finished vectors to the
        model. Returns how many items were announced.
        """
        if self.consumer is not None:
            self._read(timeout_ms)
        return self._announce(announce)

    def _read(self, timeout_ms: int) -> None:
        fz = self.featurizer
        room = min(MAX_RECORDS, fz.max_pending - fz.pending)
        if room <= 0:
            return   # the encoder is behind: the topic waits, nothing is dropped
        try:
            got = self.consumer.poll(timeout_ms=timeout_ms, max_records=room)
        except OffsetOutOfRangeError as exc:  # the log start moved under a position
            self.seek({**self.offsets(), **{tp.partition: -1 for tp in exc.args[0]}})
            return
        except KafkaError as exc:
            log.warning("catalogue read failed (retrying): %s", exc)
            return
        records = sorted((r for recs in got.values() for r in recs),
                         key=lambda r: (r.partition, r.offset))
        if not records:
            return
        items, dead = decode_items(records, self.contract)
        for err in dead:
            self._dead_letter(err)
        by_origin = {(r.partition, r.offset): r for r in records}
        for d in items:
            o = d.origin
            prev = self.waiting.get(d.item.item_id)
            if prev is None or prev[1] > o.offset:
                self.waiting[d.item.item_id] = (o.partition, o.offset,
                                                by_origin[o.partition, o.offset])
            if not fz.submit(asdict(d.item)):  # not while reads fit the room; never skip
                log.error("featurizer refused item %s: reading it again", d.item.item_id)
                self.seek(self.offsets())
                return
        for r in records:
            self.read[r.partition] = max(self.read.get(r.partition, 0), r.offset + 1)

    def _announce(self, announce: Callable[[list[str], np.ndarray], None]) -> int:
        fz = self.featurizer
        for item_id in fz.take_failed():
            entry = self.waiting.pop(item_id, None)
            if entry is not None:
                p, o, rec = entry
                self._dead_letter(DeadLetter(
                    "the sentence encoder failed on this item's text (see the worker's log)",
                    Origin(self.topic, p, o), rec.key, rec.value, Reason.ENCODER_FAILED))
        ready = fz.take_ready()
        if not ready:
            return 0
        ids = list(ready)
        announce(ids, np.stack([ready[i] for i in ids]))
        for item_id in ids:
            if not fz.waiting(item_id):  # a newer text of it may still be on its way
                self.waiting.pop(item_id, None)
        self.announced += len(ids)
        return len(ids)

    def _dead_letter(self, err: DeadLetter) -> None:
        assert self.dlq is not None
        self.dlq.send(err)
        self.refused += 1
        if self.metrics is not None:
            self.metrics.dead_letters.labels(dead_letter_reason_label(err)).inc()

    # -- in the process that holds the model and the checkpoint -----------------
    def tick(self, checkpoint: Checkpoint, model: StreamingModel) -> None:
        """One step for the serial worker's loop or a pipeline's trainer: open the topic
        when due, read, announce into ``model``, and have ``checkpoint`` publish the rows
        and record the catalogue's offsets. Never waits.

        Until the items topic exists (with ``kafka.create_topics`` off) it is
        looked for again every ``worker.topic_check_interval_s``.
        """
        if self.consumer is None:
            now = time.monotonic()
            if now < self._retry_at:
                return
            self._retry_at = now + self.retry_s
            if not self.open(checkpoint.published_offsets(self.topic)):
                return
            checkpoint.side_offsets = lambda: {self.topic: self.offsets()}
        before = self.offsets()
        announced = self.step(lambda ids, vectors: checkpoint.changed(model.announce(ids, vectors)))
        if not announced and self.offsets() != before:
            checkpoint.dirty = True        # dead letters only: record the offsets

    def rewound(self, checkpoint: Checkpoint) -> None:
        """The model went back to the checkpoint's newest durable version."""
        self.rewind(checkpoint.published_offsets(self.topic))

    # -- the checkpoint's side -------------------------------------------------
    def flush(self) -> None:
        """Make the dead letters durable before a version records offsets past them."""
        if self.dlq is not None:
            self.dlq.flush()

    def stats(self) -> dict[str, Any]:
        return {"announced": self.announced, "waiting": len(self.waiting),
                "refused": self.refused, **self.featurizer.stats()}

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close(autocommit=False)
        if self.dlq is not None:
            self.dlq.close()
        self.featurizer.close()
