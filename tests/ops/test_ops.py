"""Operator commands on a real broker: replay, snapshots pin/unpin, dead-letter re-drive, status.

Shows that (a) a replay of the range a live worker consumed, into a fresh
store, rebuilds the same state (same counts; on one partition with a fixed
seed, the same vectors), never adds to the live dead-letter topic, refuses the
live store and is idempotent; a copy into another topic keeps keys, headers
and timestamps; (b) pinning makes a running server answer from the pinned
version and unpinning returns it to the newest; (c) dead letters re-driven
after their cause is gone are applied exactly once, even when re-driven twice;
(d) argument errors exit 2 with a one-line message.
"""

from __future__ import annotations

import collections
import itertools
import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from kafka import TopicPartition

from stream_rec import cli, datasets
from stream_rec.broker import free_port, stop_process, wait_for_port
from stream_rec.events import DeadLetter, Origin, encode_event
from stream_rec.ingest.dlq import DeadLetterWriter
from stream_rec.ingest.kafka import ensure_topics, make_consumer, make_producer, topic_end_offsets
from stream_rec.settings import KafkaSettings
from stream_rec.snapshot import SnapshotStore
from tests.support import env_for, spawn, wait_until

pytestmark = [pytest.mark.kafka]


def run_cli(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str]) -> tuple[int, Any, str]:
    """``stream-rec argv`` in-process under ``env``; returns (exit code, parsed JSON, stderr)."""
    with monkeypatch.context() as m:
        for k, v in env.items():
            if k.startswith("STREAM_REC_"):
                m.setenv(k, v)
        capsys.readouterr()
        rc = cli.main(argv)
        out, err = capsys.readouterr()
    data = json.loads(out) if "--json" in argv and out.strip() else out
    return rc, data, err


def _stop(*procs: Any) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        stop_process(proc)


def _snapshot_offsets(store: Path, topic: str) -> dict[int, int]:
    s = SnapshotStore(store)
    v = s.latest_version()
    return {} if v is None else s.read_manifest(v).offsets.get(topic, {})


def _read_all(cfg: KafkaSettings, topic: str) -> list[Any]:
    c = make_consumer(cfg, None, consumer_timeout_ms=2000)
    try:
        c.assign([TopicPartition(topic, p) for p in c.partitions_for_topic(topic)])
        c.seek_to_beginning()
        return sorted(c, key=lambda r: (r.partition, r.offset))
    finally:
        c.close()


def _caught_up(store: Path, cfg: KafkaSettings) -> bool:
    end = topic_end_offsets(cfg, cfg.topic)
    got = _snapshot_offsets(store, cfg.topic)
    return all(got.get(p, 0) >= o for p, o in end.items())


