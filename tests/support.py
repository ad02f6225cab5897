"""Helpers shared by the tests: processes, waiting, and a small trained state."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from stream_rec import datasets
from stream_rec.model import ModelConfig, ModelState, StreamingModel
from stream_rec.settings import KafkaSettings

ROOT = Path(__file__).resolve().parents[1]


def env_for(cfg: KafkaSettings, store: Path, **extra: str) -> dict[str, str]:
    """Environment for a ``stream-rec`` subprocess using ``cfg`` and ``store``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_REC_")}
    env.update({
        "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        "STREAM_REC_KAFKA__BOOTSTRAP": cfg.bootstrap,
        "STREAM_REC_KAFKA__TOPIC": cfg.topic,
        "STREAM_REC_KAFKA__GROUP_ID": cfg.group_id,
        "STREAM_REC_KAFKA__SESSION_TIMEOUT_MS": str(cfg.session_timeout_ms),
        "STREAM_REC_KAFKA__HEARTBEAT_INTERVAL_MS": str(cfg.heartbeat_interval_ms),
        "STREAM_REC_STORE__PATH": str(store),
        "STREAM_REC_CONFIG": str(ROOT / "configs" / "default.toml"),
    })
    env.update(extra)
    return env


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "stream_rec", *args], env=env,
                            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def wait_until(predicate, timeout_s: float, interval_s: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def trained_state(n: int = 600, seed: int = 0) -> ModelState:
    """A small state whose vectors were really trained (chunks of 100 events)."""
    model = StreamingModel(ModelConfig(dim=16, seed=seed, train_chunk=100), device="cpu")
    evs = list(itertools.islice(datasets.iter_synthetic(n_users=50, n_items=80, seed=seed), n))
    for chunk in range(0, n, 200):
        batch = evs[chunk:chunk + 200]
        model.learn([e["user_id"] for e in batch], [e["item_id"] for e in batch],
                    np.array([e["ts"] for e in batch], dtype=np.int64))
    return model.state()



def catches(proc: subprocess.Popen[bytes], sig: int) -> bool:
    """Has ``proc`` installed a handler for ``sig`` (its SigCgt mask, Linux)?"""
    try:
        with open(f"/proc/{proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except FileNotFoundError:
        pass
    return False
