"""The worker's steps, one by one, against a scripted consumer.

The broker-level tests (``tests/faults``) drive real processes, but some
interleavings cannot be produced on demand there -- the local broker cannot
hand the partitions to a second member meanwhile -- so the steps are also
checked directly: records in hand when a rebalance seeks back are not applied
twice; revoked partitions rewind the model to the newest published version and
the assignment seeks there; an overrunning batch is not published; only owned
partitions are committed.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from kafka import TopicPartition

from stream_rec.events import encode_event
from stream_rec.model import StreamingModel
from stream_rec.settings import Settings
from stream_rec.snapshot import SnapshotStore
from stream_rec.worker import Worker
from stream_rec.worker.source import SeekToCheckpoint
from stream_rec.worker.topic import Ranges, TopicInfo

TOPIC = "clicks"


def _rec(partition: int, offset: int, **extra: Any) -> SimpleNamespace:
    ev = {"user_id": f"u{offset % 3}", "item_id": f"i{offset}",
          "ts": 1_700_000_000_000 + offset, **extra}
    return SimpleNamespace(topic=TOPIC, partition=partition, offset=offset, key=None,
                           value=encode_event(ev))


class ScriptedConsumer:
    """Answers polls from a script; a step may be a callable run inside poll (a rebalance)."""

    def __init__(self, script: list[Any], owned: set[int]) -> None:
        self.script = script
        self.owned = owned
        self.seeks: dict[int, int] = {}
        self.commits: list[dict[int, int]] = []
        self.paused: set[int] = set()

    def poll(self, timeout_ms: int = 0, max_records: int = 0) -> dict:
        if not self.script:
            return {}
        step = self.script.pop(0)
        if callable(step):
            step()
            step = self.script.pop(0) if self.script else []
        return {TopicPartition(TOPIC, 0): step} if step else {}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks[tp.partition] = offset

    def pause(self, *tps: TopicPartition) -> None:
        self.paused.update(tp.partition for tp in tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused.difference_update(tp.partition for tp in tps)

    def seek_to_beginning(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self.seeks[tp.partition] = 0

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(TOPIC, p) for p in self.owned}

    def commit(self, offsets: dict) -> None:
        self.commits.append({tp.partition: om.offset for tp, om in offsets.items()})


class DeadLetters:
    def __init__(self) -> None:
        self.letters: list[Any] = []

    def send(self, err: Any) -> None:
        self.letters.append(err)

    def flush(self) -> None:
        pass


class ScriptedTopic:
    """The broker's view of the topic, scripted: its id and each partition's log range."""

    def __init__(self, ranges: Ranges, topic_id: str = "id-1") -> None:
        self.log = dict(ranges)
        self.topic_id = topic_id

    def describe(self) -> TopicInfo:
        return TopicInfo(self.topic_id, tuple(sorted(self.log)))

    def ranges(self, _kafka: Any, _topic: str, partitions: Any, _held: Any) -> Ranges:
        return {p: self.log[p] for p in partitions}


class NoDeadLetters:
    def send(self, err: Any) -> None:
        raise AssertionError(f"unexpected dead letter {err}")

    def flush(self) -> None:
        pass


def _worker(tmp_path: Path, consumer: ScriptedConsumer, topic: ScriptedTopic | None = None,
            policy: str = "fail") -> Worker:
    settings = Settings()
    settings.kafka.topic = TOPIC
    settings.worker.device = "cpu"
    settings.worker.on_offset_out_of_range = policy  # type: ignore[assignment]
    settings.model.dim = 8
    settings.model.negatives = 16
    worker = Worker(settings, store=SnapshotStore(tmp_path / "store"))
    worker.model = StreamingModel(settings.model, device="cpu")
    worker.checkpoint.start_publisher()
    worker.source.consumer = consumer
    topic = topic or ScriptedTopic({0: (0, 1000), 1: (0, 1000)})
    worker.guard.describe = topic.describe  # type: ignore[method-assign]
    worker.guard.ranges = topic.ranges
    worker.guard.known = topic.describe()
    return worker


def test_records_in_hand_are_not_applied_twice_after_a_rebalance(tmp_path: Path) -> None:
    first = [_rec(0, o) for o in range(5)]
    consumer = ScriptedConsumer([], owned={0})
    worker = _worker(tmp_path, consumer)
    listener = SeekToCheckpoint(worker.source)
    tp = {TopicPartition(TOPIC, 0)}

    def rebalance() -> None:  # kafka-python runs the listener inside poll()
        listener.on_partitions_revoked(tp)
        listener.on_partitions_assigned(tp)

    # First poll: offsets 0-4. Second poll: a rebalance seeks back to 0 and 0-4 come again.
    consumer.script = [first, rebalance, [_rec(0, o) for o in range(5)]]
    records = worker.poll_batch(100, 1000)
    assert sorted(r.offset for r in records) == [0, 1, 2, 3, 4]
    assert consumer.seeks == {0: 0}
    worker.checkpoint.publisher.close()


def test_revocation_rewinds_to_the_published_version_and_seeks_there(tmp_path: Path) -> None:
    consumer = ScriptedConsumer([], owned={0})
    worker = _worker(tmp_path, consumer)
    worker.apply([_rec(0, o) for o in range(5)], NoDeadLetters())
    worker.checkpoint.publish(worker.model, NoDeadLetters())
    assert worker.checkpoint.publisher.wait_idle(30)
    worker.commit_published()
    assert consumer.commits == [{0: 5}]
    worker.apply([_rec(0, o) for o in range(5, 12)], NoDeadLetters())
    assert worker.offsets == {0: 12} and worker.events == 12
    listener = SeekToCheckpoint(worker.source)
    listener.on_partitions_revoked({TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)})
    assert worker.offsets == {0: 5} and worker.events == 5 and not worker.checkpoint.dirty
    assert int(worker.model.state().tables["user.events"].sum()) == 5
    listener.on_partitions_assigned({TopicPartition(TOPIC, 0)})
    assert consumer.seeks == {0: 5}
    worker.checkpoint.publisher.close()


def test_an_overrunning_batch_is_not_published_and_lost_partitions_not_committed(
        tmp_path: Path) -> None:
    consumer = ScriptedConsumer([], owned={0})
    worker = _worker(tmp_path, consumer)
    worker.source.last_poll = time.monotonic()
    assert worker.source.may_publish()
    worker.source.last_poll = time.monotonic() - worker.kafka.max_poll_interval_ms / 1000.0 - 1
    assert not worker.source.may_publish()
    worker.commit({0: 5, 1: 7})
    assert consumer.commits == [{0: 5}]
    worker.checkpoint.publisher.close()


def test_a_model_made_non_finite_is_never_published(tmp_path: Path) -> None:
    """The second line of defence: rewind, dead-letter what was applied since, go on."""
    worker = _worker(tmp_path, ScriptedConsumer([], owned={0}))
    dlq = DeadLetters()
    worker.apply([_rec(0, o) for o in range(5)], dlq)
    worker.publish(dlq)
    assert worker.checkpoint.publisher.wait_idle(30)
    worker.commit_published()
    good = worker.model.state()
    # events that pass validation, then training diverges (simulated: a row turns NaN)
    poisoned = [_rec(0, o) for o in range(5, 1005)]
    worker.apply(poisoned, dlq)
    worker.model.params.item_out[0] = float("nan")
    worker.publish(dlq)
    assert len(dlq.letters) == len(poisoned)
    assert all(x.code == "model_poisoned" and "non-finite" in x.reason for x in dlq.letters)
    assert worker.offsets == {0: 1005} and worker.events == 5
    for name, table in worker.model.state().tables.items():
        np.testing.assert_array_equal(table, good.tables[name], err_msg=name)
    worker.publish(dlq)                     # the skip is published, finite
    assert worker.checkpoint.publisher.wait_idle(30)
    worker.commit_published()
    assert worker.store.read_manifest(worker.version).offsets == {TOPIC: {0: 1005}}
    worker.checkpoint.publisher.close()
