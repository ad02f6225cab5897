"""How the ranks of a gang talk: two collectives, over torch.distributed or between threads.

A gang (:mod:`.gang`) needs only two operations, both "everyone contributes,
everyone receives every contribution in rank order":

* :meth:`Exchange.all_gather` -- small Python objects (a round's ids and
  counts, control notes), pickled;
* :meth:`Exchange.all_gather_bytes` -- one flat ``uint8`` tensor per rank of
  any length (a training step's packed gradients), on the tensor's device.

Summing in rank order on every rank, rather than an ``all_reduce`` whose
order of additions depends on the algorithm, is what keeps the replicas
bitwise equal. :class:`TorchExchange` runs on an initialised process group
(gloo on CPU, NCCL on GPU); :class:`ThreadExchange` runs W ranks as threads of
one process (``stream-rec eval --ranks`` and the tests). Both count the wall
time spent inside collectives and the bytes sent, for the benchmarks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import torch

T = TypeVar("T")


class Exchange(Protocol):
    rank: int
    world: int
    seconds: float   # wall time inside collectives
    sent: int        # bytes this rank contributed to all_gather_bytes

    def all_gather(self, obj: Any) -> list[Any]: ...

    def gather(self, obj: Any) -> list[Any] | None: ...

    def all_gather_bytes(self, buf: torch.Tensor) -> list[torch.Tensor]: ...


class TorchExchange:
    """Collectives of the default torch.distributed process group.

    Received objects and tensors are this rank's own copies.
    """

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.seconds = 0.0
        self.sent = 0

    def all_gather(self, obj: Any) -> list[Any]:
        t0 = time.perf_counter()
        out: list[Any] = [None] * self.world
        self._dist.all_gather_object(out, obj)
        self.seconds += time.perf_counter() - t0
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's object on rank 0 (``None`` elsewhere): what a version is built from."""
        t0 = time.perf_counter()
        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        self._dist.gather_object(obj, out, dst=0)
        self.seconds += time.perf_counter() - t0
        return out

    def all_gather_bytes(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``uint8`` buffer: sizes first, then the buffers padded to the largest."""
        t0 = time.perf_counter()
        dev = buf.device
        size = torch.tensor([buf.numel()], dtype=torch.int64, device=dev)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        self._dist.all_gather(sizes, size)
        n = [int(s.item()) for s in sizes]
        top = max(n)
        padded = torch.zeros(top, dtype=torch.uint8, device=dev)
        padded[:buf.numel()] = buf
        parts = [torch.empty(top, dtype=torch.uint8, device=dev) for _ in range(self.world)]
        self._dist.all_gather(parts, padded)
        self.seconds += time.perf_counter() - t0
        self.sent += buf.numel()
        return [p[:k] for p, k in zip(parts, n)]


class _Hub:
    """What the threads of one :class:`ThreadExchange` gang share."""

    def __init__(self, world: int) -> None:
        self.slots: list[Any] = [None] * world
        self.barrier = threading.Barrier(world)


class ThreadExchange:
    """One rank of a gang whose ranks are threads of this process (see :meth:`gang`).

    A contribution is handed over by reference: receivers must not modify
    what they receive (the gang's code never does).
    """

    def __init__(self, hub: _Hub, rank: int, world: int) -> None:
        self._hub = hub
        self.rank = rank
        self.world = world
        self.seconds = 0.0
        self.sent = 0

    @classmethod
    def gang(cls, world: int) -> list[ThreadExchange]:
        """The exchanges of ranks ``0 .. world - 1``, one per thread."""
        hub = _Hub(world)
        return [cls(hub, r, world) for r in range(world)]

    def all_gather(self, obj: Any) -> list[Any]:
        t0 = time.perf_counter()
        hub = self._hub
        hub.slots[self.rank] = obj
        hub.barrier.wait()
        out = list(hub.slots)
        hub.barrier.wait()  # nobody writes the next round's slot before all have read
        self.seconds += time.perf_counter() - t0
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        out = self.all_gather(obj)
        return out if self.rank == 0 else None

    def all_gather_bytes(self, buf: torch.Tensor) -> list[torch.Tensor]:
        self.sent += buf.numel()
        return self.all_gather(buf)

    def abort(self) -> None:
        """Break the barrier: a rank that failed must not leave the others waiting."""
        self._hub.barrier.abort()

    @classmethod
    def run(cls, world: int, body: Callable[[ThreadExchange], T]) -> list[T]:
        """``body(exchange)`` on ``world`` threads, one per rank; their results in rank order.

        The first exception of a rank is raised here, after every thread ended
        (a failing rank breaks the barrier, so the others stop too).
        """
        exchanges = cls.gang(world)
        results: list[Any] = [None] * world
        errors: list[BaseException] = []

        def one(ex: ThreadExchange) -> None:
            try:
                results[ex.rank] = body(ex)
            except BaseException as exc:  # noqa: BLE001 -- re-raised on the calling thread
                if not isinstance(exc, threading.BrokenBarrierError):
                    errors.append(exc)
                ex.abort()

        threads = [threading.Thread(target=one, args=(ex,), name=f"rank-{ex.rank}")
                   for ex in exchanges]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results
