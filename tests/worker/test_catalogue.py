"""The worker's catalogue stage on a real broker, with the real encoder's vectors.

* Feature extraction never blocks training: with every featurizer batch
  slowed down (the ``featurize`` failpoint), the worker learns a backlog of
  clicks as fast as without, while the catalogue is still being featurized.
* Versions record the catalogue's offsets at the oldest item not yet in the
  model: a worker stopped while items wait for the encoder reads them again
  on restart, and ends with every item announced.

The texts are encoded once for the module into a disk cache the workers
share, so no worker loads the encoder.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from stream_rec import faults
from stream_rec.content import catalogue_vectors
from stream_rec.events import encode_event
from stream_rec.ingest.kafka import ensure_topics, make_producer
from stream_rec.settings import ContentSettings, KafkaSettings, Settings
from stream_rec.snapshot import SnapshotStore
from stream_rec.worker import Worker
from tests.support import ROOT, wait_until

pytestmark = [pytest.mark.kafka]

N_ITEMS = 256          # four featurizer batches of 64
N_CLICKS = 30_000
WORDS = ["river", "castle", "robot", "garden", "storm", "violin", "desert", "harbor",
         "comet", "forest", "mirror", "engine", "island", "lantern", "meadow", "glacier"]


def _items(now_ms: int) -> list[dict]:
    return [{"item_id": f"i{k}", "title": f"The {WORDS[k % 16]} of {WORDS[(k // 16) % 16]}",
             "categories": [WORDS[(k * 7) % 16]], "ts": now_ms} for k in range(N_ITEMS)]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The workers run with one torch thread (a process-wide setting): put it back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def content_cfg(tmp_path_factory: pytest.TempPathFactory) -> ContentSettings:
    cfg = ContentSettings(model_dir=str(ROOT / "data" / "models"), device="cpu",
                          cache_dir=str(tmp_path_factory.mktemp("content")))
    vectors, _ = catalogue_vectors(_items(0), cfg)         # the encoder, once
    assert len(vectors) == N_ITEMS
    return cfg


def _settings(kafka_cfg: KafkaSettings, store: Path, content: ContentSettings) -> Settings:
    kafka = kafka_cfg.model_copy(update={"items_topic": kafka_cfg.topic + "-items"})
    return Settings(kafka=kafka, content=content,
                    model={"content_dim": 384, "dim": 32, "train_chunk": 500},
                    store={"path": str(store)},
                    worker={"publish_interval_ms": 50, "torch_threads": 1})


def _produce(settings: Settings, items: list[dict], clicks: int, now_ms: int) -> None:
    k = settings.kafka
    ensure_topics(k, [k.topic, k.items_topic])
    producer = make_producer(k)
    for it in items:
        producer.send(k.items_topic, key=it["item_id"].encode(), value=json.dumps(it).encode())
    rng = np.random.default_rng(1)
    for j in range(clicks):
        ev = {"user_id": f"u{int(rng.integers(300))}", "item_id": f"i{int(rng.integers(N_ITEMS))}",
              "ts": now_ms - clicks + j}
        producer.send(k.topic, key=ev["user_id"].encode(), value=encode_event(ev))
    producer.flush()
    producer.close()


class Running:
    """A worker on its own thread."""

    def __init__(self, settings: Settings) -> None:
        self.stop = threading.Event()
        self.worker = Worker(settings, stop=self.stop)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.started = time.monotonic()
        self.thread.start()

    def events(self) -> int:
        return self.worker.checkpoint.events if self.worker.version is not None else 0

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive()


def _learn_backlog(settings: Settings) -> tuple[float, float, int]:
    """(seconds from the first click learned to the last, seconds from then to a durable
    version holding them all, items announced by the time the last click was learned)."""
    run = Running(settings)
    try:
        wait_until(lambda: run.worker.checkpoint.events > 0, 60, 0.001, what="a first click")
        t0 = time.monotonic()
        wait_until(lambda: run.worker.checkpoint.events == N_CLICKS, 120, 0.001,
                   what="every click learned")
        t1 = time.monotonic()
        cat = run.worker.catalogue
        assert cat is not None
        announced = cat.announced
        store = SnapshotStore(settings.store.path)

        def served() -> bool:   # what a server polling the store sees
            latest = store.latest_version()
            return latest is not None and \
                store.read_manifest(latest).counts["events"] == N_CLICKS

        wait_until(served, 60, 0.005, what="a version holding every click")
        t2 = time.monotonic()
        wait_until(lambda: cat.announced >= N_ITEMS - 64, 120, what="the catalogue announced")
    finally:
        run.close()
    return t1 - t0, t2 - t1, announced


def test_a_slow_featurizer_never_holds_up_training(kafka_cfg: KafkaSettings, tmp_path: Path,
                                                   content_cfg: ContentSettings) -> None:
    took: dict[bool, tuple[float, float, int]] = {}
    for slow in (False, True):
        settings = _settings(kafka_cfg.model_copy(update={"topic": f"{kafka_cfg.topic}-{slow}"}),
                             tmp_path / f"store-{slow}", content_cfg)
        items = _items(int(time.time() * 1000))
        # a first part of the catalogue is in the model already, so both runs train with
        # text vectors from the first click on
        _produce(settings, items[:64], 0, 0)
        first = Running(settings)
        wait_until(lambda first=first: first.worker.catalogue is not None
                   and first.worker.catalogue.announced == 64, 60, what="a first part")
        first.close()
        _produce(settings, items[64:], N_CLICKS, int(time.time() * 1000))
        faults.arm("featurize=sleep:3" if slow else "")
        try:
            took[slow] = _learn_backlog(settings)
        finally:
            faults.arm("")
    (learn, lag, _), (slow_learn, slow_lag, announced) = took[False], took[True]
    print(f"{N_CLICKS} clicks learned in {learn:.2f} s, in a version {lag:.2f} s later; with "
          f"a featurizer that sleeps 3 s per batch: {slow_learn:.2f} s and {slow_lag:.2f} s "
          f"({announced} of {N_ITEMS - 64} items announced by then)")
    assert announced < N_ITEMS - 64     # every click was learned while items still waited
    assert slow_learn < 1.5 * learn + 0.5 and slow_lag < 1.5 * lag + 0.5, took


def test_waiting_items_are_read_again_after_a_restart(kafka_cfg: KafkaSettings, tmp_path: Path,
                                                      content_cfg: ContentSettings) -> None:
    settings = _settings(kafka_cfg, tmp_path / "store", content_cfg)
    items = _items(int(time.time() * 1000))
    _produce(settings, items, 1000, int(time.time() * 1000))
    faults.arm("featurize=sleep:2@2")        # the second batch is slow: stop meanwhile
    try:
        run = Running(settings)
        wait_until(lambda: run.worker.catalogue is not None
                   and 0 < run.worker.catalogue.announced < N_ITEMS
                   and run.events() == 1000, 60, 0.01, what="some items announced")
        run.close()
    finally:
        faults.arm("")
    store = SnapshotStore(settings.store.path)
    snap = store.load()
    assert snap is not None
    state, held = snap.state, snap.manifest.offsets[settings.kafka.items_topic]
    have = {i["item_id"] for i in items if state.item_row(i["item_id"]) is not None
            and state.tables["item.text"][state.item_row(i["item_id"])].any()}
    assert 0 < len(have) < N_ITEMS
    assert sum(held.values()) < N_ITEMS      # offsets stop at the items still waiting
    run = Running(settings)                  # restart: reads them again
    try:
        wait_until(lambda: run.worker.catalogue is not None
                   and run.worker.catalogue.announced > 0
                   and not run.worker.catalogue.waiting, 60, what="the rest announced")
        wait_until(lambda: not run.worker.checkpoint.dirty, 30, what="a version")
    finally:
        run.close()
    snap = store.load()
    assert snap is not None
    assert sum(snap.manifest.offsets[settings.kafka.items_topic].values()) == N_ITEMS
    st = snap.state
    assert all(st.tables["item.text"][st.item_row(i["item_id"])].any() for i in items)
    assert st.tables["user.events"].sum() == 1000           # clicks counted once
