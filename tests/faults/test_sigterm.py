"""SIGTERM at any moment of a worker's life exits 0: starting, restoring, standby, running.

The command line installs its stop handler before the slow imports, so the
only instant a signal can still kill the process is the interpreter's own
start; the tests send SIGTERM as soon as the handler is in place (``SigCgt``),
then at later moments.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from stream_rec.ingest.kafka import ensure_topics
from stream_rec.settings import KafkaSettings
from stream_rec.snapshot import SnapshotStore
from tests.faults.common import SMALL_MODEL
from tests.support import catches, env_for, spawn, trained_state, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.kafka]


@pytest.mark.parametrize("delay_s", [0.0, 0.4, 1.5, 4.0])
def test_sigterm_while_starting_or_running_exits_0(delay_s: float, kafka_cfg: KafkaSettings,
                                                   tmp_path: Path) -> None:
    ensure_topics(kafka_cfg, [kafka_cfg.topic, kafka_cfg.dlq_topic])
    store = tmp_path / "store"
    SnapshotStore(store).publish(trained_state(600), offsets={kafka_cfg.topic: {0: 0}},
                                 watermark=1)
    env = env_for(kafka_cfg, store, **{**SMALL_MODEL, "STREAM_REC_MODEL__DIM": "16"})
    proc = spawn(["worker"], env, tmp_path / "w.log")   # dim as trained_state() was built
    wait_until(lambda: catches(proc, signal.SIGTERM) or proc.poll() is not None, 30,
               interval_s=0.005, what="the worker to install its stop handler")
    time.sleep(delay_s)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, (tmp_path / "w.log").read_text(errors="replace")[-2000:]


def test_sigterm_while_standby_exits_0(kafka_cfg: KafkaSettings, tmp_path: Path) -> None:
    ensure_topics(kafka_cfg, [kafka_cfg.topic, kafka_cfg.dlq_topic])
    store = tmp_path / "store"
    env = env_for(kafka_cfg, store, **SMALL_MODEL)
    active = spawn(["worker"], env, tmp_path / "a.log")
    standby = None
    try:
        wait_until(lambda: "took the writer lease" in (tmp_path / "a.log").read_text(), 60,
                   what="the first worker to take the lease")
        standby = spawn(["worker"], env, tmp_path / "b.log")
        wait_until(lambda: "standby" in (tmp_path / "b.log").read_text(), 60,
                   what="the second worker to wait as a standby")
        standby.send_signal(signal.SIGTERM)
        assert standby.wait(30) == 0
    finally:
        for proc in (active, standby):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(30) == 0
