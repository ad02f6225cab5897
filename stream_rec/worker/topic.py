"""The consumed topic: is it there, is it still the same one, and where each partition resumes.

Offsets mean something only within one incarnation of a topic and only while
the log still holds them. A topic deleted and recreated starts again at offset
0, and retention deletes the oldest events whether anyone read them or not. A
consumer that seeks to an offset from before either skips events without a
word: kafka-python's ``auto_offset_reset`` resets quietly, and some brokers
(the local one among them) answer a fetch past the end with nothing at all,
then serve the new topic's records from the old offset on. So the worker:

- never creates the topic it consumes: :meth:`TopicGuard.wait` waits for it,
  saying so every few seconds in the log and in ``/healthz``;
- on every assignment compares the offsets it holds with each partition's log
  start and end (:func:`log_ranges`; ends confirmed by reading where the broker
  may undercount them) and resumes per ``worker.on_offset_out_of_range``
  (:func:`resume_positions`): by default a one-line error and exit 1;
- remembers the topic's id (KIP-516) and confirms it before every publish
  (:meth:`TopicGuard.confirm`): a new id means the topic was recreated under
  the worker, so nothing read since the last version may be published.

Each version records the topic id beside its offsets, so a worker restarted
after the topic was recreated (even refilled beyond the version's offsets)
treats it as recreated at its first assignment. Versions written before topic
ids were recorded, and brokers without ids, fall back to the offset checks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from kafka import TopicPartition
from kafka.errors import KafkaError, UnknownTopicOrPartitionError, for_code

from stream_rec.errors import Fatal
from stream_rec.ingest.kafka import end_offsets, make_admin, make_consumer
from stream_rec.settings import KafkaSettings

log = logging.getLogger(__name__)

Offsets = dict[int, int]
Ranges = dict[int, tuple[int, int]]  # partition -> (log start, log end), end exclusive
Policy = Literal["fail", "earliest", "latest"]
NO_ID = "00000000-0000-0000-0000-000000000000"
WAIT_LOG_EVERY_S = 5.0
SETTING = "worker.on_offset_out_of_range"


@dataclass(frozen=True)
class TopicInfo:
    topic_id: str | None  # None: the broker reports no topic ids (before Kafka 2.8)
    partitions: tuple[int, ...]


@dataclass(frozen=True)
class Misplaced:
    """A partition whose held offset the log cannot serve."""

    partition: int
    offset: int | None  # held offset (None: not held)
    start: int | None  # log start (None: the partition no longer exists)
    end: int | None

    def describe(self, recreated: bool) -> str:
        p = f"partition {self.partition}"
        at = "no offset" if self.offset is None else f"offset {self.offset}"
        if self.start is None or self.end is None:
            return f"{p} at {at} no longer exists"
        log_ = f"the log holds {self.start}..{self.end - 1}" if self.end > self.start \
            else f"the log is empty at {self.end}"
        if recreated:
            return f"{p} was at {at}, {log_} now"
        if self.offset is not None and self.offset > self.end:
            return f"{p} resumes at {at} past the log end {self.end} ({log_})"
        return f"{p} resumes at {at} below the log start {self.start} ({log_})"


class OffsetsOutOfRange(Fatal):
    """The held offsets do not address the topic's log; nothing was consumed past them."""

    def __init__(self, topic: str, misplaced: list[Misplaced], recreated: str | None = None
                 ) -> None:
        self.topic = topic
        self.misplaced = misplaced
        self.recreated = recreated
        parts = "; ".join(m.describe(recreated is not None) for m in misplaced)
        if recreated is not None:
            head = (f"topic {topic} was deleted and recreated ({recreated}): the offsets held "
                    f"refer to the old topic: {parts}; nothing read from the new topic was "
                    "published or committed")
        else:
            why = []
            if any(m.offset is not None and m.end is not None and m.offset > m.end
                   for m in misplaced):
                why.append("past the end: was the topic deleted and recreated?")
            if any(m.offset is not None and m.start is not None and m.offset < m.start
                   for m in misplaced):
                why.append("below the start: retention deleted events never read")
            if any(m.start is None for m in misplaced):
                why.append("missing partitions: was the topic recreated?")
            head = (f"topic {topic}: the snapshot's offsets are outside the log "
                    f"({'; '.join(why)}): {parts}; nothing was consumed")
        super().__init__(f"{head}. To resume anyway set {SETTING} to \"earliest\" (read what "
                         "the log holds) or \"latest\" (skip it); see docs/OPERATIONS.md")


