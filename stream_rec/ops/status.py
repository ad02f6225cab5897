"""``stream-rec status``: is the live worker keeping up, and what is serving?

Lag is committed offset vs end offset per partition for the live group (the
worker commits only after a snapshot is durable, so committed offsets trail
by up to one publish interval). Lag is sampled twice, ``--sample`` seconds
apart: a worker keeps up when its lag is zero or shrinking and its newest
snapshot is recent compared with the publish interval.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from stream_rec.ingest.kafka import end_offsets
from stream_rec.ops.common import (
    add_command,
    age_s,
    emit,
    fmt_age,
    open_store,
    settings_for,
    topic_partitions,
    usage_error,
)

EXAMPLE = "stream-rec status --bootstrap 127.0.0.1:9092 --store data/snapshots --sample 5"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``stream-rec status``."""
    p = add_command(sub, "status",
                    "consumer lag per partition, newest and pinned version, and whether the "
                    "worker keeps up", cmd_status, EXAMPLE)
    p.add_argument("--group", help="the live worker's consumer group (default: from settings)")
    p.add_argument("--sample", type=float, default=2.0,
                   help="seconds between the two lag samples (0 = one sample)")


def _lag(consumer: Any, tps: list[Any]) -> tuple[dict[int, dict[str, int | None]], int | None]:
    end = end_offsets(consumer, tps)
    rows: dict[int, dict[str, int | None]] = {}
    total: int | None = 0
    for tp in tps:
        committed = consumer.committed(tp)
        lag = None if committed is None else max(0, end[tp] - committed)
        rows[tp.partition] = {"committed": committed, "end": end[tp], "lag": lag}
        total = None if lag is None or total is None else total + lag
    return rows, total


def verdict(lag1: int | None, lag2: int | None, snapshot_age: float | None,
            publish_interval_s: float) -> tuple[bool | None, str]:
    """Whether the worker keeps up, with a one-line reason."""
    stale_after = max(30.0, 20 * publish_interval_s)
    if lag2 is None:
        return None, "the group has no committed offsets on some partition (never ran?)"
    if lag2 == 0:
        return True, "no lag"
    if lag1 is not None and lag2 < lag1:
        return True, f"catching up (lag {lag1} → {lag2})"
    if snapshot_age is not None and snapshot_age > stale_after:
        return False, (f"lag {lag2} not shrinking and the newest snapshot is "
                       f"{snapshot_age:.0f} s old (publish interval {publish_interval_s:g} s)")
    if lag1 is not None and lag2 > lag1:
        return False, f"lag growing ({lag1} → {lag2})"
    return True, f"lag steady at {lag2} with fresh snapshots"


def cmd_status(args: argparse.Namespace) -> int:
    from stream_rec.ingest.kafka import make_consumer

    if args.sample < 0:
        raise usage_error("--sample must be >= 0")
    settings = settings_for(args)
    cfg = settings.kafka
    group = args.group or cfg.group_id
    consumer = make_consumer(cfg, group)
    try:
        tps = topic_partitions(consumer, cfg.topic)
        first, lag1 = _lag(consumer, tps)
        if args.sample:
            time.sleep(args.sample)
            rows, lag2 = _lag(consumer, tps)
        else:
            rows, lag2 = first, lag1
            lag1 = None
    finally:
        consumer.close(autocommit=False)
    snap: dict[str, Any] = {"store": settings.store.path, "latest": None, "pinned": None}
    try:
        store = open_store(settings.store.path, settings.store.keep_versions)
    except FileNotFoundError:
        store = None
    if store is not None:
        latest, pinned = store.latest_version(), store.pinned()
        snap.update(latest=latest, pinned=pinned)
        if latest is not None:
            from stream_rec.snapshot import CorruptSnapshot

            try:
                m = store.read_manifest(latest)
                snap.update(watermark=m.watermark, created_at=m.created_at,
                            age_s=round(age_s(m.created_at) or 0, 1), counts=m.counts,
                            offsets=m.offsets.get(cfg.topic, {}))
            except CorruptSnapshot as exc:
                snap.update(error=str(exc))
    ok, why = verdict(lag1, lag2, snap.get("age_s"), settings.worker.publish_interval_ms / 1000)
    result = {"topic": cfg.topic, "group": group, "partitions": rows, "lag": lag2,
              "lag_before": lag1, "sample_s": args.sample, "snapshot": snap,
              "keeping_up": ok, "why": why}
    lines = [f"topic {cfg.topic}, group {group}"]
    for p, r in rows.items():
        lines.append(f"  partition {p}: committed {r['committed']}, end {r['end']}, "
                     f"lag {r['lag']}")
    lines.append(f"total lag {lag2}" + (f" (was {lag1} {args.sample:g} s earlier)"
                                        if lag1 is not None else ""))
    if snap["latest"] is None:
        lines.append(f"store {settings.store.path}: no versions")
    else:
        lines.append(f"newest version {snap['latest']}, watermark {snap.get('watermark')}, "
                     f"age {fmt_age(snap.get('age_s'))}; pinned: {snap['pinned']}")
    state = {True: "yes", False: "NO", None: "unknown"}[ok]
    lines.append(f"keeping up: {state} — {why}")
    emit(args, result, lines)
    return 0
