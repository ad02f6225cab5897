"""Where the worker's records come from: the live consumer group, or a bounded range.

Both sources position every partition at the offsets of the version the
worker holds (its checkpoint), so what was published is never read twice and
what was not is never skipped; the :class:`~.topic.TopicGuard` checks those
offsets against each partition's log first, and the consumers never reset an
offset on their own (``auto_offset_reset="none"``: a fetch out of range raises
and goes through the same check). They differ in what "done" and "commit" mean:

- :class:`GroupSource` follows the topic as a member of the consumer group.
  It checks and seeks after each assignment, rewinds the worker when
  partitions are revoked or lost, commits only partitions it owns, and refuses
  to publish after a batch overran ``max_poll_interval_ms`` (the member was
  evicted).
- :class:`BoundedSource` replays explicit partitions up to fixed end offsets
  (``stream-rec replay``): manual assignment, no group, no commits; the
  snapshot alone records progress, which makes a replay resumable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import CommitFailedError, KafkaError, OffsetOutOfRangeError
from kafka.structs import OffsetAndMetadata

from stream_rec.ingest.kafka import make_consumer
from stream_rec.settings import KafkaSettings

from .topic import TopicGuard

log = logging.getLogger(__name__)

Offsets = dict[int, int]


@dataclass(frozen=True)
class Bounds:
    """A bounded run over explicit partitions (replay), instead of following a group.

    ``start`` is where each partition begins when the store has no snapshot yet
    (a snapshot's offsets win, which makes a bounded run resumable and
    idempotent); ``stop`` is each partition's end offset, exclusive.
    """

    start: dict[int, int]
    stop: dict[int, int]


class GroupSource:
    """The live topic, as a member of ``kafka.group_id``.

    ``guard`` knows the offsets of the state the worker holds and where each
    partition resumes; ``on_lost()`` is called when partitions are revoked or
    lost and must bring the worker back to its newest durable version (whose
    offsets the guard then holds, and where the assignment seeks).
    """

    resets_on_recreation = True  # a recreated topic may be followed (worker.on_offset_out_of_range)

    def __init__(self, kafka: KafkaSettings, guard: TopicGuard,
                 on_lost: Callable[[], None]) -> None:
        self.kafka = kafka
        self.guard = guard
        self.on_lost = on_lost
        self.consumer: Any = None
        self.generation = 0  # rebalances so far: records polled before one are stale
        self.last_poll = time.monotonic()
        self.unplaced: set[TopicPartition] = set()  # assigned, paused until checked
        self.closing = False

    def open(self, stop: threading.Event) -> bool:
        """Wait for the topic (never creating it), then join the group; False if stopped first."""
        if not self.guard.wait(stop):
            return False
        self.consumer = make_consumer(self.kafka, self.kafka.group_id, auto_offset_reset="none")
        self.consumer.subscribe([self.kafka.topic], listener=SeekToCheckpoint(self))
        return True

    def poll(self, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]:
        """Records by partition, after placing partitions the last rebalance assigned.

        Placing (checking the held offsets against the log, which may read the
        log's tail) happens here, after ``poll`` returns, rather than in the
        rebalance callback: kafka-python runs the callback inside its network
        loop and turns an exception raised there into a logged stack trace.
        Raises :class:`~.topic.OffsetsOutOfRange` under ``"fail"``.
        """
        try:
            got = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except OffsetOutOfRangeError as exc:  # the log moved under a position (retention)
            moved = set(exc.args[0])
            self.consumer.pause(*moved)
            self.unplaced |= moved  # placed below, like a new assignment
            got = {}
        self.last_poll = time.monotonic()
        if self.unplaced:
            owned = self.unplaced & self.consumer.assignment()
            try:
                positions = self.guard.positions(tp.partition for tp in owned) if owned else {}
            except KafkaError as exc:  # the broker did not answer: still parked, next poll
                log.warning("could not check where partitions resume (retrying): %s", exc)
                return got
            self.unplaced = set()
            if owned:
                self.seek(positions)
                self.consumer.resume(*owned)
        return got

    def seek(self, positions: Offsets) -> None:
        """Move the owned partitions among ``positions`` there."""
        for tp in self.consumer.assignment():
            if tp.partition in positions:
                self.consumer.seek(tp, positions[tp.partition])
        log.info("resuming at %s", {p: o for p, o in sorted(positions.items())})

    def admit(self, records: list[Any]) -> tuple[list[Any], Offsets]:
        """Records to apply, and partitions known complete (none: the topic never ends)."""
        return records, {}

    def reached_end(self, offsets: Offsets) -> bool:
        return False

    def may_publish(self) -> bool:
        """May the worker publish what it holds? Not after overrunning the poll interval.

        A batch that took longer than ``max_poll_interval_ms`` got this member
        evicted: its partitions may already be someone else's, who starts from
        the committed (= published) offsets. Publishing the batch would then
        apply its events twice across the group. The next poll rejoins, the
        rebalance rewinds to the published version, and the events are read
        again by whoever owns them now.
        """
        overran = time.monotonic() - self.last_poll > self.kafka.max_poll_interval_ms / 1000.0
        if overran:
            log.warning("batch overran max_poll_interval_ms: not publishing before rejoining")
        return not overran

    def commit(self, offsets: Offsets) -> bool:
        """Commit ``offsets`` of owned partitions; whether the broker took them.

        Only partitions this member owns: committing a lost partition's older
        offset would move its new owner's committed position backwards.
        """
        owned = {tp.partition for tp in self.consumer.assignment()}
        to_commit = {TopicPartition(self.kafka.topic, p): OffsetAndMetadata(o, "", -1)
                     for p, o in offsets.items() if p in owned}
        if not to_commit:
            return False
        try:
            self.consumer.commit(to_commit)
            return True
        except (CommitFailedError, KafkaError) as exc:
            # The snapshot already holds these offsets; a failed commit only
            # means a restart will seek from the snapshot instead.
            log.warning("offset commit failed (the snapshot keeps them): %s", exc)
            return False

    def close(self) -> None:
        self.closing = True  # leaving the group revokes everything: no rewind needed
        if self.consumer is not None:
            self.consumer.close(autocommit=False)


class SeekToCheckpoint(ConsumerRebalanceListener):
    """On assignment, position each partition where the held version left it.

    kafka-python runs these callbacks inside ``poll()``, on the polling thread.
    """

    def __init__(self, source: GroupSource) -> None:
        self.source = source

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))
        if revoked and not self.source.closing:
            self.source.generation += 1
            self.source.on_lost()

    def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        log.warning("partitions lost (evicted from the group): %s",
                    sorted(tp.partition for tp in lost))
        if lost:
            self.source.generation += 1
            self.source.on_lost()

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Park the new partitions: paused at the held offsets until ``poll`` has checked them."""
        if not assigned:
            return
        consumer = self.source.consumer
        held = self.source.guard.held()
        for tp in assigned:
            consumer.seek(tp, held.get(tp.partition, 0))
        consumer.pause(*assigned)
        self.source.unplaced |= set(assigned)
        log.info("partitions assigned: %s (held offsets %s)",
                 sorted(tp.partition for tp in assigned), held)


class BoundedSource:
    """Explicit partitions from the held version's offsets (else ``bounds.start``) to ``stop``.

    The held offsets are checked against the log like a group assignment's
    (``bounds.start`` stands in where none are held); a topic recreated during
    the run always fails it, since its range was resolved on the old topic.
    """

    resets_on_recreation = False

    def __init__(self, kafka: KafkaSettings, bounds: Bounds, guard: TopicGuard) -> None:
        self.kafka = kafka
        self.bounds = bounds
        self.guard = guard
        self.consumer: Any = None
        self.generation = 0  # no group, no rebalances

    def open(self, stop: threading.Event) -> bool:
        self.guard.require()
        positions = self.guard.positions(self.bounds.stop,
                                         held={**self.bounds.start, **self.guard.held()})
        self.consumer = make_consumer(self.kafka, None, auto_offset_reset="none")
        parts = [TopicPartition(self.kafka.topic, p) for p in sorted(self.bounds.stop)]
        self.consumer.assign(parts)
        self.seek(positions)
        return True

    def poll(self, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]:
        try:
            return self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except OffsetOutOfRangeError as exc:  # the log moved under a position (retention)
            self.seek(self.guard.positions(tp.partition for tp in exc.args[0]))
            return {}

    def seek(self, positions: Offsets) -> None:
        for p, offset in positions.items():
            if p in self.bounds.stop:
                self.consumer.seek(TopicPartition(self.kafka.topic, p), offset)

    def admit(self, records: list[Any]) -> tuple[list[Any], Offsets]:
        """Records below each partition's stop, and the partitions whose range is done.

        A partition counts as done once the consumer's position reached its
        stop, even if its last offsets hold no record (compaction, markers).
        """
        stop = self.bounds.stop
        records = [r for r in records if r.offset < stop.get(r.partition, 0)]
        done = {p: end for p, end in stop.items()
                if self.consumer.position(TopicPartition(self.kafka.topic, p)) >= end}
        return records, done

    def reached_end(self, offsets: Offsets) -> bool:
        """Has every partition reached its stop offset?"""
        return all(offsets.get(p, self.bounds.start.get(p, 0)) >= end
                   for p, end in self.bounds.stop.items())

    def may_publish(self) -> bool:
        return True

    def commit(self, offsets: Offsets) -> bool:
        return False  # a bounded run has no group: its snapshot alone records progress

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close(autocommit=False)


class AssignedSource:
    """A gang rank's partitions, assigned by hand, committed under the live group's id.

    Rank r of W reads the partitions p with p mod W = r (:func:`gang_partitions`):
    no group membership, so no rebalances, and no member can be evicted while
    its gang waits for a collective; commits still name ``kafka.group_id``, so
    lag stays visible to ``stream-rec status`` and to lag-based autoscalers.
    Positions come from the held version's offsets, checked against the log by
    the guard like a group assignment's.
    """

    resets_on_recreation = False  # a gang stops; its restart applies the policy

    def __init__(self, kafka: KafkaSettings, guard: TopicGuard) -> None:
        self.kafka = kafka
        self.guard = guard
        self.consumer: Any = None
        self.partitions: list[int] = []
        self.generation = 0  # no group, no rebalances

    def open(self, partitions: list[int]) -> None:
        """Assign ``partitions`` and seek each where the held version left it."""
        self.partitions = sorted(partitions)
        positions = self.guard.positions(self.partitions) if self.partitions else {}
        self.consumer = make_consumer(self.kafka, self.kafka.group_id, auto_offset_reset="none")
        self.consumer.assign([TopicPartition(self.kafka.topic, p) for p in self.partitions])
        self.seek(positions)

    def poll(self, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]:
        if not self.partitions:
            time.sleep(timeout_ms / 1000.0)  # a rank beyond the partition count: idle
            return {}
        try:
            return self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except OffsetOutOfRangeError as exc:  # the log moved under a position (retention)
            self.seek(self.guard.positions(tp.partition for tp in exc.args[0]))
            return {}

    def seek(self, positions: Offsets) -> None:
        for p, offset in positions.items():
            if p in self.partitions:
                self.consumer.seek(TopicPartition(self.kafka.topic, p), offset)
        if positions:
            log.info("resuming at %s", {p: o for p, o in sorted(positions.items())})

    def admit(self, records: list[Any]) -> tuple[list[Any], Offsets]:
        return records, {}

    def reached_end(self, offsets: Offsets) -> bool:
        return False

    def may_publish(self) -> bool:
        return True  # no membership to lose

    def commit(self, offsets: Offsets) -> bool:
        """Commit ``offsets`` of this rank's partitions; whether the broker took them."""
        mine = {TopicPartition(self.kafka.topic, p): OffsetAndMetadata(o, "", -1)
                for p, o in offsets.items() if p in self.partitions}
        if not mine or self.consumer is None:
            return False
        try:
            self.consumer.commit(mine)
            return True
        except KafkaError as exc:
            log.warning("offset commit failed (the snapshot keeps them): %s", exc)
            return False

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close(autocommit=False)


def gang_partitions(partitions: Iterable[int], rank: int, world: int) -> list[int]:
    """The partitions rank ``rank`` of ``world`` reads: those with p mod world = rank."""
    return sorted(p for p in partitions if p % world == rank)
