"""``stream-rec worker`` as one rank of a gang: W ranks, one model, one writer.

Each rank is this serial loop in its own process (the pipelined worker's two
processes are not used: a rank's consumer and trainer take turns, and the
gang scales by ranks). Rank r reads the partitions p with p mod W = r by
manual assignment (:class:`~.source.AssignedSource`) and learns its users'
events; the model's replicated tables stay bitwise equal across ranks
(:mod:`stream_rec.model.gang`). The gang moves in **rounds**, each one
exchange: every rank polls its partitions for at most ``batch_max_ms`` (or
``batch_max_events``) -- a rank with nothing to read brings nothing, so a
training step never waits for an idle rank longer than one poll window --
then all learn their events together. Rank 0's note in the round's exchange
says when a version is due; the round ends with the publish:

1. every rank flushes its dead letters and confirms the topic is the one it
   read; all agree (one exchange) that the version may be written, and rank 0
   says whether whole or as a delta;
2. every rank sends rank 0 its share -- the user rows it owns that changed,
   its pending events, its partitions' offsets (one gather);
3. rank 0 holds the store's writer lease, assembles the version with the
   delta code servers use and hands it to its publisher thread, which commits
   it by the exclusive create of ``parent + 1`` (a stale rank 0 of an earlier
   gang loses that race: :class:`~stream_rec.snapshot.Fenced`);
4. once it is durable, rank 0's next note announces it and every rank
   commits its own partitions' offsets under the group id.

Any rank's failure fails the gang's next exchange on every rank: they exit,
the elastic launcher restarts them all, and each restores the newest version
(:func:`~stream_rec.model.gang_state.restore_rank`) -- nothing is lost or
applied twice. SIGTERM (the launcher forwards it to every rank) finishes the
round, publishes, commits and exits 0 on every rank. A model made non-finite
is never published: every rank returns to the newest version and dead-letters
the records it read since.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from stream_rec.errors import Fatal
from stream_rec.events import Contract, decode_columns
from stream_rec.faults import failpoint
from stream_rec.ingest.dlq import DeadLetterWriter, dead_letter_poisoned
from stream_rec.ingest.kafka import (
    make_producer,
    read_again,
    require_topics,
)
from stream_rec.metrics import WorkerMetrics, dead_letter_reason_label
from stream_rec.model import Changed
from stream_rec.model.exchange import Exchange
from stream_rec.model.gang import GangModel
from stream_rec.model.gang_state import (
    assemble_delta,
    assemble_full,
    owned,
    restore_rank,
    share_of,
)
from stream_rec.settings import Settings
from stream_rec.snapshot import Fenced, Manifest, SnapshotStore
from stream_rec.snapshot.lease import Lease
from stream_rec.snapshot.publisher import FullPolicy, PublishJob

from .checkpoint import Checkpoint, non_finite_tables
from .health import Health, LeaseKeeper
from .source import AssignedSource, gang_partitions
from .topic import TopicGuard

log = logging.getLogger(__name__)


@dataclass
class Note:
    """What a rank tells the gang at the start of a round."""

    stop: bool                                      # a stop was requested here
    publish: bool = False                           # rank 0: a version is due
    durable: tuple[int, dict[int, int]] | None = None   # rank 0: newest durable version
    poisoned: tuple[int | None, str] | None = None  # rank 0: return to this version (why)


class GangWorker:
    """One rank of a gang: its partitions, its share of the model, rank 0 the writer."""

    def __init__(self, settings: Settings, exchange: Exchange,
                 store: SnapshotStore | None = None, metrics: WorkerMetrics | None = None,
                 stop: threading.Event | None = None) -> None:
        self.settings = settings
        self.kafka = settings.kafka
        self.exchange = exchange
        self.rank, self.world = exchange.rank, exchange.world
        self.store = store or SnapshotStore(settings.store.path, settings.store.keep_versions,
                                            vector_dtype=settings.store.vector_dtype)
        self.lease = Lease(self.store.backend, ttl_s=settings.worker.lease_ttl_s) \
            if self.rank == 0 else None
        if self.lease is not None:
            self.store.writer = f"{self.lease.holder} (rank 0 of {self.world})"
        self.metrics = metrics or WorkerMetrics()
        self.stop_requested = stop if stop is not None else threading.Event()
        wcfg = settings.worker
        self.checkpoint = Checkpoint(
            self.store, self.kafka.topic,
            FullPolicy(max_chain=wcfg.full_every_versions, max_age_s=wcfg.full_every_s),
            on_durable=self._durable)
        self.health = Health(wcfg.stall_after_s)
        self.contract = Contract(settings.events)
        self.guard = TopicGuard(self.kafka, wcfg.on_offset_out_of_range,
                                held=lambda: self.checkpoint.offsets,
                                reposition=self.checkpoint.reposition,
                                held_topic_id=lambda: self.checkpoint.topic_id,
                                on_wait=self.health.wait_for)
        self.source = AssignedSource(self.kafka, self.guard)
        self.model: GangModel | None = None
        self.all_partitions: list[int] = []
        self.consuming_since: float | None = None
        self._poisoned: tuple[int | None, str] | None = None   # rank 0: to announce
        self.replicas_checked = 0   # rank 0, worker.gang_check_replicas: publishes checked

    @property
    def offsets(self) -> dict[int, int]:
        return self.checkpoint.offsets

    @property
    def version(self) -> int | None:
        return self.checkpoint.version

    # -- lifecycle -------------------------------------------------------
    def run(self) -> int:
        """Consume with the gang until asked to stop; the process exit code (0)."""
        try:
            if not self._await_lease():
                return 0
            keeper = LeaseKeeper(self.lease, self.health).start() if self.lease else None
            try:
                return self._run_holding_lease()
            finally:
                if keeper is not None:
                    keeper.stop()
        finally:
            if self.lease is not None:
                self.lease.release()

    def _any_stop(self, mine: Any = None) -> tuple[bool, list[Any]]:
        """One exchange of stop requests (and ``mine``): (anyone asked to stop, every ``mine``)."""
        got = self.exchange.all_gather((self.stop_requested.is_set(), mine))
        return any(g[0] for g in got), [g[1] for g in got]

    def _await_lease(self) -> bool:
        """Rank 0 takes the writer lease, the gang waiting as a standby meanwhile."""
        said = False
        while True:
            held, holder = False, None
            if self.lease is not None:
                held = self.lease.try_acquire()
                holder = None if held else self.lease.current()
            stop, got = self._any_stop((held, getattr(holder, "holder", None)))
            if stop:
                return False
            if got[0][0]:
                self.health.role = "starting"
                return True
            self.health.standby(holder)
            if not said:
                log.warning("standby: %s holds the writer lease of %s; rank 0 takes over when "
                            "it stops renewing", got[0][1], self.store.url)
                said = True
            self.stop_requested.wait(self.settings.worker.standby_poll_s)

    def _run_holding_lease(self) -> int:
        wcfg = self.settings.worker
        import torch

        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(wcfg.torch_threads or max(1, (os.cpu_count() or 1) // local))
        self._restore()
        stop, _ = self._any_stop()
        if stop:
            log.info("stop requested while starting: exiting before consuming")
            return 0
        if not self._open_topic():
            return 0
        self.health.active()
        self.consuming_since = time.monotonic()
        require_topics(self.kafka, [self.kafka.dlq_topic])
        dlq = DeadLetterWriter(make_producer(self.kafka), self.kafka.dlq_topic)
        publisher = self.checkpoint.start_publisher() if self.rank == 0 else None
        try:
            self._loop(dlq)
        finally:
            if publisher is not None:
                publisher.close()
            self.source.close()
            self.guard.close()
            dlq.close()
        log.info("rank %d of %d stopped at version %s, offsets %s", self.rank, self.world,
                 self.version, {p: self.offsets.get(p) for p in self.source.partitions})
        return 0

    def _restore(self, version: int | None = None, announced: bool = False) -> None:
        """Every rank loads the same version: the newest valid one, as rank 0 found it."""
        snap = None
        if not announced:
            if self.rank == 0:
                snap = self.store.load_latest_valid()
                version = snap.manifest.version if snap is not None else None
            version = self.exchange.all_gather(version)[0]
        if snap is None and version is not None:
            snap = self.store.load(version)
        cfg, device = self.settings.model, self.settings.worker.device
        if snap is None:
            log.info("no snapshot in %s: rank %d of %d starts from an empty model",
                     self.store.url, self.rank, self.world)
            self.model = GangModel(cfg, device=device, exchange=self.exchange)
            return
        self.model = restore_rank(snap.state, self.exchange, device=device, cfg=cfg)
        self.checkpoint.hold(snap.manifest)
        log.info("rank %d of %d restored version %d: %s events", self.rank, self.world,
                 snap.manifest.version, snap.manifest.counts.get("events"))

    def _open_topic(self) -> bool:
        """Wait, as a gang, for the topic (never creating it); assign this rank's partitions."""
        next_log = 0.0
        while True:
            try:
                info = self.guard.describe()
            except Exception as exc:  # noqa: BLE001 -- any failure to describe: ask again
                log.warning("could not describe topic %s: %s", self.kafka.topic, exc)
                info = None
            stop, got = self._any_stop(info.partitions if info is not None else None)
            if stop:
                log.info("stopped while waiting for topic %s", self.kafka.topic)
                return False
            if all(g is not None for g in got):
                break
            reason = f"topic {self.kafka.topic} does not exist yet"
            self.health.wait_for(reason)
            if time.monotonic() >= next_log:
                log.warning("%s; the worker does not create the topic it consumes", reason)
                next_log = time.monotonic() + 5.0
            self.stop_requested.wait(1.0)
        self.health.wait_for(None)
        self.all_partitions = sorted(set().union(*got))
        mine = gang_partitions(self.all_partitions, self.rank, self.world)
        if not mine:
            log.warning("rank %d of %d reads no partition: topic %s has %d; a gang needs at "
                        "least one partition per rank", self.rank, self.world,
                        self.kafka.topic, len(self.all_partitions))
        self.source.open(mine)
        log.info("rank %d of %d reads partitions %s", self.rank, self.world, mine)
        return True

    # -- rounds ---------------------------------------------------------------
    def _loop(self, dlq: DeadLetterWriter) -> None:
        wcfg = self.settings.worker
        assert self.model is not None
        last_publish = last_check = time.monotonic()
        while True:
            self._check_lease()
            t0 = time.perf_counter()
            records = self._poll_round()
            records, done = self.source.admit(records)
            batch = decode_columns(records, self.contract)
            for err in batch.dead_letters:
                dlq.send(err)
                self.metrics.dead_letters.labels(dead_letter_reason_label(err)).inc()
            rnd = self.model.learn_round(batch.user_ids, batch.item_ids, batch.ts, batch.weight,
                                         partitions=batch.partition,
                                         note=self._note(last_publish))
            failpoint("in_batch")  # learnt, offsets not yet advanced
            self.checkpoint.learned(rnd.changed, rnd.events, rnd.top_ts)
            self.checkpoint.advance(records, done)
            self._observe(batch, t0)
            lead: Note = rnd.notes[0]
            if lead.poisoned is not None:
                self._quarantine(*lead.poisoned, dlq)
            if lead.durable is not None and self.rank != 0:
                self._commit_announced(*lead.durable)
            if any(n.stop for n in rnd.notes):
                break
            now = time.monotonic()
            if lead.publish:
                self._publish(dlq)
                last_publish = last_check = time.monotonic()
            elif now - last_check >= wcfg.topic_check_interval_s:
                last_check = now
                self._confirm()
        self._finish(dlq)

    def _poll_round(self) -> list[Any]:
        """This rank's records of the round: up to ``batch_max_events`` within ``batch_max_ms``."""
        wcfg = self.settings.worker
        deadline = time.monotonic() + wcfg.batch_max_ms / 1000.0
        records: list[Any] = []
        while len(records) < wcfg.batch_max_events and not self.stop_requested.is_set():
            timeout = int((deadline - time.monotonic()) * 1000)
            if timeout <= 0:
                break
            got = self.source.poll(timeout, wcfg.batch_max_events - len(records))
            self.metrics.polled(self.source.consumer, self.checkpoint.offsets, got)
            self.health.polled(self.source.consumer, bool(got))
            held = self.checkpoint.offsets
            for recs in got.values():
                records.extend(r for r in recs if r.offset >= held.get(r.partition, 0))
        return records

    def _note(self, last_publish: float) -> Note:
        note = Note(stop=self.stop_requested.is_set())
        if self.rank != 0:
            return note
        publisher = self.checkpoint.publisher
        assert publisher is not None
        due = time.monotonic() - last_publish >= \
            self.settings.worker.publish_interval_ms / 1000.0
        note.publish = due and not publisher.busy()
        done = self.checkpoint.commit_durable(self)
        if done:
            note.durable = (done[-1].version, dict(done[-1].offsets.get(self.kafka.topic, {})))
        note.poisoned, self._poisoned = self._poisoned, None
        return note

    def _observe(self, batch: Any, t0: float) -> None:
        n = len(batch.ts)
        self.metrics.events.inc(n)
        self.metrics.batches.inc()
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)
        if self.checkpoint.watermark is not None:
            self.metrics.watermark.set(self.checkpoint.watermark)

    # -- publishing -----------------------------------------------------------
    def _confirm(self) -> bool:
        """Is the topic still the one read? A recreated topic stops the gang (exit 1): its
        restart resumes per ``worker.on_offset_out_of_range``."""
        verdict = self.guard.confirm()
        if verdict == "recreated":
            self.guard.recreated(held=self.checkpoint.published_offsets(), policy="fail")
        if verdict == "same":
            self.checkpoint.topic_id = self.guard.topic_id()  # what the next version records
        return verdict == "same"

    def _publish(self, dlq: DeadLetterWriter, final: bool = False) -> None:
        """Steps 1-3 of the module docstring, on every rank (collective)."""
        assert self.model is not None
        model, cfg = self.model, self.settings.model
        dlq.flush()   # dead letters durable before the offsets that skip them
        users, items = self.checkpoint.take_changed()
        ok = self._confirm()
        publisher = self.checkpoint.publisher
        kind = None
        if publisher is not None:
            publisher.wait_idle()
            kind = "full" if self.checkpoint.policy.wants_full(
                publisher.parent, publisher.full_at, len(users) + len(items),
                model.n_users + model.n_items) else "delta"
        votes = self.exchange.all_gather((ok, self.checkpoint.dirty, kind))
        if not all(v[0] for v in votes) or not any(v[1] for v in votes):
            self.checkpoint.learned(Changed(users=users, items=items), 0, None)  # keep them
            if not all(v[0] for v in votes):
                log.warning("not publishing: the topic could not be confirmed on every rank")
            return
        full = votes[0][2] == "full"
        check = self.settings.worker.gang_check_replicas
        mine = {p: o for p, o in self.offsets.items() if p in self.source.partitions}
        shares = self.exchange.gather((share_of(model, users, full, digest=check), mine))
        self.checkpoint.dirty = False
        if shares is None:
            return
        assert publisher is not None
        if check:
            digests = [s.digest for s, _ in shares]
            if len(set(digests)) != 1:
                raise Fatal(f"the gang's replicas differ (replica checksums by rank: {digests}); "
                            "nothing was published")
            self.replicas_checked += 1
        offsets = {p: o for p, o in self.offsets.items() if p not in self.all_partitions}
        for _, theirs in shares:
            offsets.update(theirs)
        topic_id = self.checkpoint.topic_id
        job = PublishJob(offsets={self.kafka.topic: offsets},
                         watermark=self.checkpoint.watermark, events=self.checkpoint.events,
                         topic_ids={self.kafka.topic: topic_id} if topic_id else {})
        parts = [s for s, _ in shares]
        if full:
            job.state = assemble_full(model.state(), parts, cfg)
        else:
            job.delta = assemble_delta(model.delta(owned(model, users), items), parts, cfg)
        bad = non_finite_tables(job.state.tables if job.state is not None
                                else job.delta.tables if job.delta is not None else {})
        if bad:
            self._poisoned = (publisher.parent.version if publisher.parent else None,
                              f"non-finite values in {', '.join(bad)}")
            log.error("training produced %s: the gang returns to version %s", self._poisoned[1],
                      self._poisoned[0])
            return
        publisher.submit(job)

    def _quarantine(self, version: int | None, why: str, dlq: DeadLetterWriter) -> None:
        """Back to ``version`` on every rank; this rank's records since it are dead-lettered."""
        upto = {p: o for p, o in self.offsets.items() if p in self.source.partitions}
        self._restore(version, announced=True)
        if version is None:
            self.checkpoint.offsets, self.checkpoint.events = {}, 0
            self.checkpoint.watermark = None
        since = {p: self.offsets.get(p, 0) for p in upto}
        self.checkpoint.take_changed()
        n = dead_letter_poisoned(read_again(self.kafka, self.kafka.topic, since, upto), why,
                                 dlq, self.metrics)
        dlq.flush()
        self.checkpoint.advance_to(upto)
        log.error("rank %d dead-lettered the %d records it read since version %s", self.rank,
                  n, version)

    def _finish(self, dlq: DeadLetterWriter) -> None:
        """Stopping: the last version, made durable, and every rank's offsets committed."""
        self._publish(dlq, final=True)
        durable = None
        if self.rank == 0:
            publisher = self.checkpoint.publisher
            assert publisher is not None
            publisher.wait_idle()
            done = self.checkpoint.commit_durable(self)
            if self.settings.worker.gang_check_replicas:
                log.info("replicas bitwise equal at all %d publishes checked since the restore",
                         self.replicas_checked)
            if done:
                durable = (done[-1].version, dict(done[-1].offsets.get(self.kafka.topic, {})))
        _, got = self._any_stop(durable)
        if got[0] is not None and self.rank != 0:
            self._commit_announced(*got[0])

    def _check_lease(self) -> None:
        """Fenced once rank 0 lost the lease or could not renew it for its whole TTL."""
        if self.lease is not None and not self.lease.held():
            raise Fenced(f"the writer lease of {self.store.url} was lost "
                         f"(not renewed for {self.lease.ttl_s:g} s, or taken over)")

    # -- commits --------------------------------------------------------------
    def commit(self, offsets: dict[int, int]) -> bool:
        """Commit this rank's partitions among ``offsets`` (rank 0's checkpoint calls it)."""
        if self.source.commit(offsets):
            self.health.committed()
            return True
        return False

    def _commit_announced(self, version: int, offsets: dict[int, int]) -> None:
        """Rank 0 announced ``version`` durable: commit this rank's partitions of it."""
        self.checkpoint.version = version
        self.metrics.version.set(version)
        failpoint("before_commit")  # durable version, offsets not yet committed
        self.commit(offsets)

    def _durable(self, manifest: Manifest) -> None:
        assert self.checkpoint.publisher is not None
        self.metrics.publishes.inc()
        self.metrics.publish_seconds.observe(self.checkpoint.publisher.seconds_last)
        self.metrics.version.set(manifest.version)
        self.metrics.users.set(manifest.counts["users"])
        self.metrics.items.set(manifest.counts["items"])
        log.debug("published %s version %d (%s events)", manifest.kind, manifest.version,
                  manifest.counts.get("events"))
