#!/usr/bin/env python
"""Study: how should item content enter the streaming model so that cold items get hit?

Prequential evaluation on ML-100K as in ``stream_rec.evaluation.run_eval``
(micro-batches of 1,000, each event ranked before it is learned, seen items
excluded), with three slices counted in one run:

* ``overall``: the usual 1-in-25 sample after the 10 % warm-up (offset = seed),
  3,600 events, comparable with ``stream-rec eval``;
* ``cold``: every event after the warm-up whose item had 1-9 earlier events;
* ``first``: every event after the warm-up that is its item's first event
  (only an item that is in the catalogue before its first click can be hit).

Variants (all on the default ``ModelConfig``, model seed = ``seed``):

* ``base``: the model as it is; ``none``: the same through this subclass (with
  ``--announce``: announced items get the default random row, no content).
* ``ridge``: content-initialised rows: a new item's row starts at ``x M``, where
  ``M`` (384 x D) is a ridge map from text vectors to the rows of items with at
  least 10 events, refitted at every training chunk; it then moves with clicks.
* ``joint``: every item's vector is ``free_i + W x_i`` with ``W`` (384 x D)
  trained by Adagrad on the same sampled-softmax gradients as the rows; a new
  item's free row starts as the default random row. (The tables keep the
  effective vectors; a step that changes ``W`` by ``dW`` adds ``X dW`` to every
  row, which is the same thing.)

``--announce`` puts each item in the model when the catalogue announces it
(``datasets.iter_ml100k_items``: one hour before its first rating), so it has a
row, with its content vector, before its first click.

The text vectors come from the product's own encoder and cache
(``stream_rec.content``). The model file is not edited: this script subclasses
``StreamingModel`` and wraps its row update to read the rows' gradient. One
line of JSON per run; ``--table`` prints a summary over seeds from a JSONL file.
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
from stream_rec.evaluation import _Metrics, _model_rank
from stream_rec.model import ModelConfig, StreamingModel
from stream_rec.model import streaming as streaming_mod

_ADAGRAD_ROWS = streaming_mod._adagrad_rows


def text_vectors(items: list[dict[str, Any]], cache_dir: str) -> dict[str, np.ndarray]:
    """item id -> (384,) unit text vector, through the product's featurizer and disk cache."""
    with EmbeddingCache(cache_dir) as cache:
        enc = _LazyEncoder()
        with Featurizer(enc, cache, batch_size=128) as fz:
            fz.submit_many(items)
            fz.wait_idle()
            return fz.take_ready()


class _LazyEncoder:
    """Loads the sentence encoder only when the cache misses."""

    dim, name = 384, "all-MiniLM-L6-v2"

    def __init__(self) -> None:
        self._enc: SentenceEncoder | None = None

    def encode(self, texts: list[str]) -> np.ndarray:
        if self._enc is None:
            self._enc = SentenceEncoder(ROOT / "data" / "models")
        return self._enc.encode(texts)


