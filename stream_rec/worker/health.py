"""Worker liveness: is the broker answering, and an endpoint that says so.

A stalled broker does not make ``poll`` fail: it returns nothing, as an idle
topic does. So :class:`Health` counts contact only from evidence that the
broker answered, and :func:`serve_health` exposes it (with the worker's
Prometheus metrics) for an orchestrator's liveness probe.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from stream_rec.settings import WorkerSettings
from stream_rec.snapshot import Fenced

log = logging.getLogger(__name__)


class Health:
    """Liveness as the broker side sees it, for ``/healthz`` and the log.

    A stalled broker does not make ``poll`` fail: it returns nothing, as an
    idle topic does. So contact is counted only from evidence that the broker
    answered: a poll that returned records, a successful offset commit, or a
    group heartbeat response (kafka-python's coordinator records its time).
    A polling loop that is itself stuck stops refreshing all three.
    """

    def __init__(self, stall_after_s: float) -> None:
        self.stall_after_s = stall_after_s
        self.role = "starting"  # "standby" while another worker holds the lease, then "active"
        self.lease_holder: str | None = None
        self.lease_expires_at: float | None = None
        self.last_contact = time.monotonic()
        self.last_records: float | None = None
        self.last_commit: float | None = None
        self.waiting: str | None = None  # why the worker cannot consume yet (no topic)
        self._reported = False

    def polled(self, consumer: Any, got_records: bool) -> None:
        now = time.monotonic()
        self._log_transition(now)  # a poll blocked through the stall still reports it
        if got_records:
            self.last_records = self.last_contact = now
        heartbeat = getattr(getattr(consumer, "_coordinator", None), "heartbeat", None)
        answered = getattr(heartbeat, "last_receive", None)
        if isinstance(answered, float) and answered != float("inf") \
                and answered > self.last_contact:
            self.last_contact = answered
        self._log_transition(now)

    def standby(self, holder: Any) -> None:
        """Waiting for the writer lease that ``holder`` (a LeaseRecord or None) holds."""
        self.role = "standby"
        self.lease_holder = getattr(holder, "holder", None)
        self.lease_expires_at = getattr(holder, "expires_at", None)
        self.last_contact = time.monotonic()  # a standby does not talk to the broker

    def active(self) -> None:
        """Consuming from now on: broker contact counts from here (a long restore is not a stall)."""
        self.role = "active"
        self.last_contact = time.monotonic()

    def committed(self) -> None:
        self.last_commit = self.last_contact = time.monotonic()

    def wait_for(self, reason: str | None) -> None:
        """The worker waits (``reason``), or no longer does (None); the broker answered."""
        self.waiting = reason
        self.last_contact = time.monotonic()

    def _log_transition(self, now: float) -> None:
        stalled = now - self.last_contact > self.stall_after_s
        if stalled and not self._reported:
            log.warning("stalled: no answer from the broker for %.0f s", now - self.last_contact)
        elif not stalled and self._reported:
            log.warning("broker answers again: resuming")
        self._reported = stalled

    def check(self) -> tuple[bool, dict[str, Any]]:
        """:meth:`status`, logging a stall the moment it is seen (from any thread)."""
        self._log_transition(time.monotonic())
        return self.status()

    def status(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, details) for the health endpoint."""
        if self.role == "starting" and self.waiting is None:
            return True, {"status": "starting", "role": "starting"}
        if self.role == "standby":
            expires = self.lease_expires_at
            return True, {"status": "standby", "role": "standby",
                          "lease_holder": self.lease_holder,
                          "lease_expires_in_s": None if expires is None
                          else round(expires - time.time(), 1)}
        now = time.monotonic()
        age = now - self.last_contact
        body: dict[str, Any] = {
            "status": "ok", "role": self.role, "seconds_since_broker_contact": round(age, 1),
            "seconds_since_records": None if self.last_records is None
            else round(now - self.last_records, 1),
            "seconds_since_commit": None if self.last_commit is None
            else round(now - self.last_commit, 1)}
        if self.waiting is not None:
            body["status"] = "waiting"
            body["reason"] = self.waiting
            return False, body
        if age > self.stall_after_s:
            body["status"] = "stalled"
            body["reason"] = (f"no successful poll, heartbeat or commit for {age:.0f} s "
                              f"(limit {self.stall_after_s:g} s): broker unreachable or stalled")
            return False, body
        return True, body


class LeaseKeeper:
    """Renews the writer lease every third of its TTL, on its own thread.

    Renewing from a thread keeps a long batch from losing the lease; a loop
    that is stuck for good is the liveness probe's business (``/healthz``).
    A store that cannot be written for a whole TTL ends the lease: the loop
    sees ``lease.held()`` turn false and stops publishing.
    """

    def __init__(self, lease: Any, health: Health) -> None:
        self.lease = lease
        self.health = health
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.lease.ttl_s / 3):
            try:
                if not self.lease.renew():
                    return  # lost for good: the loop is fenced at its next check
            except OSError as exc:
                log.warning("renewing the writer lease failed (%s): retrying", exc)


def serve_health(check: Callable[[], tuple[bool, dict[str, Any]]], registry: CollectorRegistry,
                 port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """``/healthz`` (200, or 503 with the reason) and ``/metrics`` on a daemon thread.

    503 means the worker cannot make progress: the broker stalled, or the topic
    it consumes does not exist yet (``status`` "stalled" or "waiting").
    """

    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # seconds a client may take to send its request (socket timeout)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                ok, body = check()
                data, ctype, code = json.dumps(body).encode(), "application/json", \
                    200 if ok else 503
            elif path == "/metrics":
                data, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
            else:
                data, ctype, code = b"not found", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="worker-health", daemon=True).start()
    return server


def run_with_health(worker: Any, cfg: WorkerSettings, port_offset: int = 0) -> int:
    """Run ``worker`` (a serial, pipelined or gang worker) with its ``/healthz`` and
    ``/metrics`` on ``cfg.metrics_port + port_offset`` (none when the port is 0); the
    process exit code: the worker's, or 3 when another writer fenced it."""
    if cfg.metrics_port:
        serve_health(worker.health.check, worker.metrics.registry,
                     cfg.metrics_port + port_offset, host=cfg.metrics_host)
    try:
        return int(worker.run())
    except Fenced as exc:
        log.error("fenced: %s", exc)
        return 3
