"""Where partitions resume: held offsets against the log, and a topic recreated under the worker.

The rules are checked directly here (``resume_positions``), then through the
source and the loop with a scripted consumer and a scripted view of the topic,
for the interleavings a real broker cannot be made to produce on demand: a
failure raised inside ``poll``'s rebalance callback, a fetch out of range. The
same edges against the real broker and real processes are in
``tests/faults/test_kafka_edges.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kafka import TopicPartition
from kafka.errors import OffsetOutOfRangeError

from stream_rec.worker.source import SeekToCheckpoint
from stream_rec.worker.topic import OffsetsOutOfRange, resume_positions
from tests.worker.test_worker import (
    TOPIC,
    NoDeadLetters,
    ScriptedConsumer,
    ScriptedTopic,
    _rec,
    _worker,
)

LOG = {0: (0, 120), 1: (40, 90), 2: (0, 0)}


def test_offsets_inside_the_log_resume_where_held_and_unheld_partitions_at_the_start() -> None:
    positions, misplaced = resume_positions("t", {0: 120, 1: 40}, LOG, "fail")
    assert positions == {0: 120, 1: 40, 2: 0} and misplaced == []


@pytest.mark.parametrize("held, why", [
    ({0: 121}, "partition 0 resumes at offset 121 past the log end 120"),
    ({1: 39}, "partition 1 resumes at offset 39 below the log start 40"),
    ({2: 5}, "partition 2 resumes at offset 5 past the log end 0 (the log is empty at 0)"),
    ({7: 3}, "partition 7 at offset 3 no longer exists"),
])
def test_out_of_range_fails_with_one_line_naming_topic_partition_and_offsets(
        held: dict[int, int], why: str) -> None:
    with pytest.raises(OffsetsOutOfRange) as info:
        resume_positions("clicks", held, LOG, "fail")
    message = str(info.value)
    assert "\n" not in message and message.startswith("topic clicks: ")
    assert why in message and "worker.on_offset_out_of_range" in message


def test_resets_follow_the_policy() -> None:
    held = {0: 500, 1: 3, 7: 9}
    earliest, misplaced = resume_positions("t", held, LOG, "earliest")
    assert earliest == {0: 0, 1: 40, 2: 0}
    assert [m.partition for m in misplaced] == [0, 1, 7]
    latest, _ = resume_positions("t", held, LOG, "latest")
    assert latest == {0: 120, 1: 90, 2: 0}


def test_a_recreated_topic_misplaces_every_partition_even_offsets_that_look_valid() -> None:
    with pytest.raises(OffsetsOutOfRange) as info:
        resume_positions("clicks", {0: 100, 1: 50}, LOG, "fail", recreated="topic id a -> b")
    assert "deleted and recreated (topic id a -> b)" in str(info.value)
    assert "partition 0 was at offset 100, the log holds 0..119 now" in str(info.value)
    positions, misplaced = resume_positions("t", {0: 100, 1: 50}, LOG, "earliest",
                                            recreated="x")
    assert positions == {0: 0, 1: 40, 2: 0} and len(misplaced) == 3


def test_assigned_partitions_stay_paused_until_poll_has_checked_them_and_a_failure_raises(
        tmp_path: Path) -> None:
    consumer = ScriptedConsumer([], owned={0})
    worker = _worker(tmp_path, consumer, ScriptedTopic({0: (0, 10)}))
    worker.checkpoint.offsets = {0: 25}  # the snapshot's offset, past the new log's end
    listener = SeekToCheckpoint(worker.source)
    consumer.script = [lambda: listener.on_partitions_assigned({TopicPartition(TOPIC, 0)}),
                       [_rec(0, o) for o in range(10)]]
    with pytest.raises(OffsetsOutOfRange, match="partition 0 resumes at offset 25 past the log"):
        worker.poll_batch(100, 50)
    assert consumer.paused == {0} and worker.offsets == {0: 25} and worker.events == 0
    worker.checkpoint.publisher.close()


def test_earliest_resumes_at_the_log_start_and_the_next_version_records_it(
        tmp_path: Path) -> None:
    consumer = ScriptedConsumer([], owned={0})
    worker = _worker(tmp_path, consumer, ScriptedTopic({0: (30, 60)}), policy="earliest")
    worker.checkpoint.offsets = {0: 12}  # retention deleted 12..29 unread
    SeekToCheckpoint(worker.source).on_partitions_assigned({TopicPartition(TOPIC, 0)})
    assert consumer.seeks == {0: 12} and consumer.paused == {0}  # parked: nothing fetched
    worker.source.poll(10, 10)
    assert consumer.seeks == {0: 30} and consumer.paused == set()
    assert worker.offsets == {0: 30} and worker.checkpoint.dirty
    worker.checkpoint.publisher.close()


def test_a_fetch_out_of_range_goes_through_the_same_check(tmp_path: Path) -> None:
    consumer = ScriptedConsumer([], owned={0})
    worker = _worker(tmp_path, consumer, ScriptedTopic({0: (50, 80)}))
    worker.checkpoint.offsets = {0: 20}

    def out_of_range() -> None:
        raise OffsetOutOfRangeError({TopicPartition(TOPIC, 0): 20})

    consumer.script = [out_of_range]
    with pytest.raises(OffsetsOutOfRange, match="below the log start 50"):
        worker.source.poll(10, 10)
    worker.checkpoint.publisher.close()


def test_a_topic_recreated_under_the_worker_publishes_nothing_read_since_the_last_version(
        tmp_path: Path) -> None:
    consumer = ScriptedConsumer([], owned={0})
    topic = ScriptedTopic({0: (0, 1000)})
    worker = _worker(tmp_path, consumer, topic)
    worker.apply([_rec(0, o) for o in range(5)], NoDeadLetters())
    assert worker.confirm_topic()
    worker.checkpoint.publish(worker.model, NoDeadLetters())
    assert worker.checkpoint.publisher.wait_idle(30)
    worker.commit_published()
    # Recreated and refilled past offset 5: records 5.. now come from the new topic.
    topic.topic_id, topic.log = "id-2", {0: (0, 40)}
    worker.apply([_rec(0, o) for o in range(5, 12)], NoDeadLetters())
    with pytest.raises(OffsetsOutOfRange, match="partition 0 was at offset 5, the log holds "
                                                r"0\.\.39 now"):
        worker.confirm_topic()
    assert worker.checkpoint.published_offsets() == {0: 5}
    worker.checkpoint.publisher.close()


def test_with_earliest_a_recreated_topic_is_read_from_its_start_once(tmp_path: Path) -> None:
    consumer = ScriptedConsumer([], owned={0})
    topic = ScriptedTopic({0: (0, 1000)})
    worker = _worker(tmp_path, consumer, topic, policy="earliest")
    worker.apply([_rec(0, o) for o in range(5)], NoDeadLetters())
    worker.checkpoint.publish(worker.model, NoDeadLetters())
    assert worker.checkpoint.publisher.wait_idle(30)
    topic.topic_id, topic.log = "id-2", {0: (0, 40)}
    worker.apply([_rec(0, o) for o in range(5, 12)], NoDeadLetters())
    assert worker.confirm_topic()
    # Back to the published 5 events; partition 0 rereads the new topic from 0.
    assert worker.events == 5 and worker.offsets == {0: 0} and consumer.seeks == {0: 0}
    assert worker.guard.known is not None and worker.guard.known.topic_id == "id-2"
    worker.checkpoint.publish(worker.model, NoDeadLetters())
    assert worker.checkpoint.publisher.wait_idle(30)
    assert worker.checkpoint.published_offsets() == {0: 0}
    worker.checkpoint.publisher.close()
