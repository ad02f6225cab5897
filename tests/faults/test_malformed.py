"""Hostile input: generated malformed messages never crash decoding or the worker.

Unit level, a property over generated messages: ``parse_event`` either returns
an event or raises ``InvalidEvent`` with a reason, nothing else, and
``decode_batch`` keeps every good message around the bad ones. Broker level,
one worker run over a topic mixing generated bad messages with good ones:
every bad one reaches the dead-letter topic with a reason and every good one
is applied exactly once.
"""

from __future__ import annotations

import collections
import math
import random
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import TopicPartition

from stream_rec.events import InvalidEvent, decode_batch, encode_event, parse_event
from stream_rec.ingest.kafka import ensure_topics, make_consumer, make_producer
from stream_rec.settings import KafkaSettings
from stream_rec.snapshot import SnapshotStore
from stream_rec.worker.checkpoint import non_finite_tables
from tests.faults.common import SMALL_MODEL, assert_exactly_once, caught_up
from tests.support import env_for, spawn, wait_until

pytestmark = [pytest.mark.faults]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)
good_id = st.one_of(st.text(min_size=1, max_size=20), st.integers(0, 10**9))
# Event times the contract accepts: from its earliest time (1990) up to the clock.
good_ts = st.integers(631_152_000_000, int(time.time() * 1000))
good_event = st.fixed_dictionaries(
    {"user_id": good_id, "item_id": good_id, "ts": good_ts},
    optional={"event": st.sampled_from(["click", "view", "like", "purchase"]),
              "weight": st.floats(0.001, 100), "extra": json_values})