class ContentModel(StreamingModel):
    """StreamingModel with a content part per item (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, content: dict[str, np.ndarray], mode: str,
                 lr_w: float = 0.1, ridge_lambda: float = 1.0, ridge_min_events: int = 10,
                 free_scale: float = 1.0, knn_alpha: float = 0.0, knn_max_events: int = 9,
                 knn_recency: float = 0.6, w_init: float = 0.0, learn_alpha: float = 0.0,
                 acc_prior: float = 0.0, neighbours: int = 20, tail_gate: bool = False,
                 tail_events: int = 12, tail_recency: float = 0.6) -> None:
        super().__init__(cfg, device="cpu")
        assert cfg.tied, "the study covers the tied model only"
        self.mode = mode
        self.content = content
        self.lr_w = lr_w
        self.ridge_lambda = ridge_lambda
        self.ridge_min_events = ridge_min_events
        self.free_scale = free_scale
        self.knn_alpha = knn_alpha
        self.knn_max_events = knn_max_events
        self.knn_recency = knn_recency
        # per young-item bucket (0, 1-2, 3-5, 6-9 events) weight of the content term,
        # learned on the training softmax when learn_alpha > 0
        self.learn_alpha = learn_alpha
        self.acc_prior = acc_prior    # Adagrad sum a content-initialised row starts with
        self.neighbours = neighbours
        # scale the term by the user's recency-weighted share of recent items that are
        # still rare (at most tail_events events): users browsing the tail get it
        self.tail_gate = tail_gate
        self.tail_events = tail_events
        self.tail_recency = tail_recency
        self.term_on = True           # off: rank by the trained model alone (paired figures)
        self._alpha = torch.full((4,), float(knn_alpha))
        self._alpha_acc = torch.zeros(4)
        self._X = torch.zeros(16, 384)
        self._has_x = np.zeros(16, dtype=bool)
        gen = torch.Generator().manual_seed(cfg.seed)
        self._W = torch.randn(384, cfg.dim, generator=gen) * w_init
        self._W_acc = torch.zeros(384, cfg.dim)
        self._M: torch.Tensor | None = None
        self._content_rows: set[int] = set()   # initialised from content, skip chunk-end init
        self.train_s = 0.0

    # ------------------------------------------------------------- content rows
    def _grow_items(self, need: int) -> None:
        super()._grow_items(need)
        cap = self._pop.shape[0]
        if self._X.shape[0] < cap:
            self._X = torch.cat([self._X, torch.zeros(cap - self._X.shape[0], 384)])
            self._has_x = np.concatenate([self._has_x, np.zeros(cap - len(self._has_x), bool)])

    def _content_part(self, rows: np.ndarray) -> torch.Tensor | None:
        x = self._X[torch.as_tensor(rows)]
        if self.mode == "knn":
            nb = self._neighbour_mean(x)
            return None if nb is None else nb[0]
        if self.mode == "joint":
            return x @ self._W
        if self.mode == "ridge" and self._M is not None:
            return x @ self._M
        return None

    def _neighbour_mean(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rows (R, D) and biases (R,): similarity-weighted mean over the ``neighbours``
        items with at least ``ridge_min_events`` events whose text is closest to ``x``."""
        n = self.n_items
        ok = np.flatnonzero(self._has_x[:n] & (self._i_events[:n] >= self.ridge_min_events))
        if len(ok) < self.neighbours:
            return None
        rows = torch.as_tensor(ok)
        sim = x @ self._X[rows].T                                  # (R, W)
        top, idx = sim.topk(self.neighbours, dim=1)
        w = torch.softmax(top / 0.05, dim=1)
        nb = rows[idx]                                             # (R, k)
        return (w[..., None] * self._Eout[nb]).sum(1), (w * self._B[nb]).sum(1)

    def _init_content_row(self, row: int, item_id: str) -> None:
        vec = self.content.get(item_id)
        if vec is None:
            return
        self._X[row] = torch.from_numpy(np.array(vec, dtype=np.float32))
        self._has_x[row] = True
        if self.mode == "none":
            return
        rows = np.array([row])
        part = self._content_part(rows)
        if part is None:      # no map fitted yet: the default chunk-end init
            return
        free = torch.zeros(1, self.cfg.dim)
        if self.mode == "joint":
            rng = np.random.default_rng([self.cfg.seed, 3, row])
            free = torch.from_numpy(rng.standard_normal((1, self.cfg.dim)).astype(np.float32)
                                    * self.cfg.init_std * self.free_scale)
        self._Eout[row] = (free + part)[0]
        self._Ein[row] = self._Eout[row]
        for t in (self._B, self._acc_in, self._acc_out, self._acc_b):
            t[row] = 0.0
        if self.mode == "knn":
            nb = self._neighbour_mean(self._X[rows])
            if nb is not None:
                self._B[row] = nb[1][0]
        self._acc_out[row] = self._acc_in[row] = self.acc_prior
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
        if row not in self._content_rows:   # no content: the default random row, now
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
        if self.mode == "joint" and keep:   # rows with content but no content init yet
            rows = np.asarray([r for r in keep if self._has_x[r]], dtype=np.int64)
            if len(rows):
                t = torch.as_tensor(rows)
                self._Eout[t] = self._Eout[t] * self.free_scale + self._X[t] @ self._W
                self._Ein[t] = self._Eout[t]

    # ------------------------------------------------------------------- scoring
    def score_user(self, user_id: str) -> np.ndarray | None:
        """Model scores plus, with ``knn_alpha``, a content term for young items.

        ``alpha * cos(x_u, x_i)`` for items with at most ``knn_max_events``
        events, where ``x_u`` is the user's history of text vectors weighted
        ``knn_recency ** h`` (newest first).
        """
        scores = super().score_user(user_id)
        if scores is None or not self.term_on or (self.knn_alpha == 0 and self.learn_alpha == 0):
            return scores
        row = self._users.index[str(user_id)]
        hist = self._hist[row]
        ok = hist >= 0
        if not ok.any():
            return scores
        w = torch.from_numpy((self.knn_recency ** np.arange(len(hist)))[ok].astype(np.float32))
        xu = (w[:, None] * self._X[torch.as_tensor(hist[ok])]).sum(0)
        xu = xu / (xu.norm() + 1e-8)
        if self.tail_gate:
            wt = self.tail_recency ** np.arange(len(hist))[ok]
            rare = self._i_events[hist[ok]] <= self.tail_events
            xu = xu * float((wt * rare).sum() / wt.sum())
        n = self.n_items
        return scores + (self._gate(np.arange(n)) * (self._X[:n] @ xu)).numpy()

    _EDGES = np.array([0, 2, 5, 9])

    def _gate(self, rows: np.ndarray) -> torch.Tensor:
        """Weight (R,) of the content term per item: alpha of its young bucket, 0 when warm."""
        b = np.searchsorted(self._EDGES, self._i_events[rows], side="left")
        young = (b < 4) & self._has_x[rows]
        g = torch.zeros(len(rows))
        g[torch.from_numpy(young)] = self._alpha[torch.from_numpy(b[young])]
        return g

    def _user_text(self, h_inv: np.ndarray, hrows: np.ndarray, has_pad: bool,
                   hshape: tuple[int, int]) -> torch.Tensor:
        """Unit recency-weighted text vector (N, 384) of each training event's history."""
        N, H = hshape
        Xh = self._X[torch.as_tensor(hrows)]
        idx = torch.as_tensor(h_inv)
        w = torch.from_numpy((self.knn_recency ** np.arange(H)).astype(np.float32)).repeat(N)
        if has_pad:
            Xh = torch.cat([torch.zeros(1, 384), Xh])
            w = w * (idx > 0).to(torch.float32)
        xu = torch.nn.functional.embedding_bag(idx, Xh, torch.arange(0, N * H, H), mode="sum",
                                               per_sample_weights=w)
        return xu / (xu.norm(dim=1, keepdim=True) + 1e-8)

    # ------------------------------------------------------------------ training
    def _end_chunk(self, ch_u: list[np.ndarray], ch_i: list[np.ndarray]) -> None:
        t0 = time.perf_counter()
        if self.mode == "ridge":
            self._fit_ridge()
        super()._end_chunk(ch_u, ch_i)
        self.train_s += time.perf_counter() - t0

    def _fit_ridge(self) -> None:
        n = self.n_items
        ok = self._has_x[:n] & (self._i_events[:n] >= self.ridge_min_events)
        if ok.sum() < 50:
            return
        rows = torch.as_tensor(np.flatnonzero(ok))
        X, E = self._X[rows], self._Eout[rows]
        A = X.T @ X + self.ridge_lambda * torch.eye(384)
        self._M = torch.linalg.solve(A, X.T @ E)

    def _sgd_step(self, uu: np.ndarray, u_inv: np.ndarray, hrows: np.ndarray,
                  h_inv: np.ndarray, has_pad: bool, hshape: tuple[int, int], slot_w: np.ndarray,
                  cand: np.ndarray, label: np.ndarray, bw: np.ndarray, *rest: Any) -> None:
        args = (uu, u_inv, hrows, h_inv, has_pad, hshape, slot_w, cand, label, bw, *rest)
        ce_orig = torch.nn.functional.cross_entropy
        if self.learn_alpha > 0:
            # the young items' content term enters the training softmax: (N, C) added to
            # the logits; the rows learn around it and alpha learns by its own gradient
            sim = self._user_text(h_inv, hrows, has_pad, hshape) @ self._X[torch.as_tensor(cand)].T
            b = np.searchsorted(self._EDGES, self._i_events[cand], side="left")
            b = np.where(self._has_x[cand], b, 4)
            onehot = torch.zeros(len(cand), 5)
            onehot[torch.arange(len(cand)), torch.from_numpy(b)] = 1.0
            onehot = onehot[:, :4]                                   # (C, 4)
            term = sim * (onehot @ self._alpha)[None, :]

            def ce(logits: torch.Tensor, target: torch.Tensor, **kw: Any) -> torch.Tensor:
                full = logits + term
                with torch.no_grad():
                    g = torch.softmax(full, dim=1)
                    g[torch.arange(len(target)), target] -= 1.0
                    g *= torch.as_tensor(bw)[:, None]
                    grad = ((g * sim).sum(0)[:, None] * onehot).sum(0)   # (4,)
                    self._alpha_acc += grad.pow(2)
                    self._alpha -= self.learn_alpha * grad / (self._alpha_acc.sqrt() + 1e-8)
                return ce_orig(full, target, **kw)

            torch.nn.functional.cross_entropy = ce  # type: ignore[assignment]
        try:
            self._sgd_step_rows(*args)
        finally:
            torch.nn.functional.cross_entropy = ce_orig

    def _sgd_step_rows(self, *args: Any) -> None:
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


