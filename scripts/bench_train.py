#!/usr/bin/env python
"""Training-step throughput of StreamingModel.learn (no Kafka, no evaluation).

Feeds pre-generated micro-batches (users uniform, items Zipf-popular, so the
id tables keep growing as in a live stream) and reports events/s of
``learn()`` -- fast path plus gradient steps. The last stdout line is JSON:
``{"events_per_s", "dim", "batch_size", "device", ...}``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from stream_rec.model import ModelConfig, StreamingModel


def make_events(n: int, n_users: int, n_items: int, seed: int = 0):
    """(users, items, ts_ms): ``n`` events, ids as strings, 10 ms apart."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n)
    w = 1.0 / np.arange(1, n_items + 1) ** 0.8
    items = rng.choice(n_items, size=n, p=w / w.sum())
    ts = 1_700_000_000_000 + 10 * np.arange(n, dtype=np.int64)
    return [f"u{u}" for u in users], [f"i{i}" for i in items], ts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--warmup-batches", type=int, default=5)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a ModelConfig field, e.g. --set steps=1")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {k: json.loads(v) for k, v in (x.split("=", 1) for x in args.set)}
    cfg = ModelConfig(dim=args.dim, **overrides)
    model = StreamingModel(cfg, device=args.device)
    n = args.batch_size * (args.batches + args.warmup_batches)
    users, items, ts = make_events(n, args.users, args.items)
    bs = args.batch_size

    def run(b0: int, b1: int) -> None:
        for b in range(b0, b1):
            s = slice(b * bs, (b + 1) * bs)
            model.learn(users[s], items[s], ts[s])

    run(0, args.warmup_batches)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run(args.warmup_batches, args.warmup_batches + args.batches)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    out = {"events_per_s": args.batches * bs / dt, "dim": args.dim, "batch_size": bs,
           "device": str(model.device), "threads": torch.get_num_threads(),
           "batches": args.batches, "seconds": dt, "n_users": model.n_users,
           "n_items": model.n_items, "train_chunk": cfg.train_chunk, "steps": cfg.steps,
           "replay_per_step": cfg.replay_per_step, "overrides": overrides}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
