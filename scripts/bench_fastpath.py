#!/usr/bin/env python
"""Host cost of the per-event fast path inside ``StreamingModel.learn``.

Feeds the ``bench_train.py`` stream (users uniform, items Zipf, 1,000-event
micro-batches) through ``learn()`` and times, in CPU seconds of the calling
thread (steadier than wall time on a shared machine), the fast path
(``FastPath.apply``: ids to rows, histories, seen lists, counters) and its two
parts -- mapping ids to rows (Python dicts) and the compiled per-event loop --
against the whole of ``learn()``. The last stdout line is JSON, per event in µs.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from bench_train import make_events

from stream_rec.model import ModelConfig, StreamingModel
from stream_rec.model.fastpath import FastPath

SPENT: dict[str, float] = {}


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[name] = SPENT.get(name, 0.0) + time.thread_time() - t0
    return wrapper


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--warmup-batches", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    FastPath.apply = timed("fast_path", FastPath.apply)          # type: ignore[method-assign]
    FastPath._rows = timed("ids_to_rows", FastPath._rows)        # type: ignore[method-assign]
    FastPath._run = timed("compiled_loop", FastPath._run)        # type: ignore[method-assign]
    model = StreamingModel(ModelConfig(), device="cpu")
    bs = args.batch_size
    users, items, ts = make_events(bs * (args.batches + args.warmup_batches), args.users,
                                   args.items)
    for b in range(args.batches + args.warmup_batches):
        if b == args.warmup_batches:
            SPENT.clear()
            t0 = time.thread_time()
        s = slice(b * bs, (b + 1) * bs)
        model.learn(users[s], items[s], np.asarray(ts[s]))
    total = time.thread_time() - t0
    n = args.batches * bs
    out = {f"{k}_us": round(1e6 * v / n, 3) for k, v in SPENT.items()}
    out.update(learn_us=round(1e6 * total / n, 2), events=n, threads=args.threads)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
