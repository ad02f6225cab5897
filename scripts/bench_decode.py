"""Decoding cost per event: one message at a time versus the batched column decoder.

Both paths turn the same kafka-python ``ConsumerRecord``s (MovieLens-100K
clicks as the producer sends them) into the columns the model learns from, in
micro-batches of the worker's default size, on one core, in the same run:

- per message: ``decode_batch`` (an ``Event`` per record) then the columns
  built from them, as the worker did before ``decode_columns``;
- batched: ``decode_columns`` (orjson, one loop of type checks, numpy bounds).

Usage::

    python scripts/bench_decode.py            # 200 000 events, 5 rounds
    python scripts/bench_decode.py --quick    # 40 000 events, 3 rounds

Prints µs/event for each path (best round; CPU time of the decoding thread,
and wall time), the same with 1 % malformed messages mixed in, and ends with
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from benchlib import ml100k_events, write_result
from kafka.consumer.fetcher import ConsumerRecord

from stream_rec.events import Contract, decode_batch, decode_columns, encode_event

BAD = [b"{not json", b'{"user_id": 1, "item_id": 2, "ts": 1700000000}',
       b'{"user_id": 1, "item_id": 2, "ts": 874724710000, "weight": 1e39}', None]


def records(values: list[bytes | None], partitions: int = 4) -> list[ConsumerRecord]:
    out = []
    for k, value in enumerate(values):
        size = -1 if value is None else len(value)
        out.append(ConsumerRecord("clicks", k % partitions, 0, k // partitions,
                                  1_700_000_000_000 + k, 0, None, value, [], None, -1, size, -1))
    return out


def per_message(batch: list[Any], contract: Contract, now_ms: int) -> tuple[Any, ...]:
    oks, errs = decode_batch(batch, contract, now_ms=now_ms)
    users = [d.event.user_id for d in oks]
    items = [d.event.item_id for d in oks]
    ts = np.fromiter((d.event.ts for d in oks), dtype=np.int64, count=len(oks))
    weights = np.fromiter((d.event.weight for d in oks), dtype=np.float32, count=len(oks))
    return users, items, ts, weights, errs


def batched(batch: list[Any], contract: Contract, now_ms: int) -> tuple[Any, ...]:
    b = decode_columns(batch, contract, now_ms=now_ms)
    return b.user_ids, b.item_ids, b.ts, b.weight, b.dead_letters


def best_us(fn: Callable[..., Any], recs: list[Any], batch: int, rounds: int,
            contract: Contract, now_ms: int) -> tuple[float, float]:
    """``(cpu, wall)`` µs/event of the best round.

    CPU time of this thread is the cost; on a shared machine wall time also
    counts the time other processes held the core, so both are reported.
    """
    cpu = wall = float("inf")
    for _ in range(rounds):
        c0, w0 = time.thread_time(), time.perf_counter()
        for s in range(0, len(recs), batch):
            fn(recs[s:s + batch], contract, now_ms)
        cpu = min(cpu, time.thread_time() - c0)
        wall = min(wall, time.perf_counter() - w0)
    return cpu / len(recs) * 1e6, wall / len(recs) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--events", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1000, help="records per micro-batch")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    n = args.events or (40_000 if args.quick else 200_000)
    rounds = args.rounds or (3 if args.quick else 5)
    contract, now_ms = Contract(), time.time_ns() // 1_000_000
    values: list[bytes | None] = [encode_event(e) for e in ml100k_events(n)]
    clean = records(values)
    dirty = records([BAD[k // 100 % len(BAD)] if k % 100 == 50 else v
                     for k, v in enumerate(values)])
    for recs in (clean, dirty):  # both paths must produce the same columns
        a, b = per_message(recs, contract, now_ms), batched(recs, contract, now_ms)
        assert a[0] == b[0] and a[1] == b[1] and np.array_equal(a[2], b[2])
        assert np.array_equal(a[3], b[3]) and [e.reason for e in a[4]] == [e.reason for e in b[4]]
    print(f"{n} ML-100K messages, mean {np.mean([len(v) for v in values]):.0f} bytes, "
          f"micro-batches of {args.batch}, best of {rounds} rounds", flush=True)
    result: dict[str, Any] = {"events": n, "batch": args.batch, "rounds": rounds}
    for name, recs in (("typical", clean), ("1pct_bad", dirty)):
        old, old_wall = best_us(per_message, recs, args.batch, rounds, contract, now_ms)
        new, new_wall = best_us(batched, recs, args.batch, rounds, contract, now_ms)
        print(f"{name:8s}: per message {old:.2f} µs/event, batched {new:.2f} µs/event "
              f"({old / new:.1f}x) CPU; wall {old_wall:.2f} / {new_wall:.2f}", flush=True)
        result[name] = {"per_message_us": round(old, 3), "batched_us": round(new, 3),
                        "speedup": round(old / new, 2), "per_message_wall_us": round(old_wall, 3),
                        "batched_wall_us": round(new_wall, 3)}
    path = write_result("bench_decode", result)
    print(f"wrote {path}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
