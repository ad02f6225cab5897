"""Publish cost follows change: full vs delta versions at a million items.

Measures, in one run on this machine:
- a full publish (serialise + checksum + fsync + rename + LATEST) of the whole state,
- a delta publish with ``--changed`` (1 %) of item rows and as many user rows changed,
  including the extraction of those rows from the state,
- a reader applying that delta over the version it holds (load + verify + apply +
  refresh a copy of the index),
- in-process serving latency p50/p99 with no publishing, then while a delta version is
  published every second and the reader swaps it in,
- recall@10 of the IVF index against exact search on clustered vectors,
- per ``store.vector_dtype`` (``--dtypes``; float32, float16, int8): bytes and time
  of a full and of a delta version, and a reader holding the same dtype
  (``serve.vector_dtype``): time to load the full version and build its index,
  and the bytes of the vectors and of all the tables it holds. ``--dtypes-only`` runs this part alone.

The state is shaped like the model's (every table, at ``--items`` items and
``--users`` users) with item vectors drawn from a Gaussian mixture, so index
recall is measured on clustered vectors, not uniform noise. Last line: JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_rec import datasets
from stream_rec.index import ItemIndex, set_search_threads
from stream_rec.model import ModelConfig, ModelState, StreamingModel, delta_from_state, quant
from stream_rec.model import tables as T
from stream_rec.serving.state import ServingState, SnapshotWatcher
from stream_rec.snapshot import SnapshotStore


def template_state(dim: int) -> ModelState:
    """A small trained state: the real table names, dtypes and trailing shapes."""
    model = StreamingModel(ModelConfig(dim=dim), device="cpu")
    evs = list(itertools.islice(datasets.iter_synthetic(n_users=200, n_items=300), 3000))
    model.learn([e["user_id"] for e in evs], [e["item_id"] for e in evs],
                np.array([e["ts"] for e in evs], dtype=np.int64))
    return model.state()


def clustered(n: int, d: int, rng: np.random.Generator, clusters: int = 256) -> np.ndarray:
    centers = rng.normal(size=(clusters, d)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.8 * rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def big_state(n_items: int, n_users: int, dim: int, seed: int = 0) -> ModelState:
    """A state of the model's exact layout at the requested size."""
    rng = np.random.default_rng(seed)
    tpl = template_state(dim)
    tables: dict[str, np.ndarray] = {}
    for name, arr in tpl.tables.items():
        n = {"item": n_items, "user": n_users, "global": 0}[T.kind(name)]
        if not n:
            tables[name] = arr
            continue
        src = rng.integers(0, len(arr), n)
        tables[name] = arr[src].copy()
    vec = clustered(n_items, dim, rng)
    tables[T.ITEM_OUT] = vec
    tables[T.ITEM_VECTORS] = np.concatenate(
        [vec, rng.normal(size=(n_items, 1)).astype(np.float32) * 0.1], axis=1)
    if T.USER_HIST in tables:
        tables[T.USER_HIST] = rng.integers(0, n_items, tables[T.USER_HIST].shape)
    seen_len = 20
    tables[T.SEEN_PTR] = np.arange(0, (n_users + 1) * seen_len, seen_len,
                                             dtype=np.int64)
    tables[T.SEEN_ITEMS] = rng.integers(0, n_items, n_users * seen_len)
    return ModelState(config=tpl.config, user_ids=[f"u{i}" for i in range(n_users)],
                      item_ids=[f"i{i}" for i in range(n_items)], tables=tables)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def perturb(state: ModelState, users: np.ndarray, items: np.ndarray,
            rng: np.random.Generator) -> None:
    """Change the given rows in place, as a training batch would."""
    for name, arr in state.tables.items():
        if T.kind(name) == "item" and arr.dtype.kind == "f":
            arr[items] += rng.normal(scale=0.01, size=arr[items].shape).astype(arr.dtype)
        elif T.kind(name) == "user" and arr.dtype.kind == "f":
            arr[users] += rng.normal(scale=0.01, size=arr[users].shape).astype(arr.dtype)


