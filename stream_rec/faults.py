"""Failpoints: named places in the product where a test can inject a crash or a delay.

Crash safety is a claim about every instant between two steps, and the
interesting instants (between the rename of a version and the move of
``LATEST``, between a durable publish and the offset commit) are too short to
hit by killing a process from outside at random. A failpoint names such an
instant. ``STREAM_REC_FAILPOINTS`` arms them, comma separated::

    STREAM_REC_FAILPOINTS="after_rename=kill@3,in_batch=sleep:2"

Actions: ``kill`` (SIGKILL this process: no handlers, no flushing, like a power
cut for the process), ``sleep:S`` (block S seconds), ``raise`` (raise
:class:`FailpointError`). ``@N`` acts on the Nth hit only; without it, every hit.

The environment is parsed once at import; an unarmed failpoint costs one dict
lookup on an empty dict, so the calls stay in production code.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

ENV = "STREAM_REC_FAILPOINTS"


class FailpointError(RuntimeError):
    """Raised by a failpoint armed with ``raise``."""


@dataclass
class _Armed:
    action: str  # "kill" | "sleep" | "raise"
    seconds: float = 0.0
    nth: int | None = None  # act on this hit only; None = every hit
    hits: int = 0


def parse(spec: str) -> dict[str, _Armed]:
    """``name=action[:arg][@n],...`` into armed failpoints; malformed entries raise."""
    out: dict[str, _Armed] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, rest = part.partition("=")
        if not name or not rest:
            raise ValueError(f"failpoint {part!r} is not name=action")
        rest, _, nth = rest.partition("@")
        action, _, arg = rest.partition(":")
        if action not in ("kill", "sleep", "raise"):
            raise ValueError(f"failpoint {name!r}: unknown action {action!r}")
        out[name.strip()] = _Armed(action, float(arg) if arg else 0.0,
                                   int(nth) if nth else None)
    return out


_ARMED: dict[str, _Armed] = parse(os.environ.get(ENV, ""))
_LOCK = threading.Lock()


def arm(spec: str) -> None:
    """Replace the armed set (in-process tests; processes use the environment)."""
    global _ARMED
    _ARMED = parse(spec)


def failpoint(name: str) -> None:
    """Act if ``name`` is armed; otherwise return at once."""
    if not _ARMED:
        return
    armed = _ARMED.get(name)
    if armed is None:
        return
    with _LOCK:  # the publisher thread and the polling thread both hit failpoints
        armed.hits += 1
        due = armed.nth is None or armed.hits == armed.nth
    if not due:
        return
    log.warning("failpoint %s: %s (hit %d)", name, armed.action, armed.hits)
    if armed.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif armed.action == "sleep":
        time.sleep(armed.seconds)
    else:
        raise FailpointError(f"failpoint {name}")
