"""``stream-rec replay``: rebuild state from a topic into a new store, or copy a range.

Into a store, replay runs the ordinary worker over explicit partitions
(:class:`~stream_rec.worker.Bounds`): manual assignment, no consumer group and
no commits, so the live worker's offsets never move. The range is resolved
once and recorded in the target store (``REPLAY.json``); re-running the same
command resumes from the store's newest snapshot offsets and stops at the same
ends, which makes it idempotent. With ``--into-topic`` the range is copied to
another topic instead, keeping keys, headers and record timestamps.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import orjson
from kafka import TopicPartition

from stream_rec.ingest.kafka import end_offsets, read_range
from stream_rec.ops.common import (
    add_command,
    emit,
    open_store,
    parse_pairs,
    parse_time,
    settings_for,
    topic_partitions,
    usage_error,
)

log = logging.getLogger(__name__)

MARKER = "REPLAY.json"
EXAMPLE = ("stream-rec replay --store data/replay-0601 --from-time 2026-06-01T00:00:00Z "
           "--to-time 2026-06-02T00:00:00Z\n"
           "  stream-rec replay --from-offsets 0:120,1:80 --store data/replay\n"
           "  stream-rec replay --into-topic clicks-staging --from-time 1780000000000 --rate 2000")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``stream-rec replay``."""
    p = add_command(sub, "replay",
                    "rebuild state from a topic into a NEW snapshot store (or copy a range of "
                    "the topic into another topic); never touches the live group's offsets",
                    cmd_replay, EXAMPLE)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--from-offsets", metavar="P:O,…",
                     help="start offsets per partition (others start at their beginning)")
    src.add_argument("--from-time", metavar="TIME",
                     help="start at the first record at/after TIME (ISO-8601 or epoch ms)")
    p.add_argument("--to-time", metavar="TIME",
                   help="stop before the first record at/after TIME (default: the end offsets "
                        "seen when the replay starts)")
    p.add_argument("--into-topic", metavar="T",
                   help="copy the range into topic T instead of building a store")
    p.add_argument("--rate", type=float, default=0.0,
                   help="with --into-topic: events/s (0 = as fast as possible)")
    p.add_argument("--no-progress", action="store_true",
                   help="periodic log lines instead of a progress bar")


# -- resolving the range ------------------------------------------------------
def resolve_range(consumer: Any, topic: str, from_offsets: str | None, from_time: str | None,
                  to_time: str | None) -> tuple[dict[int, int], dict[int, int]]:
    """Start and stop (exclusive) offsets per partition for the requested range."""
    parsed = parse_pairs(from_offsets, "--from-offsets") if from_offsets else None
    t_from = parse_time(from_time) if from_time else None
    t_to = parse_time(to_time) if to_time else None
    if t_from is not None and t_to is not None and t_to < t_from:
        raise usage_error("--to-time is before --from-time")
    tps = topic_partitions(consumer, topic)
    begin = consumer.beginning_offsets(tps)
    end = end_offsets(consumer, tps)
    start = {tp.partition: begin[tp] for tp in tps}
    stop = {tp.partition: end[tp] for tp in tps}
    if parsed is not None:
        unknown = sorted(set(parsed) - set(start))
        if unknown:
            raise usage_error(f"--from-offsets: {topic} has no partition {unknown[0]} "
                              f"(partitions 0..{len(tps) - 1})")
        for p, o in parsed.items():
            if o > stop[p]:
                raise usage_error(f"--from-offsets: offset {o} of partition {p} is past its "
                                  f"end ({stop[p]})")
            if o < start[p]:
                log.warning("partition %d begins at %d (older records expired): starting there",
                            p, start[p])
            start[p] = max(o, start[p])
    if t_from is not None:
        found = consumer.offsets_for_times({tp: t_from for tp in tps})
        for tp in tps:
            hit = found.get(tp)
            start[tp.partition] = hit.offset if hit is not None else stop[tp.partition]
    if t_to is not None:
        found = consumer.offsets_for_times({tp: t_to for tp in tps})
        for tp in tps:
            hit = found.get(tp)
            if hit is not None:
                stop[tp.partition] = min(stop[tp.partition], hit.offset)
    stop = {p: max(o, start[p]) for p, o in stop.items()}
    return start, stop