def latencies(serving: SnapshotWatcher, users: list[str], seconds: float) -> np.ndarray:
    out = []
    deadline = time.perf_counter() + seconds
    for u in itertools.cycle(users):
        t0 = time.perf_counter()
        current = serving.current
        assert current is not None
        current.recommend(u, 10)
        out.append(time.perf_counter() - t0)
        if t0 > deadline:
            break
    return np.array(out) * 1000.0


def recall_ivf(vectors: np.ndarray, nprobes: list[int], n_queries: int = 200
               ) -> dict[int, float]:
    """recall@10 of IVF against exact search for taste-like queries.

    A query is the mean of 5 items drawn from one item's 50 nearest neighbours:
    a user whose recent clicks share a taste, as the model's queries are built.
    """
    rng = np.random.default_rng(1)
    exact = ItemIndex.build(vectors, kind="flat")
    approx = ItemIndex.build(vectors, kind="ivf")
    anchors = vectors[rng.choice(len(vectors), n_queries, replace=False)]
    neighbours = exact.search(anchors, 50)
    q = np.stack([vectors[rng.choice([r for r, _ in nb], 5, replace=False)].mean(axis=0)
                  for nb in neighbours])
    truth = exact.search(q, 10)
    out = {}
    for nprobe in nprobes:
        faiss.extract_index_ivf(approx.index).nprobe = nprobe
        hits = sum(len({r for r, _ in a} & {r for r, _ in b})
                   for a, b in zip(truth, approx.search(q, 10)))
        out[nprobe] = hits / (10 * n_queries)
    return out


