"""The gang's worker loop, two ranks as threads of this process, on the real broker.

The process gang (``stream-rec worker --procs``, ``tests/faults/test_gang.py``)
runs the same :class:`GangWorker` over torch.distributed; here the ranks share
a :class:`ThreadExchange`, so a test can reach into them: commits land in the
live group for every partition, and a model made non-finite is never
published -- every rank returns to the newest version and dead-letters what it
read since.
"""

from __future__ import annotations

import collections
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from kafka import TopicPartition

from stream_rec import datasets
from stream_rec.ingest.kafka import ensure_topics, make_consumer, topic_end_offsets
from stream_rec.model.exchange import ThreadExchange
from stream_rec.model.gang import GangModel
from stream_rec.settings import KafkaSettings, Settings
from stream_rec.snapshot import SnapshotStore
from stream_rec.worker.gang import GangWorker
from tests.faults.common import applied_counts, caught_up, send_acked
from tests.support import wait_until

pytestmark = pytest.mark.kafka


def _settings(kafka: KafkaSettings, store: Path) -> Settings:
    s = Settings()
    s.kafka = kafka
    s.store.path = str(store)
    s.model.dim, s.model.negatives, s.model.train_chunk = 8, 16, 300
    s.model.replay, s.model.replay_per_step = 200, 50
    s.worker.device, s.worker.torch_threads = "cpu", 1
    s.worker.batch_max_events, s.worker.publish_interval_ms = 200, 100
    s.worker.full_every_versions = 4
    return s


class Gang:
    """Two ranks on threads; ``stop()`` asks both to finish and waits for them."""

    def __init__(self, settings: Settings, world: int = 2) -> None:
        self.stop_event = threading.Event()
        self.workers: list[GangWorker] = []
        self.result: list[int] = []
        self._thread = threading.Thread(target=self._run, args=(settings, world), daemon=True)
        self._thread.start()

    def _run(self, settings: Settings, world: int) -> None:
        def body(ex: ThreadExchange) -> int:
            w = GangWorker(settings.model_copy(deep=True), ex, stop=self.stop_event)
            self.workers.append(w)
            return w.run()

        self.result = ThreadExchange.run(world, body)

    def stop(self) -> list[int]:
        self.stop_event.set()
        self._thread.join(120)
        assert not self._thread.is_alive()
        return self.result


def _events(n: int, seed: int) -> list[dict]:
    it = datasets.iter_synthetic(n_users=80, n_items=120, seed=seed)
    return [next(it) for _ in range(n)]


def _committed(kafka: KafkaSettings, partitions: list[int]) -> dict[int, int | None]:
    consumer = make_consumer(kafka, kafka.group_id)
    try:
        return {p: consumer.committed(TopicPartition(kafka.topic, p)) for p in partitions}
    finally:
        consumer.close()


def test_a_gang_commits_every_partition_under_the_group_and_stops_on_request(
        kafka_cfg: KafkaSettings, tmp_path: Path) -> None:
    ensure_topics(kafka_cfg, [kafka_cfg.topic, kafka_cfg.dlq_topic], partitions=4)
    store = tmp_path / "store"
    gang = Gang(_settings(kafka_cfg, store))
    acked, ends = send_acked(kafka_cfg, _events(1500, seed=1))
    wait_until(lambda: caught_up(store, kafka_cfg.topic, ends), 60, what="the gang to catch up")
    assert gang.stop() == [0, 0]
    users, items = applied_counts(store)
    assert users == dict(collections.Counter(u for u, _ in acked))
    assert items == dict(collections.Counter(i for _, i in acked))
    ends = topic_end_offsets(kafka_cfg, kafka_cfg.topic)
    assert _committed(kafka_cfg, sorted(ends)) == ends   # lag is visible, and zero
    assert [w.source.partitions for w in sorted(gang.workers, key=lambda w: w.rank)] == \
        [[0, 2], [1, 3]]


def test_a_model_made_non_finite_is_never_published_by_a_gang(
        kafka_cfg: KafkaSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ensure_topics(kafka_cfg, [kafka_cfg.topic, kafka_cfg.dlq_topic], partitions=4)
    store = tmp_path / "store"
    poison = threading.Event()
    poisoned: set[int] = set()
    learn_round = GangModel.learn_round

    def diverging(self: GangModel, *args, **kwargs):   # training "diverges" once, on request
        out = learn_round(self, *args, **kwargs)
        if poison.is_set() and self.rank not in poisoned:
            poisoned.add(self.rank)
            self.params.item_out[0] = float("nan")
        return out

    monkeypatch.setattr(GangModel, "learn_round", diverging)
    gang = Gang(_settings(kafka_cfg, store))
    first, ends = send_acked(kafka_cfg, _events(600, seed=2))
    wait_until(lambda: caught_up(store, kafka_cfg.topic, ends), 60, what="the first events")
    poison.set()
    second, ends = send_acked(kafka_cfg, _events(600, seed=3))
    wait_until(lambda: caught_up(store, kafka_cfg.topic, ends), 60, what="the poisoned events")
    third, ends = send_acked(kafka_cfg, _events(600, seed=4))
    wait_until(lambda: caught_up(store, kafka_cfg.topic, ends), 60, what="the last events")
    assert gang.stop() == [0, 0]
    assert poisoned == {0, 1}

    reader = make_consumer(kafka_cfg, None)
    reader.assign([TopicPartition(kafka_cfg.dlq_topic, p)
                   for p in sorted(reader.partitions_for_topic(kafka_cfg.dlq_topic))])
    reader.seek_to_beginning()
    letters = []
    while batch := reader.poll(timeout_ms=2000):
        letters += [r for recs in batch.values() for r in recs]
    reader.close()
    assert letters, "nothing was dead-lettered"
    reasons = {dict(r.headers).get("error.reason", b"").decode() for r in letters}
    assert all("non-finite" in r for r in reasons), reasons
    dropped = [(v["user_id"], v["item_id"]) for v in (json.loads(r.value) for r in letters)]
    users, items = applied_counts(store)
    everything = first + second + third
    assert collections.Counter(users) + collections.Counter(u for u, _ in dropped) == \
        collections.Counter(u for u, _ in everything)
    assert collections.Counter(items) + collections.Counter(i for _, i in dropped) == \
        collections.Counter(i for _, i in everything)
    state = SnapshotStore(store).load().state
    assert all(np.isfinite(t).all() for n, t in state.tables.items()
               if t.dtype.kind == "f" and n != "item.pop_log")
