"""``stream-rec demo``: the whole system on one machine, replaying MovieLens-100K.

It starts the local broker (or uses ``--bootstrap``), a worker and a server as
separate processes, replays the ratings through Kafka, and prints while it
runs: events/s, the snapshot version being served, and a few users'
recommendations changing as their clicks arrive. It ends with a summary whose
freshness is measured end to end: from the moment an event is produced to the
first time the server answers from a version whose offsets include it.
"""

from __future__ import annotations

import collections
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from stream_rec import datasets
from stream_rec.broker import LocalBroker, free_port, stop_process, wait_for_port
from stream_rec.ingest.kafka import ensure_topics
from stream_rec.producer import produce
from stream_rec.settings import Settings

log = logging.getLogger(__name__)

SAMPLE_EVERY = 20


def settle(pending: list[tuple[int, int, float]], served: dict[int, int], now: float,
           latencies: list[float]) -> list[tuple[int, int, float]]:
    """Record ``now - sent`` for each pending (partition, offset, sent) that ``served``
    offsets include; return those still waiting."""
    keep = []
    for p, o, sent in pending:
        if o < served.get(p, 0):
            latencies.append(now - sent)
        else:
            keep.append((p, o, sent))
    return keep


class FreshnessProbe:
    """Matches produced events to the first served version that includes them."""

    def __init__(self, base_url: str, topic: str) -> None:
        self.base_url = base_url
        self.topic = topic
        self.pending: list[tuple[int, int, float]] = []  # partition, offset, produced (mono)
        self.latencies: list[float] = []
        self.versions_seen: list[int] = []
        self.served_offsets: dict[int, int] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.n_sent = 0

    def on_sent(self, _event: Any, future: Any) -> None:
        self.n_sent += 1
        if self.n_sent % SAMPLE_EVERY:
            return
        sent = time.monotonic()

        def done(meta: Any) -> None:
            with self.lock:
                self.pending.append((meta.partition, meta.offset, sent))

        future.add_callback(done)

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=2.0) as client:
            while not self.stop.is_set():
                try:
                    r = client.get("/readyz")
                except httpx.HTTPError:
                    time.sleep(0.05)
                    continue
                if r.status_code == 200:
                    body = r.json()
                    now = time.monotonic()
                    if not self.versions_seen or body["version"] != self.versions_seen[-1]:
                        self.versions_seen.append(body["version"])
                    offsets = {int(p): o for p, o in body["offsets"].get(self.topic, {}).items()}
                    self.served_offsets = offsets
                    with self.lock:
                        self.pending = settle(self.pending, offsets, now, self.latencies)
                time.sleep(0.02)


