"""A gang of two ranks (``stream-rec worker --procs 2``) under kill -9 and SIGTERM.

Events flow at a steady rate into four partitions; rank 1, then rank 0 (the
writer), is killed with SIGKILL mid-stream, and the elastic launcher restarts
the gang each time; then SIGTERM. The final version must count every
acknowledged event exactly once, per user and per item; hold the topic's end
offset on every partition; form one chain that ``stream-rec snapshots
verify`` accepts; and count what a single worker counts over the same events.
Rank 0 compares every replica's checksum at each publish
(``worker.gang_check_replicas``) and would stop the gang if one differed.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from stream_rec.ingest.kafka import ensure_topics, topic_end_offsets
from stream_rec.settings import KafkaSettings
from stream_rec.snapshot import SnapshotStore
from tests.faults.common import (
    SMALL_MODEL,
    Feeder,
    applied_counts,
    assert_exactly_once,
    caught_up,
    published_offsets,
)
from tests.support import env_for, spawn, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.kafka]

GANG = {**SMALL_MODEL, "STREAM_REC_WORKER__TORCH_THREADS": "1",
        "STREAM_REC_WORKER__GANG_CHECK_REPLICAS": "true",
        "STREAM_REC_WORKER__GANG_SHUTDOWN_S": "60"}


def _ranks(launcher: subprocess.Popen[bytes]) -> dict[int, psutil.Process]:
    """The launcher's rank processes by rank (read from the environment torchrun gave them)."""
    out = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None and "stream_rec" in " ".join(child.cmdline()):
            out[int(rank)] = child
    return out


def _events(store: Path) -> int:
    s = SnapshotStore(store)
    v = s.latest_version()
    return 0 if v is None else int(s.read_manifest(v).counts.get("events", 0))


def test_a_gang_survives_kill_9_of_either_rank_and_counts_like_one_worker(
        kafka_cfg: KafkaSettings, tmp_path: Path) -> None:
    store, log = tmp_path / "store", tmp_path / "gang.log"
    ensure_topics(kafka_cfg, [kafka_cfg.topic, kafka_cfg.dlq_topic], partitions=4)
    feeder = Feeder(kafka_cfg, rate=250, limit=5000).start()
    gang = spawn(["worker", "--procs", "2"], env_for(kafka_cfg, store, **GANG), log)
    try:
        for victim in (1, 0):
            before = _events(store)
            wait_until(lambda before=before: _events(store) > before + 600, 90,
                       what="the gang to publish new events")
            ranks = wait_until(lambda: len(r := _ranks(gang)) == 2 and r, 30,
                               what="two ranks")
            ranks[victim].send_signal(signal.SIGKILL)   # mid-stream, mid-anything
            wait_until(lambda victim=victim, old=ranks[victim].pid:
                       (r := _ranks(gang)).get(victim) is not None and r[victim].pid != old,
                       60, what=f"the launcher to restart the gang after rank {victim} died")
        feeder.join(120)
        wait_until(lambda: caught_up(store, kafka_cfg.topic, feeder.ends), 120,
                   what="the restarted gang to publish every produced offset")
    finally:
        gang.send_signal(signal.SIGTERM)
        code = gang.wait(120)
        feeder.stop.set()
    text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert "restart 2" in text and "restart 3" not in text   # one restart per kill
    assert "replicas differ" not in text and "connectFullMesh" not in text
    checked = re.findall(r"replicas bitwise equal at all (\d+) publishes checked", text)
    assert checked and int(checked[-1]) > 0, "the replicas were not compared"

    applied = assert_exactly_once(store, feeder.acked)
    assert applied == len(feeder.acked)
    ends = topic_end_offsets(kafka_cfg, kafka_cfg.topic)
    assert published_offsets(SnapshotStore(store), kafka_cfg.topic) == ends
    assert len(ends) == 4

    snaps = SnapshotStore(store)
    versions = snaps.versions()
    for m in (snaps.read_manifest(v) for v in versions):   # one line of versions, no fork
        assert m.parent == (m.version - 1 if m.version > 1 else None), m
    verify = subprocess.run(
        [sys.executable, "-m", "stream_rec", "snapshots", "verify", "--store", str(store)],
        env=env_for(kafka_cfg, store), capture_output=True, text=True, timeout=120, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    # one worker over the same events counts the same, per user and per item
    single = tmp_path / "single"
    replay = spawn(["replay", "--store", str(single), "--no-progress"],
                   env_for(kafka_cfg, single, **SMALL_MODEL), tmp_path / "single.log")
    assert replay.wait(180) == 0, (tmp_path / "single.log").read_text()[-2000:]
    assert applied_counts(store) == applied_counts(single)
    print(f"gang: {applied} events exactly once over {len(versions)} kept versions "
          f"(newest {versions[-1]}), two ranks killed")
