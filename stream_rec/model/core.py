"""The model's state, as the parts that operate on it see it.

:class:`ModelCore` holds everything a :class:`~stream_rec.model.StreamingModel`
is made of -- parameters on the device, the fast path's host state, the
training buffers and the step counter -- without the behaviour, so that
export, scoring and expiry can work on it without importing the model class.
"""

from __future__ import annotations

import numpy as np
import torch

from .buffers import PendingChunk, ReplayRing
from .config import ModelConfig
from .fastpath import FastPath
from .ids import shared_row
from .params import Params
from .trainer import Trainer


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> cuda when available else cpu; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ModelCore:
    """``params`` (device tensors) and ``fast`` (host arrays and id tables) grow
    together by capacity doubling; ``n_users`` / ``n_items`` count rows in use
    (expired rows included until reused)."""

    def __init__(self, cfg: ModelConfig | None = None, device: str = "auto") -> None:
        self.cfg = cfg or ModelConfig()
        self.device = resolve_device(device)
        c = self.cfg
        self.params = Params(c, self.device)
        self.fast = FastPath(c, self.params.grow_users, self.params.grow_items)
        self.trainer = Trainer(c, self.params)            # training steps on the device
        self.step = 0                                      # training chunks completed
        self.replay = ReplayRing(c.replay, c.history)
        self.chunk = PendingChunk(c.train_chunk, c.history)
        # rows changed outside the fast path (an expired item left their seen list or
        # history; a restore applied a new bound), reported by the next learn()
        self.touched_users: list[int] = []
        self.touched_items: list[int] = []
        if c.shared_rows:   # reserved rows, initialised like new rows when the chunk ends
            self.chunk.new_users.extend(range(c.shared_rows))
            self.chunk.new_items.extend(range(c.shared_rows))

    @property
    def n_users(self) -> int:
        return len(self.fast.users)

    @property
    def n_items(self) -> int:
        return len(self.fast.items)

    def user_row(self, user_id: str) -> int | None:
        """The user's own row; ``None`` when unknown, waiting for admission or expired."""
        return self.fast.users.get(str(user_id))

    def query_row(self, user_id: str) -> int | None:
        """The row a user is answered from: their own, else their shared row (if any)."""
        row = self.fast.users.get(str(user_id))
        if row is None and self.cfg.shared_rows:
            return shared_row(str(user_id), self.cfg.shared_rows)
        return row

    def item_row(self, item_id: str) -> int | None:
        return self.fast.items.get(str(item_id))

    def seen_rows(self, user_row: int) -> np.ndarray:
        """Item rows (int64) the user has seen, oldest first (at most ``seen_max``)."""
        return self.fast.seen.rows(user_row)

    def live_items(self) -> np.ndarray:
        """Bool mask (I,) of rows that hold an item."""
        return self.fast.items.live()
