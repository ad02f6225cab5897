"""End-to-end freshness: from produce to the first answer that includes the event.

A producer sends events at a steady rate to a topic; a worker and a server run
as separate processes. For every 20th event the benchmark notes when it was
sent and, from the broker's acknowledgement, its partition and offset. A probe
asks the server for recommendations every 10 ms; each answer names its
snapshot version, whose manifest lists the offsets it includes. An event is
fresh at the first answer whose version includes its offset.

"Own click" latency, under that background load: a few probe users (given a
history at warm-up, never in the background stream) each, after a random
0-250 ms pause, ask for their top 100, click the first item, and ask again
every 10 ms (``--own-poll-ms``)
until an answer reflects the click: the item is gone from their top 100 (a
server that knows the click excludes it as seen), or what the answer names
includes the click's offset (its version's manifest, or offsets the answer
states, such as a topic overlay's: see ``benchlib.answer_offsets``). The
latency is from just before the click is sent to the receipt of that answer. Which sign came first is
counted: on a server that learns a click only from versions, the item can only
disappear because a newer version ranks it lower, so exclusions seen before
the version are false positives, and their count says how far to trust it.

    python scripts/bench_freshness.py                 # 1000, 5000, 10000 events/s, 20 s each
    python scripts/bench_freshness.py --quick         # 1000 and 5000 events/s, 8 s each
    python scripts/bench_freshness.py --set worker.publish_interval_ms=5000   # any setting

Last line: ``{"rates": {"5000": {"p50_s": …, "p95_s": …, "p99_s": …, "own_click": {"p50_s":
…}}, …}}``.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from typing import Any

import httpx
import numpy as np
from benchlib import (
    VersionOffsets,
    answer_offsets,
    broker,
    covering,
    percentiles,
    pipeline,
    plot,
    settings_env,
    write_result,
)
from kafka.errors import KafkaError

from stream_rec import datasets
from stream_rec.demo import settle
from stream_rec.events import encode_event
from stream_rec.ingest.kafka import make_producer
from stream_rec.producer import RateLimiter
from stream_rec.settings import KafkaSettings
from stream_rec.snapshot import SnapshotStore

SAMPLE_EVERY = 20
OWN_USER_BASE = 900_000    # probe users' ids: above every MovieLens user
OWN_HISTORY = 20           # clicks each probe user is given at warm-up
OWN_K = 100                # the top-k a probe user watches for the clicked item
OWN_TIMEOUT_S = 10.0
# A probe user waits a random 0-250 ms before each click, so that clicks do not lock onto the
# publish cycle (a click sent right after a version was seen always meets the same phase).
OWN_JITTER_S = 0.25


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


class OwnClick:
    """Probe users clicking an item of their own answer and waiting to see it reflected.

    One thread per probe user; samples go to the phase (the background rate) during which
    the click was sent, and no click starts between phases.
    """

    def __init__(self, base_url: str, cfg: KafkaSettings, store: SnapshotStore,
                 users: list[int], poll_s: float = 0.01) -> None:
        self.base_url = base_url
        self.poll_s = poll_s
        self.cfg = cfg
        self.versions = VersionOffsets(store, cfg.topic)
        self.users = users
        self.phase: str | None = None
        self.ts = 0                   # event time of the newest background event
        self.samples: dict[str, list[tuple[float, str]]] = {}
        self.unmatched: dict[str, int] = {}
        self.in_flight = 0            # clicks sent and not yet seen or given up
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(u,), daemon=True)
                        for u in users]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=OWN_TIMEOUT_S + 5)

    def run(self, user: int) -> None:
        producer = make_producer(self.cfg, linger_ms=0, acks=1)
        rng = random.Random(user)
        with httpx.Client(base_url=self.base_url, timeout=5.0) as client:
            while not self.stop.wait(rng.uniform(0.0, OWN_JITTER_S)):
                phase = self.phase
                body = self._ask(client, user) if phase else None
                if not body or body["fallback"] or not body["items"]:
                    time.sleep(0.05)
                    continue
                item = body["items"][0]["item_id"]
                with self.lock:
                    self.in_flight += 1
                t_sent = time.perf_counter()
                click = {"user_id": user, "item_id": item, "ts": self.ts, "event": "click"}
                try:
                    meta = producer.send(self.cfg.topic, key=str(user).encode(),
                                         value=encode_event(click)).get(timeout=10)
                except KafkaError:
                    seen = None
                else:
                    seen = self._wait(client, user, item, meta.partition, meta.offset, t_sent)
                with self.lock:
                    self.in_flight -= 1
                    if seen is None:
                        self.unmatched[phase] = self.unmatched.get(phase, 0) + 1
                    else:
                        self.samples.setdefault(phase, []).append(seen)
        producer.close()

    def _ask(self, client: httpx.Client, user: int) -> dict[str, Any] | None:
        try:
            r = client.get(f"/recommend/{user}", params={"k": OWN_K})
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    def _wait(self, client: httpx.Client, user: int, item: str, partition: int, offset: int,
              t_sent: float) -> tuple[float, str] | None:
        """(seconds from the send to the first answer reflecting the click, the sign seen)."""
        while time.perf_counter() - t_sent < OWN_TIMEOUT_S and not self.stop.is_set():
            body = self._ask(client, user)
            t = time.perf_counter()
            if body is not None:
                source = covering(answer_offsets(body, self.versions, self.cfg.topic),
                                  partition, offset)
                if source is not None:
                    return t - t_sent, source
                if not body["fallback"] and item not in {x["item_id"] for x in body["items"]}:
                    return t - t_sent, "excluded"
            time.sleep(self.poll_s)
        return None

    def stats(self, phase: str) -> dict[str, Any]:
        """Once the clicks in flight are settled (call after ``phase`` has ended)."""
        deadline = time.monotonic() + OWN_TIMEOUT_S + 2
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        with self.lock:
            got = list(self.samples.get(phase, []))
            unmatched = self.unmatched.get(phase, 0)
        lat = [t for t, _ in got]
        first: dict[str, int] = {}
        for _, sign in got:
            first[sign] = first.get(sign, 0) + 1
        return {**{k + "_s": round(v, 4) for k, v in percentiles(lat).items()},
                "samples": len(lat), "unmatched": unmatched, "first_sign": first,
                "latencies": lat}


def own_histories(events: list[dict], n_users: int) -> list[dict]:
    """Warm-up clicks for the probe users: each copies a real user's first clicks."""
    by_user: dict[int, list[dict]] = {}
    for ev in events:
        by_user.setdefault(ev["user_id"], []).append(ev)
    donors = [u for u, evs in by_user.items() if len(evs) >= OWN_HISTORY][:n_users]
    return [{**ev, "user_id": OWN_USER_BASE + k}
            for k, u in enumerate(donors) for ev in by_user[u][:OWN_HISTORY]]


