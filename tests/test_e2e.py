"""End to end on a real broker: producer → worker → snapshots → server, with faults.

Shows that (a) every malformed message reaches the dead-letter topic with its
reason, (b) a user's new clicks change that user's answer under a newer
version, (c) a worker stopped (SIGTERM) and killed (SIGKILL) mid-stream
resumes from its snapshot's offsets and the final state counts every valid
event exactly once.
"""

from __future__ import annotations

import collections
import itertools
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from kafka import TopicPartition

from stream_rec import datasets
from stream_rec.broker import free_port, stop_process, wait_for_port
from stream_rec.events import encode_event
from stream_rec.ingest.kafka import ensure_topics, make_consumer, make_producer
from stream_rec.settings import KafkaSettings
from stream_rec.snapshot import SnapshotStore
from tests.support import env_for, spawn, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

MALFORMED: list[tuple[bytes | None, str]] = [
    (b"{not json", "not valid UTF-8 JSON"),
    (b"\xff\xfe\x00garbage", "not valid UTF-8 JSON"),
    (b'{"item_id": 1, "ts": 5}', "missing field 'user_id'"),
    (b'{"user_id": "u1", "ts": 5}', "missing field 'item_id'"),
    (b'{"user_id": "u1", "item_id": "i1"}', "missing field 'ts'"),
    (b'{"user_id": [1], "item_id": 1, "ts": 5}', "user_id must be"),
    (b'{"user_id": "u1", "item_id": 1, "ts": -3}', "before the earliest accepted time"),
    (b'{"user_id": "u1", "item_id": 1, "ts": "yesterday"}', "ts must be"),
    (b'{"user_id": "u1", "item_id": 1, "ts": NaN}', "not valid UTF-8 JSON"),
    (b"[1, 2, 3]", "expected a JSON object"),
    (None, "empty message"),
    (b'{"user_id": "", "item_id": 1, "ts": 5}', "user_id must be 1..256"),
]


def _stream(n_valid: int, every: int = 100) -> list[tuple[bytes | None, bytes | None, bool]]:
    """``n_valid`` synthetic events with a malformed message after every ``every``."""
    out: list[tuple[bytes | None, bytes | None, bool]] = []
    bad = itertools.cycle(MALFORMED)
    for i, ev in enumerate(itertools.islice(datasets.iter_synthetic(seed=7), n_valid)):
        out.append((ev["user_id"].encode(), encode_event(ev), True))
        if i % every == every - 1:
            out.append((b"bad", next(bad)[0], False))
    return out


def _send(cfg: KafkaSettings, msgs: list[tuple[bytes | None, bytes | None, bool]],
          rate: float = 0.0) -> list[tuple[int, int, bool]]:
    """Produce ``msgs``; returns (partition, offset, valid) of each."""
    producer = make_producer(cfg)
    futures = []
    for i, (key, value, ok) in enumerate(msgs):
        futures.append((producer.send(cfg.topic, key=key, value=value), ok))
        if rate and i % 50 == 49:
            time.sleep(50 / rate)
    producer.flush()
    out = [(f.get(10).partition, f.get(10).offset, ok) for f, ok in futures]
    producer.close()
    return out


def _served(client: httpx.Client) -> dict | None:
    r = client.get("/readyz")
    return r.json() if r.status_code == 200 else None


