"""Shared pieces of the benchmarks: a broker, bulk produce, results and plots.

Every benchmark measures the product beside the limit it cannot beat, in the
same run, because this machine is shared and absolute figures drift.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream_rec import datasets
from stream_rec.broker import LocalBroker, free_port, stop_process, wait_for_port
from stream_rec.events import encode_event
from stream_rec.ingest.kafka import ensure_topics, make_producer
from stream_rec.settings import KafkaSettings
from stream_rec.snapshot import CorruptSnapshot, SnapshotStore

RESULTS = ROOT / "docs" / "results"
PLOTS = ROOT / "docs" / "img"


@contextlib.contextmanager
def broker(bootstrap: str | None) -> Iterator[str]:
    """An external bootstrap if given, else a fresh local broker for this run."""
    if bootstrap:
        yield bootstrap
        return
    with LocalBroker() as b:
        yield b.bootstrap


def settings_env(assignments: list[str]) -> dict[str, str]:
    """``section.key=value`` flags as the environment variables the processes read
    (``STREAM_REC_SECTION__KEY``): any setting, including ones newer than this script."""
    env = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set wants section.key=value, got {item!r}")
        env["STREAM_REC_" + key.strip().upper().replace(".", "__")] = value
    return env


@dataclass
class Pipeline:
    """A worker and a server running as separate processes on one topic and store."""

    cfg: KafkaSettings
    store_path: Path
    port: int
    procs: list[subprocess.Popen[bytes]]
    work: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        """Until the server answers from a version (the worker has joined and published)."""
        import httpx

        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.base_url, timeout=2.0) as client:
            while client.get("/readyz").status_code != 200:
                dead = [p for p in self.procs if p.poll() is not None]
                if dead or time.monotonic() > deadline:
                    raise SystemExit(f"no version served within {timeout_s:.0f} s; "
                                     f"logs in {self.work}")
                time.sleep(0.1)


@contextlib.contextmanager
def pipeline(bootstrap: str, name: str, env_extra: dict[str, str] | None = None,
             partitions: int = 4) -> Iterator[Pipeline]:
    """``stream-rec worker`` and ``stream-rec serve`` on a fresh topic and store.

    The worker trains on the CPU with short group timeouts (a quick join);
    ``env_extra`` (settings as environment variables) goes last, so it wins.
    Logs are in the temporary directory named by :attr:`Pipeline.work`.
    """
    work = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    cfg = KafkaSettings(bootstrap=bootstrap, topic=f"{name}-{uuid.uuid4().hex[:8]}",
                        group_id=f"bench-{uuid.uuid4().hex[:6]}")
    ensure_topics(cfg, [cfg.topic, cfg.dlq_topic], partitions=partitions)
    store_path = work / "store"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "STREAM_REC_KAFKA__BOOTSTRAP": bootstrap, "STREAM_REC_KAFKA__TOPIC": cfg.topic,
           "STREAM_REC_KAFKA__GROUP_ID": cfg.group_id,
           "STREAM_REC_KAFKA__SESSION_TIMEOUT_MS": "2000",
           "STREAM_REC_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
           "STREAM_REC_STORE__PATH": str(store_path), "STREAM_REC_SERVE__PORT": str(port),
           "STREAM_REC_WORKER__DEVICE": "cpu", "STREAM_REC_LOG_LEVEL": "WARNING",
           **(env_extra or {})}
    procs = [subprocess.Popen([sys.executable, "-m", "stream_rec", role], env=env,
                              stdout=open(work / f"{role}.log", "wb"),  # noqa: SIM115
                              stderr=subprocess.STDOUT, cwd=ROOT)
             for role in ("worker", "serve")]
    try:
        wait_for_port("127.0.0.1", port, 60, procs[1])
        yield Pipeline(cfg, store_path, port, procs, work)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            stop_process(p)


# ---- what an answer covers: the offsets of its version, or what it states itself ----
def parse_offsets(raw: Any, topic: str) -> dict[int, int] | None:
    """``{partition: next offset}`` from ``raw``, either that or ``{topic: that}``."""
    if not isinstance(raw, dict):
        return None
    if isinstance(raw.get(topic), dict):
        raw = raw[topic]
    try:
        return {int(p): int(o) for p, o in raw.items()}
    except (TypeError, ValueError):
        return None


class VersionOffsets:
    """The offsets each served version includes, read once from its manifest."""

    def __init__(self, store: SnapshotStore, topic: str) -> None:
        self.store = store
        self.topic = topic
        self.cache: dict[int, dict[int, int] | None] = {}

    def get(self, version: int) -> dict[int, int] | None:
        if version not in self.cache:
            try:
                m = self.store.read_manifest(version)
                self.cache[version] = parse_offsets(m.offsets, self.topic) or {}
            except (CorruptSnapshot, OSError, ValueError):  # pruned: unknown, not "nothing"
                self.cache[version] = None
        return self.cache[version]


def answer_offsets(body: dict[str, Any], versions: VersionOffsets, topic: str
                   ) -> dict[str, dict[int, int]]:
    """What an answer says it includes, by source, each ``{partition: first offset not
    included}``: ``version`` (its manifest), ``answer`` (a top-level ``offsets``), ``overlay``
    (``overlay.offsets``, from a server that follows the topic between versions). Empty when
    nothing is known (the version's manifest was pruned before it was read)."""
    out: dict[str, dict[int, int]] = {}
    if "version" in body and (v := versions.get(int(body["version"]))) is not None:
        out["version"] = v
    if (stated := parse_offsets(body.get("offsets"), topic)) is not None:
        out["answer"] = stated
    overlay = body.get("overlay")
    if isinstance(overlay, dict) and (ov := parse_offsets(overlay.get("offsets"), topic)):
        out["overlay"] = ov
    return out


def covering(sources: dict[str, dict[int, int]], partition: int, offset: int) -> str | None:
    """The first source (as :func:`answer_offsets` names them) including that record, if any."""
    for name, offsets in sources.items():
        if offset < offsets.get(partition, 0):
            return name
    return None


def merged(sources: dict[str, dict[int, int]]) -> dict[int, int]:
    """Per partition, the furthest any source reaches."""
    out: dict[int, int] = {}
    for offsets in sources.values():
        for p, o in offsets.items():
            out[p] = max(out.get(p, 0), o)
    return out


def ml100k_events(n: int) -> list[dict[str, Any]]:
    """``n`` events: MovieLens-100K in time order, repeated with shifted ids if needed."""
    data = datasets.load_ml100k()
    out: list[dict[str, Any]] = []
    for rnd in itertools.count():
        for row in data:
            if len(out) == n:
                return out
            out.append({"user_id": int(row["user"]) + rnd * 10_000,
                        "item_id": int(row["item"]), "ts": int(row["ts"]) + rnd, "event": "click"})
    return out


def produce_bulk(cfg: KafkaSettings, events: list[dict[str, Any]], partitions: int = 4
                 ) -> float:
    """Produce ``events`` as fast as the client allows; returns seconds taken."""
    ensure_topics(cfg, [cfg.topic, cfg.dlq_topic], partitions=partitions)
    producer = make_producer(cfg, linger_ms=20, batch_size=256 * 1024, acks=1)
    t0 = time.perf_counter()
    for ev in events:
        producer.send(cfg.topic, key=str(ev["user_id"]).encode(), value=encode_event(ev))
    producer.flush()
    producer.close()
    return time.perf_counter() - t0


def machine() -> dict[str, Any]:
    import torch

    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(),
            "load_avg_1_5_15m": [round(x, 2) for x in os.getloadavg()]}


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**result, "machine": machine(),
                                "when": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2) + "\n")
    return path


def percentiles(values: list[float] | np.ndarray, qs: tuple[int, ...] = (50, 95, 99)
                ) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {f"p{q}": float("nan") for q in qs}
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


def plot(filename: str, draw: Any) -> Path | None:
    """Render a PNG into docs/img with ``draw(ax)``; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: plot skipped", file=sys.stderr)
        return None
    PLOTS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    draw(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = PLOTS / filename
    fig.savefig(path)
    plt.close(fig)
    return path
