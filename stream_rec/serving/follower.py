"""A server that follows the click topic: the overlay's feed.

One consumer per server process, without a consumer group: it assigns every
partition of the topic itself and starts at the offsets of the version being
served, decodes each poll with the worker's own contract
(:func:`~stream_rec.events.decode_columns`) and applies the accepted clicks to
the :class:`~stream_rec.serving.overlay.Overlay`. A server that cannot reach
the broker keeps answering from its versions and says so (``/readyz``).

Each replica reads the whole topic: the cost is one consumer's fetch and
decode per replica (about a core per 100 000 clicks/s, docs/OPERATIONS.md).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaError

from stream_rec.events import Contract, decode_columns
from stream_rec.events.config import EventSettings
from stream_rec.settings import KafkaSettings

from .overlay import Overlay

log = logging.getLogger(__name__)

RETRY_MAX_S = 10.0
QUIET_PROBE_S = 2.0       # no record for this long: check that the broker still answers
PROBE_TIMEOUT_MS = 3000
FETCH_WAIT_MS = 10


class TopicFollower:
    """Reads ``kafka.topic`` from the served version's offsets into ``overlay``.

    ``metrics`` (optional) gets ``overlay_lag``, ``overlay_applied`` and
    ``overlay_following`` updates from this thread.
    """

    def __init__(self, kafka: KafkaSettings, events: EventSettings, overlay: Overlay,
                 metrics: Any | None = None, poll_ms: int = 10,
                 partitions: list[int] | None = None) -> None:
        self.kafka = kafka
        self.partitions = None if partitions is None else set(partitions)
        self.contract = Contract(events)
        self.overlay = overlay
        self.metrics = metrics
        self.poll_ms = poll_ms
        self.following = False
        self.error: str | None = "not started"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="topic-follower", daemon=True)

    def start(self) -> TopicFollower:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def status(self) -> dict[str, Any]:
        """What ``/readyz`` says about the overlay."""
        return {"following": self.following, "topic": self.kafka.topic, "error": self.error,
                "reach": dict(self.overlay.reach), **self.overlay.stats()}

    def _run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            try:
                self._follow()
                return
            except Exception as exc:  # noqa: BLE001 -- whatever went wrong, answer from versions and retry
                self._set(False, f"{type(exc).__name__}: {exc}")
                log.warning("following %s failed (%s): answering from versions alone; "
                            "retrying in %.1f s", self.kafka.topic, exc, delay)
                self._stop.wait(delay)
                delay = min(RETRY_MAX_S, delay * 2)

    def _set(self, following: bool, error: str | None) -> None:
        self.following, self.error = following, error
        if self.metrics is not None:
            self.metrics.overlay_following.set(1 if following else 0)

    def _follow(self) -> None:
        from stream_rec.ingest.kafka import make_consumer

        while self.overlay.base is None:          # nothing to follow from until a version
            self.error = "waiting for a version to follow from"
            if self._stop.wait(0.05):
                return
        # A short request timeout: a probe of a broker that went away answers in seconds.
        # A fetch the broker holds while no record arrives returns as soon as one does,
        # but a short hold bounds what a click waits for when it is not the case.
        consumer = make_consumer(self.kafka, None, auto_offset_reset="earliest",
                                 request_timeout_ms=PROBE_TIMEOUT_MS,
                                 fetch_max_wait_ms=FETCH_WAIT_MS)
        try:
            parts = consumer.partitions_for_topic(self.kafka.topic)
            while not parts:
                self.error = f"topic {self.kafka.topic!r} does not exist yet"
                if self._stop.wait(1.0):
                    return
                parts = consumer.partitions_for_topic(self.kafka.topic)
            tps = [TopicPartition(self.kafka.topic, p) for p in sorted(parts)
                   if self.partitions is None or p in self.partitions]
            consumer.assign(tps)
            base: dict[int, int] = {}
            self._set(True, None)
            contact = time.monotonic()
            while not self._stop.is_set():
                base = self._seek_past_base(consumer, tps, base)
                got = consumer.poll(timeout_ms=self.poll_ms, max_records=5000)
                records = [r for recs in got.values() for r in recs]
                if records:
                    contact = time.monotonic()
                    applied = self.overlay.apply(decode_columns(records, self.contract))
                    if self.metrics is not None:
                        self.metrics.overlay_applied.inc(applied)
                elif time.monotonic() - contact > QUIET_PROBE_S:
                    # A broker that went away makes poll() return nothing, as an idle
                    # topic does: ask it something that needs an answer.
                    try:
                        consumer.end_offsets(tps)
                        contact = time.monotonic()
                        if not self.following:
                            log.info("following %s again", self.kafka.topic)
                            self._set(True, None)
                    except KafkaError as exc:
                        if self.following:
                            log.warning("the broker does not answer (%s): answering from "
                                        "versions alone", exc)
                        self._set(False, f"broker does not answer: {exc}")
                if self.metrics is not None:
                    self._observe(consumer, tps)
        finally:
            consumer.close(autocommit=False)

    def _seek_past_base(self, consumer: Any, tps: list[TopicPartition],
                        held: dict[int, int]) -> dict[int, int]:
        """Start where the served version ends, and skip what a newer one covers.

        A version behind where the follower is (an operator pinned an older
        one) means the clicks in between are missing: read them again.
        """
        base = self.overlay.base or {}
        if base == held:
            return held
        for tp in tps:
            want = base.get(tp.partition, 0)
            pos = consumer.position(tp) if held else None
            if pos is None or want > pos or want < held.get(tp.partition, 0):
                consumer.seek(tp, want)
        return dict(base)

    def _observe(self, consumer: Any, tps: list[TopicPartition]) -> None:
        total = 0
        for tp in tps:
            high = consumer.highwater(tp)
            if high is not None:
                total += max(0, high - self.overlay.reach.get(tp.partition, 0))
        self.metrics.overlay_lag.set(total)
        stats = self.overlay.stats()
        self.metrics.overlay_users.set(stats["users"])
        self.metrics.overlay_events.set(stats["events"])


def wait_following(follower: TopicFollower, timeout_s: float) -> bool:
    """For tests and start-up scripts: has the follower connected within ``timeout_s``?"""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if follower.following:
            return True
        time.sleep(0.02)
    return False
