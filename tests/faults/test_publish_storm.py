"""Serving under a publish storm: 100 versions (fulls and deltas) while ~200 requests/s flow.

Every full version is trained from scratch on items named after it
(``v<n>-i<k>``) and each delta adds items named after itself, so the items a
version holds are exactly those named after it and its chain back to its full
base. An answer that mixed two versions (an index of one, the state of
another) would name an item its version does not hold. Zero errors allowed.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from stream_rec.broker import free_port, stop_process, wait_for_port
from stream_rec.model import ModelConfig, StreamingModel, delta_from_state
from stream_rec.settings import KafkaSettings
from stream_rec.snapshot import SnapshotStore
from tests.support import env_for, spawn, wait_until

pytestmark = [pytest.mark.faults]

VERSIONS = 100
FULL_EVERY = 5
RATE = 200.0
CFG = ModelConfig(dim=8, negatives=16, replay=50, replay_per_step=10, steps=1)


def _learn(model: StreamingModel, version: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    users = [f"u{k % 12}" for k in range(n_items * 2)]
    items = [f"v{version}-i{k % n_items}" for k in range(n_items * 2)]
    ts = np.arange(len(users), dtype=np.int64) + 1_700_000_000_000 + version * 1000
    changed = model.learn(users, items, ts)
    return changed.users, changed.items


def _publish_all(store: SnapshotStore, pace_s: float) -> None:
    model: StreamingModel | None = None
    parent = None
    for v in range(1, VERSIONS + 1):
        offsets = {"clicks": {0: v}}
        if (v - 1) % FULL_EVERY == 0:
            model = StreamingModel(CFG, device="cpu")
            _learn(model, v, 40)
            parent = store.publish(model.state(), offsets=offsets, watermark=v,
                                   parent=parent.version if parent else None)
        else:
            assert model is not None and parent is not None
            users, items = _learn(model, v, 10)
            delta = delta_from_state(model.state(), users, items)
            parent = store.publish_delta(delta, parent=parent, offsets=offsets, watermark=v,
                                         events=int(model.state().tables["user.events"].sum()))
        time.sleep(pace_s)


def test_answers_come_from_one_whole_version_during_a_publish_storm(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = SnapshotStore(root, keep_versions=VERSIONS + 10)
    # The first version before the server starts, so that every request can be answered.
    port = free_port()
    env = env_for(KafkaSettings(), root, STREAM_REC_STORE__KEEP_VERSIONS=str(VERSIONS + 10),
                  STREAM_REC_SERVE__POLL_INTERVAL_MS="20")
    server = spawn(["serve", "--port", str(port)], env, tmp_path / "server.log")
    answers: list[tuple[int, list[str]]] = []
    errors: list[str] = []
    done = threading.Event()

    def client_loop(offset: int) -> int:
        n = 0
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            t0 = time.monotonic()
            while not done.is_set():
                user = f"u{(n + offset) % 14}"  # two of them unknown: the popular fallback
                try:
                    r = client.get(f"/recommend/{user}", params={"k": 10})
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                else:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        body = r.json()
                        answers.append((body["version"], [i["item_id"] for i in body["items"]]))
                n += 1
                ahead = t0 + n / (RATE / 4) - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        return n

    try:
        wait_for_port("127.0.0.1", port, 60, server)
        publisher = threading.Thread(target=_publish_all, args=(store, 0.04))
        publisher.start()
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200, 30,
                   what="the first version served")
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client_loop, i) for i in range(4)]
            publisher.join(120)
            wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz").json()["version"]
                       == VERSIONS, 30, what="the last version served")
            time.sleep(0.5)
            done.set()
            sent = sum(f.result() for f in futures)
    finally:
        done.set()
        stop_process(server, 20)
    assert not errors, f"{len(errors)} errors, e.g. {errors[:3]}"
    versions = sorted({v for v, _ in answers})
    held = {v: set(store.load(v).state.item_ids) for v in versions}
    for v, items in answers:
        assert items and set(items) <= held[v], f"an answer from v{v} names items it lacks"
        named = {int(i.split("-")[0][1:]) for i in items}
        assert all(v - FULL_EVERY < n <= v for n in named), (v, sorted(named))
    assert len(versions) >= 20, f"only {len(versions)} versions were seen by requests"
    print(f"storm: {sent} requests, {len(answers)} answers, 0 errors, "
          f"{len(versions)} of {VERSIONS} versions answered from")
