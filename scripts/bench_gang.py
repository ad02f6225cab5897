#!/usr/bin/env python
"""Scaling of a gang: events/s and step time at W ranks, and what the exchanges cost.

Runs the gang's model (``GangModel.learn_round``, what ``stream-rec worker
--procs W`` runs per round, without Kafka) in W processes over gloo, one torch
thread each, on the ``bench_train.py`` stream (users uniform, items Zipf, new
ids throughout). Every rank gets the events of its users (a hash of the user
over 8 partitions, p mod W = r); each round every rank learns up to
``--batch`` of them (so a round is ``batch × W`` events of the stream). Beside
it, in the same run, the single worker (``StreamingModel.learn``) on the same
stream, one thread. Reported per configuration (median of ``--rounds``
alternating runs): events/s (the stream's events over the slowest rank's
wall time); per training step the milliseconds of the whole gang step, of
preparing it and of its exchanges (targets and gradients, waiting for the
other rank included); per round the milliseconds of the round's id/counter
exchanges; and, measured alone, the exchange of one step's gradient payload
with both ranks ready (the wire cost without waiting). The last stdout line is
JSON; ``docs/results/bench_gang.json`` and ``docs/img/gang_scaling.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench_train import make_events
from scripts.benchlib import plot, write_result
from stream_rec.broker import free_port
from stream_rec.model import ModelConfig, StreamingModel
from stream_rec.model.ids import id_hash

PARTITIONS = 8


def _config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(dim=args.dim)


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    """One rank: learn its share of the stream in rounds; write its timings to ``out``."""
    import torch
    import torch.distributed as dist

    from stream_rec.model.exchange import TorchExchange
    from stream_rec.model.gang import GangModel

    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    users, items, ts = make_events(args.events, args.users, args.items, seed=args.seed)
    part = np.array([id_hash(u) % PARTITIONS for u in users], dtype=np.int64)
    mine = np.flatnonzero(part % world == rank)
    ex = TorchExchange()
    model = GangModel(_config(args), device="cpu", exchange=ex)
    per_round = args.batch
    n_rounds = -(-len(mine) // per_round)
    n_rounds = max(ex.all_gather(n_rounds))            # every rank takes part in every round
    warm = args.warmup // (args.batch * world)
    t0 = x0 = 0.0
    s0: dict[str, float] = {}
    for r in range(n_rounds):
        if r == warm:
            dist.barrier()
            t0, x0, s0 = time.perf_counter(), ex.seconds, dict(model.stats)
        idx = mine[r * per_round:(r + 1) * per_round]
        model.learn_round([users[j] for j in idx], [items[j] for j in idx], ts[idx],
                          partitions=part[idx])
    dist.barrier()
    wall = time.perf_counter() - t0
    st = {k: model.stats[k] - s0.get(k, 0) for k in model.stats}
    sent_per_step = ex.sent / max(model.stats["steps"], 1)
    # the gradient exchange alone: both ranks ready, one step's payload each
    payload = torch.zeros(int(sent_per_step), dtype=torch.uint8)
    alone = []
    for _ in range(args.alone):
        dist.barrier()
        a = time.perf_counter()
        ex.all_gather_bytes(payload)
        alone.append(time.perf_counter() - a)
    timed = len(mine) - min(len(mine), warm * per_round)
    Path(out).write_text(json.dumps({
        "rank": rank, "wall_s": wall, "events": timed, "rounds": n_rounds - warm,
        "steps": st["steps"], "step_s": st["step_s"], "prepare_s": st["prepare_s"],
        "step_exchange_s": st["step_exchange_s"], "exchange_s": ex.seconds - x0,
        "bytes_per_step": sent_per_step, "exchange_alone_ms": 1000 * statistics.median(alone)}))
    dist.destroy_process_group()


def run_gang(world: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        outs = [str(Path(tmp) / f"rank{r}.json") for r in range(world)]
        port = free_port()
        mp.start_processes(_spawned, args=(world, port, args, outs), nprocs=world,
                           start_method="spawn")
        ranks = [json.loads(Path(o).read_text()) for o in outs]
    wall = max(r["wall_s"] for r in ranks)
    steps = max(r["steps"] for r in ranks)
    rounds = ranks[0]["rounds"]

    def ms(key: str) -> float:
        return 1000 * statistics.mean(r[key] for r in ranks) / max(steps, 1)

    return {
        "ranks": world, "events_per_s": sum(r["events"] for r in ranks) / wall,
        "step_ms": ms("step_s"), "step_prepare_ms": ms("prepare_s"),
        "step_exchange_ms": ms("step_exchange_s"),
        "round_exchange_ms": 1000 * statistics.mean(
            (r["exchange_s"] - r["step_exchange_s"]) for r in ranks) / max(rounds, 1),
        "exchange_alone_ms": statistics.mean(r["exchange_alone_ms"] for r in ranks),
        "bytes_per_step": statistics.mean(r["bytes_per_step"] for r in ranks),
        "steps": steps, "rounds": rounds}


def _spawned(rank: int, world: int, port: int, args: argparse.Namespace,
             outs: list[str]) -> None:
    _rank_main(rank, world, port, args, outs[rank])


def run_single(args: argparse.Namespace) -> dict[str, Any]:
    """The single worker's learn() on the same stream, same batches, one thread."""
    import torch

    torch.set_num_threads(args.threads)
    users, items, ts = make_events(args.events, args.users, args.items, seed=args.seed)
    model = StreamingModel(_config(args), device="cpu")
    B = args.batch
    t0 = 0.0
    s0 = dict(model.trainer.stats)
    for b0 in range(0, len(users), B):
        if b0 == args.warmup:
            t0, s0 = time.perf_counter(), dict(model.trainer.stats)
        model.learn(users[b0:b0 + B], items[b0:b0 + B], ts[b0:b0 + B])
    wall = time.perf_counter() - t0
    st = {k: model.trainer.stats[k] - s0[k] for k in s0}
    return {"ranks": 1, "events_per_s": (len(users) - args.warmup) / wall,
            "step_ms": 1000 * (st["step_s"] + st["prepare_s"]) / max(st["steps"], 1),
            "step_prepare_ms": 1000 * st["prepare_s"] / max(st["steps"], 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--events", type=int, default=120_000)
    ap.add_argument("--warmup", type=int, default=20_000, help="events before timing starts")
    ap.add_argument("--batch", type=int, default=1000, help="events per rank per round")
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--rounds", type=int, default=3, help="alternating repetitions")
    ap.add_argument("--alone", type=int, default=200, help="exchanges timed alone")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a short run (no result file)")
    args = ap.parse_args()
    if args.quick:
        args.events, args.warmup, args.rounds, args.alone = 30_000, 5_000, 1, 50
    runs: dict[str, list[dict[str, Any]]] = {}
    for rep in range(args.rounds):
        for name, fn in [("worker", lambda: run_single(args))] + \
                [(f"gang{w}", lambda w=w: run_gang(w, args)) for w in args.ranks]:
            res = fn()
            runs.setdefault(name, []).append(res)
            print(f"round {rep}: {name}: " + ", ".join(
                f"{k} {v:,.2f}" for k, v in res.items() if isinstance(v, float)), flush=True)
    summary = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for name, rs in runs.items()}
    result = {"args": vars(args), "summary": summary, "runs": runs}
    if not args.quick:
        write_result("bench_gang", result)
        _plot(summary, args.ranks)
    print(json.dumps(result["summary"]))
    return 0


def _plot(summary: dict[str, dict[str, float]], ranks: list[int]) -> None:
    def draw(ax: Any) -> None:
        xs = [w for w in ranks]
        eps = [summary[f"gang{w}"]["events_per_s"] for w in xs]
        ax.plot(xs, eps, "o-", label="gang (learn_round, gloo)")
        ax.axhline(summary["worker"]["events_per_s"], color="grey", ls="--",
                   label="single worker (learn)")
        for w, e in zip(xs, eps):
            step = summary[f"gang{w}"]
            ax.annotate(f"step {step['step_ms']:.1f} ms\n(exchange {step['step_exchange_ms']:.1f})",
                        (w, e), textcoords="offset points", xytext=(6, -24), fontsize=8)
        ax.set_xticks(xs)
        ax.set_xlim(min(xs) - 0.3, max(xs) + 0.7)
        ax.set_ylim(0, 1.15 * max(eps + [summary["worker"]["events_per_s"]]))
        ax.set_xlabel("ranks (one torch thread each)")
        ax.set_ylabel("events/s")
        ax.set_title("Gang scaling on this machine's cores")
        ax.legend(loc="lower left", fontsize=8)

    plot("gang_scaling.png", draw)


if __name__ == "__main__":
    sys.exit(main())
