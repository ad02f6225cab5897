"""The worker's checkpoint: what the model holds, and how it becomes durable and committed.

The published snapshot is the checkpoint. A :class:`Checkpoint` owns what a
version records -- the next offset of every partition whose events the model
holds, the watermark, the event count -- and the rows changed since the
previous version, and it alone moves them through the commit sequence (see
:meth:`Checkpoint.publish` and :meth:`Checkpoint.commit_durable`). On start
and after losing partitions it brings the model back to the newest durable
version, so a crash at any instant loses nothing and applies nothing twice
relative to the restored state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from stream_rec.faults import failpoint
from stream_rec.model import Changed, ModelConfig, StreamingModel
from stream_rec.model import tables as T
from stream_rec.snapshot import Manifest, SnapshotStore
from stream_rec.snapshot.publisher import FullPolicy, Publisher, PublishJob

log = logging.getLogger(__name__)


class DeadLetterSink(Protocol):
    def flush(self) -> None: ...


class Committer(Protocol):
    def commit(self, offsets: dict[int, int]) -> bool: ...


class NonFinite(RuntimeError):
    """The model the worker holds has non-finite rows: it must not be published."""


def non_finite_tables(tables: dict[str, np.ndarray]) -> list[str]:
    """Names of floating-point tables holding NaN or inf (``pop_log`` may be -inf: no event)."""
    bad = []
    for name, arr in tables.items():
        if arr.dtype.kind != "f" or not arr.size:
            continue
        ok = np.isfinite(arr) | (arr == -np.inf) if name == T.ITEM_POP_LOG else np.isfinite(arr)
        if not ok.all():
            bad.append(name)
    return bad


class Checkpoint:
    """Offsets, watermark, event count and changed rows of the model the worker holds."""

    def __init__(self, store: SnapshotStore, topic: str, policy: FullPolicy,
                 on_durable: Callable[[Manifest], None] | None = None) -> None:
        self.store = store
        self.topic = topic
        self.policy = policy
        self.on_durable = on_durable
        self.offsets: dict[int, int] = {}   # partition -> next offset the model has not seen
        self.watermark: int | None = None   # newest event time (ms) among learned events
        self.events = 0                     # valid events in the model
        self.version: int | None = None     # newest durable version
        self.restored: Manifest | None = None
        self.durable_offsets: dict[int, int] | None = None  # set where no publisher runs
        self.dirty = False                  # learned anything since the last publish?
        self.publisher: Publisher | None = None
        # offsets of other topics the model holds (the catalogue), recorded beside the topic's
        self.side_offsets: Callable[[], dict[str, dict[int, int]]] | None = None
        self._changed_users: list[np.ndarray] = []
        self._changed_items: list[np.ndarray] = []

    # -- recovery -------------------------------------------------------
    def restore(self, cfg: ModelConfig, device: str) -> StreamingModel:
        """The model of the newest valid version (an empty one for an empty store)."""
        snapshot = self.store.load_latest_valid()
        if snapshot is None:
            log.info("no snapshot in %s: starting from an empty model", self.store.url)
            return StreamingModel(cfg, device=device)
        m = snapshot.manifest
        self._hold(m)
        self.restored = m
        log.info("restored version %d: %s events, offsets %s", m.version,
                 m.counts.get("events"), self.offsets)
        return StreamingModel.from_state(snapshot.state, device=device, cfg=cfg)

    def start_publisher(self) -> Publisher:
        self.publisher = Publisher(self.store, self.restored)
        return self.publisher

    def rewind(self, model: StreamingModel, cfg: ModelConfig, device: str,
               force: bool = False) -> StreamingModel:
        """Drop what was learnt since the newest durable version; returns the model to use.

        Unpublished events may come from partitions that now belong to another
        member, which will read them from the committed offsets; keeping them
        would put them in a later version as well. The worker returns to its
        own last published version (model, offsets, counts) and the assignment
        that follows seeks every partition to that version's offsets.
        """
        if self.publisher is None:
            return model
        self.publisher.wait_idle()
        published = self.publisher.parent
        target = dict(published.offsets.get(self.topic, {})) if published else {}
        if target == self.offsets and not force:
            return model  # nothing learnt since the last durable version
        log.warning("rewinding: discarding events learnt after version %s (offsets %s -> %s)",
                    published.version if published else None, self.offsets, target)
        snapshot = self.store.load(published.version) if published else None
        if snapshot is None:
            model = StreamingModel(cfg, device=device)
            self.watermark, self.events = None, 0
        else:
            model = StreamingModel.from_state(snapshot.state, device=device, cfg=cfg)
            self.watermark = snapshot.manifest.watermark
            self.events = int(snapshot.manifest.counts.get("events", 0))
        self.offsets = target
        self._changed_users.clear()
        self._changed_items.clear()
        self.dirty = False
        return model

    def reposition(self, offsets: dict[int, int]) -> None:
        """Hold ``offsets`` instead, without learning anything (a reset the operator chose).

        The next version records them, so a restart resumes where reading
        really resumed rather than at offsets the log no longer serves.
        """
        self.offsets = dict(offsets)
        self.dirty = True

    def published_offsets(self, topic: str | None = None) -> dict[int, int]:
        """The offsets of the newest durable version (where a restart would resume) in
        ``topic`` (default: the click topic)."""
        if self.durable_offsets is not None and topic in (None, self.topic):
            return dict(self.durable_offsets)  # a pipeline's consumer, told by its trainer
        published = self.publisher.parent if self.publisher is not None else self.restored
        return dict(published.offsets.get(topic or self.topic, {})) if published else {}

    def _hold(self, m: Manifest) -> None:
        self.offsets = dict(m.offsets.get(self.topic, {}))
        self.watermark = m.watermark
        self.version = m.version
        self.events = int(m.counts.get("events", 0))

    # -- learning -------------------------------------------------------
    def learned(self, changed: Changed, n_events: int, top_ts: int | None) -> None:
        """The model learned ``n_events`` valid events, the newest at ``top_ts`` (ms)."""
        self._changed_users.append(changed.users)
        self._changed_items.append(changed.items)
        if top_ts is not None:
            self.watermark = top_ts if self.watermark is None else max(self.watermark, top_ts)
        self.events += n_events

    def changed(self, changed: Changed) -> None:
        """Rows changed by something other than clicks (catalogue items): publish them."""
        self._changed_users.append(changed.users)
        self._changed_items.append(changed.items)
        self.dirty = True

    def advance(self, records: list[Any], done: dict[int, int] | None = None) -> None:
        """The model now holds ``records`` (learned or dead-lettered): move past them.

        ``done`` marks partitions whose bounded range is complete.
        """
        for p, end in (done or {}).items():
            self.offsets[p] = max(self.offsets.get(p, 0), end)
        for rec in records:
            if rec.offset + 1 > self.offsets.get(rec.partition, -1):
                self.offsets[rec.partition] = rec.offset + 1
        if records:
            self.dirty = True

    def advance_to(self, ends: dict[int, int]) -> None:
        """The model now holds every record before ``ends`` (partition -> next offset)."""
        for p, end in ends.items():
            if end > self.offsets.get(p, -1):
                self.offsets[p] = end
                self.dirty = True

    # -- the commit sequence --------------------------------------------
    def publish(self, model: StreamingModel, dlq: DeadLetterSink) -> None:
        """Steps 1-3 of a checkpoint; steps 4-6 are :meth:`commit_durable`.

        1. Flush the dead letters: they are durable before the offsets that
           skip them.
        2. Copy what the version needs, on the thread that trains (so the copy
           is consistent): the rows changed since the previous version (a
           delta), or the whole state when the full-version policy asks.
        3. Hand the copy to the publisher thread, which writes it under a
           temporary name, fsyncs, renames and moves ``LATEST``.
        4. (:meth:`commit_durable`) Take back the versions made durable.
        5. The ``before_commit`` failpoint: durable, not yet committed.
        6. Commit their offsets to Kafka (owned partitions only). The commit
           is a hint for lag tools; a restart seeks from the snapshot.

        Callers check ``publisher.busy()`` first: while a version is being
        written, changed rows keep accumulating and merge into the next one.
        Before step 3 the copy is checked: a model with NaN or infinite rows
        raises :class:`NonFinite` and nothing is published.
        """
        assert self.publisher is not None
        dlq.flush()
        users = np.unique(np.concatenate(self._changed_users)) if self._changed_users \
            else np.zeros(0, np.int64)
        items = np.unique(np.concatenate(self._changed_items)) if self._changed_items \
            else np.zeros(0, np.int64)
        self._changed_users.clear()
        self._changed_items.clear()
        side = self.side_offsets() if self.side_offsets is not None else {}
        job = PublishJob(offsets={**side, self.topic: dict(self.offsets)},
                         watermark=self.watermark, events=self.events)
        total = model.n_users + model.n_items
        if self.policy.wants_full(self.publisher.parent, self.publisher.full_at,
                                  len(users) + len(items), total):
            job.state = model.state()
        else:
            job.delta = model.delta(users, items)
        bad = non_finite_tables(job.state.tables if job.state is not None
                                else job.delta.tables if job.delta is not None else {})
        if bad:
            raise NonFinite(f"non-finite values in {', '.join(bad)}")
        self.publisher.submit(job)
        self.dirty = False

    def commit_durable(self, committer: Committer) -> list[Manifest]:
        """Steps 4-6 of :meth:`publish`: commit the offsets of versions made durable."""
        assert self.publisher is not None
        done = self.publisher.completed()
        if not done:
            return done
        for manifest in done:
            if self.on_durable:
                self.on_durable(manifest)
        self.version = done[-1].version
        failpoint("before_commit")  # durable version, offsets not yet committed
        committer.commit(done[-1].offsets.get(self.topic, {}))
        return done