# -- (a) replay -----------------------------------------------------------------
def test_replay_from_time_rebuilds_the_live_state(kafka_cfg: KafkaSettings, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg = kafka_cfg
    ensure_topics(cfg, [cfg.topic], partitions=1)
    ensure_topics(cfg, [cfg.dlq_topic])
    live = tmp_path / "live"
    # Training on fixed chunks makes the result independent of batch boundaries; one
    # torch thread makes its reductions run in one order (bitwise reproducible).
    env = env_for(cfg, live, STREAM_REC_WORKER__BATCH_MAX_EVENTS="100",
                  STREAM_REC_WORKER__TORCH_THREADS="1", STREAM_REC_WORKER__BATCH_MAX_MS="5000",
                  STREAM_REC_WORKER__PUBLISH_INTERVAL_MS="100")
    t_from = int(time.time() * 1000)
    time.sleep(0.02)
    producer = make_producer(cfg)
    events = list(itertools.islice(datasets.iter_synthetic(seed=3), 1996))
    for i, ev in enumerate(events):
        headers = [("trace", str(i).encode())] if i % 100 == 0 else []
        producer.send(cfg.topic, key=ev["user_id"].encode(), value=encode_event(ev),
                      headers=headers)
        if i % 500 == 250:  # a few malformed ones: dead-lettered by the live run only
            producer.send(cfg.topic, key=b"bad", value=b"{not json")
    producer.flush()
    time.sleep(0.05)
    t_to = int(time.time() * 1000)  # the range ends here: later records must not be replayed
    assert topic_end_offsets(cfg, cfg.topic) == {0: 2000}

    worker = spawn(["worker"], env, tmp_path / "worker.log")
    try:
        wait_until(lambda: _snapshot_offsets(live, cfg.topic).get(0) == 2000, 60,
                   what="the live worker to consume the range")
    finally:
        _stop(worker)
    time.sleep(0.05)
    late_ms = int(time.time() * 1000)
    for j in range(50):
        producer.send(cfg.topic, key=b"late", value=encode_event(
            {"user_id": "late", "item_id": f"late-{j}", "ts": late_ms + j}))
    producer.flush()
    producer.close()
    dlq_before = topic_end_offsets(cfg, cfg.dlq_topic)
    assert sum(dlq_before.values()) == 4

    target = tmp_path / "replay"
    argv = ["replay", "--store", str(target), "--from-time", str(t_from),
            "--to-time", str(t_to), "--json"]
    # Interrupted (Ctrl+C) once it has published a first version; small batches that
    # each pause a little keep the replay running long enough to be interrupted.
    slow = {**env, "STREAM_REC_FAILPOINTS": "in_batch=sleep:0.2",
            "STREAM_REC_WORKER__BATCH_MAX_EVENTS": "100"}
    first = spawn(argv, slow, tmp_path / "replay.log")
    wait_until(lambda: SnapshotStore(target).latest_version() if target.exists() else None, 60,
               interval_s=0.02, what="the replay's first version")
    first.send_signal(signal.SIGINT)
    assert first.wait(30) == 130, (tmp_path / "replay.log").read_text()[-2000:]
    assert _snapshot_offsets(target, cfg.topic).get(0, 0) < 2000
    # ...then re-run: it resumes from the store's offsets and finishes the same range.
    rc, out, err = run_cli(argv, env, monkeypatch, capsys)
    assert rc == 0, err
    assert out["complete"] and out["start"] == {"0": 0} and out["stop"] == {"0": 2000}

    a, b = SnapshotStore(live).load(), SnapshotStore(target).load()
    assert a is not None and b is not None
    assert b.manifest.offsets[cfg.topic] == {0: 2000}
    same = ("events", "users", "items")  # a delta's manifest also counts the rows it changed
    assert {k: a.manifest.counts[k] for k in same} == {k: b.manifest.counts[k] for k in same}
    assert a.manifest.watermark == b.manifest.watermark

    def per_item(snap: Any) -> dict[str, int]:
        return {i: int(n) for i, n in zip(snap.state.item_ids, snap.state.tables["item.events"])
                if i}

    assert per_item(a) == per_item(b)
    assert per_item(a) == dict(collections.Counter(str(e["item_id"]) for e in events))
    # One partition, a fixed seed, training on fixed chunks: the very same state, bit for bit.
    assert a.state.item_ids == b.state.item_ids and a.state.user_ids == b.state.user_ids
    for name in a.state.tables:
        np.testing.assert_array_equal(b.state.tables[name], a.state.tables[name], err_msg=name)
    # The replay's dead letters went to its own topic, not the live one.
    assert topic_end_offsets(cfg, cfg.dlq_topic) == dlq_before

    # Idempotent: the same command again changes nothing.
    versions = SnapshotStore(target).versions()
    rc, out, _ = run_cli(argv, env, monkeypatch, capsys)
    assert rc == 0 and out["complete"] and SnapshotStore(target).versions() == versions
    # A different range into the same store, and any replay into the live store, are refused.
    rc, _, err = run_cli(["replay", "--store", str(target)], env, monkeypatch, capsys)
    assert rc == 2 and "different range" in err
    rc, _, err = run_cli(["replay", "--store", str(live)], env, monkeypatch, capsys)
    assert rc == 2 and "live store" in err and err.count("\n") == 1

    # snapshots diff: the two stores' newest versions carry the same vectors.
    rc, d, err = run_cli(["snapshots", "diff", "1", "latest", "--store", str(target), "--json"],
                         env, monkeypatch, capsys)
    assert rc == 0, err
    assert d["counts"]["events"]["new"] == 1996 and d["items_added"] >= 0

    # Copy the range into another topic: keys, headers and timestamps kept, at a rate.
    copy = cfg.topic + "-copy"
    rc, out, err = run_cli(["replay", "--into-topic", copy, "--from-offsets", "0:1500",
                            "--to-time", str(t_to), "--rate", "2000", "--json"],
                           env, monkeypatch, capsys)
    assert rc == 0, err
    assert out["copied"] == 500 and out["seconds"] >= 0.2
    src = [r for r in _read_all(cfg, cfg.topic) if 1500 <= r.offset < 2000]
    dst = _read_all(cfg, copy)
    assert [(r.key, r.value, r.timestamp, list(r.headers)) for r in dst] == \
        [(r.key, r.value, r.timestamp, list(r.headers)) for r in src]
    assert any(r.headers for r in dst)


# -- (b) pin / unpin ------------------------------------------------------------
def _publish_versions(store_path: Path, n: int) -> SnapshotStore:
    """``n`` versions of a small model, each with more events than the last."""
    from stream_rec.model import ModelConfig, StreamingModel

    store = SnapshotStore(store_path)
    model = StreamingModel(ModelConfig(dim=8), device="cpu")
    events = list(itertools.islice(datasets.iter_synthetic(seed=5), 200 * n))
    for k in range(n):
        chunk = events[200 * k:200 * (k + 1)]
        ts = np.array([e["ts"] for e in chunk], dtype=np.int64)
        model.learn([e["user_id"] for e in chunk], [str(e["item_id"]) for e in chunk], ts,
                    np.ones(len(chunk), dtype=np.float32))
        store.publish(model.state(), offsets={"clicks": {0: 200 * (k + 1)}},
                      watermark=int(ts.max()), parent=k or None)
    return store


def test_pin_and_unpin_switch_a_running_server(kafka_cfg: KafkaSettings, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    store_path = tmp_path / "store"
    store = _publish_versions(store_path, 3)
    env = env_for(kafka_cfg, store_path)
    port = free_port()
    server = spawn(["serve", "--port", str(port)], env, tmp_path / "server.log")
    try:
        wait_for_port("127.0.0.1", port, 60, server)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5)

        def served() -> int | None:
            r = client.get("/readyz")
            return r.json()["version"] if r.status_code == 200 else None

        wait_until(lambda: served() == 3, 30, what="the newest version")
        rc, out, err = run_cli(["snapshots", "pin", "1", "--json"], env, monkeypatch, capsys)
        assert rc == 0 and out["pinned"] == 1, err
        wait_until(lambda: served() == 1, 30, what="the pinned version")
        user = store.load(1).state.user_ids[0]
        assert client.get(f"/recommend/{user}").json()["version"] == 1
        # A newer version appears while pinned: serving stays on the pin.
        newest = store.load(3)
        store.publish(newest.state, offsets={"clicks": {0: 700}},
                      watermark=newest.manifest.watermark, parent=3)
        time.sleep(0.5)
        assert served() == 1
        rc, rows, _ = run_cli(["snapshots", "list", "--json"], env, monkeypatch, capsys)
        assert rc == 0 and [r["version"] for r in rows["versions"]] == [4, 3, 2, 1]
        assert rows["pinned"] == 1 and rows["versions"][3]["pinned"]
        rc, out, _ = run_cli(["snapshots", "unpin", "--json"], env, monkeypatch, capsys)
        assert rc == 0 and out["was_pinned"] == 1
        wait_until(lambda: served() == 4, 30, what="the newest version after unpin")
    finally:
        _stop(server)


# -- (c) dead letters -----------------------------------------------------------
def test_redriven_dead_letters_apply_once(kafka_cfg: KafkaSettings, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    cfg = kafka_cfg
    ensure_topics(cfg, [cfg.topic, cfg.dlq_topic])
    store = tmp_path / "store"
    env = env_for(cfg, store, STREAM_REC_WORKER__PUBLISH_INTERVAL_MS="100")
    worker = spawn(["worker"], env, tmp_path / "worker.log")
    try:
        producer = make_producer(cfg)
        events = list(itertools.islice(datasets.iter_synthetic(seed=9), 300))
        for ev in events:
            producer.send(cfg.topic, key=ev["user_id"].encode(), value=encode_event(ev))
        for _ in range(2):
            producer.send(cfg.topic, key=b"bad", value=b"{not json")
        producer.flush()
        # Letters an earlier, stricter contract wrote (it refused 'like' events); the
        # current contract accepts them, so re-driving them is the fix.
        old = DeadLetterWriter(make_producer(cfg), cfg.dlq_topic)
        fixed = [{"user_id": f"late-{k}", "item_id": f"liked-{k}", "ts": 1_700_000_000_000 + k,
                  "event": "like"} for k in range(3)]
        reason = "event 'like' is not accepted (contract v1)"
        for k, ev in enumerate(fixed):
            old.send(DeadLetter(reason, Origin(cfg.topic, k % 4, 10_000 + k),
                                ev["user_id"].encode(), encode_event(ev)))
        old.flush()
        old.close()
        truncated = encode_event({"user_id": "cut", "item_id": "x", "ts": 1})
        producer.send(cfg.dlq_topic, key=b"cut", value=truncated, headers=[
            ("error.reason", reason.encode()), ("origin.topic", cfg.topic.encode()),
            ("origin.partition", b"0"), ("origin.offset", b"20000"),
            ("value.truncated", b"true")])
        producer.flush()
        producer.close()

        wait_until(lambda: _caught_up(store, cfg), 60, what="the worker to catch up")
        wait_until(lambda: sum(topic_end_offsets(cfg, cfg.dlq_topic).values()) == 6, 30,
                   what="the dead letters")
        rc, out, err = run_cli(["dlq", "list", "--json", "--limit", "0"], env, monkeypatch,
                               capsys)
        assert rc == 0, err
        assert out["total"] == 6
        reasons = collections.Counter(x["reason"] for x in out["letters"])
        assert reasons[reason] == 4
        assert any(x["origin"]["topic"] == cfg.topic and "not valid UTF-8 JSON" in x["reason"]
                   for x in out["letters"])
        rc, out, _ = run_cli(["dlq", "list", "--json", "--reason", "contract v1", "--limit",
                              "2"], env, monkeypatch, capsys)
        assert out["total"] == 4 and len(out["letters"]) == 2

        rc, first, err = run_cli(["dlq", "redrive", "--reason", "contract v1", "--json"], env,
                                 monkeypatch, capsys)
        assert rc == 0, err
        assert first["redriven"] == 3
        assert [s["skipped"] for s in first["skipped"]] == [
            "value was truncated when dead-lettered: cannot be re-driven"]
        rc, again, _ = run_cli(["dlq", "redrive", "--all", "--json"], env, monkeypatch, capsys)
        assert rc == 0 and again["redriven"] == 0 and again["already_redriven"] == 3
        assert sum("still invalid" in s["skipped"] for s in again["skipped"]) == 2

        wait_until(lambda: _caught_up(store, cfg), 60, what="the worker to apply re-driven ones")
        snap = SnapshotStore(store).load()
        items = {i: int(n) for i, n in zip(snap.state.item_ids, snap.state.tables["item.events"])}
        assert [items.get(f"liked-{k}") for k in range(3)] == [1, 1, 1]
        assert snap.manifest.counts["events"] == 300 + 3
        marks = [dict(r.headers).get("redriven.from") for r in _read_all(cfg, cfg.topic)]
        assert sum(m is not None for m in marks) == 3

        # status: the live group has caught up, and says so.
        rc, st, err = run_cli(["status", "--sample", "0.5", "--json"], env, monkeypatch, capsys)
        assert rc == 0, err
        assert st["snapshot"]["latest"] == snap.manifest.version
        assert st["keeping_up"] is True and st["lag"] is not None
    finally:
        _stop(worker)


# -- (d) argument errors --------------------------------------------------------
def test_argument_errors_exit_2_with_one_line(kafka_cfg: KafkaSettings, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    store_path = tmp_path / "store"
    _publish_versions(store_path, 2)
    env = env_for(kafka_cfg, store_path)
    cases = [
        (["replay", "--store", str(tmp_path / "r"), "--from-offsets", "0:abc"], "PARTITION:OFFSET"),
        (["replay", "--store", str(tmp_path / "r"), "--from-time", "yesterday"], "ISO-8601"),
        (["snapshots", "pin", "7"], "unknown version 7"),
        (["snapshots", "show", "--store", str(tmp_path / "missing")], "no snapshot store"),
        (["dlq", "redrive"], "--reason"),
        (["dlq", "redrive", "--origin", "1-2"], "PARTITION:OFFSET"),
    ]
    for argv, message in cases:
        rc, _, err = run_cli(argv, env, monkeypatch, capsys)
        assert rc == 2, argv
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "missing").exists()
    ensure_topics(kafka_cfg, [kafka_cfg.topic])
    rc, _, err = run_cli(["replay", "--store", str(tmp_path / "r"), "--from-offsets", "9:0"],
                         env, monkeypatch, capsys)
    assert rc == 2 and "no partition 9" in err
    # An unreachable broker: one line, exit 2.
    dead = {**env, "STREAM_REC_KAFKA__BOOTSTRAP": f"127.0.0.1:{free_port()}",
            "STREAM_REC_KAFKA__BOOTSTRAP_TIMEOUT_MS": "1000"}
    rc, _, err = run_cli(["dlq", "list"], dead, monkeypatch, capsys)
    assert rc == 2 and "no Kafka broker answers" in err and err.count("\n") == 1
    # verify: a corrupt version makes a non-zero exit.
    vdir = SnapshotStore(store_path).version_dir(1)
    victim = max((f for f in Path(vdir).iterdir() if f.name != "manifest.json"),
                 key=lambda f: f.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    rc, out, _ = run_cli(["snapshots", "verify", "--json"], env, monkeypatch, capsys)
    assert rc == 1 and out["corrupt"] == 1 and [r["ok"] for r in out["results"]] == [False, True]
    for cmd in (["replay"], ["snapshots", "list"], ["dlq", "redrive"], ["status"]):
        with pytest.raises(SystemExit) as exc:
            cli.main([*cmd, "--help"])
        assert exc.value.code == 0
        assert "example:" in capsys.readouterr().out


def test_times_offsets_and_the_keeping_up_verdict() -> None:
    from stream_rec.ops.common import parse_pairs, parse_time
    from stream_rec.ops.status import verdict

    assert parse_time("1700000000000") == 1_700_000_000_000
    assert parse_time("2023-11-14T22:13:20Z") == 1_700_000_000_000
    assert parse_time("2023-11-14T22:13:20") == 1_700_000_000_000  # naive = UTC
    assert parse_time("2023-11-15T00:13:20+02:00") == 1_700_000_000_000
    assert parse_pairs("0:120, 1:80", "--x") == {0: 120, 1: 80}
    for bad in ("0:1,0:2", "0", "-1:5", "a:b"):
        with pytest.raises(cli.UsageError):
            parse_pairs(bad, "--x")
    assert verdict(5, 0, 1.0, 0.25)[0] is True
    assert verdict(50, 20, 1.0, 0.25)[0] is True
    assert verdict(20, 50, 1.0, 0.25)[0] is False
    assert verdict(50, 50, 600.0, 0.25)[0] is False
    assert verdict(50, 50, 1.0, 0.25)[0] is True
    assert verdict(None, None, None, 0.25)[0] is None
