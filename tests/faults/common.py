"""Shared pieces of the fault-injection suite: a steady producer and the exactly-once checker.

The checker follows Kafka's system tests and Flink's exactly-once tests: what
was produced (acknowledged by the broker) is compared with what the final
published state contains, per user and per item.
"""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path
from typing import Any

from stream_rec import datasets
from stream_rec.events import encode_event
from stream_rec.ingest.kafka import make_producer
from stream_rec.settings import KafkaSettings
from stream_rec.snapshot import SnapshotStore

# A small model keeps a worker's start and its batches cheap on a shared machine.
SMALL_MODEL = {
    "STREAM_REC_MODEL__DIM": "8",
    "STREAM_REC_MODEL__NEGATIVES": "32",
    "STREAM_REC_MODEL__REPLAY": "200",
    "STREAM_REC_MODEL__REPLAY_PER_STEP": "50",
    "STREAM_REC_WORKER__PUBLISH_INTERVAL_MS": "100",
    "STREAM_REC_WORKER__BATCH_MAX_EVENTS": "200",
    "STREAM_REC_WORKER__FULL_EVERY_VERSIONS": "4",
    "STREAM_REC_WORKER__DEVICE": "cpu",
}


class Feeder:
    """Produces synthetic events at a steady rate on a thread, recording each acknowledged one."""

    def __init__(self, cfg: KafkaSettings, rate: float, limit: int | None = None,
                 seed: int = 11) -> None:
        self.cfg = cfg
        self.rate = rate
        self.limit = limit
        self.seed = seed
        self.stop = threading.Event()
        self.acked: list[tuple[str, str]] = []  # (user, item) of every acknowledged event
        self.ends: dict[int, int] = {}  # partition -> next offset after the last acked event
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)

    def start(self) -> Feeder:
        self._thread.start()
        return self

    def _run(self) -> None:
        producer = make_producer(self.cfg)
        pending = []
        t0 = time.monotonic()
        for n, ev in enumerate(datasets.iter_synthetic(seed=self.seed)):
            if self.stop.is_set() or (self.limit is not None and n >= self.limit):
                break
            fut = producer.send(self.cfg.topic, key=ev["user_id"].encode(),
                                value=encode_event(ev))
            pending.append((fut, ev["user_id"], ev["item_id"]))
            ahead = t0 + (n + 1) / self.rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        producer.flush()
        for fut, user, item in pending:
            md = fut.get(60)
            self.acked.append((user, item))
            self.ends[md.partition] = max(self.ends.get(md.partition, 0), md.offset + 1)
        producer.close()

    def finish(self, timeout_s: float = 120) -> None:
        self.stop.set()
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the producer did not finish"

    def join(self, timeout_s: float = 120) -> None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the producer did not finish"


def send_acked(cfg: KafkaSettings, events: list[dict], partition: int | None = None,
               producer: Any = None) -> tuple[list[tuple[str, str]], dict[int, int]]:
    """Send ``events`` keyed by user (to ``partition`` if given) and wait for every ack.

    Returns the (user, item) of each acknowledged event and each partition's
    next offset after them; any send that fails raises.
    """
    own = producer is None
    producer = producer or make_producer(cfg)
    futures = [(producer.send(cfg.topic, key=ev["user_id"].encode(), value=encode_event(ev),
                              partition=partition), ev) for ev in events]
    producer.flush()
    acked: list[tuple[str, str]] = []
    ends: dict[int, int] = {}
    for fut, ev in futures:
        md = fut.get(30)
        acked.append((ev["user_id"], ev["item_id"]))
        ends[md.partition] = max(ends.get(md.partition, 0), md.offset + 1)
    if own:
        producer.close()
    return acked, ends


def published_offsets(store: SnapshotStore, topic: str) -> dict[int, int]:
    version = store.latest_version()
    if version is None:
        return {}
    return store.read_manifest(version).offsets.get(topic, {})


def caught_up(store_path: Path, topic: str, ends: dict[int, int]) -> bool:
    """Does the latest published version include every offset in ``ends``?"""
    got = published_offsets(SnapshotStore(store_path), topic)
    return all(got.get(p, 0) >= end for p, end in ends.items())


def applied_counts(store_path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Per-user and per-item event counts in the latest published state."""
    snap = SnapshotStore(store_path).load()
    assert snap is not None, "nothing was published"
    st = snap.state
    users = {u: int(n) for u, n in zip(st.user_ids, st.tables["user.events"]) if u and n}
    items = {i: int(n) for i, n in zip(st.item_ids, st.tables["item.events"]) if i and n}
    return users, items


def assert_exactly_once(store_path: Path, acked: list[tuple[str, str]]) -> int:
    """Every acknowledged event is applied exactly once; returns the number applied."""
    users, items = applied_counts(store_path)
    want_users = collections.Counter(u for u, _ in acked)
    want_items = collections.Counter(i for _, i in acked)
    assert users == dict(want_users), _diff(users, want_users)
    assert items == dict(want_items), _diff(items, want_items)
    return sum(users.values())


def _diff(got: dict[str, int], want: collections.Counter) -> str:
    keys = sorted(set(got) | set(want), key=lambda k: got.get(k, 0) - want.get(k, 0))
    bad = [(k, got.get(k, 0), want.get(k, 0)) for k in keys if got.get(k, 0) != want.get(k, 0)]
    total = sum(got.values()) - sum(want.values())
    return f"applied minus produced = {total}; first differences (id, got, want): {bad[:8]}"
