"""Item content end to end on a real broker: catalogue topic -> worker -> snapshots -> server.

An item announced on the catalogue topic and never clicked gets a row and a
vector from its text: ``/similar`` returns it for an item of the same genre,
and ``/recommend`` returns it to users of that genre, before anyone clicked it.
The version records the catalogue's offsets beside the clicks', and a
malformed catalogue message lands in the items' dead-letter topic.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from kafka import TopicPartition

from stream_rec.broker import free_port, stop_process, wait_for_port
from stream_rec.events import encode_event
from stream_rec.ingest.kafka import ensure_topics, make_consumer, make_producer
from stream_rec.settings import KafkaSettings
from stream_rec.snapshot import SnapshotStore
from tests.support import ROOT, env_for, spawn, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

GENRES = {
    "scifi": (["Sci-Fi", "Space"], ["Star Voyager", "Galactic Frontier", "Orbit of Mars",
                                    "Alien Contact", "Warp Drive Legacy", "Planet Nine",
                                    "Robot Uprising", "Cosmic Station"]),
    "romance": (["Romance", "Drama"], ["Love in Paris", "Summer Hearts", "The Wedding Letter",
                                       "Moonlit Kiss", "Second Chance Romance",
                                       "Sweet Valentine", "A Heart Apart", "Forever Yours"]),
    "horror": (["Horror", "Thriller"], ["Haunted Manor", "Night of the Zombies",
                                        "The Cursed Doll", "Scream in the Dark",
                                        "Blood Moon Terror", "The Ghost Hunter",
                                        "Demon's Cellar", "Graveyard Shift"]),
    "kids": (["Animation", "Children's"], ["Puppy Adventures", "Cartoon Island",
                                           "The Little Dragon", "Bunny Friends", "Toy Parade",
                                           "Happy Penguins", "Magic Crayons",
                                           "Teddy Bear Picnic"]),
    "western": (["Western"], ["Gunfight at Dusty Creek", "Outlaw Trail", "The Sheriff's Badge",
                              "Cowboy Sunset", "Rattlesnake Canyon", "Wild Horse Ranch",
                              "Frontier Justice", "The Last Stagecoach"]),
    "war": (["War", "History"], ["Battle of the Ardennes", "Beach Landing 1944",
                                 "The Submarine", "Tank Commander", "Trenches of Verdun",
                                 "Paratroopers", "Fighter Squadron", "The General's Retreat"]),
}
NEW = "new-scifi"          # announced, never clicked
N_CLICKS = 3000


def _catalogue(now_ms: int) -> tuple[list[dict], dict[str, str]]:
    items, genre = [], {}
    for g, (cats, titles) in GENRES.items():
        for t in titles:
            iid = f"{g}-{len(items)}"
            items.append({"item_id": iid, "title": t, "categories": cats, "ts": now_ms})
            genre[iid] = g
    items.append({"item_id": NEW, "title": "Starship Nebula", "categories": ["Sci-Fi", "Space"],
                  "attributes": {"year": 2026}, "ts": now_ms})
    return items, genre


def _clicks(genre: dict[str, str], now_ms: int) -> list[dict]:
    """60 users, ten per genre, who click their genre's items 9 times in 10."""
    rng = np.random.default_rng(0)
    names = list(GENRES)
    by_genre = {g: [i for i, x in genre.items() if x == g] for g in names}
    out = []
    for j in range(N_CLICKS):
        u = int(rng.integers(60))
        g = names[u % 6] if rng.random() < 0.9 else names[int(rng.integers(6))]
        item = by_genre[g][int(rng.integers(len(by_genre[g])))]
        out.append({"user_id": f"u{u}", "item_id": item, "ts": now_ms - (N_CLICKS - j) * 100})
    return out