def _bad_messages() -> st.SearchStrategy[bytes | None]:
    """Each family of malformed input named in the event contract, and then some."""
    broken = good_event.map(lambda e: encode_event(e))
    return st.one_of(
        st.none(),
        st.binary(max_size=200).filter(lambda b: not _valid(b)),  # arbitrary bytes
        st.binary(min_size=1, max_size=40).map(lambda b: b"\xff\xfe" + b),  # not UTF-8
        broken.map(lambda b: b[: max(1, len(b) // 2)]),  # truncated JSON
        json_values.filter(lambda v: not isinstance(v, dict)).map(orjson.dumps),  # not an object
        good_event.flatmap(lambda e: st.sampled_from(["user_id", "item_id", "ts"]).map(
            lambda f: orjson.dumps({k: v for k, v in e.items() if k != f}))),  # missing field
        good_event.flatmap(lambda e: st.tuples(
            st.sampled_from(["user_id", "item_id", "ts", "weight", "event"]),
            st.one_of(st.lists(st.integers(-9, 9), max_size=2), st.dictionaries(st.text(), st.none(),
                      max_size=1), st.booleans(), st.none())).filter(
            lambda fv: fv[1] is not None or fv[0] in ("user_id", "item_id", "ts")).map(
            lambda fv: orjson.dumps({**e, fv[0]: fv[1]}))),  # wrong types (null: absent if optional)
        good_event.flatmap(lambda e: st.sampled_from(
            [b"NaN", b"-1", b"-0.5", b"Infinity", b"1e300", b"-1e20"]).map(
            lambda ts: orjson.dumps({**e, "ts": 0}).replace(b'"ts":0', b'"ts":' + ts))),
        good_event.map(lambda e: orjson.dumps({**e, "user_id": "u" * 10_240})),  # 10 kB id
        good_event.map(lambda e: orjson.dumps({**e, "item_id": "i" * 10_240})),
        good_event.map(lambda e: orjson.dumps({**e, "pad": "x" * 1_000_000})),  # 1 MB payload
        good_event.map(lambda e: orjson.dumps({**e, "user_id": ""})),  # empty id
    )


def _valid(raw: bytes | None) -> bool:
    try:
        parse_event(raw)
        return True
    except InvalidEvent:
        return False


def _rec(offset: int, value: bytes | None, key: bytes | None = None) -> SimpleNamespace:
    return SimpleNamespace(topic="t", partition=0, offset=offset, key=key, value=value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(raw=st.one_of(st.binary(max_size=300), _bad_messages(), good_event.map(encode_event)))
def test_parse_event_accepts_or_gives_a_reason(raw: bytes | None) -> None:
    try:
        ev = parse_event(raw)
    except InvalidEvent as exc:
        assert str(exc)
        return
    assert ev.user_id and ev.item_id and 0 <= ev.ts <= 2**53
    assert math.isfinite(ev.weight) and 0 < ev.weight <= 1000


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(goods=st.lists(good_event, max_size=8), bads=st.lists(_bad_messages(), max_size=8),
       seed=st.integers(0, 2**32 - 1))
def test_bad_messages_go_to_dead_letters_and_every_good_one_survives(
        goods: list[dict], bads: list[bytes | None], seed: int) -> None:
    mixed = [(encode_event(g), True) for g in goods] + [(b, False) for b in bads]
    random.Random(seed).shuffle(mixed)
    records = [_rec(i, value, key=None) for i, (value, _) in enumerate(mixed)]
    oks, errs = decode_batch(records)
    assert [d.origin.offset for d in oks] == [i for i, (_, ok) in enumerate(mixed) if ok]
    assert [e.origin.offset for e in errs] == [i for i, (_, ok) in enumerate(mixed) if not ok]
    assert all(e.reason for e in errs)
    for d in oks:
        g = orjson.loads(mixed[d.origin.offset][0])
        assert d.event.user_id == str(g["user_id"]) and d.event.ts == g["ts"]


@pytest.mark.kafka
def test_worker_dead_letters_generated_garbage_and_applies_the_rest(
        kafka_cfg: KafkaSettings, tmp_path: Path) -> None:
    bad = _bad_messages()
    rng = random.Random(5)
    bads: list[bytes | None] = []

    @settings(max_examples=120, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(bad)
    def collect(value: bytes | None) -> None:
        bads.append(value)

    collect()
    # Sure to be there whatever the generator drew: a 1 MB payload, NaN and negative ts, and
    # the three that used to poison the model or the watermark: a weight that is inf in
    # float32, a time in microseconds and one in the year 9999.
    poisons = {
        orjson.dumps({"user_id": "u1", "item_id": "i1", "ts": 1_700_000_000_000,
                      "weight": 1e39}): "not finite in float32",
        orjson.dumps({"user_id": "u2", "item_id": "i2",
                      "ts": 1_700_000_000_000_000}): "looks like microseconds",
        orjson.dumps({"user_id": "u3", "item_id": "i3",
                      "ts": 253_402_300_799_000}): "in the future",
    }
    bads += [orjson.dumps({"user_id": "u1", "item_id": "i1", "ts": 1, "pad": "x" * 1_000_000}),
             b'{"user_id": "u1", "item_id": "i1", "ts": NaN}',
             b'{"user_id": "u1", "item_id": "i1", "ts": -5}', *poisons]
    msgs: list[tuple[bytes | None, bytes | None, bool]] = []
    for i in range(1500):
        user = f"u{rng.randrange(200)}"
        ev = {"user_id": user, "item_id": f"i{rng.randrange(300)}", "ts": 1_700_000_000_000 + i,
              "unknown_field": {"nested": [1, 2]}}
        msgs.append((user.encode() if i % 7 else None, encode_event(ev), True))  # null keys too
        if i % 12 == 0 and bads:
            value = bads.pop()  # a null key with a null value is no message at all
            msgs.append((None if i % 24 and value is not None else b"bad", value, False))
    msgs.extend((b"bad", b, False) for b in bads)
    ensure_topics(kafka_cfg, [kafka_cfg.topic, kafka_cfg.dlq_topic])
    producer = make_producer(kafka_cfg)
    futures = [(producer.send(kafka_cfg.topic, key=k, value=v), k, v, ok) for k, v, ok in msgs]
    producer.flush()
    sent = [(f.get(30), k, v, ok) for f, k, v, ok in futures]
    producer.close()
    ends: dict[int, int] = {}
    for md, *_ in sent:
        ends[md.partition] = max(ends.get(md.partition, 0), md.offset + 1)
    store = tmp_path / "store"
    worker = spawn(["worker"], env_for(kafka_cfg, store, **SMALL_MODEL), tmp_path / "worker.log")
    try:
        wait_until(lambda: caught_up(store, kafka_cfg.topic, ends), 90, what="every offset")
        assert worker.poll() is None, "the worker crashed"
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    acked = [(orjson.loads(v)["user_id"], orjson.loads(v)["item_id"])
             for _md, _k, v, ok in sent if ok]
    assert_exactly_once(store, acked)

    want_bad = {(md.partition, md.offset) for md, _k, _v, ok in sent if not ok}
    dlq = make_consumer(kafka_cfg, None, consumer_timeout_ms=3000)
    dlq.assign([TopicPartition(kafka_cfg.dlq_topic, p)
                for p in dlq.partitions_for_topic(kafka_cfg.dlq_topic)])
    dlq.seek_to_beginning()
    reasons: dict[tuple[int, int], str] = {}
    for rec in dlq:
        h = {k: v.decode() for k, v in rec.headers}
        reasons[(int(h["origin.partition"]), int(h["origin.offset"]))] = h["error.reason"]
    dlq.close()
    assert set(reasons) == want_bad and all(reasons.values())
    by_value = {v: reasons[(md.partition, md.offset)] for md, _k, v, ok in sent if not ok}
    for value, words in poisons.items():
        assert words in by_value[value], (words, by_value[value])
    snap = SnapshotStore(store).load()
    assert snap is not None and not non_finite_tables(snap.state.tables)
    assert snap.manifest.watermark == 1_700_000_000_000 + 1499  # the newest good event
    kinds = collections.Counter(r.split(":")[0][:30] for r in reasons.values())
    print(f"malformed: {len(want_bad)} bad messages dead-lettered ({dict(kinds)}), "
          f"{len(acked)} good applied")