# -- into a store -------------------------------------------------------------
def _same_path(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def _read_marker(store: Any) -> dict[str, Any] | None:
    try:
        return orjson.loads(store.fs.cat_file(store.root.rstrip("/") + "/" + MARKER))
    except FileNotFoundError:
        return None


def _write_marker(store: Any, data: dict[str, Any]) -> None:
    store.fs.pipe_file(store.root.rstrip("/") + "/" + MARKER,
                       orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))


def _live_store_path(args: argparse.Namespace) -> str:
    """The store the live system is configured with: settings without the ``--store`` flag."""
    ns = argparse.Namespace(**{**vars(args), "store": None})
    return str(settings_for(ns).store.path)


class _Progress:
    """A tqdm bar on a terminal, else a log line every few seconds; fed from a thread."""

    def __init__(self, total: int, done: int, desc: str, bar: bool) -> None:
        self.total, self.done, self.desc = total, done, desc
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="ev", desc=desc, smoothing=0.1)
        self.t0 = time.monotonic()
        self.first = done
        self.last_log = self.t0

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(max(0, done - self.done))
        elif time.monotonic() - self.last_log >= 5:
            self.last_log = time.monotonic()
            elapsed = self.last_log - self.t0
            rate = (done - self.first) / elapsed if elapsed else 0.0
            eta = (self.total - done) / rate if rate > 0 else float("nan")
            log.info("%s: %d/%d events (%.0f ev/s, ETA %.0f s)", self.desc, done, self.total,
                     rate, eta)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def replay_into_store(args: argparse.Namespace, settings: Any) -> int:
    from stream_rec.ingest.kafka import make_consumer
    from stream_rec.snapshot import Fenced
    from stream_rec.worker import Bounds, Worker

    target = args.store
    if not target:
        raise usage_error("--store is required: the NEW snapshot store to rebuild into")
    topic = settings.kafka.topic
    live = _live_store_path(args)
    store = open_store(target, settings.store.keep_versions, must_exist=False)
    marker = _read_marker(store)
    has_versions = bool(store.versions())
    if marker is None and has_versions:
        if _same_path(target, live):
            raise usage_error(f"refusing to replay into the live store {target}: "
                              "choose a new, empty --store")
        raise usage_error(f"{target} already holds snapshots and is not a replay target: "
                          "choose a new, empty --store")
    request = {"topic": topic, "from_offsets": args.from_offsets,
               "from_time": args.from_time, "to_time": args.to_time}
    if marker is not None and marker.get("request") != request:
        raise usage_error(f"{target} is a replay of a different range "
                          f"({marker.get('request')}): use a new --store")
    if marker is not None:
        start = {int(p): o for p, o in marker["start"].items()}
        stop = {int(p): o for p, o in marker["stop"].items()}
        log.info("resuming the replay recorded in %s", target)
    else:
        consumer = make_consumer(settings.kafka, None)
        try:
            start, stop = resolve_range(consumer, topic, args.from_offsets, args.from_time,
                                        args.to_time)
        finally:
            consumer.close()
        _write_marker(store, {"request": request, "start": start, "stop": stop,
                              "created_at": time.time()})
    # Dead letters found while replaying go to their own topic: the live DLQ
    # already holds them, and duplicates there would be re-driven twice.
    settings.kafka.dlq_suffix = settings.kafka.dlq_suffix + ".replay"
    worker = Worker(settings, store, bounds=Bounds(start, stop))
    total = sum(stop[p] - start[p] for p in stop)

    def done_count() -> int:
        offsets = dict(worker.offsets)
        return sum(min(max(offsets.get(p, start[p]), start[p]), stop[p]) - start[p]
                   for p in stop)

    snap = store.load_latest_valid()
    already = 0
    if snap is not None:
        offs = snap.manifest.offsets.get(topic, {})
        already = sum(min(max(offs.get(p, start[p]), start[p]), stop[p]) - start[p]
                      for p in stop)
    progress = _Progress(total, already, f"replay {topic} → {target}",
                         bar=sys.stderr.isatty() and not args.no_progress)
    finished = threading.Event()

    def watch() -> None:
        while not finished.wait(0.5):
            try:
                progress.update(done_count())
            except RuntimeError:  # offsets changed size mid-copy: next tick
                pass

    watcher = threading.Thread(target=watch, name="replay-progress", daemon=True)
    watcher.start()
    # Ctrl+C / SIGTERM finish the batch in hand and publish: re-running resumes there.
    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    if in_main:
        worker.install_signal_handlers()
    t0 = time.monotonic()
    try:
        worker.run()
    except Fenced as exc:
        raise usage_error(f"cannot replay into {target}: {exc}") from None
    finally:
        if in_main:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        finished.set()
        watcher.join(2)
        progress.update(done_count())
        progress.close()
    complete = worker.reached_end()
    manifest = store.read_manifest(worker.version) if worker.version is not None else None
    elapsed = time.monotonic() - t0
    result = {
        "store": target, "topic": topic, "complete": complete,
        "start": start, "stop": stop, "events_in_range": total,
        "version": worker.version, "offsets": dict(worker.offsets),
        "counts": manifest.counts if manifest else {},
        "watermark": manifest.watermark if manifest else None,
        "seconds": round(elapsed, 3),
    }
    state = "complete" if complete else "interrupted (re-run the same command to resume)"
    emit(args, result,
         f"replay {state}: {topic} {start} → {stop} into {target}, version {worker.version}, "
         f"{result['counts'].get('events', 0)} events in the state")
    return 0 if complete else 130


