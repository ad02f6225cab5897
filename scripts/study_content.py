#!/usr/bin/env python
"""Study: how should item content enter the streaming model so that cold items get hit?

Prequential evaluation on ML-100K as in ``stream_rec.evaluation.run_eval``
(micro-batches of 1,000, each event ranked before it is learned, seen items
excluded, unknown users served by popularity), with three slices in one run:

* ``overall``: the usual 1-in-25 sample after the 10 % warm-up (offset = seed),
  3,600 events, comparable with ``stream-rec eval``;
* ``cold``: every event after the warm-up whose item had 1-9 earlier events
  (6,538 events);
* ``first``: every event after the warm-up that is its item's first (559): only
  an item that is in the model before its first click can be hit.

How content enters (``--variant``; default ``ModelConfig`` with seed = ``seed``):

* ``base``: the model as it is (no content at all).
* ``none``: the same model through this subclass (identical results); with
  ``--announce`` an announced item gets the default random row at once.
* ``ridge``: content-initialised rows: a new item's row starts at ``x M``, where
  ``M`` (384 x D) is a ridge map from text vectors to the rows of items with at
  least 10 events, refitted at every training chunk; the row then moves with
  clicks like any other.
* ``joint``: every item's vector is ``free_i + W x_i``, ``W`` (384 x D) trained
  by Adagrad on the same sampled-softmax gradients as the rows. (The tables
  keep the effective vectors: a step that changes ``W`` by ``dW`` adds ``X dW``
  to every row.)

``--announce`` puts each item in the model when the catalogue announces it
(``datasets.iter_ml100k_items``: one hour before its first rating).

``--alphas`` adds, at scoring time only, a content term for young items (at most
9 events, announced ones included): ``score_i += alpha * g_u * cos(x_u, x_i)``,
where ``x_u`` is the user's history of text vectors weighted ``recency ** h``
(h = 0 newest) and, with ``--tail-gate``, ``g_u`` is the user's share of recent
items (weighted ``0.6 ** h``) that have at most 12 events (1 otherwise). Each
alpha is ranked on the same trained model in the same run, so its cost is
measured paired; ``alpha = 0`` is that model without the term.

Text vectors come from the product's encoder, featurizer and disk cache
(``stream_rec.content``). The model file is not edited: this script subclasses
``StreamingModel`` and wraps its row update to read the rows' gradient. One JSON
line per run; ``--table`` prints a Markdown summary over seeds from a JSONL file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream_rec import datasets
from stream_rec.content import EmbeddingCache, Featurizer, SentenceEncoder
from stream_rec.model import ModelConfig, StreamingModel
from stream_rec.model import streaming as streaming_mod
from stream_rec.ranking import Metrics, model_rank, rank_of

_ADAGRAD_ROWS = streaming_mod._adagrad_rows
YOUNG_MAX_EVENTS = 9


class _LazyEncoder:
    """Loads the sentence encoder only when the cache misses."""

    dim, name = 384, "all-MiniLM-L6-v2"

    def __init__(self) -> None:
        self._enc: SentenceEncoder | None = None

    def encode(self, texts: list[str]) -> np.ndarray:
        if self._enc is None:
            self._enc = SentenceEncoder(ROOT / "data" / "models")
        return self._enc.encode(texts)


def text_vectors(items: list[dict[str, Any]], cache_dir: str) -> dict[str, np.ndarray]:
    """item id -> (384,) unit text vector, through the product's featurizer and disk cache."""
    with EmbeddingCache(cache_dir) as cache, \
            Featurizer(_LazyEncoder(), cache, batch_size=128) as fz:
        fz.submit_many(items)
        fz.wait_idle()
        return fz.take_ready()