def run_rate(cfg: KafkaSettings, probe: Probe, rate: int, seconds: float,
             events: list[dict], own: OwnClick | None = None) -> dict:
    producer = make_producer(cfg, linger_ms=2)
    pacer = RateLimiter(rate)
    n = int(rate * seconds)
    probe.latencies = []
    if own:
        own.ts = events[0]["ts"]
        own.phase = str(rate)
    t_start = time.monotonic()
    for i in range(n):
        ev = events[i % len(events)]
        future = producer.send(cfg.topic, key=str(ev["user_id"]).encode(),
                               value=encode_event(ev))
        if own:
            own.ts = ev["ts"]
        if i % SAMPLE_EVERY == 0:
            t_sent = time.monotonic()
            future.add_callback(lambda meta, t=t_sent: probe.sent(meta.partition, meta.offset, t))
        pacer.wait()
    if own:
        own.phase = None          # clicks in flight finish; no new one starts
    producer.flush()
    achieved = n / (time.monotonic() - t_start)
    deadline = time.monotonic() + 60
    while probe.pending and time.monotonic() < deadline:
        time.sleep(0.1)
    producer.close()
    lat = list(probe.latencies)
    stats = {k + "_s": round(v, 4) for k, v in percentiles(lat).items()}
    out = {**stats, "target_rate": rate, "achieved_rate": round(achieved),
           "samples": len(lat), "unmatched": len(probe.pending), "latencies": lat}
    if own:
        out["own_click"] = own.stats(str(rate))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rates", default=None, help="comma-separated events/s")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--bootstrap", default=None)
    ap.add_argument("--own-probes", type=int, default=2,
                    help="probe users measuring own-click latency at once (0: none)")
    ap.add_argument("--own-poll-ms", type=float, default=10.0,
                    help="how often a probe user asks again after clicking (resolution)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a setting for the worker and the server (repeatable)")
    args = ap.parse_args()
    rates = [int(r) for r in (args.rates or ("1000,5000" if args.quick else "1000,5000,10000"))
             .split(",")]
    seconds = args.seconds or (8.0 if args.quick else 20.0)
    data = datasets.load_ml100k()
    events = [{"user_id": int(r["user"]), "item_id": int(r["item"]), "ts": int(r["ts"]),
               "event": "click"} for r in data]

    with broker(args.bootstrap) as bootstrap, \
            pipeline(bootstrap, "bench-fresh", settings_env(args.set)) as pipe:
        cfg = pipe.cfg
        # Warm up: users known to the model (the probe users among them), and the worker
        # joined to its group.
        own_users = [OWN_USER_BASE + k for k in range(args.own_probes)]
        producer = make_producer(cfg)
        for ev in events[:2000] + own_histories(events[:2000], args.own_probes):
            producer.send(cfg.topic, key=str(ev["user_id"]).encode(), value=encode_event(ev))
        producer.flush()
        producer.close()
        pipe.wait_ready(60)
        store = SnapshotStore(pipe.store_path)
        with httpx.Client(base_url=pipe.base_url) as c:
            deadline = time.monotonic() + 60
            while own_users and time.monotonic() < deadline and any(
                    c.get(f"/recommend/{u}").json()["fallback"] for u in own_users):
                time.sleep(0.2)
        probe = Probe(pipe.base_url, store, cfg.topic)
        thread = threading.Thread(target=probe.run, daemon=True)
        thread.start()
        own = OwnClick(pipe.base_url, cfg, store, own_users, args.own_poll_ms / 1000) \
            if own_users else None
        if own:
            own.start()
        results = {}
        for rate in rates:
            print(f"producing at {rate} events/s for {seconds:.0f} s…", flush=True)
            res = run_rate(cfg, probe, rate, seconds, events[2000:], own)
            results[str(rate)] = res
            print(f"  achieved {res['achieved_rate']} events/s; freshness p50 "
                  f"{res['p50_s']:.3f} s, p95 {res['p95_s']:.3f} s, p99 {res['p99_s']:.3f} s "
                  f"({res['samples']} samples, {res['unmatched']} unmatched)", flush=True)
            if own:
                oc = res["own_click"]
                print(f"  own click p50 {oc['p50_s']:.3f} s, p95 {oc['p95_s']:.3f} s, "
                      f"p99 {oc['p99_s']:.3f} s ({oc['samples']} clicks, {oc['unmatched']} "
                      f"unmatched; first sign {oc['first_sign']})", flush=True)
        probe.stop.set()
        if own:
            own.close()

    def draw(ax):
        for rate, res in results.items():
            lat = np.sort(res["latencies"])
            if len(lat):
                line, = ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat),
                                label=f"{rate} events/s")
                own_lat = np.sort(res.get("own_click", {}).get("latencies", []))
                if len(own_lat):
                    ax.plot(own_lat, np.arange(1, len(own_lat) + 1) / len(own_lat), "--",
                            color=line.get_color(), label=f"{rate} events/s, own click")
        ax.set_xscale("log")   # 0.05 s to tens of seconds when the worker falls behind
        ax.set_xlabel("send → first answer that includes (reflects) it (s)")
        ax.set_ylabel("fraction of events")
        ax.set_title("End-to-end freshness (CDF)")
        ax.legend()

    plot("freshness_cdf_quick.png" if args.quick else "freshness_cdf.png", draw)
    for res in results.values():
        res.get("own_click", {}).pop("latencies", None)
    summary = {"rates": {r: {k: v for k, v in res.items() if k != "latencies"}
                         for r, res in results.items()}}
    write_result("bench_freshness_quick" if args.quick else "bench_freshness", summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
