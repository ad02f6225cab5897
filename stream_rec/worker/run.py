"""``stream-rec worker``: the serial or the pipelined worker, as the settings say."""

from __future__ import annotations

import logging
import threading

from stream_rec.settings import Settings
from stream_rec.snapshot import Fenced

from .health import serve_health
from .pipeline import make_worker

log = logging.getLogger(__name__)


def run_worker(settings: Settings, stop: threading.Event | None = None) -> int:
    """``stream-rec worker``: 0 after a requested stop, 3 when fenced by another writer."""
    worker = make_worker(settings, stop=stop)
    if stop is None:
        worker.install_signal_handlers()
    if settings.worker.metrics_port:
        serve_health(worker.health.check, worker.metrics.registry, settings.worker.metrics_port,
                     host=settings.worker.metrics_host)
    try:
        return worker.run()
    except Fenced as exc:
        log.error("fenced: %s", exc)
        return 3
