"""In-memory scoring: the model's own answers, without a snapshot or an index.

The same arithmetic as :meth:`~stream_rec.model.state.ModelState.query` and the
FAISS vectors of a snapshot, so the in-memory answer, the snapshot answer and
the served answer agree (``tests/contracts/test_scoring.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from .core import ModelCore


def user_query(model: ModelCore, rows: np.ndarray) -> torch.Tensor:
    """Query vectors (B, D + 1 [+ K]) on device from the current fast-path history.

    With content the query is ``[s q, 1, s q Wᵀ]`` against the items'
    ``[free, bias, text]`` (see :meth:`ModelState.query_history`).
    """
    p, fast, cfg, dev = model.params, model.fast, model.cfg, model.device
    hist = torch.as_tensor(fast.hist[rows], device=dev)                       # (B, H)
    bucket = torch.as_tensor(fast.buckets(fast.hist_ts[rows]), device=dev)
    slots = torch.arange(hist.shape[1], device=dev)[None, :]
    wts = p.pos_w[slots.expand_as(bucket), bucket] * (hist >= 0).to(torch.float32)
    emb = p.item_in[hist.clamp_min(0)]
    q = torch.einsum("bhd,bh->bd", emb, wts)
    if cfg.content_dim:
        text = p.item_text[hist.clamp_min(0)].to(torch.float32)              # (B, H, K)
        q = q + torch.einsum("bhk,bh->bk", text, wts) @ p.content_w
        emb = emb + text @ p.content_w if cfg.transition else emb
    if cfg.transition:
        q = q + (emb[:, 0] * (hist[:, :1] >= 0).to(torch.float32)) @ p.transition
    if cfg.use_user_vector:
        q = q + p.user_vec[torch.as_tensor(rows, device=dev)]
    q = q * cfg.scale
    parts = [q, torch.ones(len(rows), 1, device=dev)]
    if cfg.content_dim:
        parts.append(q @ p.content_w.t())
    return torch.cat(parts, dim=1)


def item_vectors(model: ModelCore, rows: np.ndarray | slice | None = None
                 ) -> torch.Tensor:
    """FAISS vectors (R, D + 1): output embedding and bias + weighted log popularity.

    ``rows``: a slice or int64 row array; ``None`` = every row in use.
    """
    p, dev = model.params, model.device
    if rows is None:
        rows = slice(0, model.n_items)
    pop_r = model.fast.pop[rows]
    pop = np.where(np.isfinite(pop_r), pop_r, 0.0)
    t_rows = rows if isinstance(rows, slice) else torch.as_tensor(rows, device=dev)
    extra = p.item_bias[t_rows] + torch.as_tensor(
        (model.cfg.pop_weight * pop).astype(np.float32), device=dev)
    return torch.cat([p.item_out[t_rows], extra[:, None]], dim=1)


def index_vectors(model: ModelCore, rows: np.ndarray | slice | None = None) -> torch.Tensor:
    """What an index holds per item (R, D + 1 [+ K]): :func:`item_vectors`, then with
    content the text vector, so that W stays in the query and out of the rows."""
    v = item_vectors(model, rows)
    if not model.cfg.content_dim:
        return v
    if rows is None:
        rows = slice(0, model.n_items)
    t_rows = rows if isinstance(rows, slice) else torch.as_tensor(rows, device=model.device)
    return torch.cat([v, model.params.item_text[t_rows].to(torch.float32)], dim=1)


def score_user(model: ModelCore, user_id: str) -> np.ndarray | None:
    """Scores (I,) float32 of every item row for a user with a (own or shared) row."""
    row = model.query_row(user_id)
    if row is None:
        return None
    q = user_query(model, np.array([row]))
    return (index_vectors(model) @ q[0]).cpu().numpy()


def popular_rows(model: ModelCore, k: int) -> np.ndarray:
    """Up to ``k`` live item rows, by decayed popularity, most popular first."""
    pop = np.where(model.live_items(), model.fast.pop[: model.n_items], -np.inf)
    order = np.argsort(-pop, kind="stable")[:k]
    return order[np.isfinite(pop[order])]


def recommend(model: ModelCore, user_id: str, k: int) -> list[tuple[str, float]]:
    """Top-``k`` unseen items for ``user_id``; users without a row get decayed-popular items."""
    ids = model.fast.items.ids
    row = model.query_row(user_id)
    if row is None:
        return [(ids[r], float(model.fast.pop[r])) for r in popular_rows(model, k)]
    scores = score_user(model, user_id)
    assert scores is not None
    scores = scores.astype(np.float32)
    scores[~model.live_items()] = -np.inf
    scores[model.seen_rows(row)] = -np.inf
    kk = min(k, int(np.isfinite(scores).sum()))
    if kk <= 0:
        return []
    top = np.argpartition(-scores, kk - 1)[:kk]
    top = top[np.argsort(-scores[top], kind="stable")]
    return [(ids[r], float(scores[r])) for r in top]
