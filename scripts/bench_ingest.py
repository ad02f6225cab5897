"""Worker throughput against the limit: raw kafka-python consumption + JSON decoding.

One run, one broker, the same messages: first a bare kafka-python consumer reads
and decodes every message (the most any consumer process can do), then the
worker consumes, validates, trains, and publishes versions over the same range
(a bounded run into a fresh store) -- the pipelined worker (a consumer process
and a trainer process, the default) and, for comparison, the serial one.
Reports the rates and their ratio to the raw limit, for each micro-batch size
asked for; CPU µs per event of each stage (consumer process, trainer process,
its publisher thread, the broker); the fraction of the run the ring between
them was full (the trainer is the bottleneck) or empty (the consumer is); and
optionally a cProfile of the serial worker's top costs.

    python scripts/bench_ingest.py            # 200 000 events, batch sizes 250/1000/4000
    python scripts/bench_ingest.py --quick    # 40 000 events, batch 1000

Last line: JSON with ``worker_events_per_s``, ``raw_events_per_s``, ``ratio``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import tempfile
import time
import uuid

import numpy as np
import orjson
import psutil
from benchlib import broker, ml100k_events, plot, produce_bulk, write_result
from kafka import TopicPartition

from stream_rec.ingest.kafka import make_consumer, topic_end_offsets
from stream_rec.model import StreamingModel
from stream_rec.settings import Settings
from stream_rec.snapshot import SnapshotStore
from stream_rec.worker import Bounds, make_worker


def raw_rate(settings: Settings, n: int) -> float:
    """Events/s of kafka-python consuming and JSON-decoding ``n`` messages."""
    cfg = settings.kafka
    t0 = time.perf_counter()
    consumer = make_consumer(cfg, None)
    parts = [TopicPartition(cfg.topic, p) for p in consumer.partitions_for_topic(cfg.topic)]
    consumer.assign(parts)
    consumer.seek_to_beginning()
    seen = 0
    while seen < n:
        for records in consumer.poll(timeout_ms=500, max_records=5000).values():
            for rec in records:
                orjson.loads(rec.value)
            seen += len(records)
    elapsed = time.perf_counter() - t0
    consumer.close()
    return n / elapsed


def train_rate(settings: Settings, events: list[dict], batch: int) -> float:
    """Events/s of the model's ``learn()`` alone on the same events, already decoded.

    The part of the worker that kafka-python does not do. Consuming and training
    run one after the other on the polling thread, so the worker cannot exceed
    ``1 / (1 / raw + 1 / train)`` -- the serial bound reported beside the ratio.
    """
    model = StreamingModel(settings.model, device=settings.worker.device)
    users = [str(e["user_id"]) for e in events]
    items = [str(e["item_id"]) for e in events]
    ts = np.array([e["ts"] for e in events], dtype=np.int64)
    t0 = time.perf_counter()
    for s in range(0, len(events), batch):
        model.learn(users[s:s + batch], items[s:s + batch], ts[s:s + batch])
    return len(events) / (time.perf_counter() - t0)


def worker_rate(settings: Settings, n: int, profile: bool = False,
                broker_pid: int | None = None) -> tuple[float, str, dict]:
    """Events/s of a bounded worker run over the whole topic into a fresh store, with the
    CPU µs/event of each stage and the ring's full/empty fractions (pipelined worker)."""
    cfg = settings.kafka
    end = topic_end_offsets(cfg, cfg.topic)
    store = SnapshotStore(tempfile.mkdtemp(prefix="bench-ingest-"))
    worker = make_worker(settings, store, bounds=Bounds(start={p: 0 for p in end}, stop=end))
    prof = cProfile.Profile() if profile else None
    me = psutil.Process()
    brk = psutil.Process(broker_pid) if broker_pid else None
    cpu0, bcpu0 = _cpu(me), _cpu(brk)
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    worker.run()
    if prof:
        prof.disable()
    # Throughput from when consumption began: start-up (the trainer's imports, a
    # restore) is a one-off cost, not a rate.
    elapsed = time.monotonic() - worker.consuming_since if worker.consuming_since \
        else time.perf_counter() - t0
    cpu1, bcpu1 = _cpu(me), _cpu(brk)
    events = worker.events or int(store.read_manifest(worker.version).counts.get("events", 0))
    assert events == n, f"worker applied {events} of {n} events"
    us = 1e6 / n
    stages: dict = {"consumer_us": round((cpu1 - cpu0) * us, 2),
                    "broker_us": round((bcpu1 - bcpu0) * us, 2) if brk else None}
    stats = getattr(worker, "trainer_stats", {})
    if stats:
        stages.update(trainer_us=round((stats["cpu_s"] - stats["publisher_cpu_s"]) * us, 2),
                      publisher_us=round(stats["publisher_cpu_s"] * us, 2),
                      ring_full=round(worker.ring_waits()["ring_full_s"] / elapsed, 3),
                      ring_empty=round(stats["ring_empty_s"] / elapsed, 3))
    text = ""
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
        text = buf.getvalue()
    return n / elapsed, text, stages


