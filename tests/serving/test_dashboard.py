"""The dashboard's data, in process: what it shows is what /readyz, /metrics and the worker say.

The page itself runs in a real browser in ``test_dashboard_browser.py``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from stream_rec.broker import free_port
from stream_rec.metrics import WorkerMetrics
from stream_rec.model import ModelConfig, StreamingModel, delta_from_state
from stream_rec.serving import dashboard
from stream_rec.serving.app import create_app
from stream_rec.serving.dashboard import WorkerProbe, timeline
from stream_rec.serving.state import Swap
from stream_rec.settings import ServeSettings
from stream_rec.snapshot import SnapshotStore
from stream_rec.worker.health import serve_health


@pytest.fixture
def served(tmp_path: Path):
    store = SnapshotStore(tmp_path / "store")
    app = create_app(store, ServeSettings(), watch=False)
    with TestClient(app) as client:
        yield store, app.state.watcher, client


def _model() -> tuple[StreamingModel, list[str], list[str], np.ndarray]:
    model = StreamingModel(ModelConfig(dim=8, history=5), device="cpu")
    users = ["u1", "u2", "u1", "u3", "u1", "u1", "u1", "u1"]
    items = ["a", "b", "c", "a", "d", "e", "f", "g"]
    ts = np.arange(1, len(users) + 1, dtype=np.int64) * 1000
    return model, users, items, ts


def test_data_shows_the_served_version_and_its_history(served) -> None:
    store, watcher, client = served
    assert client.get("/dashboard/data").json()["served"]["ready"] is False
    model, users, items, ts = _model()
    model.learn(users[:4], items[:4], ts[:4])
    parent = store.publish(model.state(), offsets={"clicks": {0: 3, 1: 1}}, watermark=4000)
    watcher.poll_once()
    changed = model.learn(users[4:], items[4:], ts[4:])
    store.publish_delta(delta_from_state(model.state(), changed.users, changed.items),
                        parent=parent, offsets={"clicks": {0: 7, 1: 1}}, watermark=8000,
                        events=8)
    watcher.poll_once()
    client.get("/recommend/u1")
    data = client.get("/dashboard/data").json()
    ready = client.get("/readyz").json()
    served_ = data["served"]
    assert {k: served_[k] for k in ready} == ready  # the same body /readyz gives
    assert served_["version"] == 2 and served_["kind"] == "delta"
    assert [s["version"] for s in data["history"]["recent"]] == [2, 1]
    assert [s["events"] for s in data["history"]["recent"]] == [8, 4]
    assert data["history"]["versions"][-1][1] == 2
    assert data["server"]["swaps"] == 2 and data["server"]["refused"] == 0
    assert data["server"]["requests"]["/recommend/{user_id}"] == {"200": 1.0}
    assert data["worker"] is None and data["events_per_s_from"] == "versions"
    assert data["try_users"][0] == "u1"  # the newest click


def test_try_a_user_shows_recent_clicks_and_the_recommend_answer(served) -> None:
    store, watcher, client = served
    assert client.get("/dashboard/user/u1").status_code == 503
    model, users, items, ts = _model()
    model.learn(users, items, ts)
    store.publish(model.state(), offsets={}, watermark=8000)
    watcher.poll_once()
    body = client.get("/dashboard/user/u1", params={"k": 3}).json()
    # u1 clicked a c d e f g; the version keeps the last `history` (5), newest first.
    assert [c["item_id"] for c in body["recent"]] == ["g", "f", "e", "d", "c"]
    assert [c["ts"] for c in body["recent"]] == [8000, 7000, 6000, 5000, 3000]
    rec = client.get("/recommend/u1", params={"k": 3}).json()
    assert body["items"] == rec["items"] and body["version"] == rec["version"]
    unknown = client.get("/dashboard/user/nobody").json()
    assert unknown["recent"] == [] and unknown["fallback"] is True
    assert watcher.current.recent_clicks("u1", limit=2)[0].item_id == "g"


def test_timeline_buckets_events_per_second_of_creation() -> None:
    now = 1_000_000.0

    watcher = SimpleNamespace(history=[
        Swap(v, "delta", now - 6 + v * 0.5, now - 5.9 + v * 0.5, None, 100 * v, 0.01)
        for v in range(1, 9)])
    t = timeline(watcher, now)
    # Versions 2..8 each add 100 events; two versions are created per second.
    assert sum(n for _, n in t["rate"]) == 700
    assert max(n for _, n in t["rate"]) == 200
    assert t["versions"][-1][1] == 8
    assert all(abs(d - 0.1) < 1e-6 for _, d in t["delay"])
    # The last 5 s hold versions 2..8 (created from now - 5 s on): 700 events.
    assert t["events_per_s"] == pytest.approx(700 / 5)


def test_worker_probe_reads_lag_dead_letters_and_measures_events_per_s() -> None:
    metrics = WorkerMetrics(CollectorRegistry())
    port = free_port()
    server = serve_health(lambda: (True, {}), metrics.registry, port)
    try:
        metrics.events.inc(1000)
        metrics.dead_letters.labels("not_json").inc(3)
        metrics.dead_letters.labels("missing_field").inc(1)
        metrics.lag.labels("0").set(12)
        metrics.lag.labels("1").set(0)
        metrics.version.set(42)
        probe = WorkerProbe(f"http://127.0.0.1:{port}/metrics", min_interval_s=0.0)
        first = probe.read()
        assert first["ok"] and first["events_per_s"] is None  # one sample: no rate yet
        assert first["lag"] == {"0": 12.0, "1": 0.0} and first["version"] == 42
        assert list(first["dead_letters"].items()) == [("not_json", 3.0),
                                                       ("missing_field", 1.0)]
        time.sleep(1.0)
        metrics.events.inc(500)
        rate = probe.read()["events_per_s"]
        assert 350 < rate <= 500  # 500 events over a little more than 1 s
    finally:
        server.shutdown()
    down = WorkerProbe(f"http://127.0.0.1:{free_port()}/metrics", timeout_s=0.5).read()
    assert not down["ok"] and "ConnectError" in down["error"]


def test_the_page_is_packaged_and_fetches_nothing_from_elsewhere(served) -> None:
    _store, _watcher, client = served
    r = client.get("/dashboard")
    assert r.status_code == 200 and r.content == dashboard.page()
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    text = r.text
    # The only absolute URL is the SVG namespace, an identifier that is never fetched.
    assert set(re.findall(r"(?:https?:)?//[\w.-]+[^\s\"'`)]*", text)) == \
        {"http://www.w3.org/2000/svg"}
    assert not re.search(r"<(link|img|iframe)\b|<script\s+src|@import|url\(", text)
    for element in ("version", "lag", "dlq", "chart-rate", "chart-versions", "chart-delay",
                    "user-recent", "user-recs"):
        assert f'id="{element}"' in text
