#!/usr/bin/env python
"""Memory of a long-running worker's model: does RSS stay flat as new ids keep coming?

Streams ``--users`` distinct users (each with ``--events-per-user`` events,
close together in time) through ``StreamingModel.learn`` in micro-batches of
``--batch-size``, as the worker does, with the model's default settings. Items
are a Zipf-popular catalogue of ``--catalogue`` ids, and a ``--tail`` fraction
of events go to brand-new items (so the item side churns too). Resident memory
(RSS, from /proc) is read at every tenth of the stream; the last stdout line
is ``{"users": N, "rss_mb_half": ..., "rss_mb_end": ..., "growth": ...}`` with
``growth = (end - half) / half``, and the full result goes to
``docs/results/bench_memory.json``.

``--quick`` streams 300 000 users against caps of 100 000 users and items, so
the caps bind as early (relative to the stream) as the defaults do at 3 M.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch
from benchlib import write_result

from stream_rec.model import ModelConfig, StreamingModel


def rss_mb() -> float:
    """Resident set size of this process (MB), from /proc/self/statm."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def batches(args: argparse.Namespace):
    """Micro-batches (users, items, ts_ms) of the stream, generated as it goes."""
    rng = np.random.default_rng(args.seed)
    w = 1.0 / np.arange(1, args.catalogue + 1) ** 0.8
    cdf = np.cumsum(w / w.sum())
    n = args.users * args.events_per_user
    tail_next = 0
    for b0 in range(0, n, args.batch_size):
        k = min(args.batch_size, n - b0)
        pos = b0 + np.arange(k)
        # user u's events sit at positions u*E .. u*E+E-1, a few per batch window
        user = pos // args.events_per_user
        item = np.searchsorted(cdf, rng.random(k)).astype(np.int64)
        tail = rng.random(k) < args.tail
        items = [f"i{x}" for x in item.tolist()]
        for j in np.flatnonzero(tail).tolist():
            items[j] = f"t{tail_next}"
            tail_next += 1
        yield [f"u{x}" for x in user.tolist()], items, 1_700_000_000_000 + 100 * pos


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=3_000_000)
    ap.add_argument("--events-per-user", type=int, default=2)
    ap.add_argument("--catalogue", type=int, default=100_000)
    ap.add_argument("--tail", type=float, default=0.4,
                    help="fraction of events on brand-new items")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (memory does not depend on it; 1 is steadiest here)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="300 000 users, caps of 100 000 users and items")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a ModelConfig field, e.g. --set max_users=0")
    ap.add_argument("--no-write", action="store_true",
                    help="do not write docs/results/bench_memory.json (--quick never does)")
    args = ap.parse_args()
    overrides: dict[str, Any] = {}
    if args.quick:
        args.users = 300_000
        overrides.update(max_users=100_000, max_items=100_000)
    overrides.update({k: json.loads(v) for k, v in (x.split("=", 1) for x in args.set)})
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(**overrides)
    model = StreamingModel(cfg, device="cpu")
    n = args.users * args.events_per_user
    marks = {round(n * q / 10) for q in range(1, 11)}
    timeline: list[dict[str, float]] = []
    done = 0
    t0 = time.perf_counter()
    rss0 = rss_mb()
    for users, items, ts in batches(args):
        model.learn(users, items, ts)
        before, done = done, done + len(users)
        if any(before < m <= done for m in marks):
            timeline.append({"users": done // args.events_per_user, "rss_mb": round(rss_mb(), 1),
                             "live_users": model.fast.users.n_live,
                             "live_items": model.fast.items.n_live,
                             "seen_entries": model.fast.seen.entries(),
                             "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(timeline[-1]), file=sys.stderr, flush=True)
    half = next(p["rss_mb"] for p in timeline if p["users"] >= args.users // 2)
    end = timeline[-1]["rss_mb"]
    line = {"users": args.users, "rss_mb_half": half, "rss_mb_end": end,
            "growth": round((end - half) / half, 4)}
    result = {**line, "events": n, "events_per_s": round(n / (time.perf_counter() - t0)),
              "rss_mb_start": round(rss0, 1), "rows": [model.n_users, model.n_items],
              "config": {k: getattr(cfg, k) for k in ("max_users", "max_items", "seen_max",
                                                       "ttl_ms", "admit_after")},
              "overrides": overrides, "tail": args.tail, "catalogue": args.catalogue,
              "events_per_user": args.events_per_user, "batch_size": args.batch_size,
              "threads": args.threads, "timeline": timeline}
    if not (args.no_write or args.quick):
        write_result("bench_memory", result)
    print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
