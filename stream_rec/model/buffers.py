"""Learned events held between calls: the pending training chunk and the replay ring.

Both keep the same five columns (:class:`Events`); one buffer class lets both be
filled, drawn from, snapshotted (as ``<prefix>user`` … ``<prefix>bucket``) and
restored by the same code, so a restore mid-chunk continues bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


@dataclass
class Events:
    """N learned events: rows, weight, and the history each was learned with.

    ``user``, ``item`` (N,) int64 rows; ``weight`` (N,) float32; ``hist`` (N, H)
    int64 the user's item rows before the event, newest first (-1 empty);
    ``bucket`` (N, H) int64 the age bucket of each history slot.
    """

    user: np.ndarray
    item: np.ndarray
    weight: np.ndarray
    hist: np.ndarray
    bucket: np.ndarray

    def __len__(self) -> int:
        return len(self.user)

    def select(self, which: np.ndarray | slice) -> Events:
        """The events at ``which`` (a bool mask or indices), as copies."""
        return Events(*(getattr(self, f.name)[which] for f in fields(self)))

    def concat(self, other: Events) -> Events:
        """These events followed by ``other``'s."""
        return Events(*(np.concatenate([getattr(self, f.name), getattr(other, f.name)])
                        for f in fields(self)))


COLUMNS = tuple(f.name for f in fields(Events))


class EventBuffer:
    """Preallocated columns for up to ``capacity`` events."""

    def __init__(self, capacity: int, history: int) -> None:
        self.user = np.zeros(capacity, dtype=np.int64)
        self.item = np.zeros(capacity, dtype=np.int64)
        self.weight = np.zeros(capacity, dtype=np.float32)
        self.hist = np.full((capacity, history), -1, dtype=np.int64)
        self.bucket = np.zeros((capacity, history), dtype=np.int64)

    def put(self, at: slice | np.ndarray, events: Events) -> None:
        for col in COLUMNS:
            getattr(self, col)[at] = getattr(events, col)

    def take(self, at: slice | np.ndarray) -> Events:
        """Copies of the events at ``at``."""
        return Events(*(getattr(self, col)[at].copy() for col in COLUMNS))

    def tables(self, prefix: str, n: int) -> dict[str, np.ndarray]:
        return {prefix + col: getattr(self, col)[:n].copy() for col in COLUMNS}

    def load(self, tables: dict[str, np.ndarray], prefix: str) -> int:
        """Restore the first rows from ``tables``; returns how many there were."""
        n = len(tables[prefix + "user"])
        if n:
            for col in COLUMNS:
                getattr(self, col)[:n] = tables[prefix + col]
        return n


class ReplayRing:
    """The most recent ``capacity`` learned events, mixed into later gradient steps."""

    def __init__(self, capacity: int, history: int) -> None:
        self.capacity = capacity
        self.buffer = EventBuffer(capacity, history)
        self.size = 0   # filled entries
        self.pos = 0    # next write position

    def push(self, events: Events) -> None:
        R = self.capacity
        if R <= 0:
            return
        if len(events) > R:
            events = events.select(slice(len(events) - R, None))
        idx = (self.pos + np.arange(len(events))) % R
        self.buffer.put(idx, events)
        self.pos = int((self.pos + len(events)) % R)
        self.size = min(R, self.size + len(events))

    def draw(self, rng: np.random.Generator, k: int) -> Events:
        """``k`` distinct entries drawn uniformly, minus those expired since they were pushed."""
        sel = rng.choice(self.size, size=k, replace=False)
        sel = sel[self.buffer.weight[sel] > 0]
        return self.buffer.take(sel)

    def load(self, tables: dict[str, np.ndarray], prefix: str, pos: int, capacity: int) -> None:
        """Restore a ring saved by a ring of ``capacity`` entries (next write at ``pos``).

        Under the same capacity the layout is kept (so draws continue bit for
        bit); under another, the newest entries are kept, oldest first.
        """
        n = len(tables[prefix + "user"])
        if capacity == self.capacity:
            self.size = self.buffer.load(tables, prefix)
            self.pos = pos
            return
        order = np.arange(n) if n < capacity or n == 0 else (pos + np.arange(n)) % n
        keep = order[max(0, n - self.capacity):]
        self.buffer.load({prefix + c: tables[prefix + c][keep] for c in COLUMNS}, prefix)
        self.size = len(keep)
        self.pos = self.size % self.capacity if self.capacity else 0

    def forget(self, users: np.ndarray, items: np.ndarray) -> None:
        """Expired rows: their events weigh nothing and leave every history."""
        k = self.size
        if not k:
            return
        b = self.buffer
        dead = np.isin(b.user[:k], users) | np.isin(b.item[:k], items)
        b.weight[:k][dead] = 0.0
        b.hist[:k][np.isin(b.hist[:k], items)] = -1


class PendingChunk:
    """Events of the current, incomplete training chunk: fast path done, not yet trained.

    ``filled`` counts stream events since the chunk started (learned or not:
    events of ids waiting for admission fill the chunk too), ``queued`` the
    learned ones held in the buffer. Rows allocated during the chunk are
    initialised when it completes.
    """

    def __init__(self, capacity: int, history: int) -> None:
        self.buffer = EventBuffer(capacity, history)
        self.queued = 0
        self.filled = 0
        self.new_users: list[int] = []
        self.new_items: list[int] = []

    def add(self, events: Events, new_users: list[int], new_items: list[int]) -> None:
        k = self.queued
        self.buffer.put(slice(k, k + len(events)), events)
        self.queued = k + len(events)
        self.new_users.extend(new_users)
        self.new_items.extend(new_items)

    def close(self) -> tuple[Events, np.ndarray, np.ndarray]:
        """(the learned events, rows of new users, rows of new items), and start anew."""
        events = self.buffer.take(slice(0, self.queued))
        new_u = np.asarray(self.new_users, dtype=np.int64)
        new_i = np.asarray(self.new_items, dtype=np.int64)
        self.queued = self.filled = 0
        self.new_users, self.new_items = [], []
        return events, new_u, new_i