def test_stream_to_answers_with_dead_letters_and_restarts(kafka_cfg: KafkaSettings,
                                                          tmp_path: Path) -> None:
    store_path = tmp_path / "store"
    ensure_topics(kafka_cfg, [kafka_cfg.topic, kafka_cfg.dlq_topic])
    env = env_for(kafka_cfg, store_path, STREAM_REC_WORKER__PUBLISH_INTERVAL_MS="100")
    port = free_port()
    server = spawn(["serve", "--port", str(port)], env, tmp_path / "server.log")
    worker = spawn(["worker"], env, tmp_path / "worker.log")
    sent: list[tuple[int, int, bool]] = []
    msgs = _stream(3000)
    try:
        wait_for_port("127.0.0.1", port, 60, server)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5)
        assert client.get("/readyz").status_code == 503  # nothing published yet

        def events_served() -> int:
            return int((_served(client) or {}).get("counts", {}).get("events", 0))

        # First third, then a graceful stop mid-stream while the second third flows in.
        sent += _send(kafka_cfg, msgs[:1000])
        wait_until(lambda: events_served() > 0, 60, what="a first version")
        feeder = threading.Thread(target=lambda: sent.extend(
            _send(kafka_cfg, msgs[1000:2000], rate=1000)))
        feeder.start()
        time.sleep(0.3)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        at_stop = events_served()
        worker = spawn(["worker"], env, tmp_path / "worker.log")
        feeder.join()
        # Then a crash: SIGKILL once the restarted worker is applying the last third.
        wait_until(lambda: events_served() > at_stop, 60, what="the restarted worker")
        feeder = threading.Thread(target=lambda: sent.extend(
            _send(kafka_cfg, msgs[2000:], rate=500)))
        feeder.start()
        before_kill = events_served()
        wait_until(lambda: events_served() > before_kill, 30, what="progress before the kill")
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        assert feeder.is_alive(), "the kill should land while events still flow"
        worker = spawn(["worker"], env, tmp_path / "worker.log")
        feeder.join()

        total = len(msgs)
        valid = sum(ok for *_, ok in sent)
        assert len(sent) == total

        def caught_up() -> dict | None:
            body = _served(client)
            offsets = (body or {}).get("offsets", {}).get(kafka_cfg.topic, {})
            return body if body and sum(offsets.values()) == total else None

        body = wait_until(caught_up, 90, what="the server to serve every produced offset")

        # (c) exactly once: the state counts every valid event, per user too.
        assert body["counts"]["events"] == valid
        snap = SnapshotStore(store_path).load()
        assert snap is not None and snap.manifest.version == body["version"]
        want = collections.Counter(k.decode() for k, _v, ok in msgs if ok)
        state = snap.state
        got = {uid: int(n) for uid, n in zip(state.user_ids, state.tables["user.events"])
               if uid}
        assert got == dict(want)

        # (a) every malformed message is in the DLQ with its reason and origin.
        bad = {(p, o) for p, o, ok in sent if not ok}
        dlq = make_consumer(kafka_cfg, None, consumer_timeout_ms=3000)
        parts = [TopicPartition(kafka_cfg.dlq_topic, p)
                 for p in dlq.partitions_for_topic(kafka_cfg.dlq_topic)]
        dlq.assign(parts)
        dlq.seek_to_beginning()
        seen: dict[tuple[int, int], str] = {}
        for rec in dlq:
            h = {k: v.decode() for k, v in rec.headers}
            assert h["origin.topic"] == kafka_cfg.topic
            seen[(int(h["origin.partition"]), int(h["origin.offset"]))] = h["error.reason"]
        dlq.close()
        assert set(seen) == bad
        expected_reason = {value: why for value, why in MALFORMED}
        by_origin = {(p, o): msgs[i][1] for i, (p, o, _ok) in enumerate(sent)}
        for origin, reason in seen.items():
            assert expected_reason[by_origin[origin]] in reason

        # (b) a user's new clicks change that user's answer, under a newer version.
        user = msgs[0][0].decode()
        before = client.get(f"/recommend/{user}", params={"k": 10}).json()
        assert not before["fallback"] and len(before["items"]) == 10
        fresh_items = [f"i{n}" for n in range(3, 1000, 10)][:8]  # one other taste group
        now_ms = int(time.time() * 1000)
        clicks = [(user.encode(), encode_event(
            {"user_id": user, "item_id": it, "ts": now_ms + j}), True)
            for j, it in enumerate(fresh_items)]
        new = _send(kafka_cfg, clicks)
        need = {p: o + 1 for p, o, _ in new}

        def includes_clicks() -> dict | None:
            r = client.get(f"/recommend/{user}", params={"k": 10}).json()
            served = (_served(client) or {}).get("offsets", {}).get(kafka_cfg.topic, {})
            if all(int(served.get(str(p), 0)) >= o for p, o in need.items()) and \
                    r["version"] > before["version"]:
                return r
            return None

        after = wait_until(includes_clicks, 60, what="a version with the user's new clicks")
        assert after["version"] > before["version"]
        assert [i["item_id"] for i in after["items"]] != [i["item_id"] for i in before["items"]]
        assert not set(fresh_items) & {i["item_id"] for i in after["items"]}  # seen: excluded
        assert after["watermark"] >= now_ms
    finally:
        worker.send_signal(signal.SIGTERM)
        server.send_signal(signal.SIGTERM)
        for proc in (worker, server):
            stop_process(proc)