class ContentModel(StreamingModel):
    """StreamingModel with item text vectors (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, content: dict[str, np.ndarray], mode: str, *,
                 lr_w: float = 0.01, w_init: float = 0.05, free_scale: float = 1.0,
                 ridge_lambda: float = 1.0, ridge_min_events: int = 10,
                 recency: float = 0.9, tail_gate: bool = False, tail_events: int = 12,
                 tail_recency: float = 0.6) -> None:
        super().__init__(cfg, device="cpu")
        assert cfg.tied, "the study covers the tied model only"
        self.mode, self.content = mode, content
        self.lr_w, self.free_scale = lr_w, free_scale
        self.ridge_lambda, self.ridge_min_events = ridge_lambda, ridge_min_events
        self.recency, self.tail_gate = recency, tail_gate
        self.tail_events, self.tail_recency = tail_events, tail_recency
        self._X = torch.zeros(16, 384)                 # text vector per item row
        self._has_x = np.zeros(16, dtype=bool)
        gen = torch.Generator().manual_seed(cfg.seed)
        self._W = torch.randn(384, cfg.dim, generator=gen) * (w_init if mode == "joint" else 0)
        self._W_acc = torch.zeros(384, cfg.dim)
        self._M: torch.Tensor | None = None
        self._content_rows: set[int] = set()   # initialised from content: skip chunk-end init

    # ------------------------------------------------------------- content rows
    def _grow_items(self, need: int) -> None:
        super()._grow_items(need)
        cap = self._pop.shape[0]
        if self._X.shape[0] < cap:
            self._X = torch.cat([self._X, torch.zeros(cap - self._X.shape[0], 384)])
            self._has_x = np.concatenate([self._has_x, np.zeros(cap - len(self._has_x), bool)])

    def _init_content_row(self, row: int, item_id: str) -> None:
        """Record the item's text vector; in ``ridge``/``joint`` start its row from it."""
        vec = self.content.get(item_id)
        if vec is None:
            return
        self._X[row] = torch.from_numpy(np.array(vec, dtype=np.float32))
        self._has_x[row] = True
        if self.mode == "ridge" and self._M is not None:
            part = self._X[row] @ self._M
            free = torch.zeros(self.cfg.dim)
        elif self.mode == "joint":
            part = self._X[row] @ self._W
            rng = np.random.default_rng([self.cfg.seed, 3, row])
            free = torch.from_numpy(rng.standard_normal(self.cfg.dim).astype(np.float32)
                                    * self.cfg.init_std * self.free_scale)
        else:             # no content init (or no map fitted yet): the default row
            return
        self._Eout[row] = free + part
        self._Ein[row] = self._Eout[row]
        for t in (self._B, self._acc_in, self._acc_out, self._acc_b):
            t[row] = 0.0
        self._content_rows.add(row)

    def announce(self, item_id: str) -> None:
        """The catalogue lists ``item_id``: give it a row (and its content) before any click."""
        if item_id in self._items.index:
            return
        row, _ = self._items.lookup(item_id)
        if row < 0:
            return
        self._grow_items(row + 1)
        self._init_content_row(row, item_id)
        if row not in self._content_rows:   # the default random row, now
            rng = np.random.default_rng([self.cfg.seed, 3, row])
            self._Eout[row] = torch.from_numpy(
                rng.standard_normal(self.cfg.dim).astype(np.float32) * self.cfg.init_std)
            self._Ein[row] = self._Eout[row]

    def _lookup(self, user_id: object, item_id: object, new_u: list[int],
                new_i: list[int]) -> tuple[int, int]:
        n0 = len(new_i)
        u, i = super()._lookup(user_id, item_id, new_u, new_i)
        if len(new_i) > n0 and i >= 0:
            self._init_content_row(i, str(item_id))
        return u, i

    def _init_rows(self, new_u: list[int], new_i: list[int]) -> None:
        keep = [r for r in new_i if r not in self._content_rows]
        self._content_rows.difference_update(new_i)
        super()._init_rows(new_u, keep)

    # ------------------------------------------------------------------ training
    def _end_chunk(self, ch_u: list[np.ndarray], ch_i: list[np.ndarray]) -> None:
        if self.mode == "ridge":
            n = self.n_items
            ok = self._has_x[:n] & (self._i_events[:n] >= self.ridge_min_events)
            if ok.sum() >= 50:
                rows = torch.as_tensor(np.flatnonzero(ok))
                X, E = self._X[rows], self._Eout[rows]
                A = X.T @ X + self.ridge_lambda * torch.eye(384)
                self._M = torch.linalg.solve(A, X.T @ E)
        super()._end_chunk(ch_u, ch_i)

    def _sgd_step(self, *args: Any) -> None:
        if self.mode != "joint":
            super()._sgd_step(*args)
            return
        captured: list[tuple[torch.Tensor, torch.Tensor]] = []

        def capture(table: torch.Tensor, acc: torch.Tensor, rows: torch.Tensor,
                    value: torch.Tensor, grad: torch.Tensor, lr: float, decay: float) -> None:
            if table is self._Eout:
                captured.append((rows, grad.detach()))
            _ADAGRAD_ROWS(table, acc, rows, value, grad, lr, decay)

        streaming_mod._adagrad_rows = capture
        try:
            super()._sgd_step(*args)
        finally:
            streaming_mod._adagrad_rows = _ADAGRAD_ROWS
        if not captured or self.lr_w <= 0:
            return
        rows, g = captured[0]
        gW = self._X[rows].T @ g                                   # (384, D)
        self._W_acc += gW.pow(2)
        dW = -self.lr_w * gW / (self._W_acc.sqrt() + 1e-8)
        self._W += dW
        n = self.n_items
        self._Eout[:n] += self._X[:n] @ dW
        self._Ein[:n] = self._Eout[:n]

    # ------------------------------------------------------------------- scoring
    def content_term(self, user_id: str) -> np.ndarray | None:
        """``g_u * cos(x_u, x_i)`` (I,) for young items with text, 0 for the rest."""
        row = self._users.index.get(str(user_id))
        if row is None:
            return None
        hist = self._hist[row]
        ok = hist >= 0
        if not ok.any():
            return None
        h = hist[ok]
        w = torch.from_numpy((self.recency ** np.arange(len(hist)))[ok].astype(np.float32))
        xu = (w[:, None] * self._X[torch.as_tensor(h)]).sum(0)
        xu = xu / (xu.norm() + 1e-8)
        gate = 1.0
        if self.tail_gate:
            wt = self.tail_recency ** np.arange(len(hist))[ok]
            gate = float((wt * (self._i_events[h] <= self.tail_events)).sum() / wt.sum())
        n = self.n_items
        young = (self._i_events[:n] <= YOUNG_MAX_EVENTS) & self._has_x[:n]
        return (self._X[:n] @ xu).numpy() * young * gate


