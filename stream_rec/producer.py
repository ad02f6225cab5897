"""``stream-rec produce``: push events to the clicks topic at a chosen rate.

Sources: MovieLens-100K in timestamp order, a JSONL/CSV file, or the synthetic
generator with a planted preference structure. The key is the user id, so a
user's events stay in order on one partition. With ``--items`` the dataset's
catalogue (item metadata) goes to the catalogue topic instead, keyed by item id.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from kafka.errors import KafkaError

from stream_rec import datasets
from stream_rec.errors import Fatal, describe
from stream_rec.events import encode_event
from stream_rec.ingest.kafka import make_producer, require_topics
from stream_rec.settings import KafkaSettings

log = logging.getLogger(__name__)


def open_source(source: str, *, seed: int = 0) -> Iterator[dict[str, Any] | bytes]:
    """``ml-100k``, ``synthetic`` or a path to a .jsonl/.json/.csv file."""
    if source == "ml-100k":
        return datasets.iter_ml100k()
    if source == "synthetic":
        return datasets.iter_synthetic(seed=seed)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no such dataset or file: {source!r} "
                                "(use ml-100k, synthetic or a .jsonl/.csv path)")
    return datasets.iter_file(path)


class ProduceFailed(Fatal):
    """Some events were not acknowledged by the broker."""


class SendCheck:
    """Counts sends that failed, when refused or once the broker answered (sender thread)."""

    def __init__(self) -> None:
        self.failed = 0
        self.first: BaseException | None = None
        self._lock = threading.Lock()

    def failure(self, exc: BaseException) -> None:
        with self._lock:
            self.failed += 1
            if self.first is None:
                self.first = exc


def open_item_source(source: str) -> Iterator[dict[str, Any] | bytes]:
    """Catalogue items of ``ml-100k``, or of a .jsonl/.csv file of item objects."""
    if source == "ml-100k":
        return datasets.iter_ml100k_items()
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no such catalogue: {source!r} (use ml-100k or a .jsonl path)")
    return datasets.iter_file(path)


class RateLimiter:
    """Paces a loop to ``rate`` iterations per second (0 = unlimited) without drift."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.start = time.perf_counter()
        self.n = 0

    def wait(self) -> None:
        if not self.interval:
            return
        self.n += 1
        ahead = self.start + self.n * self.interval - time.perf_counter()
        if ahead > 0.0005:
            time.sleep(ahead)


def produce(cfg: KafkaSettings, events: Iterable[dict[str, Any] | bytes], *,
            limit: int | None = None, rate: float = 0.0, stamp: bool = True,
            progress: bool | None = None,
            on_sent: Callable[[dict[str, Any] | bytes, Any], None] | None = None,
            topic: str | None = None, key_field: str = "user_id") -> int:
    """Send ``events`` (dicts, or raw bytes passed through as they are); returns the count.

    ``stamp`` adds ``produced_at`` (epoch seconds) for end-to-end latency
    measurement; ``on_sent(event, future)`` sees each send's future. Every send
    is checked: if any was refused or not acknowledged, :class:`ProduceFailed`
    says how many (after the rest were sent). ``topic`` (default ``cfg.topic``)
    and ``key_field`` (the field whose value keys the message) let the same loop
    send the catalogue: items go to ``cfg.items_topic`` keyed by ``item_id``, so
    an item's updates stay in order on one partition.
    """
    topic = topic or cfg.topic
    require_topics(cfg, [topic, topic + cfg.dlq_suffix])
    producer = make_producer(cfg)
    stream = itertools.islice(events, limit) if limit else events
    show_bar = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show_bar:
        from tqdm import tqdm

        bar = tqdm(total=limit, unit="ev", desc=f"produce → {topic}", smoothing=0.1)
    pacer = RateLimiter(rate)
    check = SendCheck()
    n = 0
    t0 = last_log = time.monotonic()
    try:
        for ev in stream:
            if isinstance(ev, (bytes, bytearray)):
                key, value = None, bytes(ev)
            else:
                if stamp:
                    ev = {**ev, "produced_at": time.time()}
                kid = ev.get(key_field)
                key = None if kid is None else str(kid).encode()
                value = encode_event(ev)
            n += 1
            try:
                future = producer.send(topic, key=key, value=value)
            except KafkaError as exc:  # refused before sending (size, metadata timeout)
                check.failure(exc)
            else:
                future.add_errback(check.failure)
                if on_sent:
                    on_sent(ev, future)
            if bar is not None:
                bar.update(1)
            elif time.monotonic() - last_log >= 5:
                last_log = time.monotonic()
                log.info("produced %d events (%.0f ev/s)", n, n / (last_log - t0))
            pacer.wait()
        producer.flush()
    finally:
        producer.close(timeout=10)
        if bar is not None:
            bar.close()
    if check.failed:
        raise ProduceFailed(f"{check.failed} of {n} events could not be sent to {topic} "
                            f"(first error: {describe(check.first)})")
    elapsed = time.monotonic() - t0
    log.info("produced %d events to %s in %.1f s (%.0f ev/s)", n, topic, elapsed,
             n / elapsed if elapsed else 0.0)
    return n
