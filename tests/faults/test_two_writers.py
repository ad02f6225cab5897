"""Two workers on one store and one topic: one writes, one waits; kill -9 the writer.

The second worker must not join the consumer group or publish while the first
holds the store's writer lease (``/healthz`` says "standby"). When the writer
is killed with SIGKILL mid-stream, the standby takes the lease over once it
expires, restores the newest version and continues from its offsets. The
final state counts every acknowledged event exactly once, per user and per
item; every version verifies; and the versions form one chain.
"""

from __future__ import annotations

import itertools
import signal
import time
from pathlib import Path

import httpx
import pytest

from stream_rec.broker import free_port, stop_process
from stream_rec.cli import main as cli
from stream_rec.ingest.kafka import ensure_topics
from stream_rec.settings import KafkaSettings
from stream_rec.snapshot import SnapshotStore
from tests.faults.common import SMALL_MODEL, Feeder, assert_exactly_once, caught_up
from tests.support import env_for, spawn, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.kafka]

LEASE = {"STREAM_REC_WORKER__LEASE_TTL_S": "3", "STREAM_REC_WORKER__STANDBY_POLL_S": "0.3"}


def _health(port: int) -> dict:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return {}


def test_standby_takes_over_from_a_killed_writer(kafka_cfg: KafkaSettings,
                                                  tmp_path: Path) -> None:
    store = tmp_path / "store"
    ensure_topics(kafka_cfg, [kafka_cfg.topic, kafka_cfg.dlq_topic])
    port_a, port_b = free_port(), free_port()
    env = {**SMALL_MODEL, **LEASE}
    feeder = Feeder(kafka_cfg, rate=600).start()   # until the new writer is active
    a = spawn(["worker"], env_for(kafka_cfg, store, **env,
                                  STREAM_REC_WORKER__METRICS_PORT=str(port_a)),
              tmp_path / "a.log")
    b = None
    try:
        wait_until(lambda: SnapshotStore(store).latest_version(), 60,
                   what="the first worker to publish")
        b = spawn(["worker"], env_for(kafka_cfg, store, **env,
                                      STREAM_REC_WORKER__METRICS_PORT=str(port_b)),
                  tmp_path / "b.log")
        wait_until(lambda: _health(port_b).get("status") == "standby", 60,
                   what="the second worker to wait as a standby")
        assert _health(port_a).get("role") == "active"
        before = SnapshotStore(store).latest_version()
        wait_until(lambda: (SnapshotStore(store).latest_version() or 0) >= (before or 0) + 3,
                   30, what="the writer to go on publishing")
        assert _health(port_b).get("status") == "standby"   # still waiting, publishing nothing
        a.send_signal(signal.SIGKILL)
        assert a.wait(10) == -signal.SIGKILL
        wait_until(lambda: _health(port_b).get("role") == "active", 30,
                   what="the standby to take the lease over")
        time.sleep(1.0)
        feeder.finish()
        wait_until(lambda: caught_up(store, kafka_cfg.topic, feeder.ends), 90,
                   what="the new writer to publish every produced offset")
        b.send_signal(signal.SIGTERM)
        assert b.wait(30) == 0
    finally:
        feeder.stop.set()
        stop_process(a)
        stop_process(b)
    assert_exactly_once(store, feeder.acked)
    assert cli(["snapshots", "verify", "--store", str(store)]) == 0
    s = SnapshotStore(store)
    versions = s.versions()
    for older, newer in itertools.pairwise(versions):
        assert s.read_manifest(newer).parent == older, f"v{newer} does not follow v{older}"
    writers = [s.read_manifest(v).writer for v in versions]
    handovers = sum(1 for x, y in itertools.pairwise(writers) if x != y)
    assert all(writers) and handovers <= 1, writers   # never interleaved
    log_b = (tmp_path / "b.log").read_text(errors="replace")
    assert "standby" in log_b and "took the writer lease" in log_b