# --------------------------------------------------------------------- evaluation
def _ranks(model: StreamingModel, user: str, item: str, alphas: list[float]) -> list[int | None]:
    """Rank of ``item`` for ``user`` with the content term at each alpha (as model_rank)."""
    term = model.content_term(user) if isinstance(model, ContentModel) else None
    target = model.item_row(item)
    if term is None or target is None:
        return [model_rank(model, user, item)] * len(alphas)
    scores = model.score_user(user)
    assert scores is not None
    live = model.live_items()
    seen = model.seen_rows(model.user_row(user))  # type: ignore[arg-type]
    return [rank_of(np.where(live, scores + a * term, -np.inf), target, seen) for a in alphas]


def run(variant: str, seed: int, announce: bool, alphas: list[float],
        content: dict[str, np.ndarray], catalogue: list[dict[str, Any]], data: np.ndarray,
        **kw: Any) -> dict[str, Any]:
    cfg = ModelConfig(seed=seed)
    model: StreamingModel = (StreamingModel(cfg, device="cpu") if variant == "base"
                             else ContentModel(cfg, content, variant, **kw))
    users = [str(x) for x in data["user"].tolist()]
    items = [str(x) for x in data["item"].tolist()]
    ts = data["ts"].astype(np.int64)
    n = len(users)
    start = math.ceil(0.1 * n)
    prior = np.zeros(n, dtype=np.int64)          # earlier events of the event's item
    counts: dict[str, int] = {}
    for j, it in enumerate(items):
        prior[j] = counts.get(it, 0)
        counts[it] = prior[j] + 1
    after = np.arange(n) >= start
    slices = {"overall": np.zeros(n, dtype=bool), "cold": after & (prior >= 1) & (prior <= 9),
              "first": after & (prior == 0)}
    slices["overall"][start + seed % 25::25] = True
    tested = slices["overall"] | slices["cold"] | slices["first"]
    metrics = {a: {k: Metrics() for k in slices} for a in alphas}
    ann_ts = np.array([c["ts"] for c in catalogue], dtype=np.int64)
    ann_id = [str(c["item_id"]) for c in catalogue]
    nxt = 0
    test_s = 0.0
    t_all = time.perf_counter()
    for b0 in range(0, n, 1000):
        b1 = min(n, b0 + 1000)

        def before(j: int, b0: int = b0) -> None:
            nonlocal nxt, test_s
            t0 = time.perf_counter()
            k = b0 + j
            while announce and nxt < len(ann_ts) and ann_ts[nxt] <= ts[k]:
                model.announce(ann_id[nxt])  # type: ignore[attr-defined]
                nxt += 1
            if tested[k]:
                for a, rank in zip(alphas, _ranks(model, users[k], items[k], alphas)):
                    for name, mask in slices.items():
                        if mask[k]:
                            metrics[a][name].add(rank)
            test_s += time.perf_counter() - t0

        model.learn(users[b0:b1], items[b0:b1], ts[b0:b1], before_event=before)
    wall = time.perf_counter() - t_all
    return {"variant": variant, "announce": announce, "seed": seed, **kw,
            "hr@10": {f"{a:g}": {k: m.result()["hr@10"] for k, m in ms.items()}
                      for a, ms in metrics.items()},
            "tested": {k: int(v.sum()) for k, v in slices.items()},
            "train_events_per_s": n / (wall - test_s), "wall_s": wall}


