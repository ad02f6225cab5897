"""Shared pieces of the benchmarks: a broker, bulk produce, results and plots.

Every benchmark measures the product beside the limit it cannot beat, in the
same run, because this machine is shared and absolute figures drift.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream_rec import datasets
from stream_rec.broker import LocalBroker
from stream_rec.events import encode_event
from stream_rec.ingest.kafka import ensure_topics, make_producer
from stream_rec.settings import KafkaSettings

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
    import os

    import torch

    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


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
