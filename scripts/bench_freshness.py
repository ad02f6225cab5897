"""End-to-end freshness: from produce to the first answer that includes the event.

A producer sends events at a steady rate to a topic; a worker and a server run
as separate processes. For every 20th event the benchmark notes when it was
sent and, from the broker's acknowledgement, its partition and offset. A probe
asks the server for recommendations every 10 ms; each answer names its
snapshot version, whose manifest lists the offsets it includes. An event is
fresh at the first answer whose version includes its offset.

    python scripts/bench_freshness.py                 # 1000, 5000, 10000 events/s, 20 s each
    python scripts/bench_freshness.py --quick         # 1000 and 5000 events/s, 8 s each

Last line: ``{"rates": {"5000": {"p50_s": …, "p95_s": …, "p99_s": …}, …}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
from benchlib import ROOT, broker, percentiles, plot, write_result

from stream_rec import datasets
from stream_rec.broker import free_port, stop_process, wait_for_port
from stream_rec.demo import settle
from stream_rec.events import encode_event
from stream_rec.ingest.kafka import ensure_topics, make_producer
from stream_rec.producer import RateLimiter
from stream_rec.settings import KafkaSettings
from stream_rec.snapshot import SnapshotStore

SAMPLE_EVERY = 20


class Probe:
    """Matches sampled events to the first served version that includes them."""

    def __init__(self, base_url: str, store: SnapshotStore, topic: str) -> None:
        self.base_url = base_url
        self.store = store
        self.topic = topic
        self.lock = threading.Lock()
        self.pending: list[tuple[int, int, float]] = []
        self.latencies: list[float] = []
        self.offsets_of: dict[int, dict[int, int]] = {}
        self.stop = threading.Event()
        self.errors = 0

    def sent(self, partition: int, offset: int, t_sent: float) -> None:
        with self.lock:
            self.pending.append((partition, offset, t_sent))

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=2.0) as client:
            while not self.stop.is_set():
                try:
                    r = client.get("/recommend/1", params={"k": 10})
                except httpx.HTTPError:
                    self.errors += 1
                    time.sleep(0.01)
                    continue
                now = time.monotonic()
                if r.status_code == 200:
                    version = r.json()["version"]
                    if version not in self.offsets_of:
                        m = self.store.read_manifest(version)
                        self.offsets_of[version] = m.offsets.get(self.topic, {})
                    served = self.offsets_of[version]
                    with self.lock:
                        self.pending = settle(self.pending, served, now, self.latencies)
                time.sleep(0.01)


def run_rate(cfg: KafkaSettings, probe: Probe, rate: int, seconds: float,
             events: list[dict]) -> dict:
    producer = make_producer(cfg, linger_ms=2)
    pacer = RateLimiter(rate)
    n = int(rate * seconds)
    probe.latencies = []
    t_start = time.monotonic()
    for i in range(n):
        ev = events[i % len(events)]
        future = producer.send(cfg.topic, key=str(ev["user_id"]).encode(),
                               value=encode_event(ev))
        if i % SAMPLE_EVERY == 0:
            t_sent = time.monotonic()
            future.add_callback(lambda meta, t=t_sent: probe.sent(meta.partition, meta.offset, t))
        pacer.wait()
    producer.flush()
    achieved = n / (time.monotonic() - t_start)
    deadline = time.monotonic() + 60
    while probe.pending and time.monotonic() < deadline:
        time.sleep(0.1)
    producer.close()
    lat = list(probe.latencies)
    stats = {k + "_s": round(v, 4) for k, v in percentiles(lat).items()}
    return {**stats, "target_rate": rate, "achieved_rate": round(achieved),
            "samples": len(lat), "unmatched": len(probe.pending), "latencies": lat}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rates", default=None, help="comma-separated events/s")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--bootstrap", default=None)
    args = ap.parse_args()
    rates = [int(r) for r in (args.rates or ("1000,5000" if args.quick else "1000,5000,10000"))
             .split(",")]
    seconds = args.seconds or (8.0 if args.quick else 20.0)
    data = datasets.load_ml100k()
    events = [{"user_id": int(r["user"]), "item_id": int(r["item"]), "ts": int(r["ts"]),
               "event": "click"} for r in data]

    with broker(args.bootstrap) as bootstrap:
        work = Path(tempfile.mkdtemp(prefix="bench-fresh-"))
        cfg = KafkaSettings(bootstrap=bootstrap, topic=f"bench-fresh-{uuid.uuid4().hex[:8]}",
                            group_id=f"bench-{uuid.uuid4().hex[:6]}")
        ensure_topics(cfg, [cfg.topic, cfg.dlq_topic])
        store_path = work / "store"
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT),
               "STREAM_REC_KAFKA__BOOTSTRAP": bootstrap, "STREAM_REC_KAFKA__TOPIC": cfg.topic,
               "STREAM_REC_KAFKA__GROUP_ID": cfg.group_id,
               "STREAM_REC_KAFKA__SESSION_TIMEOUT_MS": "2000",
               "STREAM_REC_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
               "STREAM_REC_STORE__PATH": str(store_path), "STREAM_REC_SERVE__PORT": str(port),
               "STREAM_REC_WORKER__DEVICE": "cpu", "STREAM_REC_LOG_LEVEL": "WARNING"}
        procs = [subprocess.Popen([sys.executable, "-m", "stream_rec", role], env=env,
                                  stdout=open(work / f"{role}.log", "wb"),  # noqa: SIM115
                                  stderr=subprocess.STDOUT, cwd=ROOT)
                 for role in ("worker", "serve")]
        try:
            wait_for_port("127.0.0.1", port, 60, procs[1])
            # Warm up: one user known to the model, and the worker joined to its group.
            producer = make_producer(cfg)
            for ev in events[:2000]:
                producer.send(cfg.topic, key=str(ev["user_id"]).encode(), value=encode_event(ev))
            producer.flush()
            producer.close()
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
                deadline = time.monotonic() + 60
                while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                    time.sleep(0.2)
            probe = Probe(f"http://127.0.0.1:{port}", SnapshotStore(store_path), cfg.topic)
            thread = threading.Thread(target=probe.run, daemon=True)
            thread.start()
            results = {}
            for rate in rates:
                print(f"producing at {rate} events/s for {seconds:.0f} s…", flush=True)
                res = run_rate(cfg, probe, rate, seconds, events[2000:])
                results[str(rate)] = res
                print(f"  achieved {res['achieved_rate']} events/s; freshness p50 "
                      f"{res['p50_s']:.3f} s, p95 {res['p95_s']:.3f} s, p99 {res['p99_s']:.3f} s "
                      f"({res['samples']} samples, {res['unmatched']} unmatched)", flush=True)
            probe.stop.set()
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                stop_process(p)

    def draw(ax):
        for rate, res in results.items():
            lat = np.sort(res["latencies"])
            if len(lat):
                ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=f"{rate} events/s")
        ax.set_xlabel("produce → served answer (s)")
        ax.set_ylabel("fraction of events")
        ax.set_title("End-to-end freshness (CDF)")
        ax.legend()

    plot("freshness_cdf_quick.png" if args.quick else "freshness_cdf.png", draw)
    summary = {"rates": {r: {k: v for k, v in res.items() if k != "latencies"}
                         for r, res in results.items()}}
    write_result("bench_freshness_quick" if args.quick else "bench_freshness", summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
