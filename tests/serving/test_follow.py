"""A server that follows the topic: a click shapes its user's next answer before any
version carries it, and a server whose broker goes away keeps answering from versions."""

from __future__ import annotations

import itertools
import signal
import time
import uuid
from pathlib import Path

import httpx
import pytest

from stream_rec.broker import LocalBroker, free_port, stop_process, wait_for_port
from stream_rec.datasets import iter_synthetic
from stream_rec.events import encode_event
from stream_rec.ingest.kafka import ensure_topics, make_producer
from stream_rec.settings import KafkaSettings
from stream_rec.snapshot import SnapshotStore
from tests.faults.common import SMALL_MODEL
from tests.support import env_for, spawn, wait_until

pytestmark = [pytest.mark.kafka]


def test_own_clicks_without_a_version_and_a_broker_gone(tmp_path: Path) -> None:
    broker = LocalBroker(log_path=tmp_path / "broker.log").start()
    tag = uuid.uuid4().hex[:8]
    cfg = KafkaSettings(bootstrap=broker.bootstrap, topic=f"clicks-{tag}", group_id=f"w-{tag}",
                        session_timeout_ms=2000, heartbeat_interval_ms=500, create_topics=True)
    store = tmp_path / "store"
    port = free_port()
    worker = server = None
    try:
        ensure_topics(cfg, [cfg.topic, cfg.dlq_topic])
        producer = make_producer(cfg)
        now = int(time.time() * 1000)
        for n, ev in enumerate(itertools.islice(iter_synthetic(n_users=40, n_items=60), 800)):
            producer.send(cfg.topic, key=ev["user_id"].encode(),
                          value=encode_event({**ev, "ts": now - 800 + n}))
        producer.flush()
        worker = spawn(["worker"], env_for(cfg, store, **SMALL_MODEL), tmp_path / "w.log")
        wait_until(lambda: (SnapshotStore(store).load() or None) and
                   SnapshotStore(store).load().manifest.counts.get("events") == 800, 60,
                   what="a version with every event")
        worker.send_signal(signal.SIGTERM)          # no new versions from here on
        assert worker.wait(30) == 0
        server = spawn(["serve", "--port", str(port)],
                       env_for(cfg, store, STREAM_REC_SERVE__PORT=str(port)),
                       tmp_path / "s.log")
        wait_for_port("127.0.0.1", port, 60, server)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{url}/readyz").json().get("overlay", {}).get(
            "following"), 30, what="the server to follow the topic")
        before = httpx.get(f"{url}/recommend/u7", params={"k": 5}).json()
        top = before["items"][0]["item_id"]
        sent = time.monotonic()
        producer.send(cfg.topic, key=b"u7", value=encode_event(
            {"user_id": "u7", "item_id": top, "ts": int(time.time() * 1000)}))
        producer.flush()
        after = wait_until(lambda: (b := httpx.get(f"{url}/recommend/u7",
                                                   params={"k": 5}).json())["overlay"][
            "events"] and b, 10, interval_s=0.005, what="the click to reach the answer")
        took = time.monotonic() - sent
        assert after["version"] == before["version"]       # no new version: the overlay did it
        assert top not in [x["item_id"] for x in after["items"]]
        producer.close()
        broker.stop()                                       # the broker goes away
        wait_until(lambda: not httpx.get(f"{url}/readyz").json()["overlay"]["following"], 30,
                   what="the server to notice")
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 200 and ready.json()["overlay"]["error"]
        still = httpx.get(f"{url}/recommend/u7", params={"k": 5})
        assert still.status_code == 200 and still.json()["version"] == before["version"]
        print(f"own click reflected after {took * 1000:.0f} ms without a new version")
    finally:
        stop_process(server)
        stop_process(worker)
        broker.stop()
