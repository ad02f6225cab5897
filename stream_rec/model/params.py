"""The learned parameters: torch tensors on the model's device.

Row tables grow by capacity doubling (rows beyond ``n_users`` / ``n_items`` are
spare capacity, zero). Rows are initialised when the training chunk that
allocated them completes, seeded by ``(seed, step)`` so a replay or a restart
draws the same values.
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
    ``transition`` / ``transition_acc`` (D, D). All float32.
    """

    ITEM_ROWS = ("item_in", "item_out", "item_bias", "acc_in", "acc_out", "acc_bias")
    USER_ROWS = ("user_vec", "user_acc")

    def __init__(self, cfg: ModelConfig, device: torch.device, capacity: int = 16) -> None:
        D, H = cfg.dim, cfg.history
        f32: dict[str, Any] = {"dtype": torch.float32, "device": device}
        self.cfg = cfg
        self.device = device
        self.user_vec = torch.zeros(capacity, D, **f32)
        self.user_acc = torch.zeros(capacity, **f32)
        self.item_in = torch.zeros(capacity, D, **f32)
        self.item_out = torch.zeros(capacity, D, **f32)
        self.item_bias = torch.zeros(capacity, **f32)
        self.acc_in = torch.zeros(capacity, **f32)
        self.acc_out = torch.zeros(capacity, **f32)
        self.acc_bias = torch.zeros(capacity, **f32)
        self.pos_w = torch.from_numpy(initial_pos_w(cfg)).to(device)
        self.pos_acc = torch.zeros(H, n_buckets(cfg), **f32)
        self.transition = torch.zeros(D, D, **f32)
        self.transition_acc = torch.zeros(D, D, **f32)

    def grow_users(self, cap: int) -> None:
        for name in self.USER_ROWS:
            setattr(self, name, _grow(getattr(self, name), cap))

    def grow_items(self, cap: int) -> None:
        for name in self.ITEM_ROWS:
            setattr(self, name, _grow(getattr(self, name), cap))

    def rows(self, rows: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(rows, device=self.device)

    def init_users(self, rows: list[int]) -> None:
        """New users start with a zero vector: their query is their history."""
        r = self.rows(np.asarray(rows, dtype=np.int64))
        self.user_vec[r] = 0.0
        self.user_acc[r] = 0.0

    def init_items(self, rows: list[int], step: int) -> None:
        """New items start small and random, drawn from ``(seed, 1, step)``."""
        cfg = self.cfg
        arr = np.asarray(rows, dtype=np.int64)
        rng = np.random.default_rng([cfg.seed, 1, step])
        init = rng.standard_normal((2, len(arr), cfg.dim)).astype(np.float32) * cfg.init_std
        r = self.rows(arr)
        self.item_in[r] = torch.from_numpy(init[0]).to(self.device)
        self.item_out[r] = torch.from_numpy(init[1]).to(self.device)
        if cfg.tied:
            self.item_in[r] = self.item_out[r]
        for t in (self.item_bias, self.acc_in, self.acc_out, self.acc_bias):
            t[r] = 0.0

    def clear_users(self, rows: np.ndarray) -> None:
        r = self.rows(rows)
        self.user_vec[r] = 0.0
        self.user_acc[r] = 0.0

    def clear_items(self, rows: np.ndarray) -> None:
        r = self.rows(rows)
        for t in (self.item_in, self.item_out, self.item_bias, self.acc_in, self.acc_out,
                  self.acc_bias):
            t[r] = 0.0


def n_buckets(cfg: ModelConfig) -> int:
    """Age buckets of a history slot: one more than the edges in ``time_buckets_s``."""
    return len(cfg.time_buckets_s) + 1


def initial_pos_w(cfg: ModelConfig) -> np.ndarray:
    """Weights (H, NB) per (slot, age bucket); start recency-decayed, newest weighs most."""
    h = np.arange(cfg.history, dtype=np.float32)
    w = (cfg.recency ** h).astype(np.float32)
    return np.repeat(w[:, None], n_buckets(cfg), axis=1)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy (never a view of the parameter)."""
    return t.detach().to("cpu").numpy().copy()


def _grow(t: torch.Tensor, cap: int) -> torch.Tensor:
    out = torch.zeros((cap,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out