# --------------------------------------------------------------------- evaluation
def run(variant: str, seed: int, announce: bool, content: dict[str, np.ndarray],
        catalogue: list[dict[str, Any]], data: np.ndarray, **kw: Any) -> dict[str, Any]:
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
    overall = np.zeros(n, dtype=bool)
    overall[start + seed % 25::25] = True
    cold = after & (prior >= 1) & (prior <= 9)
    first = after & (prior == 0)
    metrics = {"overall": _Metrics(), "cold": _Metrics(), "first": _Metrics()}
    # the same trained model ranked without the scoring-time content term (paired)
    paired = isinstance(model, ContentModel) and (model.knn_alpha != 0 or model.learn_alpha != 0)
    without = {"overall": _Metrics(), "cold": _Metrics(), "first": _Metrics()}
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
            if announce:
                while nxt < len(ann_ts) and ann_ts[nxt] <= ts[k]:
                    model.announce(ann_id[nxt])  # type: ignore[attr-defined]
                    nxt += 1
            if overall[k] or cold[k] or first[k]:
                rank = _model_rank(model, users[k], items[k])
                rank0 = None
                if paired:
                    model.term_on = False  # type: ignore[attr-defined]
                    rank0 = _model_rank(model, users[k], items[k])
                    model.term_on = True  # type: ignore[attr-defined]
                for name, mask in (("overall", overall), ("cold", cold), ("first", first)):
                    if mask[k]:
                        metrics[name].add(rank)
                        if paired:
                            without[name].add(rank0)
            test_s += time.perf_counter() - t0

        model.learn(users[b0:b1], items[b0:b1], ts[b0:b1], before_event=before)
    wall = time.perf_counter() - t_all
    train_s = wall - test_s
    return {"variant": variant, "announce": announce, "seed": seed, **kw,
            **{f"{k}_hr@10": m.result()["hr@10"] for k, m in metrics.items()},
            **{f"{k}_n": m.n for k, m in metrics.items()},
            "overall_ndcg@10": metrics["overall"].result()["ndcg@10"],
            **({f"{k}_hr@10_without_term": m.result()["hr@10"] for k, m in without.items()}
               if paired else {}),
            "train_events_per_s": n / train_s, "wall_s": wall,
            **({"alpha_end": [round(a, 3) for a in model._alpha.tolist()]}
               if isinstance(model, ContentModel) and model.learn_alpha > 0 else {})}