# -- into a topic -------------------------------------------------------------
def replay_into_topic(args: argparse.Namespace, settings: Any) -> int:
    from stream_rec.ingest.kafka import ensure_topics, make_consumer, make_producer
    from stream_rec.producer import RateLimiter

    source, dest = settings.kafka.topic, args.into_topic
    if dest == source:
        raise usage_error("--into-topic must differ from the source topic")
    if args.rate < 0:
        raise usage_error("--rate must be >= 0")
    consumer = make_consumer(settings.kafka, None)
    producer = None
    try:
        start, stop = resolve_range(consumer, source, args.from_offsets, args.from_time,
                                    args.to_time)
        ensure_topics(settings.kafka, [dest], partitions=len(stop))
        producer = make_producer(settings.kafka)
        dest_parts = producer.partitions_for(dest) or set()
        same_partition = len(dest_parts) >= len(stop)
        total = sum(stop[p] - start[p] for p in stop)
        progress = _Progress(total, 0, f"copy {source} → {dest}",
                             bar=sys.stderr.isatty() and not args.no_progress)
        pacer = RateLimiter(args.rate)
        n = 0
        t0 = time.monotonic()
        try:
            for rec in read_range(consumer, {TopicPartition(source, p): o for p, o in start.items()},
                                  {TopicPartition(source, p): o for p, o in stop.items()}):
                producer.send(dest, key=rec.key, value=rec.value,
                              headers=list(rec.headers or []), timestamp_ms=rec.timestamp,
                              partition=rec.partition if same_partition else None)
                n += 1
                progress.update(n)
                pacer.wait()
            producer.flush()
            # Complete when every partition's position reached its stop (offset gaps from
            # compaction or transaction markers make fewer records than offsets).
            complete = all(consumer.position(TopicPartition(source, p)) >= o
                           for p, o in stop.items() if start[p] < o)
        finally:
            progress.close()
    finally:
        consumer.close()
        if producer is not None:
            producer.close(timeout=10)
    elapsed = time.monotonic() - t0
    result = {"source": source, "topic": dest, "copied": n, "start": start, "stop": stop,
              "complete": complete, "seconds": round(elapsed, 3)}
    emit(args, result, f"copied {n} records {source} {start} → {stop} into {dest} "
                       f"in {elapsed:.1f} s" + ("" if complete else
                                                " (INCOMPLETE: the range stopped arriving)"))
    return 0 if complete else 1


def cmd_replay(args: argparse.Namespace) -> int:
    """Replay a range of the topic into a new store, or into another topic."""
    if args.from_offsets:
        parse_pairs(args.from_offsets, "--from-offsets")  # fail before touching the broker
    for flag in ("from_time", "to_time"):
        if getattr(args, flag):
            parse_time(getattr(args, flag))
    if args.rate and not args.into_topic:
        raise usage_error("--rate applies only with --into-topic")
    settings = settings_for(args)
    if args.into_topic:
        return replay_into_topic(args, settings)
    return replay_into_store(args, settings)
