"""Serving latency and throughput against the index alone, at 100 000 and 1 000 000 items.

For each catalogue size: a snapshot of the model's exact layout is published,
`stream-rec serve` loads it, and a load generator (its own process, asyncio)
keeps 1, 8 and 64 requests in flight for a fixed time, recording requests/s and
latency. In the same run, the limit: the same index answering the same queries
one at a time in this process, without HTTP. recall@10 compares the served
answers with exact search over the same vectors.

    python scripts/bench_serving.py            # 100k (flat) and 1M items (ivf), 10 s per level
    python scripts/bench_serving.py --quick    # 100k items, 4 s per level

Last line: ``{"index_alone_rps": {…}, "results": [{"items", "concurrency", "rps", …}]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_snapshot import big_state
from benchlib import ROOT, plot, write_result

from stream_rec.broker import free_port, stop_process, wait_for_port
from stream_rec.index import ItemIndex, set_search_threads
from stream_rec.model import tables as T
from stream_rec.snapshot import SnapshotStore


def _load(port: int, users: list[str], concurrency: int, seconds: float, out: mp.Queue) -> None:
    """Keep ``concurrency`` requests in flight for ``seconds``; report latencies (s)."""
    import httpx

    async def main() -> None:
        lat: list[float] = []
        errors = 0
        answers: dict[str, list[str]] = {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits,
                                     timeout=10.0) as client:
            deadline = time.perf_counter() + seconds

            async def one(worker: int) -> None:
                nonlocal errors
                i = worker
                while time.perf_counter() < deadline:
                    user = users[i % len(users)]
                    i += concurrency
                    t0 = time.perf_counter()
                    r = await client.get(f"/recommend/{user}", params={"k": 10})
                    lat.append(time.perf_counter() - t0)
                    if r.status_code != 200:
                        errors += 1
                    elif user not in answers:
                        answers[user] = [x["item_id"] for x in r.json()["items"]]

            t0 = time.perf_counter()
            await asyncio.gather(*(one(w) for w in range(concurrency)))
            elapsed = time.perf_counter() - t0
        out.put({"latencies": lat, "elapsed": elapsed, "errors": errors, "answers": answers})

    asyncio.run(main())


WRK_SCRIPT = """
local users = {%s}
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", "/recommend/" .. users[(i %% #users) + 1] .. "?k=10")
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %%d %%d %%f %%f %%d\\n", summary.requests, summary.duration,
           latency:percentile(50), latency:percentile(99),
           summary.errors.status + summary.errors.connect + summary.errors.read +
           summary.errors.write + summary.errors.timeout))