def _label(r: dict[str, Any]) -> str:
    """Short name of a run's configuration."""
    parts = [r["variant"]]
    if r["announce"]:
        parts.append("announce")
    if r.get("knn_alpha") or r.get("learn_alpha"):
        parts.append(f"term a={r.get('knn_alpha', 0):g}" + (" tail" if r.get("tail_gate") else "")
                     + (f" r={r['knn_recency']:g}" if "knn_recency" in r else ""))
    skip = {"variant", "announce", "knn_alpha", "tail_gate", "knn_recency", "seed", "wall_s",
            "train_events_per_s", "alpha_end"}
    parts += [f"{k}={v:g}" for k, v in r.items() if k not in skip and isinstance(v, (int, float))
              and not k.endswith(("hr@10", "_n", "ndcg@10", "_term"))]
    return " ".join(parts)


def table(path: Path) -> None:
    """Mean (and per-seed) figures per configuration, from the JSONL of runs.

    ``w/o term``: the same trained models ranked without the scoring-time term.
    """
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_label(r), []).append(r)
    print("| configuration | seeds | HR@10 | cold HR@10 | first HR@10 | HR@10 w/o term | "
          "cold w/o term | train ev/s | per seed HR@10 / cold |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, rs in groups.items():
        rs.sort(key=lambda r: r["seed"])

        def mean(f: str, rs: list[dict[str, Any]] = rs) -> str:
            vals = [r[f] for r in rs if f in r]
            return f"{sum(vals) / len(vals):.4f}" if vals else "—"

        per = " · ".join(f"{r['overall_hr@10']:.4f} / {r['cold_hr@10']:.4f}" for r in rs)
        evs = sum(r["train_events_per_s"] for r in rs) / len(rs)
        print(f"| {label} | {len(rs)} | {mean('overall_hr@10')} | {mean('cold_hr@10')} | "
              f"{mean('first_hr@10')} | {mean('overall_hr@10_without_term')} | "
              f"{mean('cold_hr@10_without_term')} | {evs:,.0f} | {per} |")
    n = rows[0]
    print(f"tested events: overall {n['overall_n']}, cold {n['cold_n']}, first {n['first_n']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="base", choices=["base", "none", "ridge", "knn", "joint"])
    ap.add_argument("--acc-prior", type=float, default=None)
    ap.add_argument("--knn-recency", type=float, default=None)
    ap.add_argument("--tail-gate", action="store_true", default=None)
    ap.add_argument("--knn-alpha", type=float, default=None)
    ap.add_argument("--w-init", type=float, default=None)
    ap.add_argument("--learn-alpha", type=float, default=None, help="learning rate of the "
                    "young items' content-term weights (0 = fixed at --knn-alpha)")
    ap.add_argument("--knn-max-events", type=int, default=None)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--announce", action="store_true")
    ap.add_argument("--lr-w", type=float, default=None)
    ap.add_argument("--free-scale", type=float, default=None)
    ap.add_argument("--ridge-lambda", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=str(ROOT / "data" / "content"))
    ap.add_argument("--out", type=Path, default=None, help="append each run's JSON here")
    ap.add_argument("--table", type=Path, default=None, help="summarise a JSONL of runs")
    args = ap.parse_args()
    if args.table:
        table(args.table)
        return 0
    torch.set_num_threads(args.threads)
    data = datasets.load_ml100k()
    catalogue = list(datasets.iter_ml100k_items(ratings=data))
    content = text_vectors(catalogue, args.cache_dir)
    kw = {k: v for k, v in (("lr_w", args.lr_w), ("free_scale", args.free_scale),
                            ("ridge_lambda", args.ridge_lambda), ("knn_alpha", args.knn_alpha),
                            ("knn_max_events", args.knn_max_events), ("w_init", args.w_init),
                            ("learn_alpha", args.learn_alpha), ("acc_prior", args.acc_prior),
                            ("knn_recency", args.knn_recency), ("tail_gate", args.tail_gate))
          if v is not None}
    for seed in [int(s) for s in args.seeds.split(",")]:
        res = run(args.variant, seed, args.announce, content, catalogue, data, **kw)
        line = json.dumps(res)
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as fh:
                fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
