"""Starting a gang: torch's elastic launcher on one host, ``torchrun`` across several.

``stream-rec worker --procs N`` (:func:`launch_gang`) runs torch's elastic
agent in this process (the ``torchrun`` machinery: c10d rendezvous on this
host, restarts, signal forwarding) with N copies of ``stream-rec worker`` as
its ranks. Several hosts run the same ranks under ``torchrun`` themselves::

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 \\
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d \\
        --rdzv-endpoint head:29400 --rdzv-id clicks --max-restarts 100 \\
        --no-python stream-rec worker

Either way a rank is a ``stream-rec worker`` process that finds torchrun's
environment (:func:`in_gang`) and joins the process group
(:func:`run_rank`): gloo on CPU, NCCL when its device is a GPU.

When any rank fails (killed, fenced, a fatal error), the others fail at their
next exchange; the agent stops them all and starts the gang again, every rank
restoring the newest version. SIGTERM to the launcher is forwarded to every
rank, which finishes the round, publishes and commits; the launcher waits up to
``worker.gang_shutdown_s`` for them and exits 0.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import sys
import threading
import uuid

from stream_rec.settings import Settings

from .health import run_with_health

log = logging.getLogger(__name__)


def in_gang() -> bool:
    """Is this process a rank started by torch's elastic agent (``torchrun`` or ``--procs``)?"""
    return "TORCHELASTIC_RUN_ID" in os.environ and "WORLD_SIZE" in os.environ


def run_rank(settings: Settings, stop: threading.Event | None = None) -> int:
    """Join the gang as the rank torchrun's environment names and run it.

    0 after a requested stop, 3 when rank 0 was fenced by another writer.
    """
    import torch
    import torch.distributed as dist

    from stream_rec.model.core import resolve_device
    from stream_rec.model.exchange import TorchExchange

    from .gang import GangWorker

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(settings.worker.device)
    if device.type == "cuda":
        torch.cuda.set_device(local)
        settings.worker.device = f"cuda:{local}"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        log.warning("the ranks share the launcher's rendezvous store: a restarted gang may fail "
                    "to connect (stale addresses, pytorch#167288); run torchrun with "
                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    # While the group forms, a rank is blocked in C++ where no Python handler runs: a
    # stop (the launcher stopping a gang that cannot form) must end it at once.
    handler = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=settings.worker.gang_timeout_s))
    finally:
        signal.signal(signal.SIGTERM, handler)
    try:
        worker = GangWorker(settings, TorchExchange(), stop=stop)
        log.info("rank %d of %d (%s, restart %s)", worker.rank, worker.world,
                 settings.worker.device, os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        return run_with_health(worker, settings.worker, port_offset=local)
    finally:
        dist.destroy_process_group()


def launch_gang(settings: Settings, procs: int, argv: list[str]) -> int:
    """Run ``stream-rec worker`` (with ``argv``, less ``--procs``) as ``procs`` ranks here.

    Returns 0 once the gang stopped on request (SIGTERM/SIGINT), 1 when it
    failed more often than ``worker.gang_max_restarts``.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    wcfg = settings.worker
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=procs, run_id=f"stream-rec-{uuid.uuid4()}",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=wcfg.gang_max_restarts,
        monitor_interval=0.5, start_method="spawn", shutdown_timeout=wcfg.gang_shutdown_s)
    # Every attempt gets a rendezvous store of its own: with the launcher's shared store a
    # restarted gang can read a dead rank's address and fail to connect (pytorch#167288).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    log.info("starting a gang of %d ranks on this host", procs)
    try:
        elastic_launch(config, sys.executable)("-m", "stream_rec", *rank_argv(argv))
    except SignalException as exc:
        if exc.sigval in (signal.SIGTERM, signal.SIGINT):
            log.info("gang stopped on request (%s)", exc.sigval.name)
            return 0
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        log.error("the gang failed more often than worker.gang_max_restarts (%d): %s",
                  wcfg.gang_max_restarts, exc.get_first_failure()[1].message)
        return 1
    log.info("gang stopped")
    return 0


def rank_argv(argv: list[str]) -> list[str]:
    """``stream-rec worker`` arguments for a rank: the launcher's, less ``--procs N``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--procs":
            skip = True
        elif not arg.startswith("--procs="):
            out.append(arg)
    return out
