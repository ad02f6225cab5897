"""The learned parameters: torch tensors on the model's device.

Row tables grow by capacity doubling (rows beyond ``n_users`` / ``n_items`` are
spare capacity, zero). Rows are initialised when the training chunk that
allocated them completes, seeded by ``(seed, step)`` so a replay or a restart
draws the same values.

Every row table is stored with one extra leading **scratch row** (tensor index
0, always zero): the training step pads its row lists with it so that its
shapes can be static, and prepared batches address table row ``r`` as ``r + 1``
(see :mod:`.train`), which does not depend on the capacity. The public
attributes (``item_out`` ...) are views without it, so row ``r`` is
``item_out[r]`` everywhere else.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .config import ModelConfig


class Params:
    """Embeddings, biases, history weights and their Adagrad accumulators.

    ``user_vec`` (capU, D), ``user_acc`` (capU,); ``item_in`` / ``item_out``
    (capI, D), ``item_bias``, ``acc_in``, ``acc_out``, ``acc_bias`` (capI,);
    ``pos_w`` / ``pos_acc`` (H, NB) weight per (history slot, age bucket);
    ``transition`` / ``transition_acc`` (D, D). All float32. ``full[name]`` is
    the storage of a row table, scratch row 0 included ((cap + 1, ...)).

    With ``content_dim`` K > 0 (tied only): ``item_text`` (capI, K) float16, each
    item's text vector (zero: none), ``content_w`` / ``content_acc`` (K, D) the
    projection W and its Adagrad sums, and ``has_text`` (capI,) bool, the host's
    record of which rows have one. An item's vector is then ``item_out[r] +
    item_text[r] @ W``: ``item_out`` holds only its free part, so a change of W
    never rewrites the rows.
    """

    ITEM_ROWS = ("item_in", "item_out", "item_bias", "acc_in", "acc_out", "acc_bias")
    USER_ROWS = ("user_vec", "user_acc")

    def __init__(self, cfg: ModelConfig, device: torch.device, capacity: int = 16) -> None:
        D, H = cfg.dim, cfg.history
        f32: dict[str, Any] = {"dtype": torch.float32, "device": device}
        self.cfg = cfg
        self.device = device
        self.full: dict[str, torch.Tensor] = {}
        for name in self.USER_ROWS + self.ITEM_ROWS:
            width = (D,) if name in ("user_vec", "item_in", "item_out") else ()
            self._set(name, torch.zeros((capacity + 1,) + width, **f32))
        self._tie()
        self.pos_w = torch.from_numpy(initial_pos_w(cfg)).to(device)
        self.pos_acc = torch.zeros(H, n_buckets(cfg), **f32)
        self.transition = torch.zeros(D, D, **f32)
        self.transition_acc = torch.zeros(D, D, **f32)
        K = cfg.content_dim
        self.has_text = np.zeros(capacity, dtype=bool)
        self.n_text = 0                     # rows with a text vector (host count)
        if K:
            self._set("item_text", torch.zeros(capacity + 1, K, dtype=torch.float16,
                                               device=device))
            self.content_w = torch.from_numpy(initial_content_w(cfg)).to(device)
            self.content_acc = torch.zeros(K, D, **f32)

    def _set(self, name: str, full: torch.Tensor) -> None:
        self.full[name] = full
        setattr(self, name, full[1:])

    def grow_users(self, cap: int) -> None:
        for name in self.USER_ROWS:
            self._set(name, _grow(self.full[name], cap + 1))

    def grow_items(self, cap: int) -> None:
        for name in self._item_rows():
            if not (self.cfg.tied and name == "item_in"):
                self._set(name, _grow(self.full[name], cap + 1))
        self._tie()
        if len(self.has_text) < cap:
            grown = np.zeros(cap, dtype=bool)
            grown[:len(self.has_text)] = self.has_text
            self.has_text = grown

    def _item_rows(self) -> tuple[str, ...]:
        return self.ITEM_ROWS + (("item_text",) if self.cfg.content_dim else ())

    def _tie(self) -> None:
        """Tied: ``item_in`` is ``item_out`` (one tensor), so they can never differ."""
        if self.cfg.tied:
            self._set("item_in", self.full["item_out"])

    def key(self) -> tuple[tuple[int, int], ...]:
        """(address, rows) of every tensor: changes whenever one is replaced or grown.

        A captured CUDA graph holds raw addresses, so it is valid only while
        this key is unchanged.
        """
        ts = list(self.full.values()) + [self.pos_w, self.pos_acc, self.transition,
                                         self.transition_acc]
        if self.cfg.content_dim:
            ts += [self.content_w, self.content_acc]
        return tuple((t.data_ptr(), t.shape[0]) for t in ts)

    def to_device(self, a: np.ndarray) -> torch.Tensor:
        """``a`` on the device without a host sync (pinned, asynchronous copy on CUDA).

        On CPU it is ``a`` itself (no copy); the caller must not change it afterwards.
        """
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def rows(self, rows: np.ndarray) -> torch.Tensor:
        return self.to_device(np.asarray(rows, dtype=np.int64))

    def init_users(self, rows: list[int]) -> None:
        """New users start with a zero vector: their query is their history."""
        r = self.rows(np.asarray(rows, dtype=np.int64))
        self.user_vec[r] = 0.0
        self.user_acc[r] = 0.0

    def init_items(self, rows: list[int], step: int) -> None:
        """New items start small and random, drawn from ``(seed, 1, step)``; an item that
        has a text vector starts with a zero free part (its vector is its content, ``x W``)."""
        cfg = self.cfg
        arr = np.asarray(rows, dtype=np.int64)
        rng = np.random.default_rng([cfg.seed, 1, step])
        init = rng.standard_normal((2, len(arr), cfg.dim)).astype(np.float32) * cfg.init_std
        if self.n_text:
            init[:, self.has_text[arr]] = 0.0
        r = self.rows(arr)
        vals = self.to_device(init)
        if not cfg.tied:
            self.item_in[r] = vals[0]
        self.item_out[r] = vals[1]
        for t in (self.item_bias, self.acc_in, self.acc_out, self.acc_bias):
            t[r] = 0.0

    def clear_users(self, rows: np.ndarray) -> None:
        r = self.rows(rows)
        self.user_vec[r] = 0.0
        self.user_acc[r] = 0.0

    def clear_items(self, rows: np.ndarray) -> None:
        r = self.rows(rows)
        for name in self._item_rows():
            if not (self.cfg.tied and name == "item_in"):
                getattr(self, name)[r] = 0.0
        rows = np.asarray(rows, dtype=np.int64)
        if self.n_text and len(rows):
            self.n_text -= int(self.has_text[rows].sum())
            self.has_text[rows] = False

    def set_text(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Rows ``rows`` (B,) get text vectors ``vectors`` (B, K) (stored as float16)."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return
        vals = np.ascontiguousarray(vectors, dtype=np.float16).reshape(len(rows), -1)
        self.item_text[self.rows(rows)] = self.to_device(vals)
        self.has_text[rows] = vals.any(axis=1)
        self.n_text = int(self.has_text.sum())


def n_buckets(cfg: ModelConfig) -> int:
    """Age buckets of a history slot: one more than the edges in ``time_buckets_s``."""
    return len(cfg.time_buckets_s) + 1


def initial_pos_w(cfg: ModelConfig) -> np.ndarray:
    """Weights (H, NB) per (slot, age bucket); start recency-decayed, newest weighs most."""
    h = np.arange(cfg.history, dtype=np.float32)
    w = (cfg.recency ** h).astype(np.float32)
    return np.repeat(w[:, None], n_buckets(cfg), axis=1)


def initial_content_w(cfg: ModelConfig) -> np.ndarray:
    """W (K, D) float32 at the start: small and random, drawn from ``(seed, 4)``."""
    rng = np.random.default_rng([cfg.seed, 4])
    w = rng.standard_normal((cfg.content_dim, cfg.dim)) * cfg.content_init_std
    return w.astype(np.float32)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy (never a view of the parameter)."""
    return t.detach().to("cpu").numpy().copy()


def _grow(t: torch.Tensor, rows: int) -> torch.Tensor:
    out = torch.zeros((rows,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out
