"""Graceful stop for long-running commands: the first SIGTERM/SIGINT asks, the second insists.

Installed by the command line before anything slow (imports of torch, a
restore), so a signal that arrives while a worker is still starting is a
request to stop -- the worker exits 0 without starting -- and never kills it
with the signal's default action.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


def install(stop: threading.Event | None = None) -> threading.Event:
    """Route SIGTERM and SIGINT to ``stop`` (a new event if none); returns it.

    The first signal sets the event: the process finishes what it holds and
    exits 0. A second one raises ``SystemExit(130)`` at once.
    """
    event = stop if stop is not None else threading.Event()

    def handler(signum: int, _frame: object) -> None:
        if event.is_set():
            log.warning("second stop request: exiting now")
            raise SystemExit(130)
        log.info("%s received: finishing the work in hand, then stopping",
                 signal.Signals(signum).name)
        event.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return event