end
"""


def run_wrk(port: int, users: list[str], concurrency: int, seconds: float) -> dict:
    """wrk (C, one thread) as the load: the client costs far less than the server."""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(WRK_SCRIPT % ", ".join(f'"{u}"' for u in users))
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:.0f}s", "-s",
                          str(script), f"http://127.0.0.1:{port}"],
                         capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT"))
    n, duration_us, p50_us, p99_us, errors = line.split()[1:]
    return {"rps": int(n) / (int(duration_us) / 1e6), "p50_ms": float(p50_us) / 1000,
            "p99_ms": float(p99_us) / 1000, "errors": int(errors)}


def served_answers(port: int, users: list[str]) -> dict[str, list[str]]:
    import httpx

    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        return {u: [x["item_id"] for x in
                    client.get(f"/recommend/{u}", params={"k": 10}).json()["items"]]
                for u in users}


def run_level(port: int, users: list[str], concurrency: int, seconds: float) -> dict:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_load, args=(port, users, concurrency, seconds, q))
    proc.start()
    res = q.get(timeout=seconds + 120)
    proc.join()
    return res


def index_alone(state, kind: str, queries: np.ndarray, excludes: list[np.ndarray],
                nprobe: int) -> float:
    idx = ItemIndex.build(state.tables[T.ITEM_VECTORS], kind=kind, nprobe=nprobe)
    t0 = time.perf_counter()
    for q, e in zip(queries, excludes):
        idx.search(q[None, :], 10, [e])
    return len(queries) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default=None, help="e.g. 100000:flat,1000000:ivf")
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--nprobe", type=int, default=16)
    args = ap.parse_args()
    sizes = [(int(n), kind) for n, kind in (s.split(":") for s in (
        args.sizes or ("100000:flat" if args.quick else "100000:flat,1000000:ivf")).split(","))]
    levels = [int(c) for c in args.concurrency.split(",")]
    seconds = args.seconds or (4.0 if args.quick else 10.0)
    set_search_threads(1)
    use_wrk = shutil.which("wrk") is not None
    print(f"load generator: {'wrk' if use_wrk else 'python asyncio (install wrk for less noise)'}",
          flush=True)
    rng = np.random.default_rng(0)
    alone: dict[str, float] = {}
    results = []
    for n_items, kind in sizes:
        n_users = 20_000
        print(f"{n_items} items ({kind}): building and publishing a snapshot…", flush=True)
        state = big_state(n_items, n_users, 64)
        work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
        store = SnapshotStore(work / "store")
        store.publish(state, offsets={}, watermark=0)
        users = [f"u{i}" for i in rng.choice(n_users, 2000, replace=False)]
        rows = np.array([state.user_row(u) for u in users])
        queries = state.query(rows)
        excludes = [np.asarray(state.seen(r), dtype=np.int64) for r in rows]
        rate = index_alone(state, kind, queries[:500], excludes[:500], args.nprobe)
        alone[str(n_items)] = round(rate)
        print(f"  index alone, one query at a time: {rate:,.0f} queries/s", flush=True)
        exact = ItemIndex.build(state.tables[T.ITEM_VECTORS], kind="flat")
        truth = {u: [state.item_ids[r] for r, _ in exact.search(queries[i:i + 1], 10,
                                                                 [excludes[i]])[0]]
                 for i, u in enumerate(users)}
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "STREAM_REC_STORE__PATH": str(work / "store"),
               "STREAM_REC_SERVE__PORT": str(port), "STREAM_REC_SERVE__INDEX": kind,
               "STREAM_REC_SERVE__NPROBE": str(args.nprobe), "STREAM_REC_LOG_LEVEL": "WARNING"}
        server = subprocess.Popen([sys.executable, "-m", "stream_rec", "serve"], env=env,
                                  cwd=ROOT, stdout=open(work / "server.log", "wb"),  # noqa: SIM115
                                  stderr=subprocess.STDOUT)
        try:
            wait_for_port("127.0.0.1", port, 120, server)
            import httpx

            deadline = time.monotonic() + 300
            while httpx.get(f"http://127.0.0.1:{port}/readyz").status_code != 200:
                if time.monotonic() > deadline:
                    raise TimeoutError("server never became ready")
                time.sleep(0.5)
            got = served_answers(port, users[:300])
            (run_wrk if use_wrk else run_level)(port, users, 8, 2.0)  # warm-up, not reported
            recall = float(np.mean([len(set(got[u]) & set(truth[u])) / 10 for u in got]))
            for c in levels:
                if use_wrk:
                    stats = run_wrk(port, users, c, seconds)
                else:
                    res = run_level(port, users, c, seconds)
                    lat = np.array(res["latencies"]) * 1000
                    stats = {"rps": len(lat) / res["elapsed"],
                             "p50_ms": float(np.percentile(lat, 50)),
                             "p99_ms": float(np.percentile(lat, 99)), "errors": res["errors"]}
                row = {"items": n_items, "index": kind, "concurrency": c,
                       "rps": round(stats["rps"]), "p50_ms": round(stats["p50_ms"], 3),
                       "p99_ms": round(stats["p99_ms"], 3), "recall_at_10": round(recall, 4),
                       "errors": stats["errors"],
                       "vs_index_alone": round(stats["rps"] / rate, 3)}
                results.append(row)
                print(f"  concurrency {c:3d}: {row['rps']:6,} req/s, p50 {row['p50_ms']:.2f} ms, "
                      f"p99 {row['p99_ms']:.2f} ms, recall@10 {row['recall_at_10']:.3f}, "
                      f"errors {row['errors']}", flush=True)
        finally:
            stop_process(server)

    def draw(ax):
        for n_items, kind in sizes:
            rs = [r for r in results if r["items"] == n_items]
            ax.plot([r["concurrency"] for r in rs], [r["p99_ms"] for r in rs], "o-",
                    label=f"{n_items:,} items ({kind}) p99")
            ax.plot([r["concurrency"] for r in rs], [r["p50_ms"] for r in rs], "o--",
                    label=f"{n_items:,} items ({kind}) p50")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("requests in flight")
        ax.set_ylabel("latency (ms)")
        ax.set_title("/recommend latency vs concurrency")
        ax.legend(fontsize=8)

    plot("serving_latency_quick.png" if args.quick else "serving_latency.png", draw)
    summary = {"index_alone_rps": alone, "results": results,
               "load_generator": "wrk" if use_wrk else "python-asyncio"}
    write_result("bench_serving_quick" if args.quick else "bench_serving", summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
