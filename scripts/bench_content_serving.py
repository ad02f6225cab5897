#!/usr/bin/env python
"""What item text costs a server: the wider index, the content term's plan, delta bytes.

* **Index.** With content an item's index vector is ``[free, bias, text]``
  (D + 1 + 384 floats instead of D + 1): flat search time per query, one query
  at a time and in batches of 64, over ``--items`` random vectors of each width.
* **Plan.** The content term scores the young items exactly in the plan
  (``YoungItems.plan``): time per plan for ``--young`` young items.
* **Deltas.** Bytes per changed item row of a version, and the fixed bytes of
  W and its Adagrad sums that every version carries.

The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_rec.index import ItemIndex, set_search_threads
from stream_rec.model import ModelConfig, StreamingModel
from stream_rec.model import tables as T
from stream_rec.serving.state import Plan, YoungItems


def per_query_ms(index: ItemIndex, queries: np.ndarray, batch: int, reps: int) -> float:
    index.search(queries[:batch], 10)
    t0 = time.perf_counter()
    n = 0
    for r in range(reps):
        q = queries[(r * batch) % len(queries):][:batch]
        index.search(q, 10)
        n += len(q)
    return 1e3 * (time.perf_counter() - t0) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--young", type=int, default=2_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    set_search_threads(1)
    rng = np.random.default_rng(0)
    out: dict = {"items": args.items, "dim": args.dim}
    # a small trained state with text, for the plan and the delta sizes
    cfg = ModelConfig(dim=args.dim, content_dim=384, train_chunk=500)
    m = StreamingModel(cfg, device="cpu")
    n_items = max(args.young, 500)
    ids = [f"i{k}" for k in range(n_items)]
    x = rng.standard_normal((n_items, 384)).astype(np.float32)
    m.announce(ids, x / np.linalg.norm(x, axis=1, keepdims=True))
    users = [f"u{k}" for k in rng.integers(0, 300, 3000)]
    m.learn(users, [ids[k] for k in rng.integers(0, 50, 3000)],
            1_700_000_000_000 + np.arange(3000, dtype=np.int64))
    state = m.state()
    young = YoungItems(state, 1.5)
    row = state.user_row(users[0])
    plan = Plan(state.query(np.array([row]))[0], state.seen(row))
    term = young.user_term(state.tables[T.USER_HIST][row])
    term = term if term is not None else np.ones(384, np.float32) / np.sqrt(384)
    t0 = time.perf_counter()
    for _ in range(args.reps):
        young.plan(plan, term)
    out["young_items"] = len(young.rows)
    out["plan_ms"] = 1e3 * (time.perf_counter() - t0) / args.reps
    print(f"content term over {len(young.rows)} young items: {out['plan_ms']:.3f} ms per plan",
          flush=True)

    queries = rng.standard_normal((512, args.dim + 1 + 384)).astype(np.float32)
    for name, width in (("without_text", args.dim + 1), ("with_text", args.dim + 1 + 384)):
        vectors = rng.standard_normal((args.items, width)).astype(np.float32)
        index = ItemIndex.build(vectors)
        q = np.ascontiguousarray(queries[:, :width])
        out[name] = {"width": width,
                     "ms_per_query_single": per_query_ms(index, q, 1, args.reps),
                     "ms_per_query_batch64": per_query_ms(index, q, 64, max(args.reps // 16, 4))}
        print(f"{name:13} width {width:3}: {out[name]['ms_per_query_single']:.2f} ms per query "
              f"alone, {out[name]['ms_per_query_batch64']:.2f} ms in batches of 64", flush=True)

    per_row = {n: a[:1].nbytes for n, a in state.tables.items() if n.startswith("item.")}
    out["delta_bytes_per_item_row"] = sum(per_row.values())
    out["delta_bytes_per_item_row_text"] = per_row[T.ITEM_TEXT]
    out["delta_bytes_fixed_content"] = sum(state.tables[n].nbytes
                                           for n in (T.CONTENT_W, T.CONTENT_ACC))
    print(f"a changed item row: {out['delta_bytes_per_item_row']} bytes, "
          f"{out['delta_bytes_per_item_row_text']} of them text; W and its sums: "
          f"{out['delta_bytes_fixed_content']} bytes in every version", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
