"""The trainer of one model: host preparation and the device step, in chunk order.

:func:`~stream_rec.model.train.prepare_chunk` (host, parameter-free) and
:class:`~stream_rec.model.step.StepRunner` (device) meet here.
"""

from __future__ import annotations

import time

import numpy as np

from .buffers import Events, ReplayRing
from .config import ModelConfig
from .params import Params
from .seen import SeenLists
from .step import StepRunner
from .train import Plan, PreparedChunk, Workspace, prepare_chunk


class Trainer:
    """Prepares and runs training chunks for one model's :class:`Params`.

    :meth:`prepare` may run on another thread (with its own :class:`Workspace`)
    or process, ahead of the device. Everything that touches the parameters --
    :meth:`run`, the chunk-end ``Params.init_*`` / ``clear_*`` and exports --
    must be called from one thread in chunk order; on CUDA they are queued on
    one stream and return at once, so that thread is not held up by the device.
    ``stats`` accumulates seconds spent preparing (host) and running (CPU) or
    enqueuing (CUDA) steps.
    """

    def __init__(self, cfg: ModelConfig, params: Params, graphs: bool | None = None) -> None:
        self.cfg = cfg
        self.params = params
        self.plan = Plan.for_device(params.device.type)
        self.ws = Workspace()
        self.runner = StepRunner(params, cfg, graphs=graphs)
        self.stats = {"chunks": 0, "steps": 0, "prepare_s": 0.0, "step_s": 0.0}

    def prepare(self, events: Events, replay: ReplayRing, seen: SeenLists,
                pop: np.ndarray, n_users: int, step: int) -> PreparedChunk:
        """:func:`prepare_chunk` with this trainer's buckets and workspace."""
        t0 = time.perf_counter()
        out = prepare_chunk(self.cfg, events, replay, seen, pop, n_users, step,
                            self.plan, self.ws, content=self.params.n_text > 0)
        self.stats["prepare_s"] += time.perf_counter() - t0
        return out

    def run(self, chunk: PreparedChunk) -> None:
        """Queue the chunk's steps on the device (CPU: run them)."""
        t0 = time.perf_counter()
        for b in chunk.steps:
            self.runner.run(b)
        self.stats["step_s"] += time.perf_counter() - t0
        self.stats["chunks"] += 1
        self.stats["steps"] += len(chunk.steps)

    def train_chunk(self, events: Events, replay: ReplayRing, seen: SeenLists,
                    pop: np.ndarray, n_users: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Prepare and run a chunk; returns the (users, items) rows it changes."""
        chunk = self.prepare(events, replay, seen, pop, n_users, step)
        self.run(chunk)
        return chunk.users, chunk.items
