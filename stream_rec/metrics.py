"""Prometheus metrics, built against an injected registry (no global state in tests)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stream_rec.events import DeadLetter, Reason

MS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("stream_rec_requests_total", "HTTP requests",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("stream_rec_request_seconds", "Request latency (s)",
                                 ["endpoint"], buckets=MS_BUCKETS, registry=r)
        self.version = Gauge("stream_rec_snapshot_version", "Version being served", registry=r)
        self.watermark = Gauge("stream_rec_snapshot_watermark_ms",
                               "Watermark of the served version (epoch ms)", registry=r)
        self.created = Gauge("stream_rec_snapshot_created_seconds",
                             "Creation time of the served version (epoch s)", registry=r)
        self.swaps = Counter("stream_rec_snapshot_swaps_total", "Versions swapped in",
                             registry=r)
        self.swap_seconds = Histogram("stream_rec_snapshot_load_seconds",
                                      "Time to load, verify and index a version",
                                      buckets=MS_BUCKETS + (5.0, 10.0), registry=r)
        self.refused = Counter("stream_rec_snapshot_refused_total",
                               "Versions refused as torn or corrupt", registry=r)

    def observe_swap(self, state: Any, seconds: float) -> None:
        self.swaps.inc()
        self.swap_seconds.observe(seconds)
        self.version.set(state.manifest.version)
        self.created.set(state.manifest.created_at)
        if state.manifest.watermark is not None:
            self.watermark.set(state.manifest.watermark)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter("stream_rec_worker_events_total", "Valid events applied",
                              registry=r)
        self.dead_letters = Counter("stream_rec_worker_dead_letters_total",
                                    "Messages sent to the dead-letter topic", ["reason"],
                                    registry=r)
        for code in Reason:  # every reason exported from the start, at 0
            self.dead_letters.labels(code.value)
        self.batches = Counter("stream_rec_worker_batches_total", "Micro-batches applied",
                               registry=r)
        self.batch_seconds = Histogram("stream_rec_worker_batch_seconds",
                                       "Decode + train + index time per batch",
                                       buckets=MS_BUCKETS, registry=r)
        self.publishes = Counter("stream_rec_worker_publishes_total", "Versions published",
                                 registry=r)
        self.publish_seconds = Histogram("stream_rec_worker_publish_seconds",
                                         "Time to write a version durably",
                                         buckets=MS_BUCKETS + (5.0, 10.0), registry=r)
        self.version = Gauge("stream_rec_worker_version", "Last version published", registry=r)
        self.watermark = Gauge("stream_rec_worker_watermark_ms", "Event-time watermark (ms)",
                               registry=r)
        self.last_poll = Gauge("stream_rec_worker_last_poll_seconds",
                               "Epoch time of the last successful poll", registry=r)
        self.users = Gauge("stream_rec_worker_users", "Known users", registry=r)
        self.items = Gauge("stream_rec_worker_items", "Known items", registry=r)

    def polled(self) -> None:
        self.last_poll.set(time.time())


def dead_letter_reason_label(err: DeadLetter | str) -> str:
    """The dead-letter metric's label: the letter's :class:`Reason` code, from a fixed set.

    Free text (a reason without its letter) is labelled ``other``: labels never
    come from message contents, so the metric's cardinality stays bounded.
    """
    return err.code.value if isinstance(err, DeadLetter) else Reason.OTHER.value
