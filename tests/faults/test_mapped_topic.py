"""A topic written by another system: other field names, times in seconds, nested ids.

Adopting stream-rec on an existing click topic is configuration, not code: the
worker is told where the user, item and time are and in which unit, and then
applies every event of that topic exactly once, dead-lettering none.
"""

from __future__ import annotations

import itertools
import signal
from pathlib import Path

import orjson
import pytest

from stream_rec.datasets import iter_synthetic
from stream_rec.ingest.kafka import ensure_topics, make_producer
from stream_rec.settings import KafkaSettings
from stream_rec.snapshot import SnapshotStore
from tests.faults.common import SMALL_MODEL, assert_exactly_once, caught_up
from tests.support import env_for, spawn, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.kafka]

MAPPING = {
    "STREAM_REC_EVENTS__FIELDS__USER": "visitor",
    "STREAM_REC_EVENTS__FIELDS__ITEM": "product.sku",
    "STREAM_REC_EVENTS__FIELDS__TIME": "occurred_at",
    "STREAM_REC_EVENTS__FIELDS__KIND": "action",
    "STREAM_REC_EVENTS__TIME_UNIT": "s",
}


def test_a_topic_with_other_names_and_seconds_is_applied_whole(kafka_cfg: KafkaSettings,
                                                                 tmp_path: Path) -> None:
    ensure_topics(kafka_cfg, [kafka_cfg.topic, kafka_cfg.dlq_topic])
    producer = make_producer(kafka_cfg)
    sent = []
    for ev in itertools.islice(iter_synthetic(n_users=80, n_items=120, seed=9), 1500):
        theirs = {"visitor": ev["user_id"], "product": {"sku": ev["item_id"], "price": 9.5},
                  "occurred_at": ev["ts"] // 1000, "action": "click", "session": "s-1"}
        sent.append((producer.send(kafka_cfg.topic, key=ev["user_id"].encode(),
                                   value=orjson.dumps(theirs)), ev))
    producer.flush()
    ends: dict[int, int] = {}
    for fut, _ev in sent:
        md = fut.get(30)
        ends[md.partition] = max(ends.get(md.partition, 0), md.offset + 1)
    producer.close()
    store = tmp_path / "store"
    worker = spawn(["worker"], env_for(kafka_cfg, store, **SMALL_MODEL, **MAPPING),
                   tmp_path / "worker.log")
    try:
        wait_until(lambda: caught_up(store, kafka_cfg.topic, ends), 90, what="every offset")
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    assert_exactly_once(store, [(ev["user_id"], ev["item_id"]) for _f, ev in sent])
    snap = SnapshotStore(store).load()
    assert snap is not None
    newest = max(ev["ts"] for _f, ev in sent) // 1000 * 1000
    assert snap.manifest.watermark == newest   # seconds, read as such