def time_train(variant: str, seed: int, content: dict[str, np.ndarray], data: np.ndarray,
               repeat: int, **kw: Any) -> float:
    """Best events/s of learn() over the stream in micro-batches of 1,000 (fast path + steps)."""
    users = [str(x) for x in data["user"].tolist()]
    items = [str(x) for x in data["item"].tolist()]
    ts = data["ts"].astype(np.int64)
    best = 0.0
    for _ in range(repeat):
        cfg = ModelConfig(seed=seed)
        model = (StreamingModel(cfg, device="cpu") if variant == "base"
                 else ContentModel(cfg, content, variant, **kw))
        t0 = time.perf_counter()
        for b0 in range(0, len(users), 1000):
            model.learn(users[b0:b0 + 1000], items[b0:b0 + 1000], ts[b0:b0 + 1000])
        best = max(best, len(users) / (time.perf_counter() - t0))
    return best


def _label(r: dict[str, Any]) -> str:
    """Short name of a run's configuration."""
    parts = [r["variant"]] + (["announce"] if r["announce"] else [])
    skip = {"variant", "announce", "seed", "wall_s", "train_events_per_s", "hr@10", "tested"}
    return " ".join(parts + [f"{k}={v}" for k, v in r.items() if k not in skip])


def table(path: Path) -> None:
    """Markdown table: mean over seeds per configuration and alpha.

    ``Δ paired`` is against alpha = 0 on the same runs; ``Δ base`` against the
    mean of the ``base`` runs (other training streams, so seed noise included).
    """
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    base = [r["hr@10"]["0"] for r in rows if r["variant"] == "base"]
    b_all = np.mean([b["overall"] for b in base]) if base else math.nan
    b_cold = np.mean([b["cold"] for b in base]) if base else math.nan
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_label(r), []).append(r)
    print("| configuration | alpha | seeds | HR@10 | Δ paired | Δ base | cold HR@10 | cold vs base "
          "| first HR@10 | train ev/s | per seed HR@10 / cold |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, rs in groups.items():
        rs.sort(key=lambda r: r["seed"])
        evs = np.mean([r["train_events_per_s"] for r in rs])
        for a in rs[0]["hr@10"]:
            m = {k: np.mean([r["hr@10"][a][k] for r in rs]) for k in ("overall", "cold", "first")}
            paired = np.mean([r["hr@10"][a]["overall"] - r["hr@10"]["0"]["overall"] for r in rs])
            per = " · ".join(f"{r['hr@10'][a]['overall']:.4f} / {r['hr@10'][a]['cold']:.4f}"
                             for r in rs)
            print(f"| {label} | {a} | {len(rs)} | {m['overall']:.4f} | {paired:+.4f} | "
                  f"{m['overall'] - b_all:+.4f} | {m['cold']:.4f} | {m['cold'] / b_cold - 1:+.0%} "
                  f"| {m['first']:.4f} | {evs:,.0f} | {per} |")
    print(f"tested events per run: {rows[0]['tested']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="base", choices=["base", "none", "ridge", "joint"])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--announce", action="store_true")
    ap.add_argument("--alphas", default="0", help="weights of the scoring-time content term")
    ap.add_argument("--tail-gate", action="store_true", help="scale the term by the user's "
                    "share of rare recent items")
    ap.add_argument("--recency", type=float, default=None, help="history weight of x_u (0.9)")
    ap.add_argument("--lr-w", type=float, default=None, help="joint: Adagrad rate of W")
    ap.add_argument("--w-init", type=float, default=None, help="joint: initial std of W")
    ap.add_argument("--free-scale", type=float, default=None,
                    help="joint: scale of a new row's random free part (1 = default init)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=str(ROOT / "data" / "content"))
    ap.add_argument("--out", type=Path, default=None, help="append each run's JSON here")
    ap.add_argument("--table", type=Path, default=None, help="summarise a JSONL of runs")
    ap.add_argument("--time-train", type=int, default=0, metavar="R",
                    help="only time learn() over the whole stream (no tests, no announcements) "
                    "R times per seed and print the best events/s")
    args = ap.parse_args()
    if args.table:
        table(args.table)
        return 0
    torch.set_num_threads(args.threads)
    data = datasets.load_ml100k()
    catalogue = list(datasets.iter_ml100k_items(ratings=data))
    content = text_vectors(catalogue, args.cache_dir)
    alphas = [0.0] if args.variant == "base" else sorted({0.0, *map(float,
                                                                   args.alphas.split(","))})
    kw: dict[str, Any] = {k: v for k, v in (
        ("lr_w", args.lr_w), ("w_init", args.w_init), ("free_scale", args.free_scale),
        ("recency", args.recency)) if v is not None}
    if args.tail_gate:
        kw["tail_gate"] = True
    for seed in [int(s) for s in args.seeds.split(",")]:
        if args.time_train:
            print(json.dumps({"variant": args.variant, **kw, "seed": seed,
                              "train_events_per_s": time_train(args.variant, seed, content,
                                                               data, args.time_train, **kw)}))
            continue
        line = json.dumps(run(args.variant, seed, args.announce, alphas, content, catalogue,
                              data, **kw))
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as fh:
                fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
