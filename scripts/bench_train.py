#!/usr/bin/env python
"""Training throughput of StreamingModel.learn (no Kafka, no evaluation), and where it goes.

Feeds pre-generated micro-batches (users uniform, items Zipf-popular, so the
id tables keep growing as in a live stream) and reports events/s of
``learn()`` -- fast path plus gradient steps -- and, per 1 000-event chunk, the
host milliseconds of the fast path, of preparing the step and of running
(CPU) or enqueuing (CUDA) it, and the tensor operations the host dispatches.
On CUDA it also profiles a few chunks: kernels, device milliseconds and host
syncs per chunk. ``--step both`` alternates the explicit step and the autograd
reference in the same run (the machine may be shared: compare within a run).
``--content 384`` trains with item text vectors (every item announced first).
The last stdout line is JSON; its ``events_per_s`` is the explicit step's median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import write_result

from stream_rec.model import ModelConfig, StreamingModel
from stream_rec.model.reference import ReferenceTrainer


def make_events(n: int, n_users: int, n_items: int, seed: int = 0):
    """(users, items, ts_ms): ``n`` events, ids as strings, 10 ms apart."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n)
    w = 1.0 / np.arange(1, n_items + 1) ** 0.8
    items = rng.choice(n_items, size=n, p=w / w.sum())
    ts = 1_700_000_000_000 + 10 * np.arange(n, dtype=np.int64)
    return [f"u{u}" for u in users], [f"i{i}" for i in items], ts


VIEWS = {"as_strided", "slice", "view", "select", "t", "transpose", "unsqueeze", "squeeze",
         "expand", "detach", "alias", "_reshape_alias", "lift_fresh", "values", "permute",
         "empty", "empty_strided", "resolve_conj", "resolve_neg", "result_type"}


class OpCounter:
    """Counts the tensor operations that do work (views and metadata left out) the host
    dispatches while active: top-level ``aten::`` calls in the torch profiler, autograd's
    backward ones included (a dispatch mode would miss those), sub-calls not."""

    def __enter__(self) -> Self:
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU])
        self._prof.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._prof.__exit__(*exc)
        self.n = 0
        for e in self._prof.events():
            if not e.name.startswith("aten::") or e.name[6:] in VIEWS:
                continue
            p = e.cpu_parent
            while p is not None and not p.name.startswith("aten::"):
                p = p.cpu_parent
            self.n += p is None


def build(cfg: ModelConfig, device: str, step: str, n_items: int = 0) -> StreamingModel:
    model = StreamingModel(cfg, device=device)
    if step == "autograd":
        model.trainer = ReferenceTrainer(cfg, model.params)  # type: ignore[assignment]
    if cfg.content_dim and n_items:
        # every item announced with a (random, unit) text vector: the content step throughout
        rng = np.random.default_rng(7)
        x = rng.standard_normal((n_items, cfg.content_dim)).astype(np.float32)
        model.announce([f"i{i}" for i in range(n_items)],
                       x / np.linalg.norm(x, axis=1, keepdims=True))
    return model


