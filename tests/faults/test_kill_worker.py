"""kill -9 the worker again and again while events flow; nothing lost, nothing doubled.

Each life of the worker is armed with one failpoint that SIGKILLs it at a
precise step (mid-batch, while a version is half written, between the rename
of a version and the move of ``LATEST``, between a durable publish and the
offset commit), plus plain kills from outside at arbitrary instants. After the
last restart the worker catches up and the final state must count every
acknowledged event exactly once, per user and per item.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from stream_rec.ingest.kafka import ensure_topics
from stream_rec.settings import KafkaSettings
from tests.faults.common import SMALL_MODEL, Feeder, assert_exactly_once, caught_up
from tests.support import env_for, spawn, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.kafka]

# One worker life per entry: a failpoint that kills it, None for a kill of the worker from
# outside, "trainer" for one of its trainer process (the pipelined worker's other half).
LIVES: list[str | None] = [
    "in_batch=kill@3",
    "during_write=kill@2",
    "after_rename=kill@1",
    None,
    "after_publish=kill@2",
    "before_commit=kill@1",
    "in_batch=kill@7",
    None,
    "trainer",          # kill -9 of the trainer process from outside: the pair dies together
]


def _trainer_of(proc: subprocess.Popen[bytes]) -> psutil.Process | None:
    """The worker's trainer process (not multiprocessing's resource tracker)."""
    for child in psutil.Process(proc.pid).children():
        if "spawn_main" in " ".join(child.cmdline()):
            return child
    return None


def _until_dead(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    try:
        proc.wait(timeout_s)
        return True
    except subprocess.TimeoutExpired:
        return False


def test_worker_survives_repeated_kill_9(kafka_cfg: KafkaSettings, tmp_path: Path) -> None:
    store = tmp_path / "store"
    log = tmp_path / "worker.log"
    ensure_topics(kafka_cfg, [kafka_cfg.topic, kafka_cfg.dlq_topic])
    feeder = Feeder(kafka_cfg, rate=400).start()
    kills = {"failpoint": 0, "outside": 0, "trainer": 0}
    try:
        for n, point in enumerate(LIVES):
            armed = point if point and "=" in point else None
            env = env_for(kafka_cfg, store, **SMALL_MODEL,
                          **({"STREAM_REC_FAILPOINTS": armed} if armed else {}))
            proc = spawn(["worker"], env, log)
            if point == "trainer":
                trainer = wait_until(lambda p=proc: _trainer_of(p), 60, what="the trainer")
                time.sleep(3.0)
                trainer.kill()
                assert _until_dead(proc, 30), "the worker outlived its trainer"
                kills["trainer"] += 1
            elif point is None or not _until_dead(proc, 45):
                # Outside kill at an arbitrary instant once the worker is working
                # (or a failpoint not reached in time: killed all the same).
                time.sleep(2.5 + 0.37 * n)
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                kills["outside"] += 1
            else:
                kills["failpoint"] += 1
            assert proc.returncode == -signal.SIGKILL, f"life {n} ({point}) exited {proc.returncode}"
        feeder.finish()
        final = spawn(["worker"], env_for(kafka_cfg, store, **SMALL_MODEL), log)
        try:
            wait_until(lambda: caught_up(store, kafka_cfg.topic, feeder.ends), 90,
                       what="the restarted worker to publish every produced offset")
        finally:
            final.send_signal(signal.SIGTERM)
            assert final.wait(30) == 0
    finally:
        feeder.stop.set()
    applied = assert_exactly_once(store, feeder.acked)
    text = log.read_text(errors="replace")
    hit = {p.split("=")[0] for p in LIVES
           if p and "=" in p and f"failpoint {p.split('=')[0]}: kill" in text}
    assert hit == {"in_batch", "during_write", "after_rename", "after_publish", "before_commit"}
    assert sum(kills.values()) == len(LIVES)
    print(f"kills survived: {kills}; events produced {len(feeder.acked)}, applied {applied}")