def _cpu(proc: psutil.Process | None) -> float:
    """User + system CPU seconds of ``proc`` (all its threads)."""
    if proc is None:
        return 0.0
    t = proc.cpu_times()
    return t.user + t.system


def broker_pid_of(bootstrap: str) -> int | None:
    """The pid listening on ``bootstrap``'s port (the local broker), if it is on this host."""
    port = int(bootstrap.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            return conn.pid
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    ap.add_argument("--events", type=int, default=None)
    ap.add_argument("--batch-sizes", default=None, help="comma-separated micro-batch sizes")
    ap.add_argument("--bootstrap", default=None, help="external broker (default: local)")
    ap.add_argument("--profile", action="store_true", help="print the worker's top costs")
    args = ap.parse_args()
    n = args.events or (40_000 if args.quick else 200_000)
    sizes = [int(s) for s in (args.batch_sizes or ("1000" if args.quick else "250,1000,4000"))
             .split(",")]

    with broker(args.bootstrap) as bootstrap:
        settings = Settings()
        settings.kafka.bootstrap = bootstrap
        settings.kafka.topic = f"bench-ingest-{uuid.uuid4().hex[:8]}"
        settings.worker.device = "cpu"
        print(f"producing {n} events to {settings.kafka.topic}…", flush=True)
        events = ml100k_events(n)
        produce_bulk(settings.kafka, events)
        raw = raw_rate(settings, n)
        print(f"raw kafka-python consume + JSON decode: {raw:,.0f} events/s", flush=True)
        train = train_rate(settings, events, 1000)
        print(f"model.learn alone on the same events: {train:,.0f} events/s", flush=True)
        rows = []
        profile_text = ""
        pid = broker_pid_of(bootstrap)
        for size in sizes:
            settings.worker.batch_max_events = size
            rate, _, stages = worker_rate(settings, n, broker_pid=pid)
            rows.append({"batch_max_events": size, "worker_events_per_s": round(rate),
                         "ratio": round(rate / raw, 3), **stages})
            print(f"worker, micro-batch {size:5d}: {rate:,.0f} events/s "
                  f"(ratio {rate / raw:.2f}); CPU µs/event {stages}", flush=True)
        settings.worker.batch_max_events = 1000
        settings.worker.pipeline = False
        serial, _, serial_stages = worker_rate(settings, n, broker_pid=pid)
        settings.worker.pipeline = True
        print(f"serial worker (one process), micro-batch 1000: {serial:,.0f} events/s "
              f"(ratio {serial / raw:.2f}); CPU µs/event {serial_stages}", flush=True)
        raw_after = raw_rate(settings, n)  # the limit again, to see drift within the run
        print(f"raw again: {raw_after:,.0f} events/s", flush=True)
        if args.profile:  # a separate run: the profiler's overhead stays out of the figures
            settings.worker.batch_max_events = 1000
            settings.worker.pipeline = False   # cProfile sees this process only
            _, profile_text, _ = worker_rate(settings, n, profile=True)
    if profile_text:
        print(profile_text)
    default = next((r for r in rows if r["batch_max_events"] == 1000), rows[0])
    raw_mean = (raw + raw_after) / 2
    serial_bound = 1 / (1 / raw_mean + 1 / train)
    result = {"events": n, "raw_events_per_s": round(raw_mean),
              "raw_before": round(raw), "raw_after": round(raw_after),
              "worker_events_per_s": default["worker_events_per_s"],
              "ratio": round(default["worker_events_per_s"] / raw_mean, 3),
              "train_alone_events_per_s": round(train),
              "serial_bound_ratio": round(serial_bound / raw_mean, 3),
              "worker_vs_serial_bound": round(default["worker_events_per_s"] / serial_bound, 3),
              "serial_worker_events_per_s": round(serial),
              "serial_worker_ratio": round(serial / raw_mean, 3),
              "by_batch_size": rows}
    if profile_text:
        result["profile_top"] = profile_text.strip().splitlines()[:40]
    if len(rows) > 1:
        plot("ingest_by_batch_size.png", lambda ax: (
            ax.plot([r["batch_max_events"] for r in rows],
                    [r["worker_events_per_s"] for r in rows], "o-", label="worker"),
            ax.axhline(raw_mean, color="gray", ls="--", label="raw consume + decode"),
            ax.set_xscale("log"), ax.minorticks_off(),
            ax.set_xticks([r["batch_max_events"] for r in rows],
                          [str(r["batch_max_events"]) for r in rows]),
            ax.set_ylim(0, None), ax.set_xlabel("micro-batch size (events)"),
            ax.set_ylabel("events/s"), ax.set_title("Worker throughput vs micro-batch size"),
            ax.legend()))
    write_result("bench_ingest_quick" if args.quick else "bench_ingest", result)
    print(json.dumps({k: v for k, v in result.items() if k != "profile_top"}))


if __name__ == "__main__":
    main()