def sync(model: StreamingModel) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def one_run(args: argparse.Namespace, cfg: ModelConfig, step: str, data: tuple) -> dict[str, Any]:
    """Warm up, then time ``args.batches`` batches; per-chunk host figures from the trainer."""
    users, items, ts = data
    bs = args.batch_size
    model = build(cfg, args.device, step, args.items)

    def feed(b0: int, b1: int) -> None:
        for b in range(b0, b1):
            s = slice(b * bs, (b + 1) * bs)
            model.learn(users[s], items[s], ts[s])

    feed(0, args.warmup_batches)
    sync(model)
    st0 = dict(model.trainer.stats)
    t0 = time.perf_counter()
    feed(args.warmup_batches, args.warmup_batches + args.batches)
    host_s = time.perf_counter() - t0
    sync(model)
    dt = time.perf_counter() - t0
    st = {k: model.trainer.stats[k] - st0[k] for k in st0}
    chunks = max(st["chunks"], 1)
    n_ev = args.batches * bs
    out = {"step": step, "events_per_s": n_ev / dt, "seconds": dt,
           "chunks": st["chunks"],
           "host_ms_per_chunk": {
               "total": 1e3 * host_s / chunks,
               "prepare": 1e3 * st["prepare_s"] / chunks,
               "step": 1e3 * st["step_s"] / chunks,
               "fast_path_and_rest": 1e3 * (host_s - st["prepare_s"] - st["step_s"]) / chunks},
           "host_us_per_event": 1e6 * host_s / n_ev,
           "n_users": model.n_users, "n_items": model.n_items}
    # tensor operations the host dispatches per chunk (a few more chunks, counted)
    b0 = args.warmup_batches + args.batches
    c0 = model.trainer.stats["chunks"]
    kept: list[Any] = []
    if hasattr(model.trainer, "runner"):
        run = model.trainer.run
        model.trainer.run = lambda ch: (kept.append(ch), run(ch))  # type: ignore[method-assign]
    with OpCounter() as ops:
        feed(b0, b0 + args.count_batches)
    sync(model)
    out["host_ops_per_chunk"] = ops.n / max(model.trainer.stats["chunks"] - c0, 1)
    if kept:
        model.trainer.run = run  # type: ignore[method-assign]
        out["step_only_events_per_s"] = step_only(model, kept, cfg.train_chunk)
        out["runner"] = dict(model.trainer.runner.counts)
    if model.device.type == "cuda" and args.profile_batches:
        try:
            out.update(cuda_profile(model, feed, b0 + args.count_batches, args.profile_batches))
        except Exception as e:  # noqa: BLE001 -- a profiler problem must not lose the figures
            out["cuda_profile_error"] = repr(e)
    return out


def step_only(model: StreamingModel, chunks: list, chunk_events: int, reps: int = 10) -> float:
    """Stream events/s of the step alone: prepared chunks run again and again on the
    device (same shapes, so on CUDA graph replays), no fast path, no preparation."""
    for ch in chunks:
        model.trainer.run(ch)
    sync(model)
    t0 = time.perf_counter()
    for _ in range(reps):
        for ch in chunks:
            model.trainer.run(ch)
    sync(model)
    return reps * len(chunks) * chunk_events / (time.perf_counter() - t0)


