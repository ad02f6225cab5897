"""A batch slower than ``max_poll_interval_ms``: eviction, rebalance, nothing applied twice.

The worker sleeps inside a batch (failpoint ``in_batch=sleep``) for more than
twice its poll interval, so the client leaves the group and the partitions are
lost; the next poll rejoins and they are assigned again. The worker must not
publish the overrunning batch, must rewind to its own published version and
seek every partition there, and its final state must count every event
exactly once.

(A second member holding the partitions during the eviction would make the
test stronger, but the local broker never completes a join for the evicted
member while another member is present, a broker-side limitation.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_rec.broker import stop_process
from stream_rec.ingest.kafka import ensure_topics
from stream_rec.settings import KafkaSettings
from tests.faults.common import SMALL_MODEL, Feeder, assert_exactly_once, caught_up
from tests.support import env_for, spawn, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.kafka]


def test_batch_overrunning_poll_interval_is_not_applied_twice(kafka_cfg: KafkaSettings,
                                                              tmp_path: Path) -> None:
    store = tmp_path / "store"
    log = tmp_path / "worker.log"
    ensure_topics(kafka_cfg, [kafka_cfg.topic, kafka_cfg.dlq_topic])
    env = env_for(kafka_cfg, store, **SMALL_MODEL,
                  STREAM_REC_KAFKA__MAX_POLL_INTERVAL_MS="3000",
                  STREAM_REC_FAILPOINTS="in_batch=sleep:7@6")
    feeder = Feeder(kafka_cfg, rate=300, limit=6000).start()
    worker = spawn(["worker"], env, log)
    try:
        wait_until(lambda: "failpoint in_batch: sleep" in log.read_text(errors="replace"), 60,
                   what="the slow batch")
        feeder.join(120)
        wait_until(lambda: caught_up(store, kafka_cfg.topic, feeder.ends), 120,
                   what="the worker to publish every produced offset")
    finally:
        feeder.stop.set()
        stop_process(worker)
    text = log.read_text(errors="replace")
    assert "partitions lost" in text or "partitions revoked: [0, 1, 2, 3]" in text
    assert "overran max_poll_interval_ms" in text
    assert "discarding events learnt after version" in text
    applied = assert_exactly_once(store, feeder.acked)
    print(f"slow batch: produced {len(feeder.acked)}, applied {applied}")
