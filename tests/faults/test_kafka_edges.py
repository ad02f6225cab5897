"""The topic under the worker changes: it is missing, or deleted and recreated.

Real worker processes against the real broker. A worker started before its
topic exists waits for it (saying so in the log and on ``/healthz``) and never
creates it. A topic deleted and recreated under a live worker starts its
offsets again, and the local broker then serves the new topic's records from
the worker's old positions without any error: by default the worker must stop
with one line naming the topic, the partition and both offsets, having
published nothing it read from the new topic; a restart must fail the same
way rather than skip, even once the new topic holds more than the old on every
partition (the version records the topic id); and with ``worker.on_offset_out_of_range = "earliest"``
the new topic is read from its start and every event, old topic and new, is
applied exactly once.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from kafka.admin import NewTopic

from stream_rec import datasets
from stream_rec.broker import free_port
from stream_rec.ingest.kafka import make_admin
from stream_rec.settings import KafkaSettings
from stream_rec.snapshot import SnapshotStore
from tests.faults.common import (
    SMALL_MODEL,
    assert_exactly_once,
    caught_up,
    published_offsets,
    send_acked,
)
from tests.support import env_for, spawn, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.kafka]

PARTITIONS = 4
FAST_CHECKS = {"STREAM_REC_WORKER__TOPIC_CHECK_INTERVAL_S": "0.5"}


def _events(n: int, seed: int) -> list[dict]:
    return list(itertools.islice(datasets.iter_synthetic(seed=seed), n))


def _recreate(cfg: KafkaSettings) -> None:
    admin = make_admin(cfg)
    try:
        admin.delete_topics([cfg.topic])
        wait_until(lambda: cfg.topic not in admin.list_topics(), 10, what="the deletion")
        admin.create_topics([NewTopic(cfg.topic, PARTITIONS, 1)])
    finally:
        admin.close()


def published_offsets_of(store: Path, topic: str) -> dict[int, int]:
    return published_offsets(SnapshotStore(store), topic)


def _error_line(log: Path) -> str:
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    lines = [ln for ln in text.splitlines() if ln.startswith("stream-rec worker: error: ")]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


def _exit_code(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the worker did not exit within {timeout_s:.0f} s") from None


def test_a_topic_recreated_under_the_worker_stops_it_loudly_and_a_restart_too(
        kafka_cfg: KafkaSettings, tmp_path: Path) -> None:
    store = tmp_path / "store"
    make_admin(kafka_cfg).create_topics([NewTopic(kafka_cfg.topic, PARTITIONS, 1)])
    acked, ends = send_acked(kafka_cfg, _events(400, seed=1))
    log = tmp_path / "worker.log"
    env = env_for(kafka_cfg, store, **SMALL_MODEL, **FAST_CHECKS)
    worker = spawn(["worker"], env, log)
    try:
        wait_until(lambda: caught_up(store, kafka_cfg.topic, ends), 60, what="the old topic")
        before = published_offsets_of(store, kafka_cfg.topic)
        _recreate(kafka_cfg)
        # Refill partition 0 past the worker's position there: the broker now serves
        # new-topic records from the old offset on, and offsets alone look valid.
        refill = before[0] + 40
        send_acked(kafka_cfg, _events(refill, seed=2), partition=0)
        assert _exit_code(worker, 30) == 1
    finally:
        if worker.poll() is None:
            worker.kill()
    line = _error_line(log)
    assert f"topic {kafka_cfg.topic} was deleted and recreated" in line
    assert f"partition 0 was at offset {before[0]}, the log holds 0..{refill - 1} now" in line
    for p in range(1, PARTITIONS):
        assert f"partition {p} was at offset {before[p]}, the log is empty at 0 now" in line
    # Nothing read from the new topic was published: the old events, exactly once.
    assert published_offsets_of(store, kafka_cfg.topic) == before
    assert_exactly_once(store, acked)

    # Refill every other partition past the worker's old position as well: offsets alone now
    # look valid everywhere, and only the topic id the version recorded tells the topics apart.
    refills = {p: before[p] + 25 for p in range(1, PARTITIONS)}
    for p, n in refills.items():
        send_acked(kafka_cfg, _events(n, seed=10 + p), partition=p)
    log2 = tmp_path / "restart.log"
    restart = spawn(["worker"], env, log2)
    assert _exit_code(restart, 60) == 1
    line = _error_line(log2)
    assert f"topic {kafka_cfg.topic} was deleted and recreated" in line
    assert f"partition 0 was at offset {before[0]}, the log holds 0..{refill - 1} now" in line
    for p, n in refills.items():
        assert f"partition {p} was at offset {before[p]}, the log holds 0..{n - 1} now" in line
    assert published_offsets_of(store, kafka_cfg.topic) == before
    assert_exactly_once(store, acked)


def _health(port: int) -> tuple[int, dict]:
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
        return r.status_code, r.json()
    except httpx.HTTPError:
        return 0, {}


def test_a_worker_waits_for_its_topic_and_with_earliest_reads_a_recreated_one_once(
        kafka_cfg: KafkaSettings, tmp_path: Path) -> None:
    store = tmp_path / "store"
    port = free_port()
    log = tmp_path / "worker.log"
    env = env_for(kafka_cfg, store, **SMALL_MODEL, **FAST_CHECKS,
                  STREAM_REC_WORKER__METRICS_PORT=str(port),
                  STREAM_REC_WORKER__ON_OFFSET_OUT_OF_RANGE="earliest")
    worker = spawn(["worker"], env, log)
    admin = make_admin(kafka_cfg)
    try:
        def waiting() -> tuple[int, dict] | None:
            answer = _health(port)
            return answer if answer[1].get("status") == "waiting" else None

        status, body = wait_until(waiting, 60, what="/healthz to say the worker waits")
        assert status == 503 and f"topic {kafka_cfg.topic} does not exist yet" in body["reason"]
        wait_until(lambda: "the worker does not create the topic it consumes"
                   in log.read_text(errors="replace"), 10, what="the waiting log line")
        time.sleep(1.0)
        assert kafka_cfg.topic not in admin.list_topics(), "the worker created its topic"

        admin.create_topics([NewTopic(kafka_cfg.topic, PARTITIONS, 1)])
        acked, ends = send_acked(kafka_cfg, _events(300, seed=3))
        wait_until(lambda: caught_up(store, kafka_cfg.topic, ends), 60, what="the first topic")
        assert _health(port)[0] == 200
        before = published_offsets_of(store, kafka_cfg.topic)

        _recreate(kafka_cfg)
        more, new_ends = send_acked(kafka_cfg, _events(before[0] + 30, seed=4), partition=0)
        more_b, ends_b = send_acked(kafka_cfg, _events(60, seed=5))
        new_ends = {p: max(new_ends.get(p, 0), ends_b.get(p, 0)) for p in range(PARTITIONS)}

        def read_new_topic() -> bool:
            got = published_offsets_of(store, kafka_cfg.topic)
            return got == {p: new_ends.get(p, 0) for p in range(PARTITIONS)}

        wait_until(read_new_topic, 60, what="the new topic, from its start")
        assert worker.poll() is None, "the worker exited"
    finally:
        admin.close()
        worker.send_signal(signal.SIGTERM)
        assert _exit_code(worker, 30) == 0
    text = log.read_text(errors="replace")
    assert "Traceback" not in text
    assert "was at offset" in text and "worker.on_offset_out_of_range = earliest" in text
    assert_exactly_once(store, acked + more + more_b)