def cuda_profile(model: StreamingModel, feed, b0: int, n: int) -> dict[str, Any]:
    """Kernels, device ms and host syncs per chunk, from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    c0 = model.trainer.stats["chunks"]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        feed(b0, b0 + n)
        torch.cuda.synchronize()
    chunks = max(model.trainer.stats["chunks"] - c0, 1)
    kernels = copies = 0
    device_us = 0.0
    syncs = 0
    for e in prof.events():
        name = e.name
        if e.device_type.name == "CUDA":
            device_us += e.time_range.elapsed_us()
            if "memcpy" in name.lower() or "memset" in name.lower():
                copies += 1
            else:
                kernels += 1
        elif name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
                      "cudaMemcpy"):
            syncs += 1
    # the final torch.cuda.synchronize() above is the profiler's own, not the step's
    return {"cuda_kernels_per_chunk": kernels / chunks, "cuda_copies_per_chunk": copies / chunks,
            "cuda_device_ms_per_chunk": device_us / 1e3 / chunks,
            "cuda_syncs_per_chunk": max(syncs - 1, 0) / chunks, "profiled_chunks": chunks}


def check(args: argparse.Namespace, cfg: ModelConfig, data: tuple) -> dict[str, Any]:
    """The same stream through every step variant; max relative difference of each
    variant's float tables to the CPU explicit step's (0 = bitwise equal)."""
    users, items, ts = data
    bs, nb = args.batch_size, args.check_batches
    variants = [("cpu", "explicit", None), ("cpu", "autograd", None)]
    if torch.cuda.is_available():
        variants += [("cuda", "explicit", True), ("cuda", "explicit", False)]
    states: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for dev, step, graphs in variants:
        name = f"{dev}-{step}" + ("" if graphs is None else ("-graphs" if graphs else "-eager"))
        model = build(cfg, dev, step, args.items)
        if graphs is False:
            model.trainer.runner.graphs = False
        for b in range(nb):
            s = slice(b * bs, (b + 1) * bs)
            model.learn(users[s], items[s], ts[s])
        states[name] = model.state().tables
        ref = states["cpu-explicit"]
        worst = 0.0
        for k, want in ref.items():
            got = states[name][k]
            if want.dtype.kind == "f" and want.size:
                fin = np.isfinite(want)
                d = np.linalg.norm((got[fin] - want[fin]).astype(np.float64))
                worst = max(worst, float(d / max(np.linalg.norm(want[fin]), 1e-30)))
        out[name] = {"max_rel_diff": worst}
        if hasattr(model.trainer, "runner"):
            out[name]["runner"] = dict(model.trainer.runner.counts)
        print(f"check {name:22} max relative difference to cpu-explicit {worst:.2e}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--warmup-batches", type=int, default=5)
    ap.add_argument("--count-batches", type=int, default=3,
                    help="batches run with operation counting (after the timed ones)")
    ap.add_argument("--profile-batches", type=int, default=5, help="CUDA profiler batches")
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--step", choices=["explicit", "autograd", "both"], default="explicit")
    ap.add_argument("--rounds", type=int, default=1, help="runs per step (alternating)")
    ap.add_argument("--quick", action="store_true", help="20 batches, 1 round")
    ap.add_argument("--check", action="store_true",
                    help="also train --check-batches batches with every step variant and "
                         "compare the states (cpu explicit / autograd; cuda graphs / eager)")
    ap.add_argument("--check-batches", type=int, default=30)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a ModelConfig field, e.g. --set steps=1")
    ap.add_argument("--content", type=int, default=0, metavar="K",
                    help="item text vectors of width K (384: all-MiniLM-L6-v2), every item "
                         "announced with one before the first batch")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.rounds = 20, 1
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    overrides = {k: json.loads(v) for k, v in (x.split("=", 1) for x in args.set)}
    if args.content:
        overrides["content_dim"] = args.content
    cfg = ModelConfig(dim=args.dim, **overrides)
    n = args.batch_size * (args.warmup_batches + args.batches + args.count_batches
                           + args.profile_batches)
    n = max(n, args.batch_size * args.check_batches)
    data = make_events(n, args.users, args.items)
    steps = ["explicit", "autograd"] if args.step == "both" else [args.step]
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in steps}
    for r in range(args.rounds):
        for s in (steps if r % 2 == 0 else steps[::-1]):
            res = one_run(args, cfg, s, data)
            runs[s].append(res)
            h = res["host_ms_per_chunk"]
            extra = ""
            if "cuda_kernels_per_chunk" in res:
                extra = (f" | cuda: {res['cuda_kernels_per_chunk']:.0f} kernels, "
                         f"{res['cuda_device_ms_per_chunk']:.2f} device ms, "
                         f"{res['cuda_syncs_per_chunk']:.1f} syncs per chunk")
            if "step_only_events_per_s" in res:
                extra += f" | step alone {res['step_only_events_per_s']:,.0f} ev/s"
            print(f"{s:9} {res['events_per_s']:>10,.0f} ev/s | host ms/chunk "
                  f"{h['total']:.2f} = fast path+rest {h['fast_path_and_rest']:.2f} + prepare "
                  f"{h['prepare']:.2f} + step {h['step']:.2f} "
                  f"({res['host_us_per_event']:.1f} host us/event) | "
                  f"{res['host_ops_per_chunk']:.0f} ops/chunk{extra}", flush=True)
    summary = {s: {"events_per_s": statistics.median(x["events_per_s"] for x in rs),
                   "runs": rs} for s, rs in runs.items()}
    head = summary.get("explicit", summary[steps[0]])
    checked = check(args, cfg, data) if args.check else None
    out = {"events_per_s": head["events_per_s"], "dim": args.dim, "batch_size": args.batch_size,
           "device": args.device, "threads": torch.get_num_threads(), "batches": args.batches,
           "train_chunk": cfg.train_chunk, "steps": cfg.steps,
           "replay_per_step": cfg.replay_per_step, "overrides": overrides, "by_step": summary}
    if checked is not None:
        out["check"] = checked
    if not args.quick:
        name = "bench_train" if args.device in ("auto", "cpu") else f"bench_train_{args.device}"
        write_result(name, {**out, "argv": sys.argv[1:]})
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
