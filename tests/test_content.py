"""Item content features: text normalisation, the real sentence encoder, the cache,
the asynchronous featurizer, the ML-100K catalogue loader and ``produce --items``.

The encoder takes a few seconds to load, so one instance serves the module.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from stream_rec import datasets
from stream_rec.content import (
    DIM,
    EmbeddingCache,
    EncoderUnavailable,
    Featurizer,
    SentenceEncoder,
    content_key,
    item_text,
)
from stream_rec.content import encoder as encoder_mod
from tests.support import env_for

ROOT = Path(__file__).resolve().parents[1]

STAR_WARS = {"item_id": 50, "title": "Star Wars", "categories": ["Action", "Sci-Fi", "War"],
             "attributes": {"year": 1977}}
JEDI = {"item_id": 181, "title": "Return of the Jedi", "categories": ["Action", "Sci-Fi", "War"],
        "attributes": {"year": 1983}}
SENSE = {"item_id": 275, "title": "Sense and Sensibility", "categories": ["Drama", "Romance"],
         "attributes": {"year": 1995}}


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder(ROOT / "data" / "models", device="cpu")


class CountingEncoder:
    """The real encoder behind a call counter and an optional delay or gate per call."""

    def __init__(self, inner: SentenceEncoder, delay_s: float = 0.0) -> None:
        self.inner = inner
        self.dim, self.name = inner.dim, inner.name
        self.delay_s = delay_s
        self.calls = 0
        self.texts: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False

    def encode(self, texts: list[str]) -> np.ndarray:
        self.gate.wait()
        time.sleep(self.delay_s)
        self.calls += 1
        self.texts.extend(texts)
        if self.fail:
            raise RuntimeError("encoder failure")
        return self.inner.encode(texts)


# ------------------------------------------------------------------- text
def test_item_text_normalises_and_keeps_only_chosen_fields() -> None:
    a = {"item_id": 1, "title": "  Toy   STORY ", "categories": ["Animation", "Comedy",
                                                                  "animation"],
         "attributes": {"year": 1995, "studio": "Pixar"}, "ts": 5, "price": 3}
    b = {"item_id": 2, "title": "toy story", "categories": ["ANIMATION", "comedy"],
         "attributes": {"year": "1995"}}
    assert item_text(a) == "toy story. animation, comedy. year: 1995"
    assert item_text(a) == item_text(b)
    assert item_text(a, attributes=("studio", "year")) == \
        "toy story. animation, comedy. studio: pixar. year: 1995"
    assert item_text({"item_id": 3, "title": "Ｆｕｌｌｗｉｄｔｈ"}) == "fullwidth"  # NFKC
    assert item_text({"item_id": 4, "categories": "Drama"}) == "drama"
    assert content_key(item_text(a)) == content_key(item_text(b))
    assert content_key("x") != content_key("x", model="another-encoder")


def test_missing_weights_fail_with_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encoder_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EncoderUnavailable, match=r"stream-rec\[content\]"):
        encoder_mod.wheel_model_zip()


# ---------------------------------------------------------------- encoder
def test_encoder_gives_unit_384_vectors_that_follow_meaning(encoder: SentenceEncoder) -> None:
    texts = [item_text(x) for x in (STAR_WARS, JEDI, SENSE)]
    v = encoder.encode(texts)
    assert v.shape == (3, DIM) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.1   # two space operas are closer than a costume drama
    # batching does not change a text's vector (beyond float rounding)
    np.testing.assert_allclose(encoder.encode(texts[:1])[0], v[0], atol=1e-5)
    assert encoder.encode([]).shape == (0, DIM)


def test_model_is_unpacked_once(tmp_path: Path) -> None:
    first = encoder_mod.unpack_model(tmp_path)
    stamp = (first / "modules.json").stat().st_mtime_ns
    assert encoder_mod.unpack_model(tmp_path) == first
    assert (first / "modules.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind


# ------------------------------------------------------------------ cache
def test_cache_memory_lru_and_disk_persistence(tmp_path: Path) -> None:
    vecs = {f"k{i}": np.full(DIM, i, dtype=np.float32) for i in range(5)}
    with EmbeddingCache(tmp_path, memory_items=3) as cache:
        cache.put_many(vecs)
        assert len(cache) == 3
        assert cache.get_memory("k0") is None and cache.get_memory("k4") is not None
        got = cache.get_many(["k0", "k4", "nope"])        # k0 comes back from disk
        assert sorted(got) == ["k0", "k4"]
        assert cache.stats()["disk_hits"] == 1 and cache.stats()["misses"] == 1
        with pytest.raises(ValueError):
            cache.put_many({"bad": np.zeros(3)})
    with EmbeddingCache(tmp_path) as again:                # a new process: disk only
        got = again.get_many(vecs)
        assert sorted(got) == sorted(vecs)
        np.testing.assert_array_equal(got["k3"], vecs["k3"])
        assert not got["k3"].flags.writeable
    with EmbeddingCache(None, memory_items=2) as mem_only:
        mem_only.put_many(vecs)
        assert sorted(mem_only.get_many(vecs)) == ["k3", "k4"]


# ------------------------------------------------------------- featurizer
def test_featurizer_encodes_in_batches_and_replays_for_free(encoder: SentenceEncoder,
                                                            tmp_path: Path) -> None:
    items = [{"item_id": i, "title": f"film number {i}", "categories": ["Drama"]}
             for i in range(40)]
    items.append({"item_id": 999, "title": "Film Number 0", "categories": ["drama"]})  # same text
    slow = CountingEncoder(encoder)
    with Featurizer(slow, EmbeddingCache(tmp_path), batch_size=16) as fz:
        assert fz.submit_many(items) == len(items)
        assert fz.wait_idle(60)
        ready = fz.take_ready()
        assert sorted(ready) == sorted(str(it["item_id"]) for it in items)
        assert len(slow.texts) == 40                          # the duplicate text cost nothing
        np.testing.assert_array_equal(ready["999"], ready["0"])
        np.testing.assert_allclose(ready["7"], encoder.encode([item_text(items[7])])[0],
                                   atol=1e-5)
        calls = slow.calls
        fz.submit_many(items)                                 # a replay of the catalogue
        assert fz.wait_idle(10)
        assert slow.calls == calls and len(fz.take_ready()) == len(items)
        assert fz.take_ready() == {}
        st = fz.stats()
        assert st["encoded"] == 40 and st["cache_hits"] == 42 and st["errors"] == 0
    fresh = CountingEncoder(encoder)                          # restart: the disk cache answers
    with Featurizer(fresh, EmbeddingCache(tmp_path), batch_size=16) as fz:
        fz.submit_many(items)
        assert fz.wait_idle(10)
        assert fresh.calls == 0 and len(fz.take_ready()) == len(items)


def test_submit_never_waits_for_a_slow_encoder(encoder: SentenceEncoder) -> None:
    slow = CountingEncoder(encoder, delay_s=2.0)
    fz = Featurizer(slow, batch_size=8, max_pending=50)
    try:
        items = [{"item_id": i, "title": f"item {i}"} for i in range(200)]
        t0 = time.perf_counter()
        accepted = [fz.submit(it) for it in items]
        took = time.perf_counter() - t0
        assert took < 0.2, f"200 submits took {took:.3f} s with the encoder busy"
        assert fz.take_ready() == {}                           # nothing finished yet
        # 50 pending plus at most one batch taken by the thread; the rest dropped
        assert 50 <= sum(accepted) <= 58
        assert fz.stats()["dropped"] == 200 - sum(accepted)
    finally:
        fz.close(timeout=0.1)


def test_a_resent_item_ends_with_its_newest_text(encoder: SentenceEncoder) -> None:
    gated = CountingEncoder(encoder)
    gated.gate.clear()
    with Featurizer(gated, batch_size=4) as fz:
        fz.submit({"item_id": "a", "title": "old title"})
        time.sleep(0.2)                                        # the thread holds it, waiting
        fz.submit({"item_id": "a", "title": "new title"})      # supersedes the batch in hand
        fz.submit({"item_id": "b", "title": "other"})
        fz.submit({"item_id": "b", "title": "other, newer"})   # replaces a pending text
        gated.gate.set()
        assert fz.wait_idle(30)
        ready = fz.take_ready()
    want = encoder.encode(["new title", "other, newer"])
    np.testing.assert_allclose(ready["a"], want[0], atol=1e-5)
    np.testing.assert_allclose(ready["b"], want[1], atol=1e-5)
    assert "other" not in gated.texts                          # never encoded: replaced in time


def test_an_encoder_failure_is_counted_and_the_thread_goes_on(encoder: SentenceEncoder) -> None:
    flaky = CountingEncoder(encoder)
    flaky.fail = True
    with Featurizer(flaky, batch_size=4) as fz:
        fz.submit({"item_id": 1, "title": "x"})
        assert fz.wait_idle(30)
        assert fz.stats()["errors"] == 1 and fz.take_ready() == {}
        flaky.fail = False
        fz.submit({"item_id": 1, "title": "x"})
        assert fz.wait_idle(30)
        assert list(fz.take_ready()) == ["1"]


def test_featurizer_from_settings_uses_the_configured_cache(tmp_path: Path) -> None:
    from stream_rec.content import featurizer_from_settings
    from stream_rec.settings import ContentSettings

    cfg = ContentSettings(model_dir=str(ROOT / "data" / "models"), cache_dir=str(tmp_path),
                          device="cpu", batch_size=4, attributes=["year", "studio"])
    with featurizer_from_settings(cfg) as fz:
        fz.submit({**STAR_WARS, "attributes": {"year": 1977, "studio": "Lucasfilm"}})
        assert fz.wait_idle(60)
        assert fz.take_ready()["50"].shape == (DIM,)
        assert fz.attributes == ("year", "studio") and fz.batch_size == 4
    assert fz.cache._db is None                               # closed with the featurizer
    assert (tmp_path / "embeddings.sqlite").is_file()


# ------------------------------------------------------------- catalogue
def test_ml100k_items_parse_and_are_announced_before_their_first_rating(tmp_path: Path) -> None:
    path = tmp_path / "ml-100k.item"
    path.write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                    "1\tToy Story\t1995\tAnimation Children's Comedy\n"
                    "267\tunkonwn\tunkonwn\tunknown\n"
                    "3\tFour Rooms\t1995\tThriller\n", encoding="utf-8")
    ratings = np.array([(9, 3, 4.0, 1_000_000), (9, 1, 5.0, 2_000_000), (8, 3, 3.0, 3_000_000)],
                       dtype=[("user", "i8"), ("item", "i8"), ("rating", "f4"), ("ts", "i8")])
    items = list(datasets.iter_ml100k_items(path, ratings=ratings, lead_ms=500))
    assert items == [
        {"item_id": 3, "title": "Four Rooms", "categories": ["Thriller"],
         "attributes": {"year": 1995}, "ts": 999_500},
        {"item_id": 267, "title": "unkonwn", "categories": [], "attributes": {},
         "ts": 999_500},     # never rated: announced with the first
        {"item_id": 1, "title": "Toy Story", "categories": ["Animation", "Children's", "Comedy"],
         "attributes": {"year": 1995}, "ts": 1_999_500},
    ]


@pytest.mark.kafka
def test_produce_items_sends_the_catalogue_keyed_by_item_id(kafka_cfg, tmp_path: Path) -> None:
    from stream_rec.ingest.kafka import make_consumer

    items = [{"item_id": i, "title": f"film {i}", "categories": ["Drama"],
              "attributes": {"year": 1990 + i}, "ts": 1_000 + i} for i in range(12)]
    src = tmp_path / "items.jsonl"
    src.write_text("".join(json.dumps(it) + "\n" for it in items))
    topic = "items-" + kafka_cfg.topic
    env = env_for(kafka_cfg, tmp_path / "store", STREAM_REC_KAFKA__ITEMS_TOPIC=topic)
    out = subprocess.run([sys.executable, "-m", "stream_rec", "produce", "--items",
                          "--dataset", str(src), "--no-progress"],
                         check=False, env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"produced": 12, "topic": topic}
    consumer = make_consumer(kafka_cfg, None, consumer_timeout_ms=5000)
    try:
        consumer.subscribe([topic])
        got = {}
        deadline = time.monotonic() + 20
        while len(got) < 12 and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=500).values():
                for r in recs:
                    got[r.key.decode()] = json.loads(r.value)
    finally:
        consumer.close()
    assert sorted(got, key=int) == [str(i) for i in range(12)]
    assert {k: {f: v[f] for f in ("item_id", "title", "categories", "attributes", "ts")}
            for k, v in got.items()} == {str(it["item_id"]): it for it in items}
