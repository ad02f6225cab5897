"""A broker frozen for 15 s mid-stream (SIGSTOP, then SIGCONT).

The worker must not crash, must not spin while it waits, must say on its
health endpoint that it is stalled and why, and must resume: every event
produced before, during and after the stall is applied exactly once.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from stream_rec.broker import LocalBroker, free_port, stop_process
from stream_rec.ingest.kafka import ensure_topics
from stream_rec.settings import KafkaSettings
from tests.faults.common import SMALL_MODEL, Feeder, assert_exactly_once, caught_up
from tests.support import env_for, spawn, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.kafka]

STALL_S = 15.0


def _health(port: int) -> tuple[int, dict]:
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
        return r.status_code, r.json()
    except httpx.HTTPError:
        return 0, {}


def _cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def test_worker_rides_out_a_frozen_broker(tmp_path: Path) -> None:
    with LocalBroker(log_path=tmp_path / "broker.log") as broker:
        assert broker.proc is not None
        cfg = KafkaSettings(bootstrap=broker.bootstrap, topic="clicks-stall",
                            group_id="worker-stall", session_timeout_ms=2000,
                            heartbeat_interval_ms=500)
        ensure_topics(cfg, [cfg.topic, cfg.dlq_topic])
        store = tmp_path / "store"
        port = free_port()
        log = tmp_path / "worker.log"
        env = env_for(cfg, store, **SMALL_MODEL, STREAM_REC_WORKER__METRICS_PORT=str(port),
                      STREAM_REC_WORKER__STALL_AFTER_S="4")
        worker = spawn(["worker"], env, log)
        feeder = Feeder(cfg, rate=150, limit=4500).start()  # ~30 s of events
        stopped = False
        try:
            wait_until(lambda: _health(port)[0] == 200 and
                       caught_up(store, cfg.topic, {0: 1}) is not None and
                       os.path.exists(store / "LATEST"), 60, what="a first version")
            time.sleep(2)
            os.kill(broker.proc.pid, signal.SIGSTOP)
            stopped = True
            cpu0, t0 = _cpu_seconds(worker.pid), time.monotonic()
            def stalled() -> tuple[int, dict] | None:
                health = _health(port)
                return health if health[0] == 503 else None

            _, body = wait_until(stalled, STALL_S - 2,
                                 what="the health endpoint to report the stall")
            assert body["status"] == "stalled" and "broker" in body["reason"]
            time.sleep(max(0.0, STALL_S - (time.monotonic() - t0)))
            cpu = _cpu_seconds(worker.pid) - cpu0
            wall = time.monotonic() - t0
            os.kill(broker.proc.pid, signal.SIGCONT)
            stopped = False
            assert worker.poll() is None, "the worker died during the stall"
            assert cpu < 0.25 * wall, f"worker used {cpu:.1f} s CPU in {wall:.0f} s of stall"
            feeder.join(120)
            wait_until(lambda: caught_up(store, cfg.topic, feeder.ends), 120,
                       what="the worker to resume and publish every produced offset")
            wait_until(lambda: _health(port)[0] == 200, 30, what="health to recover")
        finally:
            if stopped:
                os.kill(broker.proc.pid, signal.SIGCONT)
            feeder.stop.set()
            stop_process(worker)
        text = log.read_text(errors="replace")
        assert "stalled: no answer from the broker" in text
        assert "broker answers again" in text
        applied = assert_exactly_once(store, feeder.acked)
        print(f"stall: worker CPU {cpu:.2f} s over {wall:.1f} s; produced {len(feeder.acked)}, "
              f"applied {applied}")
