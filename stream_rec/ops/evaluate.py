"""``stream-rec eval``: prequential evaluation of the model against the baselines.

The evaluation itself is :func:`stream_rec.evaluation.run_eval`; this module is
its command line: the model configuration comes from the settings (file,
environment), like the worker's, so what is evaluated is what would run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from stream_rec.ops.common import UsageError, add_plain_command, settings_for, usage_error

EXAMPLE = "stream-rec eval --dataset ml-100k --served float32,int8 --json"


def format_table(result: dict[str, Any]) -> str:
    """Terminal table: one row per system."""
    rows = [("model", result["model"])] + list(result["baselines"].items())
    lines = [f"{'system':<20} {'HR@10':>8} {'NDCG@10':>8} {'MRR':>8} {'train ev/s':>12}"]
    for name, r in rows:
        lines.append(f"{name:<20} {r['hr@10']:>8.4f} {r['ndcg@10']:>8.4f} {r['mrr']:>8.4f} "
                     f"{r['events_per_s']:>12,.0f}")
    for name, r in result.get("served", {}).items():
        lines.append(f"{'served ' + name:<20} {r['hr@10']:>8.4f} {r['ndcg@10']:>8.4f} "
                     f"{r['mrr']:>8.4f} {'':>12}  top-10 = model's: {r['top10_same_as_model']:.3f}"
                     f", vectors held: {r['served_vector_bytes']:,} B")
    lines.append(f"events={result['n_events']} tested={result['n_tested']} "
                 f"batch={result['batch_size']} ranks={result.get('ranks', 1)} "
                 f"device={result['device']} "
                 f"wall={result['wall_s']:.1f}s")
    c = result.get("content")
    if c:
        lines.append(f"content (alpha {c['alpha']:g}, {c['items_with_text']} items with text, "
                     f"trained at {c['events_per_s']:,.0f} ev/s):")
        lines.append(f"{'slice':<20} {'events':>8} {'with':>8} {'without':>8} {'no term':>8}")
        for name, key, n in (("overall", "", result["n_tested"]),
                             ("cold (1-9 earlier)", "cold_", c["cold_events"]),
                             ("first, announced", "first_", c["first_events"])):
            lines.append(f"{name:<20} {n:>8} {c[key + 'hr@10']:>8.4f} "
                         f"{c[key + 'hr@10_without']:>8.4f} {c[key + 'hr@10_no_term']:>8.4f}")
    return "\n".join(lines)


def load_events(dataset: str) -> Any:
    """``"ml-100k"`` -> structured array; otherwise a JSONL/CSV path read by ``iter_file``."""
    from stream_rec import datasets

    if dataset == "ml-100k":
        return datasets.load_ml100k()
    return datasets.iter_file(Path(dataset))


def load_catalogue(items: str, events: Any) -> list[dict[str, Any]]:
    """``"ml-100k"`` -> ML-100K's catalogue (announced before first ratings); else a JSONL
    file of catalogue items (``item_id``, ``title``, ``categories``, ``attributes``, ``ts``)."""
    from stream_rec import datasets

    if items == "ml-100k":
        ratings = events if getattr(events, "dtype", None) is not None else None
        return list(datasets.iter_ml100k_items(ratings=ratings))
    with open(items, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def cmd_eval(args: argparse.Namespace) -> int:
    from stream_rec.evaluation import run_eval

    if args.ranks < 1:
        raise UsageError("--ranks: at least 1")
    if args.ranks > 1 and args.items:
        raise UsageError("--ranks with --items: a gang trains no item text")
    if args.ranks > 1 and args.served:
        raise UsageError("--ranks with --served: rank the served state with one rank")
    settings = settings_for(args)
    served = [s for s in args.served.split(",") if s.strip()] if args.served else []
    if served:
        from stream_rec.served_eval import ServedConfig

        try:
            [ServedConfig.parse(s) for s in served]
        except ValueError as exc:
            raise usage_error(f"--served: {exc}") from None
    events = load_events(args.dataset)
    catalogue = vectors = None
    if args.items:
        from stream_rec.content import catalogue_vectors

        catalogue = load_catalogue(args.items, events)
        vectors, stats = catalogue_vectors(catalogue, settings.content)
        print(f"catalogue: {len(catalogue)} items, {len(vectors)} text vectors "
              f"({stats['encoded']} encoded, {stats['cache_hits']} from the cache)", flush=True)
    alpha = settings.serve.content_alpha if args.content_alpha is None else args.content_alpha
    result = run_eval(events, warmup=args.warmup,
                      sample_every=args.sample_every, seed=args.seed,
                      batch_size=args.batch_size, model_cfg=settings.model, device=args.device,
                      catalogue=catalogue, vectors=vectors, content_alpha=alpha,
                      ranks=args.ranks, served=served)
    print(format_table(result), flush=True)
    if args.json:
        print(json.dumps(result), flush=True)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``stream-rec eval``."""
    p = add_plain_command(sub, "eval", "prequential evaluation of the model vs baselines",
                          cmd_eval, EXAMPLE)
    p.add_argument("--dataset", default="ml-100k", help="ml-100k or a JSONL/CSV events file")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction learned before testing")
    p.add_argument("--sample-every", type=int, default=25, help="test 1 in N events")
    p.add_argument("--seed", type=int, default=0, help="offset of the tested sample")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--ranks", type=int, default=1,
                   help="train as a gang of W ranks would (stream-rec worker --procs W), "
                        "simulated in this process")
    p.add_argument("--served", default="", metavar="SPEC,…",
                   help="also rank through the served state: a snapshot store and a server's "
                        "state per SPEC, DTYPE[:INDEX] or STORE>SERVE[:INDEX] (e.g. "
                        "float32,int8,float16:fp16); a version is published before each "
                        "tested event")
    p.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    p.add_argument("--items", nargs="?", const="ml-100k", default=None, metavar="CATALOGUE",
                   help="also train the model with item text (ml-100k's catalogue, or a JSONL "
                   "file) and compare it with the model without, overall and on cold items")
    p.add_argument("--content-alpha", type=float, default=None,
                   help="weight of the serving content term (default serve.content_alpha)")