def by_dtype(state: ModelState, root: Path, dtypes: list[str], changed: float,
             rng: np.random.Generator, queries: int = 1000) -> list[dict]:
    """Full and delta versions of the same state and the same changed rows, per vector dtype.

    Each dtype gets a fresh store; its reader holds the vectors in the same dtype
    and answers ``queries`` single /recommend calls in process (p50/p99 ms).
    """
    n_items, n_users = len(state.item_ids), len(state.user_ids)
    items = np.sort(rng.choice(n_items, max(1, int(n_items * changed)), replace=False))
    users = np.sort(rng.choice(n_users, max(1, int(n_users * changed)), replace=False))
    delta = delta_from_state(state, users, items)
    out = []
    for dtype in dtypes:
        store = SnapshotStore(root / f"store-{dtype}", keep_versions=5, vector_dtype=dtype)
        t0 = time.perf_counter()
        full = store.publish(state, offsets={"clicks": {0: 0}}, watermark=0)
        full_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        dm = store.publish_delta(delta, parent=full, offsets={"clicks": {0: 1}}, watermark=1)
        delta_s = time.perf_counter() - t0
        t0 = time.perf_counter()   # a server: load + verify, encode, build the index
        snap = store.load(full.version, tables=T.SERVED)
        assert snap is not None
        held = ServingState(snap, vector_dtype=dtype)  # type: ignore[arg-type]
        load_s = time.perf_counter() - t0
        lat = []   # /recommend's work in process: query (decoding its rows), search, names
        for u in rng.choice(n_users, queries):
            t1 = time.perf_counter()
            held.recommend(f"u{u}", 10)
            lat.append(time.perf_counter() - t1)
        p50, p99 = (float(np.percentile(lat, q)) * 1e3 for q in (50, 99))

        def part(manifest, name: str) -> int:
            return sum(manifest.entries.get(f"{n}.npy", {}).get("bytes", 0)
                       for n in (name, quant.scale_name(name)))

        row = {
            "dtype": dtype,
            "full_bytes": dir_bytes(Path(store.version_dir(full.version))),
            "delta_bytes": dir_bytes(Path(store.version_dir(dm.version))),
            "full_vectors_bytes": part(full, T.ITEM_VECTORS),
            "delta_vectors_bytes": part(dm, T.ITEM_VECTORS),
            "full_s": round(full_s, 3), "delta_s": round(delta_s, 4),
            "reader_load_full_s": round(load_s, 3),
            "served_vector_bytes": quant.nbytes(held.state.tables),
            "served_table_bytes": sum(int(a.nbytes) for a in held.state.tables.values()),
            "index_bytes": held.index.nbytes(),
            "recommend_p50_ms": round(p50, 3), "recommend_p99_ms": round(p99, 3),
        }
        print(f"  {dtype:>8}: full {row['full_bytes'] / 1e6:.1f} MB ({full_s:.2f} s), delta "
              f"{row['delta_bytes'] / 1e6:.2f} MB ({delta_s:.3f} s); a reader holding {dtype} "
              f"loads the full version in {load_s:.2f} s and holds "
              f"{row['served_vector_bytes'] / 1e6:.1f} MB of vectors "
              f"({row['served_table_bytes'] / 1e6:.1f} MB of tables); recommend p50 "
              f"{p50:.2f} ms, p99 {p99:.2f} ms", flush=True)
        out.append(row)
        del snap, held
        shutil.rmtree(root / f"store-{dtype}", ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of rows changed")
    ap.add_argument("--serve-seconds", type=float, default=8.0)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--dir", default=None, help="store directory (default: a temp dir)")
    ap.add_argument("--dtypes", default=",".join(quant.DTYPES),
                    help="store.vector_dtype values to compare (comma-separated)")
    ap.add_argument("--dtypes-only", action="store_true",
                    help="measure only the bytes and times per vector dtype")
    ap.add_argument("--quick", action="store_true",
                    help="100 000 items x 10 000 users, 2 s of serving per phase")
    ap.add_argument("--out", default=None, help="JSON result (default: docs/results/"
                    "bench_snapshot.json, bench_snapshot_dtypes.json with --dtypes-only)")
    args = ap.parse_args()
    if args.quick:
        args.items, args.users, args.serve_seconds = 100_000, 10_000, 2.0
    dtypes = [d for d in args.dtypes.split(",") if d]
    if any(d not in quant.DTYPES for d in dtypes):
        ap.error(f"--dtypes: each one of {quant.DTYPES}")

    set_search_threads(1)  # as `stream-rec serve` does by default
    rng = np.random.default_rng(0)
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-snapshot-"))
    store = SnapshotStore(root / "store", keep_versions=5)
    print(f"building a state of {args.items} items x {args.users} users, dim {args.dim}…",
          flush=True)
    state = big_state(args.items, args.users, args.dim)
    if args.dtypes_only:
        print(f"per vector dtype ({args.changed:.0%} of rows in the delta):", flush=True)
        rows = by_dtype(state, root, dtypes, args.changed, rng)
        write(Path(args.out or "docs/results/bench_snapshot_dtypes.json"),
              {"items": args.items, "users": args.users, "dim": args.dim,
               "changed": args.changed, "state_table_bytes": table_bytes(state),
               "vector_dtypes": rows})
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
        return

    full_runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        full = store.publish(state, offsets={"clicks": {0: 0}}, watermark=0)
        full_runs.append(time.perf_counter() - t0)
    full_s = float(np.median(full_runs))
    full_bytes = dir_bytes(Path(store.version_dir(full.version)))
    print(f"full publish:  {full_s:.3f} s (median of 3), {full_bytes / 1e6:.1f} MB", flush=True)

    reader = SnapshotWatcher(store)
    t0 = time.perf_counter()
    reader.poll_once()
    load_full_s = time.perf_counter() - t0
    print(f"reader loads the full version and builds its index: {load_full_s:.3f} s", flush=True)

    n_items_changed = max(1, int(args.items * args.changed))
    n_users_changed = max(1, int(args.users * args.changed))

    def one_delta(parent):
        items = np.sort(rng.choice(args.items, n_items_changed, replace=False))
        users = np.sort(rng.choice(args.users, n_users_changed, replace=False))
        perturb(state, users, items, rng)
        t0 = time.perf_counter()
        delta = delta_from_state(state, users, items)
        m = store.publish_delta(delta, parent=parent, offsets={"clicks": {0: 0}}, watermark=0)
        return m, time.perf_counter() - t0

    # fsync latency on a shared disk is noisy: take the median of repeated publishes.
    delta_m, delta_s = one_delta(full)
    runs = [delta_s]
    for _ in range(4):
        delta_m, delta_s = one_delta(delta_m)
        runs.append(delta_s)
    delta_s = float(np.median(runs))
    delta_bytes = dir_bytes(Path(store.version_dir(delta_m.version)))
    print(f"delta publish: {delta_s:.3f} s (median of 5), {delta_bytes / 1e6:.2f} MB "
          f"({args.changed:.0%} of rows)", flush=True)

    reader.poll_once()  # now holds the last delta; time one more applied over it
    delta_m, _ = one_delta(delta_m)
    t0 = time.perf_counter()
    reader.poll_once()
    apply_s = time.perf_counter() - t0
    assert reader.current is not None and reader.current.version == delta_m.version
    print(f"reader applies the delta and refreshes its index: {apply_s:.3f} s", flush=True)

    users = [f"u{i}" for i in rng.choice(args.users, 500, replace=False)]
    quiet = latencies(reader, users, args.serve_seconds)
    stop = threading.Event()
    published = [0]

    def publish_every_second() -> None:
        parent = delta_m
        while not stop.is_set():
            t = time.perf_counter()
            parent, _ = one_delta(parent)
            published[0] += 1
            stop.wait(max(0.0, 1.0 - (time.perf_counter() - t)))

    reader.poll_interval_s = 0.1
    reader.start()
    writer = threading.Thread(target=publish_every_second, daemon=True)
    writer.start()
    busy = latencies(reader, users, args.serve_seconds)
    stop.set()
    writer.join()
    reader.stop()
    swaps = reader.current.version - delta_m.version if reader.current else 0
    print(f"serving p50/p99: {np.percentile(quiet, 50):.2f}/{np.percentile(quiet, 99):.2f} ms "
          f"quiet; {np.percentile(busy, 50):.2f}/{np.percentile(busy, 99):.2f} ms while "
          f"{published[0]} versions were published ({swaps} swapped in)", flush=True)

    recall_n = min(args.items, 200_000)
    recall = recall_ivf(state.tables[T.ITEM_VECTORS][:recall_n], [1, 4, args.nprobe])
    print(f"IVF recall@10 vs exact ({recall_n} clustered vectors) by nprobe: {recall}",
          flush=True)

    print(f"per vector dtype ({args.changed:.0%} of rows in the delta):", flush=True)
    by_dt = by_dtype(state, root, dtypes, args.changed, rng)

    result = {
        "items": args.items, "users": args.users, "dim": args.dim, "changed": args.changed,
        "full_s": round(full_s, 4), "full_bytes": full_bytes,
        "delta_s": round(delta_s, 4), "delta_bytes": delta_bytes,
        "ratio": round(full_s / delta_s, 1), "bytes_ratio": round(full_bytes / delta_bytes, 1),
        "load_full_s": round(load_full_s, 4), "apply_s": round(apply_s, 4),
        "serve_p50_ms_quiet": round(float(np.percentile(quiet, 50)), 3),
        "serve_p99_ms_quiet": round(float(np.percentile(quiet, 99)), 3),
        "serve_p50_ms_during_publish": round(float(np.percentile(busy, 50)), 3),
        "serve_p99_ms_during_publish": round(float(np.percentile(busy, 99)), 3),
        "versions_published_during_serving": published[0],
        "ivf_recall_at_10": round(recall[args.nprobe], 4), "ivf_nprobe": args.nprobe,
        "ivf_recall_at_10_by_nprobe": {str(k): round(v, 4) for k, v in recall.items()},
        "ivf_recall_vectors": recall_n,
        "state_table_bytes": table_bytes(state), "vector_dtypes": by_dt,
    }
    write(Path(args.out or "docs/results/bench_snapshot.json"), result)
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


def table_bytes(state: ModelState) -> int:
    """Bytes of every table of ``state``: what a server held before it read only its own."""
    return sum(int(a.nbytes) for a in state.tables.values())


def write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
