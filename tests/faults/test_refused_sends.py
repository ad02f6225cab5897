"""Sends the broker refuses: dead letters, and events from ``stream-rec produce``.

A broker of its own validates records against a JSON schema per topic (the
local broker's schema registry) and refuses the rest with INVALID_RECORD, a
non-retriable error: the real way this broker has to refuse a record (it
enforces no size limit and creates any topic a producer names). With a schema
on the dead-letter topic that no letter matches, the worker must fail the
batch holding the bad messages -- nothing published or committed past them,
one-line error, exit 1 -- and once the schema is gone, a restart must apply
every good event exactly once and write each letter once. ``stream-rec
produce`` must exit non-zero with the count it could not send.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import TopicPartition
from kafka.admin import NewTopic

from stream_rec import datasets
from stream_rec.broker import LocalBroker
from stream_rec.events import encode_event
from stream_rec.ingest.kafka import make_admin, make_consumer, make_producer
from stream_rec.settings import KafkaSettings
from stream_rec.snapshot import SnapshotStore
from tests.faults.common import (
    SMALL_MODEL,
    assert_exactly_once,
    caught_up,
    published_offsets,
    send_acked,
)
from tests.support import ROOT, env_for, spawn, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.kafka]

NO_LETTER_MATCHES = {"type": "object",
                     "properties": {"value": {"type": "object", "required": ["never"]}}}


@pytest.fixture(scope="module")
def strict_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A broker with schema validation on: (bootstrap, schema directory)."""
    schemas = tmp_path_factory.mktemp("schemas")
    log = tmp_path_factory.mktemp("strict-broker") / "broker.log"
    broker = LocalBroker(log_path=log, schema_dir=schemas).start()
    try:
        yield broker.bootstrap, schemas
    finally:
        broker.stop(timeout_s=0.5)  # memory only: nothing to lose by a quick kill


def _cfg(bootstrap: str, name: str) -> KafkaSettings:
    return KafkaSettings(bootstrap=bootstrap, topic=name, group_id=f"worker-{name}",
                         session_timeout_ms=2000, heartbeat_interval_ms=500)


def _letters(cfg: KafkaSettings) -> dict[tuple[int, int], int]:
    """How many letters the dead-letter topic holds per origin (partition, offset)."""
    consumer = make_consumer(cfg, None, consumer_timeout_ms=1000)
    consumer.assign([TopicPartition(cfg.dlq_topic, p)
                     for p in consumer.partitions_for_topic(cfg.dlq_topic)])
    consumer.seek_to_beginning()
    seen: dict[tuple[int, int], int] = {}
    for rec in consumer:
        h = {k: v.decode() for k, v in rec.headers}
        origin = (int(h["origin.partition"]), int(h["origin.offset"]))
        seen[origin] = seen.get(origin, 0) + 1
    consumer.close()
    return seen


def test_a_refused_dead_letter_fails_the_batch_and_a_restart_applies_it_once(
        strict_broker: tuple[str, Path], tmp_path: Path) -> None:
    bootstrap, schemas = strict_broker
    cfg = _cfg(bootstrap, "clicks-dlq-refused")
    rule = schemas / f"{cfg.dlq_topic}.json"
    rule.write_text(json.dumps(NO_LETTER_MATCHES))
    make_admin(cfg).create_topics([NewTopic(cfg.topic, 2, 1), NewTopic(cfg.dlq_topic, 1, 1)])
    events = list(itertools.islice(datasets.iter_synthetic(seed=7), 500))
    acked, ends = send_acked(cfg, events[:300])
    producer = make_producer(cfg)
    bad = [producer.send(cfg.topic, key=b"bad", value=v, partition=0).get(30)
           for v in (b"not json", b'{"user_id": "u1"}', b"\xff\xfe")]
    more, more_ends = send_acked(cfg, events[300:], producer=producer)
    producer.close()
    ends = {p: max(ends.get(p, 0), more_ends.get(p, 0), *(md.offset + 1 for md in bad
                                                            if md.partition == p))
            for p in (0, 1)}
    first_bad = bad[0].offset

    store = tmp_path / "store"
    log = tmp_path / "worker.log"
    env = env_for(cfg, store, **SMALL_MODEL)
    worker = spawn(["worker"], env, log)
    try:
        code = worker.wait(60)
    except subprocess.TimeoutExpired:
        worker.kill()
        raise AssertionError("the worker did not stop on a refused dead letter") from None
    text = log.read_text(errors="replace")
    assert code == 1 and "Traceback" not in text, text[-3000:]
    [line] = [ln for ln in text.splitlines() if ln.startswith("stream-rec worker: error: ")]
    assert f"could not be sent to {cfg.dlq_topic}" in line and "InvalidRecordError" in line
    assert "was not published and its offsets were not committed" in line
    # Nothing past the first bad message is published or committed on its partition.
    assert published_offsets(SnapshotStore(store), cfg.topic).get(0, 0) <= first_bad
    group = make_consumer(cfg, cfg.group_id)
    committed = group.committed(TopicPartition(cfg.topic, 0))
    group.close()
    assert committed is None or committed <= first_bad
    assert _letters(cfg) == {}

    rule.unlink()  # the operator fixes the dead-letter topic; the worker restarts
    worker = spawn(["worker"], env, log)
    try:
        wait_until(lambda: caught_up(store, cfg.topic, ends), 60, what="every offset")
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    assert_exactly_once(store, acked + more)
    assert _letters(cfg) == {(0, md.offset): 1 for md in bad}


def test_produce_exits_non_zero_with_the_count_it_could_not_send(
        strict_broker: tuple[str, Path], tmp_path: Path) -> None:
    bootstrap, schemas = strict_broker
    topic = "clicks-produce-refused"
    (schemas / f"{topic}.json").write_text(json.dumps(
        {"type": "object", "properties": {"value": {"type": "object", "properties": {
            "item_id": {"type": "string", "pattern": "^ok"}}}}}))
    source = tmp_path / "events.jsonl"
    lines = [encode_event({"user_id": f"u{i}", "item_id": ("bad" if i % 4 == 0 else "ok") + str(i),
                           "ts": 1_700_000_000_000 + i}).decode() for i in range(12)]
    source.write_text("\n".join(lines) + "\n")
    env = env_for(_cfg(bootstrap, topic), tmp_path / "store")
    proc = subprocess.run(
        [sys.executable, "-m", "stream_rec", "produce", "--dataset", str(source),
         "--no-progress"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
        check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    # The broker refuses a whole batch for one bad record: count what it holds.
    consumer = make_consumer(_cfg(bootstrap, topic), None, consumer_timeout_ms=1000)
    consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)])
    consumer.seek_to_beginning()
    stored = [rec.value for rec in consumer]
    consumer.close()
    assert not any(b'"item_id":"bad' in v for v in stored)
    assert proc.stderr.strip().splitlines()[-1] == (
        f"stream-rec produce: error: {12 - len(stored)} of 12 events could not be sent to "
        f"{topic} (first error: [Error 87] InvalidRecordError)")