def resume_positions(topic: str, held: Offsets, ranges: Ranges, policy: Policy,
                     recreated: str | None = None) -> tuple[Offsets, list[Misplaced]]:
    """Where each partition in ``ranges`` resumes, and which held offsets were out of range.

    A partition not held starts at its log start. A held offset outside its
    partition's log, a held partition the topic no longer has, and -- when
    ``recreated`` (a description of the change) -- every partition are
    *misplaced*: under ``"fail"`` that raises :class:`OffsetsOutOfRange`; under
    ``"earliest"``/``"latest"`` they resume at the log start/end.
    """
    positions: Offsets = {}
    misplaced: list[Misplaced] = []
    for p, (start, end) in sorted(ranges.items()):
        offset = held.get(p)
        if recreated is None and (offset is None or start <= offset <= end):
            positions[p] = start if offset is None else offset
            continue
        misplaced.append(Misplaced(p, offset, start, end))
        positions[p] = start if policy == "earliest" else end
    misplaced += [Misplaced(p, o, None, None) for p, o in sorted(held.items()) if p not in ranges]
    if misplaced and policy == "fail":
        raise OffsetsOutOfRange(topic, misplaced, recreated)
    return positions, misplaced


def log_ranges(kafka: KafkaSettings, topic: str, partitions: Iterable[int], held: Offsets
               ) -> Ranges:
    """Each partition's (log start, log end), ends confirmed where ``held`` lies beyond them.

    Some brokers (the local one among them) report a partition's end at record
    batch granularity, below the true end; an offset beyond the reported end is
    therefore confirmed by reading (:func:`~stream_rec.ingest.kafka.end_offsets`)
    before it is called past the end. Uses a consumer of its own (no group), so
    it may run inside the group consumer's rebalance callback.
    """
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    if not tps:
        return {}
    consumer = make_consumer(kafka, None)
    try:
        starts = consumer.beginning_offsets(tps)
        ends = dict(consumer.end_offsets(tps))
        doubtful = [tp for tp in tps if held.get(tp.partition, -1) > ends[tp]]
        if doubtful:
            ends.update(end_offsets(consumer, doubtful))
        return {tp.partition: (int(starts[tp]), int(ends[tp])) for tp in tps}
    finally:
        consumer.close()


