"""One partition, a fixed seed: a run killed again and again ends bitwise equal to one
that was never interrupted -- also when the killed run's store writes quantized vectors
(``store.vector_dtype`` int8): the worker restores only from exact tables.

Micro-batch boundaries depend on timing (a restart cuts the stream elsewhere),
so this holds because the model trains on fixed chunks counted from the start
of the stream and carries a partial chunk in its snapshot state.
"""

from __future__ import annotations

import signal
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest

from stream_rec.ingest.kafka import ensure_topics
from stream_rec.model import quant
from stream_rec.model import tables as T
from stream_rec.settings import KafkaSettings
from stream_rec.snapshot import SnapshotStore
from tests.faults.common import SMALL_MODEL, Feeder, assert_exactly_once, caught_up
from tests.support import catches, env_for, spawn, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.kafka]

KILLS = ["in_batch=kill@2", "during_write=kill@2", "after_rename=kill@1", "before_commit=kill@2"]


def _run_to_end(cfg: KafkaSettings, store: Path, ends: dict[int, int], log: Path,
                failpoints: list[str], vector_dtype: str = "float32") -> None:
    settings = {**SMALL_MODEL, "STREAM_REC_STORE__VECTOR_DTYPE": vector_dtype}
    for point in failpoints:
        proc = spawn(["worker"], env_for(cfg, store, **settings,
                                         STREAM_REC_FAILPOINTS=point), log)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"{point}: exited {proc.returncode}"
    proc = spawn(["worker"], env_for(cfg, store, **settings), log)
    try:
        wait_until(lambda: caught_up(store, cfg.topic, ends), 90, what="the worker to catch up")
        # the store may already be caught up: signal once the process can take it
        wait_until(lambda: catches(proc, signal.SIGTERM), 30, interval_s=0.005,
                   what="the worker to install its stop handler")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_killed_run_is_bitwise_equal_to_an_uninterrupted_one(kafka_cfg: KafkaSettings,
                                                              tmp_path: Path) -> None:
    # The killed run's store writes int8 vectors, the calm run's float32: one run shows
    # both that kills lose nothing and that a quantized store restores exactly (the same
    # property for every dtype, in process: tests/contracts/test_store.py).
    killed_dtype = "int8"
    ensure_topics(kafka_cfg, [kafka_cfg.topic, kafka_cfg.dlq_topic], partitions=1)
    feeder = Feeder(kafka_cfg, rate=1500, limit=6000).start()
    feeder.join()
    calm = kafka_cfg.model_copy(update={"group_id": f"calm-{uuid.uuid4().hex[:6]}"})
    _run_to_end(calm, tmp_path / "calm", feeder.ends, tmp_path / "calm.log", [])
    killed = kafka_cfg.model_copy(update={"group_id": f"killed-{uuid.uuid4().hex[:6]}"})
    _run_to_end(killed, tmp_path / "killed", feeder.ends, tmp_path / "killed.log", KILLS,
                killed_dtype)

    assert_exactly_once(tmp_path / "calm", feeder.acked)
    assert_exactly_once(tmp_path / "killed", feeder.acked)
    a = SnapshotStore(tmp_path / "calm").load()
    b = SnapshotStore(tmp_path / "killed").load()
    assert a is not None and b is not None
    assert a.state.user_ids == b.state.user_ids and a.state.item_ids == b.state.item_ids
    # the uninterrupted float32 run's state, as a store writing killed_dtype holds it
    want = quant.encoded(a.state.tables, quant.STORED, killed_dtype)  # type: ignore[arg-type]
    assert quant.encoding(b.state.tables, T.ITEM_VECTORS) == killed_dtype
    assert set(want) == set(b.state.tables)
    for name in want:
        np.testing.assert_array_equal(want[name], b.state.tables[name], err_msg=name)
