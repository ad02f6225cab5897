#!/usr/bin/env python
"""Sentence-encoder throughput and embedding-cache hit rates on the ML-100K catalogue.

Encodes the text of every ML-100K item (title, genres, year: 1,682 texts) with
all-MiniLM-L6-v2 at each batch size and reports items/s, on the CPU (torch
limited to ``--threads``) and on CUDA when torch sees a GPU. Then replays the
catalogue through a :class:`Featurizer` three times against one on-disk cache:
the first announcement, a replay (memory hits), and a replay by a fresh process
state (new featurizer and memory, same cache directory: disk hits). A hit is an
item that cost no encoder pass of its own. The last stdout line is JSON; the
result is also written to docs/results/bench_encoder[_quick].json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import torch
from benchlib import machine, write_result

from stream_rec import datasets
from stream_rec.content import EmbeddingCache, Featurizer, SentenceEncoder, item_text


def throughput(enc: SentenceEncoder, texts: list[str], sizes: list[int],
               repeat: int) -> dict[str, float]:
    """Best of ``repeat`` passes over ``texts`` per batch size, items/s.

    The batch sizes take turns within each round, so a change in the machine's
    load during the run does not favour one of them.
    """
    enc.encode(texts[:128], batch_size=32)  # warm-up: first calls pay one-off costs
    best = dict.fromkeys(map(str, sizes), 0.0)
    for _ in range(repeat):
        for b in sizes:
            t0 = time.perf_counter()
            enc.encode(texts, batch_size=b)
            if enc.device == "cuda":
                torch.cuda.synchronize()
            best[str(b)] = max(best[str(b)], len(texts) / (time.perf_counter() - t0))
    return best


def replay_pass(enc: SentenceEncoder, cache_dir: str, items: list[dict[str, Any]],
                cache: EmbeddingCache | None = None) -> tuple[dict[str, Any], EmbeddingCache]:
    cache = cache or EmbeddingCache(cache_dir)
    t0 = time.perf_counter()
    with Featurizer(enc, cache, batch_size=64) as fz:
        fz.submit_many(items)
        fz.wait_idle()
        st = fz.stats()
        got = len(fz.take_ready())
    st["seconds"] = time.perf_counter() - t0
    st["hit_rate"] = st["cache_hits"] / max(st["submitted"], 1)
    st["vectors"] = got
    return st, cache


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", default="32,128")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--repeat", type=int, default=3, help="passes per batch size (best kept)")
    ap.add_argument("--model-dir", default="data/models")
    ap.add_argument("--quick", action="store_true", help="the first 256 items only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    items = list(datasets.iter_ml100k_items())
    if args.quick:
        items = items[:256]
    texts = [item_text(it) for it in items]
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    result: dict[str, Any] = {"items": len(items), "distinct_texts": len(set(texts)),
                              "threads": args.threads}
    t0 = time.perf_counter()
    enc = SentenceEncoder(args.model_dir, device="cpu")
    result["load_s"] = time.perf_counter() - t0
    result["cpu_items_per_s"] = throughput(enc, texts, sizes, args.repeat)
    if torch.cuda.is_available():
        gpu = SentenceEncoder(args.model_dir, device="cuda")
        result["cuda_items_per_s"] = throughput(gpu, texts, sizes, args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        first, cache = replay_pass(enc, tmp, items)
        again, _ = replay_pass(enc, tmp, items, cache)
        cache.close()
        restart, cache2 = replay_pass(enc, tmp, items)
        cache2.close()
    result["replay"] = {"first": first, "replay": again, "restart": restart}
    for dev in ("cpu", "cuda"):
        for b, v in result.get(f"{dev}_items_per_s", {}).items():
            print(f"{dev:<5} batch {b:>4}: {v:8.0f} items/s")
    for name, st in result["replay"].items():
        print(f"{name:<8} hit rate {st['hit_rate']:.3f}  encoded {st['encoded']:>5}  "
              f"{st['seconds']:.2f} s")
    result["load_average"] = os.getloadavg()[0]  # the machine is shared: read figures with it
    write_result("bench_encoder_quick" if args.quick else "bench_encoder",
                 {**result, "machine": machine()})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
