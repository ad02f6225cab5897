"""The writer's lease: which worker may publish to a store, kept in the store itself.

One writer per store. A worker that starts on a store whose lease another
live worker holds waits as a standby; when the holder stops renewing (it was
killed, or lost the store), the lease expires and one standby takes it.

The lease is a sequence of epochs, ``lease/epoch-NNNNNNNNNNNN.json``, each
holding ``{holder, epoch, expires_at}``. Taking the lease is the exclusive
creation of the next epoch's file (:meth:`Backend.create`): of two standbys
that race, exactly one wins. The holder renews by rewriting its own epoch's
file; it has lost the lease as soon as a newer epoch exists. Expiry is judged
by wall clocks (the holder writes ``expires_at``, others compare with theirs),
so clock skew can hand the lease over early -- which is why the lease is only
the first line: a version is still committed by an exclusive create of
``parent + 1``, and a stale writer that loses that race is fenced.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass

import orjson

from .backend import Backend

log = logging.getLogger(__name__)

_EPOCH_FILE = re.compile(r"epoch-(\d{12})\.json$")


@dataclass(frozen=True)
class LeaseRecord:
    holder: str
    epoch: int
    expires_at: float  # epoch seconds (the holder's clock)

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at


_STARTED_MS = int(time.time() * 1000)  # tells this process from an earlier one with its pid


def holder_name() -> str:
    """``host:pid:started_ms:token`` -- unique per lease, readable by an operator."""
    return f"{socket.gethostname()}:{os.getpid()}:{_STARTED_MS}:{uuid.uuid4().hex[:8]}"


def holder_is_dead(holder: str) -> bool:
    """Is ``holder`` a process of this host that no longer runs?

    A worker restarted after a crash (kill -9, OOM) on the same host -- the
    same pod or container -- need not wait for its predecessor's lease to
    expire. Only a holder on this host can be judged; one with our pid but
    another start time is an earlier incarnation (pid 1 in a container).
    """
    host, pid_text, started, *_ = (holder.split(":") + ["", "", ""])[:4]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return started != str(_STARTED_MS)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return False


class Lease:
    """This process's claim on a store's writer lease (``ttl_s`` without renewal ends it)."""

    def __init__(self, backend: Backend, holder: str | None = None, ttl_s: float = 10.0) -> None:
        self.backend = backend
        self.holder = holder or holder_name()
        self.ttl_s = ttl_s
        self.epoch: int | None = None
        self._renewed = 0.0  # monotonic time of the last write of our epoch file
        self._dir = backend.join("lease")
        backend.makedirs(self._dir)

    def _path(self, epoch: int) -> str:
        return f"{self._dir}/epoch-{epoch:012d}.json"

    def current(self) -> LeaseRecord | None:
        """The newest epoch's record, or ``None`` when the lease was never taken."""
        epochs = sorted(int(m.group(1)) for p in self.backend.ls(self._dir)
                        if (m := _EPOCH_FILE.search(p)))
        for epoch in reversed(epochs):
            try:
                data = orjson.loads(self.backend.cat(self._path(epoch)))
                return LeaseRecord(str(data["holder"]), int(data["epoch"]),
                                   float(data["expires_at"]))
            except FileNotFoundError:
                continue  # pruned between the listing and the read
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                # a torn record cannot be renewed by anyone: treat it as expired
                return LeaseRecord("?", epoch, 0.0)
        return None

    def _record(self, epoch: int, expires_at: float) -> bytes:
        return orjson.dumps({"holder": self.holder, "epoch": epoch, "expires_at": expires_at,
                             "written_at": time.time()})

    def try_acquire(self) -> bool:
        """Take the lease if it is free or expired; whether this process now holds it."""
        rec = self.current()
        if rec is not None and not rec.expired() and rec.holder != self.holder \
                and not holder_is_dead(rec.holder):
            return False
        epoch = (rec.epoch if rec is not None else 0) + 1
        written = time.monotonic()
        if not self.backend.create(self._path(epoch),
                                   self._record(epoch, time.time() + self.ttl_s)):
            return False  # another standby took this epoch first
        self.epoch, self._renewed = epoch, written
        log.info("took the writer lease (epoch %d, previous holder %s)", epoch,
                 rec.holder if rec else None)
        self._forget_older(epoch)
        return True

    def renew(self) -> bool:
        """Extend the lease; ``False`` (for good) once a newer epoch exists."""
        if self.epoch is None:
            return False
        rec = self.current()
        if rec is None or rec.epoch != self.epoch:
            log.error("lost the writer lease: epoch %s now belongs to %s", rec and rec.epoch,
                      rec and rec.holder)
            self.epoch = None
            return False
        written = time.monotonic()
        self.backend.replace(self._path(self.epoch),
                             self._record(self.epoch, time.time() + self.ttl_s))
        self._renewed = written
        return True

    @property
    def renewed_at(self) -> float:
        """Monotonic time of the last successful write of this holder's epoch."""
        return self._renewed

    def held(self) -> bool:
        """Held, and renewed recently enough that no standby can have taken it over."""
        return self.epoch is not None and time.monotonic() - self._renewed < self.ttl_s

    def release(self) -> None:
        """Give the lease up at once (a standby may take over without waiting for expiry)."""
        if self.epoch is None:
            return
        rec = self.current()
        if rec is not None and rec.epoch == self.epoch:
            self.backend.replace(self._path(self.epoch), self._record(self.epoch, 0.0))
        self.epoch = None

    def _forget_older(self, epoch: int) -> None:
        for p in self.backend.ls(self._dir):
            m = _EPOCH_FILE.search(p)
            if m and int(m.group(1)) < epoch:
                self.backend.rm(p)