def test_an_announced_item_is_served_before_its_first_click(kafka_cfg: KafkaSettings,
                                                             tmp_path: Path) -> None:
    items_topic = kafka_cfg.topic.replace("clicks", "items")
    kafka = kafka_cfg.model_copy(update={"items_topic": items_topic})
    ensure_topics(kafka, [kafka.topic, items_topic])
    now = int(time.time() * 1000)
    catalogue, genre = _catalogue(now - 3_600_000)
    producer = make_producer(kafka)
    for it in catalogue:
        producer.send(items_topic, key=str(it["item_id"]).encode(),
                      value=json.dumps(it).encode())
    producer.send(items_topic, key=b"bad",
                  value=json.dumps({"item_id": "x", "title": 5, "ts": now}).encode())
    producer.flush()

    store_path = tmp_path / "store"
    env = env_for(kafka, store_path, STREAM_REC_KAFKA__ITEMS_TOPIC=items_topic,
                  STREAM_REC_MODEL__CONTENT_DIM="384", STREAM_REC_MODEL__TRAIN_CHUNK="100",
                  STREAM_REC_CONTENT__MODEL_DIR=str(ROOT / "data" / "models"),
                  STREAM_REC_CONTENT__CACHE_DIR=str(tmp_path / "content"),
                  STREAM_REC_CONTENT__DEVICE="cpu",
                  STREAM_REC_WORKER__PUBLISH_INTERVAL_MS="100")
    port = free_port()
    server = spawn(["serve", "--port", str(port)], env, tmp_path / "server.log")
    worker = spawn(["worker"], env, tmp_path / "worker.log")
    try:
        wait_for_port("127.0.0.1", port, 60, server)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5)
        # the catalogue alone: every item gets a row from its text, before any click
        wait_until(lambda: client.get(f"/similar/{NEW}").status_code == 200, 120,
                   what="the announced item in a served version")
        for click in _clicks(genre, now):
            producer.send(kafka.topic, key=click["user_id"].encode(), value=encode_event(click))
        producer.flush()
        producer.close()

        def caught_up() -> bool:
            body = client.get("/readyz").json()
            return body.get("counts", {}).get("events") == N_CLICKS

        wait_until(caught_up, 120, what="every click in a served version")
        scifi = [i for i, g in genre.items() if g == "scifi"]
        similar = [[x["item_id"] for x in client.get(
            f"/similar/{i}", params={"k": 10}).json()["items"]] for i in scifi[:4]]
        assert sum(NEW in s for s in similar) >= 3, similar
        fans = [f"u{u}" for u in range(60) if u % 6 == 0][:4]     # users of the sci-fi genre
        recs = [client.get(f"/recommend/{u}", params={"k": 10}).json() for u in fans]
        assert all(not r["fallback"] for r in recs)
        assert sum(NEW in [x["item_id"] for x in r["items"]] for r in recs) >= 3, recs
        for s in similar:   # and the genre's own items lead /similar
            assert sum(genre.get(i) == "scifi" for i in s[:5]) >= 4, s

        # the version holds the catalogue's offsets; the item was never clicked
        snap = SnapshotStore(store_path).load()
        assert snap is not None
        assert sum(snap.manifest.offsets[items_topic].values()) == len(catalogue) + 1
        row = snap.state.item_row(NEW)
        assert snap.state.tables["item.events"][row] == 0
        assert snap.state.tables["item.text"][row].any()
    finally:
        worker.send_signal(signal.SIGTERM)
        server.send_signal(signal.SIGTERM)
        for proc in (worker, server):
            stop_process(proc)
    dlq = make_consumer(kafka, None, consumer_timeout_ms=3000)
    dlq.assign([TopicPartition(kafka.items_dlq_topic, p)
                for p in dlq.partitions_for_topic(kafka.items_dlq_topic)])
    dlq.seek_to_beginning()
    letters = [{k: v.decode() for k, v in rec.headers} for rec in dlq]
    dlq.close()
    assert len(letters) == 1 and letters[0]["origin.topic"] == items_topic
    assert "title must be a string" in letters[0]["error.reason"]