def _spawn(args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    out = open(log_path, "ab")  # noqa: SIM115 - lives as long as the child
    return subprocess.Popen([sys.executable, "-m", "stream_rec", *args], stdout=out,
                            stderr=subprocess.STDOUT, env=env)


def _fmt_items(items: list[dict[str, Any]], n: int = 5) -> str:
    return " ".join(str(i["item_id"]) for i in items[:n])


def run_demo(settings: Settings, *, rate: float = 4000.0, limit: int | None = None,
             watch: int = 3) -> int:
    """Run the end-to-end demo; returns 0 when every event was served."""
    data = datasets.load_ml100k()
    if limit:
        data = data[:limit]
    users, counts = np.unique(data["user"], return_counts=True)
    watched = [str(u) for u in users[np.argsort(-counts, kind="stable")][:watch]]

    workdir = Path(tempfile.mkdtemp(prefix="stream-rec-demo-"))
    store = settings.store.path if settings.store.path != "data/snapshots" \
        else str(workdir / "snapshots")
    broker = None
    if settings.kafka.bootstrap == "127.0.0.1:9092" and not os.environ.get(
            "STREAM_REC_KAFKA__BOOTSTRAP"):
        broker = LocalBroker(log_path=workdir / "broker.log").start()
        settings.kafka.bootstrap = broker.bootstrap
    port = settings.serve.port if settings.serve.port != 8000 else free_port()
    env = {**os.environ, "STREAM_REC_KAFKA__BOOTSTRAP": settings.kafka.bootstrap,
           "STREAM_REC_KAFKA__TOPIC": settings.kafka.topic,
           "STREAM_REC_STORE__PATH": store, "STREAM_REC_SERVE__PORT": str(port),
           "STREAM_REC_KAFKA__GROUP_ID": f"demo-{os.getpid()}"}
    print(f"demo: broker {settings.kafka.bootstrap}, store {store}, "
          f"server http://127.0.0.1:{port}, logs in {workdir}", flush=True)
    worker = server = None
    probe = FreshnessProbe(f"http://127.0.0.1:{port}", settings.kafka.topic)
    try:
        # The demo owns its topics (on the local broker, or a fresh topic named for it).
        ensure_topics(settings.kafka, [settings.kafka.topic, settings.kafka.dlq_topic])
        worker = _spawn(["worker"], workdir / "worker.log", env)
        server = _spawn(["serve"], workdir / "server.log", env)
        wait_for_port("127.0.0.1", port, 60.0, server)
        events = ({"user_id": int(r["user"]), "item_id": int(r["item"]), "ts": int(r["ts"]),
                   "event": "click"} for r in data)
        # The first click goes alone: once it is served, the worker has joined its
        # group and freshness measures the stream, not the start-up.
        produce(settings.kafka, [next(events)], progress=False)
        print("waiting for the worker to join and publish its first version…", flush=True)
        with httpx.Client(base_url=probe.base_url, timeout=2.0) as client:
            deadline = time.monotonic() + 90
            while client.get("/readyz").status_code != 200:
                if worker.poll() is not None or time.monotonic() > deadline:
                    print(f"the worker did not publish; see {workdir / 'worker.log'}")
                    return 1
                time.sleep(0.1)
        probe_thread = threading.Thread(target=probe.run, daemon=True)
        probe_thread.start()
        progress = threading.Thread(
            target=produce, args=(settings.kafka, events),
            kwargs={"rate": rate, "progress": False, "on_sent": probe.on_sent}, daemon=True)
        t0 = time.monotonic()
        progress.start()
        _watch_loop(probe, watched, progress, t0, len(data), worker)
        total = len(data)
        deadline = time.monotonic() + 120
        while sum(probe.served_offsets.values()) < total and time.monotonic() < deadline:
            if worker.poll() is not None:
                break
            time.sleep(0.2)
        time.sleep(0.3)
        probe.stop.set()
        elapsed = time.monotonic() - t0
        served = sum(probe.served_offsets.values())
        lat = np.array(probe.latencies) if probe.latencies else np.array([np.nan])
        print("\n── summary ──────────────────────────────────────────────")
        print(f"events produced        {total}")
        print(f"events in served state {served}")
        print(f"versions served        {len(probe.versions_seen)} "
              f"(last v{probe.versions_seen[-1] if probe.versions_seen else '-'})")
        print(f"wall time              {elapsed:.1f} s ({total / elapsed:.0f} events/s)")
        print(f"freshness p50 / p95    {np.nanpercentile(lat, 50):.3f} s / "
              f"{np.nanpercentile(lat, 95):.3f} s  (produce → served answer, "
              f"{len(probe.latencies)} sampled events)")
        return 0 if served == total else 1
    finally:
        probe.stop.set()
        stop_process(server)
        code = stop_process(worker)
        if code not in (0, None):
            print(f"worker exited with code {code}; see {workdir / 'worker.log'}")
        if broker:
            broker.stop()


def _watch_loop(probe: FreshnessProbe, watched: list[str], producer: threading.Thread,
                t0: float, total: int, worker: subprocess.Popen[bytes]) -> None:
    last: dict[str, str] = collections.defaultdict(str)
    last_sent, last_t = 0, t0
    with httpx.Client(base_url=probe.base_url, timeout=2.0) as client:
        while producer.is_alive() or sum(probe.served_offsets.values()) < total:
            if worker.poll() is not None:
                print(f"worker exited early with code {worker.returncode}")
                return
            time.sleep(1.0)
            now = time.monotonic()
            rate = (probe.n_sent - last_sent) / (now - last_t)
            last_sent, last_t = probe.n_sent, now
            version = probe.versions_seen[-1] if probe.versions_seen else "-"
            served = sum(probe.served_offsets.values())
            print(f"[{now - t0:5.1f}s] produced {probe.n_sent:6d} ({rate:6.0f} ev/s)  "
                  f"served v{version} with {served} events", flush=True)
            for user in watched:
                try:
                    body = client.get(f"/recommend/{user}", params={"k": 5}).json()
                except (httpx.HTTPError, ValueError):
                    continue
                items = _fmt_items(body.get("items", []))
                if items != last[user]:
                    print(f"          user {user:>4}: top-5 now [{items}] "
                          f"(v{body.get('version')})", flush=True)
                    last[user] = items
            if not producer.is_alive() and now - t0 > 600:
                return