class TopicGuard:
    """The consumed topic's existence, identity and log ranges, for a source.

    ``held`` returns the offsets of the state the worker holds; ``reposition``
    replaces them when a partition resumes elsewhere (an operator-chosen
    reset), so the next version records where reading really resumed.
    ``held_topic_id`` is the topic id those offsets were read from, as the
    restored version recorded it (None: not recorded).
    ``on_wait`` hears why the worker waits (None once it no longer does).
    """

    def __init__(self, kafka: KafkaSettings, policy: Policy, held: Callable[[], Offsets],
                 reposition: Callable[[Offsets], None],
                 held_topic_id: Callable[[], str | None] = lambda: None,
                 on_wait: Callable[[str | None], None] = lambda _reason: None,
                 ranges: Callable[[KafkaSettings, str, Iterable[int], Offsets], Ranges]
                 = log_ranges) -> None:
        self.kafka = kafka
        self.topic = kafka.topic
        self.policy = policy
        self.held = held
        self.held_topic_id = held_topic_id
        self.reposition = reposition
        self.on_wait = on_wait
        self.ranges = ranges
        self.known: TopicInfo | None = None  # the incarnation the held offsets refer to
        self._admin: Any = None
        self._next_log = 0.0

    # -- existence and identity -----------------------------------------
    def describe(self) -> TopicInfo | None:
        """The topic as the broker describes it now (fresh metadata); None if it does not exist."""
        if self._admin is None:
            self._admin = make_admin(self.kafka)
        [meta] = self._admin.describe_topics([self.topic])
        error = for_code(meta["error_code"])
        if error is UnknownTopicOrPartitionError or (error.errno == 0 and not meta["partitions"]):
            return None
        if error.errno != 0:
            raise error(f"describing topic {self.topic}")
        topic_id = meta.get("topic_id")
        topic_id = None if topic_id is None or str(topic_id) == NO_ID else str(topic_id)
        return TopicInfo(topic_id, tuple(sorted(p["partition_index"] for p in meta["partitions"])))

    def wait(self, stop: threading.Event) -> bool:
        """Block until the topic exists (False if ``stop`` is set first); it is never created here."""
        t0 = time.monotonic()
        while True:
            try:
                info = self.describe()
            except KafkaError as exc:  # an answer that is not about the topic: ask again
                self._waiting(time.monotonic() - t0, f"cannot be described ({exc})")
                if stop.wait(1.0):
                    return False
                continue
            if info is not None:
                if time.monotonic() - t0 > 1.0:
                    log.info("topic %s exists now (waited %.0f s)", self.topic,
                             time.monotonic() - t0)
                self.on_wait(None)
                self.known = self._first_sight(info)
                return True
            self._waiting(time.monotonic() - t0, "does not exist yet")
            if stop.wait(0.5):
                return False

    def require(self) -> TopicInfo:
        """The topic as it is now, which must exist (a bounded run does not wait)."""
        info = self.describe()
        if info is None:
            raise Fatal(f"topic {self.topic} does not exist")
        self.known = self._first_sight(info)
        return info

    def _first_sight(self, info: TopicInfo) -> TopicInfo:
        """The incarnation the held offsets refer to: the restored version's, where it
        recorded one, so that a topic recreated while no worker ran is seen as such at
        the first assignment (its offsets may look valid if the new topic was refilled)."""
        held_id = self.held_topic_id()
        if held_id is not None and info.topic_id is not None and held_id != info.topic_id:
            return TopicInfo(held_id, info.partitions)
        return info

    def topic_id(self) -> str | None:
        """The id of the incarnation being read (None: unknown, or the broker has none)."""
        return self.known.topic_id if self.known is not None else None

    def confirm(self) -> Literal["same", "missing", "unknown", "recreated"]:
        """Is the topic still the incarnation the held offsets refer to?

        "missing" (deleted, not yet recreated) and "unknown" (the broker did not
        answer) both mean: do not publish yet.
        """
        try:
            info = self.describe()
        except KafkaError as exc:
            log.warning("could not confirm topic %s: %s", self.topic, exc)
            return "unknown"
        if info is None:
            self._waiting(0.0, "was deleted under the worker: not publishing until it returns")
            return "missing"
        self.on_wait(None)
        if self.known is not None and info.topic_id != self.known.topic_id:
            return "recreated"
        return "same"

    def _waiting(self, waited_s: float, what: str) -> None:
        reason = f"topic {self.topic} {what}"
        self.on_wait(reason)
        now = time.monotonic()
        if now >= self._next_log:
            log.warning("%s%s; the worker does not create the topic it consumes", reason,
                        f" (waited {waited_s:.0f} s)" if waited_s >= 1 else "")
            self._next_log = now + WAIT_LOG_EVERY_S

    # -- positions ------------------------------------------------------
    def positions(self, partitions: Iterable[int], held: Offsets | None = None) -> Offsets:
        """Where each of ``partitions`` resumes; raises :class:`OffsetsOutOfRange` under "fail".

        ``held`` (default: the held offsets) are the offsets to check. The
        topic's identity is checked too: if it was recreated since the held
        offsets were read, every partition resumes per the policy.
        """
        partitions = sorted(partitions)
        info = self.describe()
        recreated = None
        if info is not None and self.known is not None and info.topic_id != self.known.topic_id:
            recreated = f"topic id {self.known.topic_id} -> {info.topic_id}"
            partitions = list(info.partitions)  # every partition's offsets are stale
        return self._place(partitions, info, recreated, held)

    def recreated(self, held: Offsets | None = None, policy: Policy | None = None) -> Offsets:
        """The topic was recreated under the worker: every partition resumes per the policy.

        ``held`` (default: the held offsets) names where the worker was, for the
        error; ``policy`` overrides the configured one (a bounded run always fails).
        """
        info = self.describe()
        if info is None:
            raise Fatal(f"topic {self.topic} was recreated and deleted again while being checked")
        change = f"topic id {self.known.topic_id if self.known else None} -> {info.topic_id}"
        return self._place(list(info.partitions), info, change, held, policy)

    def _place(self, partitions: list[int], info: TopicInfo | None, recreated: str | None,
               held: Offsets | None = None, policy: Policy | None = None) -> Offsets:
        held = dict(self.held()) if held is None else held
        if info is None:
            log.warning("topic %s is missing while assigning %s: resuming at the held offsets",
                        self.topic, partitions)
            return {p: held.get(p, 0) for p in partitions}
        if recreated:
            considered = held
        else:  # the assigned partitions, and held ones the topic no longer has
            considered = {p: o for p, o in held.items()
                          if p in partitions or p not in info.partitions}
        ranges = self.ranges(self.kafka, self.topic, partitions, considered)
        policy = policy or self.policy
        positions, misplaced = resume_positions(self.topic, considered, ranges, policy,
                                                recreated)
        if misplaced:
            for m in misplaced:
                log.warning("%s: resuming at %s (%s = %s)", m.describe(recreated is not None),
                            positions.get(m.partition, "none: dropped"), SETTING, policy)
            new = {} if recreated else dict(held)
            new.update(positions)
            for m in misplaced:
                if m.start is None:
                    new.pop(m.partition, None)
            self.reposition(new)
        self.known = info
        return positions

    def close(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None
