"""``stream-rec worker``: the serial or the pipelined worker, or a gang of ranks."""

from __future__ import annotations

import threading

from stream_rec.model.config import GANG_WITHOUT_CONTENT
from stream_rec.settings import Settings

from .health import run_with_health
from .launch import in_gang, launch_gang, run_rank
from .pipeline import make_worker


def run_worker(settings: Settings, stop: threading.Event | None = None, procs: int = 0,
               argv: list[str] | None = None) -> int:
    """``stream-rec worker``: 0 after a requested stop, 3 when fenced by another writer.

    ``procs`` > 0 launches a gang of that many ranks on this host (``argv``: the
    command's arguments, passed on to the ranks); a process started by torch's
    elastic agent runs as one rank of its gang (:mod:`.launch`). A gang trains
    no item text: with ``model.content_dim`` it refuses to start (ValueError).
    """
    if (procs or in_gang()) and settings.model.content_dim:
        raise ValueError(GANG_WITHOUT_CONTENT)
    if procs:
        return launch_gang(settings, procs, argv or ["worker"])
    if in_gang():
        return run_rank(settings, stop)
    worker = make_worker(settings, stop=stop)
    if stop is None:
        worker.install_signal_handlers()
    return run_with_health(worker, settings.worker)
