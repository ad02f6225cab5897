"""A shared-memory ring of decoded batches, from the consumer process to the trainer.

Each slot holds one micro-batch as numpy columns -- the accepted events' ids
(UTF-8 bytes with offsets), times, weights, partitions and offsets -- so a
batch crosses processes as one memory copy per column, not as pickled
objects. Which slots are full and which are free travels on two small queues
(slot numbers and a little metadata); the bulk never does.

The consumer writes a slot and puts ``(slot, meta)`` on ``full``; the trainer
reads it, copies the columns out and puts the slot back on ``free``. A full
ring makes the consumer wait (back-pressure), an empty one the trainer; both
waits are counted, so a benchmark can say which side is the bottleneck.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from stream_rec.events import Batch


@dataclass
class Columns:
    """A batch as the trainer learns it (accepted events only), with where it came from.

    ``partition`` / ``offset`` (N,) of the accepted events; ``ends`` is, per
    partition, the next offset after every record of the batch, dead letters
    included (what the checkpoint advances to).
    """

    user_ids: list[str]
    item_ids: list[str]
    ts: np.ndarray
    weight: np.ndarray
    partition: np.ndarray
    offset: np.ndarray
    ends: dict[int, int] = field(default_factory=dict)
    generation: int = 0

    def __len__(self) -> int:
        return len(self.ts)

    def max_ts(self) -> int | None:
        return int(self.ts.max()) if len(self.ts) else None


class Ring:
    """``slots`` slots of up to ``capacity`` events and ``id_bytes`` of id text each.

    Created by the consumer process, which passes :meth:`handle` to the trainer
    process; the trainer attaches with :meth:`attach`. The creator unlinks the
    shared memory on :meth:`close`.
    """

    def __init__(self, slots: int, capacity: int, id_bytes: int, *,
                 name: str | None = None, queues: tuple[Any, Any] | None = None) -> None:
        self.slots, self.capacity, self.id_bytes = slots, capacity, id_bytes
        layout = self._layout(capacity, id_bytes)
        self._layout_map = layout
        self.slot_bytes = layout["_total"]
        owner = name is None
        self.shm = shared_memory.SharedMemory(name=name, create=owner,
                                              size=max(1, slots * self.slot_bytes))
        self.owner = owner
        if queues is None:
            ctx = mp.get_context("spawn")
            queues = (ctx.Queue(), ctx.Queue())
            for s in range(slots):
                queues[0].put(s)
        self.free, self.full = queues
        self.waited_full_s = 0.0   # consumer: time spent waiting for a free slot
        self.waited_empty_s = 0.0  # trainer: time spent waiting for a full slot

    @staticmethod
    def _layout(capacity: int, id_bytes: int) -> dict[str, Any]:
        """Byte offset, dtype and shape of each column in a slot (8-byte aligned)."""
        cols = [("ts", np.int64, capacity), ("offset", np.int64, capacity),
                ("weight", np.float32, capacity), ("partition", np.int32, capacity),
                ("user_end", np.int32, capacity), ("item_end", np.int32, capacity),
                ("ids", np.uint8, id_bytes)]
        out: dict[str, Any] = {}
        pos = 0
        for name, dtype, n in cols:
            out[name] = (pos, np.dtype(dtype), n)
            pos += (np.dtype(dtype).itemsize * n + 7) // 8 * 8
        out["_total"] = pos
        return out

    def handle(self) -> tuple[str, int, int, int, tuple[Any, Any]]:
        """What another process needs to attach (picklable with the queues)."""
        return self.shm.name, self.slots, self.capacity, self.id_bytes, (self.free, self.full)

    @classmethod
    def attach(cls, handle: tuple[str, int, int, int, tuple[Any, Any]]) -> Ring:
        name, slots, capacity, id_bytes, queues = handle
        return cls(slots, capacity, id_bytes, name=name, queues=queues)

    def _view(self, slot: int, column: str) -> np.ndarray:
        start, dtype, n = self._layout_map[column]
        base = slot * self.slot_bytes + start
        return np.ndarray((n,), dtype=dtype, buffer=self.shm.buf, offset=base)

    # -- the consumer's side ---------------------------------------------------
    def put(self, batch: Batch, ends: dict[int, int], generation: int,
            stop: Any = None, check: Any = None) -> bool:
        """Copy ``batch``'s accepted events into free slots and hand them over.

        Waits for a free slot (back-pressure), calling ``check()`` while it
        waits (it may raise: the reader died); returns ``False`` if ``stop``
        (an event) is set meanwhile. A batch larger than a slot (events or id
        bytes) goes in pieces; only the last carries ``ends``.
        """
        ub = [u.encode() for u in batch.user_ids]
        ib = [i.encode() for i in batch.item_ids]
        n = len(ub)
        ulen = np.fromiter(map(len, ub), np.int32, n)
        ilen = np.fromiter(map(len, ib), np.int32, n)
        need = np.cumsum(ulen + ilen)
        lo = 0
        while True:
            # the longest piece from lo that fits both the events and the id bytes
            base = need[lo - 1] if lo else 0
            hi = min(n, lo + self.capacity,
                     int(np.searchsorted(need, base + self.id_bytes, side="right")))
            hi = max(hi, min(n, lo + 1))
            slot = self._free_slot(stop, check)
            if slot is None:
                return False
            k = hi - lo
            for col in ("ts", "offset", "weight", "partition"):
                self._view(slot, col)[:k] = getattr(batch, col)[lo:hi]
            self._view(slot, "user_end")[:k] = np.cumsum(ulen[lo:hi])
            self._view(slot, "item_end")[:k] = np.cumsum(ilen[lo:hi])
            blob = b"".join(ub[lo:hi]) + b"".join(ib[lo:hi])
            self._view(slot, "ids")[:len(blob)] = np.frombuffer(blob, dtype=np.uint8)
            last = hi >= n
            self.full.put((slot, {"n": k, "user_bytes": int(ulen[lo:hi].sum()),
                                  "bytes": len(blob), "generation": generation,
                                  "ends": ends if last else {}}))
            if last:
                return True
            lo = hi

    def _free_slot(self, stop: Any, check: Any = None) -> int | None:
        t0 = time.perf_counter()
        try:
            while True:
                try:
                    return int(self.free.get(timeout=0.05))
                except queue.Empty:
                    if check is not None:
                        check()
                    if stop is not None and stop.is_set():
                        return None
        finally:
            self.waited_full_s += time.perf_counter() - t0

    def send(self, message: Any) -> None:
        """A control message in order with the batches (slot -1)."""
        self.full.put((-1, message))

    # -- the trainer's side ----------------------------------------------------
    def get(self, timeout_s: float) -> tuple[Columns | None, Any]:
        """The next batch (copied out, its slot freed) or control message; ``(None, None)``
        when nothing arrived within ``timeout_s``."""
        t0 = time.perf_counter()
        try:
            slot, meta = self.full.get(timeout=timeout_s)
        except queue.Empty:
            self.waited_empty_s += time.perf_counter() - t0
            return None, None
        self.waited_empty_s += time.perf_counter() - t0
        if slot < 0:
            return None, meta
        k = meta["n"]
        try:
            ids = bytes(self._view(slot, "ids")[:meta["bytes"]])
            cols = Columns(
                user_ids=_split(ids[:meta["user_bytes"]], self._view(slot, "user_end")[:k]),
                item_ids=_split(ids[meta["user_bytes"]:], self._view(slot, "item_end")[:k]),
                ts=self._view(slot, "ts")[:k].copy(),
                weight=self._view(slot, "weight")[:k].copy(),
                partition=self._view(slot, "partition")[:k].copy(),
                offset=self._view(slot, "offset")[:k].copy(),
                ends=meta["ends"], generation=meta["generation"])
        finally:
            self.free.put(slot)
        return cols, None

    def close(self) -> None:
        self.shm.close()
        if self.owner:
            self.shm.unlink()


def _split(blob: bytes, ends: np.ndarray) -> list[str]:
    """The strings of a concatenated UTF-8 ``blob`` ending at ``ends`` (cumulative bytes)."""
    out = []
    start = 0
    for end in ends.tolist():
        out.append(blob[start:end].decode())
        start = end
    return out
