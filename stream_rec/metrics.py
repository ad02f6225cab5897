"""Prometheus metrics, built against an injected registry (no global state in tests).

Several server processes (``serve.workers`` > 1) share one port, and a scrape
reaches whichever accepts it. So that every scrape answers the same totals,
those processes run prometheus_client's multiprocess mode: each writes its
values to files in one directory (``PROMETHEUS_MULTIPROC_DIR``, set by
``serve()`` before any worker process starts) and ``/metrics`` merges the
files of all of them. Counters and histograms are summed, including those of
processes that have exited, so totals never go back; gauges take the minimum
over live processes (``livemin``): the version, watermark and creation time a
pod serves are those of its stalest process.
"""

from __future__ import annotations

import glob
import os
import re
import time
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

from stream_rec.events import DeadLetter, Reason

MS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Ages along the freshness path (s): sub-second when keeping up, minutes to hours in a backlog.
AGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db$")


class ServingMetrics:
    """A server process's metrics; with ``multiprocess_dir``, merged with its siblings'.

    ``multiprocess_dir`` must be the ``PROMETHEUS_MULTIPROC_DIR`` that
    prometheus_client saw when it was imported (it picks where values live
    then, once per process).
    """

    def __init__(self, registry: CollectorRegistry | None = None,
                 multiprocess_dir: str | None = None) -> None:
        if multiprocess_dir is not None and not getattr(values.ValueClass, "_multiprocess",
                                                        False):
            raise RuntimeError("multiprocess metrics need PROMETHEUS_MULTIPROC_DIR set before "
                               "prometheus_client is imported")
        self.multiprocess_dir = multiprocess_dir
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("stream_rec_requests_total", "HTTP requests",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("stream_rec_request_seconds", "Request latency (s)",
                                 ["endpoint"], buckets=MS_BUCKETS, registry=r)
        self.version = Gauge("stream_rec_snapshot_version", "Version being served",
                             multiprocess_mode="livemin", registry=r)
        self.watermark = Gauge("stream_rec_snapshot_watermark_ms",
                               "Watermark of the served version (epoch ms)",
                               multiprocess_mode="livemin", registry=r)
        self.created = Gauge("stream_rec_snapshot_created_seconds",
                             "Creation time of the served version (epoch s)",
                             multiprocess_mode="livemin", registry=r)
        self.swaps = Counter("stream_rec_snapshot_swaps_total", "Versions swapped in",
                             registry=r)
        self.swap_seconds = Histogram("stream_rec_snapshot_load_seconds",
                                      "Time to load, verify and index a version",
                                      buckets=MS_BUCKETS + (5.0, 10.0), registry=r)
        self.refused = Counter("stream_rec_snapshot_refused_total",
                               "Versions refused as torn or corrupt", registry=r)
        # The serving end of freshness: how long after the worker created a version this
        # server answered from it (clocks of worker and server hosts must agree, NTP).
        self.visible_delay = Histogram("stream_rec_snapshot_visible_delay_seconds",
                                       "Version created (worker) → swapped in here (s)",
                                       buckets=AGE_BUCKETS, registry=r)
        # The overlay: clicks read from the topic past the served version (serving/overlay.py).
        self.overlay_following = Gauge("stream_rec_overlay_following",
                                       "1 while the server reads the click topic", registry=r)
        self.overlay_applied = Counter("stream_rec_overlay_applied_total",
                                       "Clicks applied to the overlay", registry=r)
        self.overlay_lag = Gauge("stream_rec_overlay_lag_records",
                                 "Clicks in the topic the overlay has not read yet", registry=r)
        self.overlay_users = Gauge("stream_rec_overlay_users",
                                   "Users with clicks in the overlay", registry=r)
        self.overlay_events = Gauge("stream_rec_overlay_events",
                                    "Clicks held by the overlay (past the served version)",
                                    registry=r)

    def observe_swap(self, state: Any, seconds: float) -> None:
        created = state.manifest.created_at
        if created:
            self.visible_delay.observe(max(0.0, time.time() - created))
        self.swaps.inc()
        self.swap_seconds.observe(seconds)
        self.version.set(state.manifest.version)
        self.created.set(state.manifest.created_at)
        if state.manifest.watermark is not None:
            self.watermark.set(state.manifest.watermark)


    def collected(self) -> CollectorRegistry:
        """What ``/metrics`` shows: this process's registry, or all processes' files merged.

        Live-gauge files of processes that no longer run are removed first
        (their counters stay: what they counted happened).
        """
        if self.multiprocess_dir is None:
            return self.registry
        for path in glob.glob(os.path.join(self.multiprocess_dir, "gauge_live*_*.db")):
            m = _LIVE_GAUGE_FILE.search(path)
            if m and not _alive(int(m.group(1))):
                multiprocess.mark_process_dead(int(m.group(1)), self.multiprocess_dir)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=self.multiprocess_dir)
        return merged

    def exposition(self) -> bytes:
        """The body of ``/metrics`` (Prometheus text format)."""
        return generate_latest(self.collected())

    def exited(self) -> None:
        """This process stops serving: its gauges leave the merged view (multiprocess only)."""
        if self.multiprocess_dir is not None:
            multiprocess.mark_process_dead(os.getpid(), self.multiprocess_dir)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


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
        self.lag = Gauge("stream_rec_worker_lag_records",
                         "Records in the partition not yet applied by this worker "
                         "(high watermark - next offset to apply)", ["partition"], registry=r)
        # The ingest end of freshness: Kafka record timestamp (producer's CreateTime, or
        # the broker's LogAppendTime) → fetched by the worker. Grows with a backlog.
        self.fetch_age = Histogram("stream_rec_worker_fetch_age_seconds",
                                   "Age of the oldest record of each poll when fetched (s)",
                                   buckets=AGE_BUCKETS, registry=r)
        self._lag_partitions: set[int] = set()

    def polled(self, consumer: Any = None, applied: dict[int, int] | None = None,
               got: dict[Any, list[Any]] | None = None) -> None:
        """After every poll, on the polling thread (the consumer is not thread-safe).

        ``applied`` maps partition → next offset to apply; ``got`` is what the
        poll returned. Lag uses only the high watermarks the consumer already
        holds from fetch responses, so this sends nothing to the broker.
        """
        now = time.time()
        self.last_poll.set(now)
        if got:
            # Records without a timestamp (-1: a pre-0.10 message format) carry no age.
            stamps = [ts for recs in got.values() for r in recs[:1]
                      if (ts := getattr(r, "timestamp", None)) is not None and ts > 0]
            if stamps:
                self.fetch_age.observe(max(0.0, now - min(stamps) / 1000.0))
        highwater = getattr(consumer, "highwater", None)  # only KafkaConsumer has one
        if highwater is None or applied is None:
            return
        seen: set[int] = set()
        for tp in consumer.assignment():
            high = highwater(tp)
            if high is None:
                continue
            seen.add(tp.partition)
            self.lag.labels(str(tp.partition)).set(max(0, high - applied.get(tp.partition, 0)))
        for gone in self._lag_partitions - seen:  # revoked: its lag is another worker's now
            self.lag.remove(str(gone))
        self._lag_partitions = seen


def dead_letter_reason_label(err: DeadLetter | str) -> str:
    """The dead-letter metric's label: the letter's :class:`Reason` code, from a fixed set.

    Free text (a reason without its letter) is labelled ``other``: labels never
    come from message contents, so the metric's cardinality stays bounded.
    """
    return err.code.value if isinstance(err, DeadLetter) else Reason.OTHER.value
