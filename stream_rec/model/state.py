"""The model's state as plain numpy: what snapshots store and serving reads.

A :class:`ModelState` is self-contained: serving loads one, builds a FAISS
inner-product index over ``tables["item.vectors"]`` and answers with
:meth:`ModelState.query` -- numpy only, no torch.

Scoring (identical in :class:`~stream_rec.model.StreamingModel`)::

    q_u   = user.vec[u] + sum_h pos_w[h, age_h] * item.in[user.hist[u, h]]      (D,)
    v_i   = [item.out[i], item.bias[i] + pop_weight * item.pop_log[i]]           (D + 1,)
    score = [q_u, 1] . v_i

``age_h`` buckets ``user.hist_ts[u, 0] - user.hist_ts[u, h]`` by ``time_buckets_s``.
``user.hist[u, 0]`` is the user's most recent item (``-1`` = empty slot), so the
query follows the user's newest clicks as soon as the fast path has seen them.

With content (``config["content_dim"]`` K > 0), an item's embedding is
``item.out[i] + item.text[i] @ W`` (``W`` = ``global.content_w``, (K, D)); W
stays in the query, so a change of W changes no item row::

    q_u   = user.vec[u] + sum_h w_h * (item.in[h] + item.text[h] @ W)           (D,)
    v_i   = [item.out[i], item.bias[i] + ..., item.text[i]]                     (D + 1 + K,)
    score = [s q_u, 1, s q_u Wᵀ] . v_i  =  s q_u . (item.out[i] + item.text[i] @ W) + bias
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import quant
from . import tables as T
from .ids import shared_row


@dataclass
class Changed:
    """Rows whose state changed in one :meth:`StreamingModel.learn` call.

    ``users`` and ``items`` are sorted, unique int64 row numbers. They include
    expired rows (their id became ``""``) so a delta can publish the removal.
    """

    users: np.ndarray
    items: np.ndarray


@dataclass
class ModelState:
    """A consistent CPU copy of the whole model.

    Tables (``U`` users, ``I`` items, ``D`` = ``config["dim"]``, ``H`` = ``config["history"]``):

    - ``user.vec`` (U, D) f32, ``user.hist`` (U, H) i64 item rows newest first (-1 empty),
      ``user.hist_ts`` (U, H) i64 their event times (ms),
      ``user.last_ts`` (U,) i64 ms, ``user.events`` (U,) i64 events learned,
      ``user.acc`` (U,) f32 Adagrad accumulator.
    - ``item.vectors`` (I, D + 1) f32 FAISS inner-product vectors, ``item.in`` / ``item.out``
      (I, D) f32, ``item.bias`` (I,) f32, ``item.pop_log`` (I,) f64 log decayed event count
      relative to ``global.t_ref``, ``item.last_ts``, ``item.events`` (I,) i64,
      ``item.acc_in`` / ``item.acc_out`` / ``item.acc_bias`` (I,) f32; with content
      ``item.text`` (I, K) f16 (zero: no text) and ``global.content_w`` / ``content_acc``
      (K, D) f32.
    - The vector tables serving reads (``item.vectors``, ``item.in``, ``user.vec``) may be
      held as float16 or as int8 codes with a float32 scale per row (``<name>.scale``):
      read them through :meth:`vectors`, which decodes only the rows asked for.
    - ``global.*``: ``pos_w`` / ``pos_acc`` (H, NB) f32 weight per (history slot, age bucket), ``step``, ``t_ref``, ``watermark`` (1,) i64,
      ``seen_indptr`` (U + 1,) / ``seen_items`` i64 (CSR of each user's seen item rows),
      ``replay_user`` / ``replay_item`` / ``replay_weight`` / ``replay_hist`` (recent events),
      ``free_users`` / ``free_items`` i64 (rows free for reuse),
      ``pending_user_ids`` / ``pending_user_counts`` (and ``item``) for admission,
      ``chunk_user`` / ``chunk_item`` / ``chunk_weight`` (C',) and ``chunk_hist`` /
      ``chunk_bucket`` (C', H) learned events of the incomplete training chunk,
      ``chunk_fill`` (1,) stream events in it, ``chunk_new_users`` / ``chunk_new_items``
      rows allocated in it (initialised when it completes).
    """

    config: dict[str, Any]
    user_ids: list[str]
    item_ids: list[str]
    tables: dict[str, np.ndarray]
    _user_index: dict[str, int] | None = field(default=None, repr=False, compare=False)
    _item_index: dict[str, int] | None = field(default=None, repr=False, compare=False)
    _faiss: Any = field(default=None, repr=False, compare=False)
    _popular: np.ndarray | None = field(default=None, repr=False, compare=False)

    # ---- id lookup -------------------------------------------------------------
    def user_row(self, user_id: str) -> int | None:
        """Row of ``user_id`` or ``None`` when unknown, not yet admitted or expired."""
        if self._user_index is None:
            self._user_index = {u: r for r, u in enumerate(self.user_ids) if u}
        return self._user_index.get(str(user_id))

    def query_row(self, user_id: str) -> int | None:
        """The row ``user_id`` is answered from: their own, else (with ``shared_rows``)
        the shared row of ids waiting for admission, else ``None`` (popular items)."""
        row = self.user_row(user_id)
        shared = int(self.config.get("shared_rows", 0))
        if row is None and shared:
            return shared_row(str(user_id), shared)
        return row

    def item_row(self, item_id: str) -> int | None:
        """Row of ``item_id`` or ``None``."""
        if self._item_index is None:
            self._item_index = {i: r for r, i in enumerate(self.item_ids) if i}
        return self._item_index.get(str(item_id))

    # ---- scoring ---------------------------------------------------------------
    def vectors(self, name: str, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """Float32 rows of vector table ``name`` (all with ``None``), whatever its encoding.

        ``rows`` of any shape give that shape plus (D,); only they are decoded.
        """
        return quant.take(self.tables, name, slice(None) if rows is None else rows)

    @property
    def content_dim(self) -> int:
        """K, the width of the items' text vectors; 0 for a state without content."""
        return int(self.config.get("content_dim", 0)) if T.ITEM_TEXT in self.tables else 0

    def index_vectors(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """What an index holds per item row (R, D + 1 [+ K]) float32, against :meth:`query`."""
        rows = slice(None) if rows is None else rows
        v = self.vectors(T.ITEM_VECTORS, rows)
        if not self.content_dim:
            return v
        return np.concatenate([v, self.tables[T.ITEM_TEXT][rows].astype(np.float32)], axis=1)

    def item_query(self, row: int) -> np.ndarray:
        """The query (D + 1 [+ K],) of ``/similar``: item ``row``'s own vector, its
        content part included, against :meth:`index_vectors`."""
        t = self.tables
        v = self.vectors(T.ITEM_VECTORS, row)
        if not self.content_dim:
            return v
        w = t[T.CONTENT_W]
        e = v[:-1] + t[T.ITEM_TEXT][row].astype(np.float32) @ w
        return np.concatenate([e, v[-1:], e @ w.T]).astype(np.float32)

    def query(self, user_rows: np.ndarray) -> np.ndarray:
        """Query vectors (B, D + 1 [+ K]) float32 for user rows (B,), to score by inner product."""
        rows = np.asarray(user_rows, dtype=np.int64).reshape(-1)
        t = self.tables
        return self.query_history(t[T.USER_HIST][rows], t[T.USER_HIST_TS][rows], rows)

    def query_history(self, hist: np.ndarray, hist_ts: np.ndarray,
                      user_rows: np.ndarray | None = None) -> np.ndarray:
        """Query vectors (B, D + 1) float32 for given histories, to score by inner product.

        ``hist`` (B, H) item rows newest first (-1 empty) and ``hist_ts`` (B, H)
        their times (ms): the user's recent items, which need not be the ones
        this state recorded (a server adds the clicks it saw after the
        version). ``user_rows`` (B,) adds each user's learned vector; -1 (a
        user the state does not know) adds none.
        """
        t = self.tables
        hist = np.asarray(hist, dtype=np.int64)
        hts = np.asarray(hist_ts, dtype=np.int64)
        edges = np.asarray(self.config.get("time_buckets_s", []), dtype=np.float64) * 1000.0
        bucket = np.searchsorted(edges, hts[:, :1] - hts, side="right")  # (B, H)
        mask = hist >= 0
        pos_w = t[T.POS_W].reshape(hist.shape[1], -1)           # (H, NB)
        wts = pos_w[np.arange(hist.shape[1])[None, :], bucket] * mask  # (B, H)
        emb = self.vectors(T.ITEM_IN, np.where(mask, hist, 0))         # (B, H, D)
        q = np.einsum("bhd,bh->bd", emb, wts).astype(np.float32)
        w = t[T.CONTENT_W] if self.content_dim else None
        if w is not None:
            text = t[T.ITEM_TEXT][np.where(mask, hist, 0)].astype(np.float32)   # (B, H, K)
            q = q + np.einsum("bhk,bh->bk", text, wts).astype(np.float32) @ w
            if self.config.get("transition", False):
                emb = emb + text @ w
        if self.config.get("transition", False):
            q = q + (emb[:, 0] * mask[:, :1]) @ t[T.TRANSITION]
        if self.config.get("use_user_vector", True) and user_rows is not None:
            rows = np.asarray(user_rows, dtype=np.int64).reshape(-1)
            known = rows >= 0
            if known.any():
                q[known] = q[known] + self.vectors(T.USER_VEC, rows[known])
        q = q * np.float32(self.config.get("scale", 1.0))
        D = q.shape[1]
        out = np.ones((len(hist), D + 1 + (len(w) if w is not None else 0)), dtype=np.float32)
        out[:, :D] = q
        if w is not None:
            out[:, D + 1:] = q @ w.T
        return out

    def seen(self, user_row: int) -> np.ndarray:
        """Item rows the user has interacted with (to exclude from answers)."""
        ptr = self.tables[T.SEEN_PTR]
        if user_row < 0 or user_row + 1 >= len(ptr):
            return np.zeros(0, dtype=np.int64)
        return self.tables[T.SEEN_ITEMS][ptr[user_row]:ptr[user_row + 1]]

    def popular(self, k: int) -> np.ndarray:
        """Up to ``k`` live item rows, by decayed popularity, most popular first."""
        if self._popular is None:
            live = np.array([bool(i) for i in self.item_ids], dtype=bool)
            pop = np.where(live, self.tables[T.ITEM_POP_LOG], -np.inf)
            order = np.argsort(-pop, kind="stable")
            self._popular = order[np.isfinite(pop[order])]
        return self._popular[:k]

    def recommend(self, user_id: str, k: int) -> list[tuple[str, float]]:
        """Reference answer through FAISS ``IndexFlatIP``: top-``k`` unseen items with scores.

        Users without a row (own or shared) get decayed-popular items with their
        popularity score.
        """
        row = self.query_row(user_id)
        if row is None:
            rows = self.popular(k)
            return [(self.item_ids[r], float(self.tables[T.ITEM_POP_LOG][r])) for r in rows]
        import faiss

        if self._faiss is None:
            live = np.flatnonzero(np.array([bool(i) for i in self.item_ids], dtype=bool))
            vectors = self.index_vectors()
            index = faiss.IndexIDMap(faiss.IndexFlatIP(vectors.shape[1]))
            if len(live):
                index.add_with_ids(np.ascontiguousarray(vectors[live]), live.astype(np.int64))
            self._faiss = index
        seen = self.seen(row)
        fetch = min(k + len(seen), self._faiss.ntotal)
        if fetch <= 0:
            return []
        scores, ids = self._faiss.search(self.query(np.array([row])), fetch)
        seen_set = set(seen.tolist())
        out = [(self.item_ids[i], float(s)) for s, i in zip(scores[0], ids[0])
               if i >= 0 and int(i) not in seen_set]
        return out[:k]
