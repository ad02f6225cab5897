"""The operator's page in headless Chromium, over a real broker, worker and server.

The browser loads ``/dashboard`` and runs its script for 5 s of virtual time
(``--virtual-time-budget``: timers run fast, network fetches complete for
real), then the DOM it built is read back: so the page's JavaScript must have
fetched and rendered the server's data for the checks to pass.

``DASHBOARD_SCREENSHOT=docs/img/dashboard.png`` also feeds a minute of clicks
at a changing rate and saves what the browser drew there (the picture in the docs).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from stream_rec import datasets
from stream_rec.broker import free_port, stop_process, wait_for_port
from stream_rec.events import encode_event
from stream_rec.ingest.kafka import ensure_topics, make_producer
from stream_rec.settings import KafkaSettings
from tests.support import ROOT, env_for, spawn, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BAD = [b"{not json", b"{not json either", b"\xff\xfe", b'{"user_id": "u1", "item_id": "i1"}']


def _chromium(url: str, profile: Path, *args: str) -> str:
    """Run headless Chromium on ``url`` with nothing but that URL to talk to."""
    r = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage",
         f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args, url],
        capture_output=True, text=True, timeout=90, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


class _Element(HTMLParser):
    """The text and descendants' attributes of the element with one id, in a DOM dump."""

    VOID = frozenset({"br", "img", "input", "meta", "link", "hr"})

    def __init__(self, dom: str, element_id: str) -> None:
        super().__init__()
        self.element_id = element_id
        self.depth = 0  # > 0 while inside the element
        self.found = False
        self.text: list[str] = []
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(dom)
        assert self.found, f"#{element_id} is not in the page"

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if self.depth:
            self.tags.append((tag, a))
            self.depth += tag not in self.VOID
        elif a.get("id") == self.element_id:
            self.found, self.depth = True, 1

    def handle_endtag(self, tag: str) -> None:
        if self.depth:
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.depth:
            self.text.append(data)

    @property
    def content(self) -> str:
        return "".join(self.text).strip()

    def attr(self, name: str) -> list[str]:
        return [a[name] for _, a in self.tags if name in a]


def _events(n: int, seed: int, end_ms: int) -> list[dict]:
    return list(itertools.islice(datasets.iter_synthetic(
        n_users=200, n_items=400, seed=seed, start_ms=end_ms - n * 10), n))


def _send(cfg: KafkaSettings, events: list[dict], bad: list[bytes] = (),
          rate: float = 0.0) -> int:
    producer = make_producer(cfg)
    for i, ev in enumerate(events):
        producer.send(cfg.topic, key=ev["user_id"].encode(), value=encode_event(ev))
        if rate and i % 50 == 49:
            time.sleep(50 / rate)
    for value in bad:
        producer.send(cfg.topic, key=b"bad", value=value)
    producer.flush(30)
    producer.close()
    return len(events) + len(bad)


def test_the_page_shows_what_the_server_serves(kafka_cfg: KafkaSettings,
                                               tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    ensure_topics(kafka_cfg, [kafka_cfg.topic, kafka_cfg.dlq_topic])
    wport, sport = free_port(), free_port()
    env = env_for(kafka_cfg, tmp_path / "store", STREAM_REC_WORKER__METRICS_PORT=str(wport),
                  STREAM_REC_SERVE__WORKER_METRICS_URL=f"http://127.0.0.1:{wport}/metrics")
    server = spawn(["serve", "--port", str(sport)], env, tmp_path / "server.log")
    worker = spawn(["worker"], env, tmp_path / "worker.log")
    base = f"http://127.0.0.1:{sport}"
    try:
        events = _events(3000, seed=11, end_ms=int(time.time() * 1000))
        sent = _send(kafka_cfg, events, BAD)  # while the processes start
        wait_for_port("127.0.0.1", sport, 60, server)
        client = httpx.Client(base_url=base, timeout=10)

        def caught_up() -> dict | None:  # every offset served, every dead letter counted
            d = client.get("/dashboard/data").json()
            offsets = d["served"].get("offsets", {}).get(kafka_cfg.topic, {})
            worker_ = d["worker"] or {}
            return d if sum(offsets.values()) == sent and \
                sum(worker_.get("dead_letters", {}).values()) == len(BAD) else None

        data = wait_until(caught_up, 60, interval_s=0.25, what="the server to serve it all")
        version = client.get("/readyz").json()["version"]
        user = events[-1]["user_id"]
        mine = [e["item_id"] for e in events if e["user_id"] == user][::-1]

        dom = _chromium(f"{base}/dashboard?user={user}", tmp_path / "profile", "--dump-dom")
        assert client.get("/readyz").json()["version"] == version  # nothing new meanwhile

        assert _Element(dom, "version").content == str(version)
        assert _Element(dom, "ready").content == "ready"
        assert _Element(dom, "events").content.replace(",", "") == \
            str(data["served"]["counts"]["events"])
        recent = _Element(dom, "user-recent").attr("data-item")
        assert recent == mine[:20]  # the version keeps a user's last model.history clicks
        answer = client.get(f"/recommend/{user}", params={"k": 10}).json()
        assert _Element(dom, "user-recs").attr("data-item") == \
            [i["item_id"] for i in answer["items"]]
        partitions = _Element(dom, "lag").attr("data-partition")
        assert partitions == [str(p) for p in range(kafka_cfg.partitions)]
        dlq = " ".join(_Element(dom, "dlq").content.split())
        assert "not_json 3" in dlq and "missing_field 1" in dlq, dlq

        shot = os.environ.get("DASHBOARD_SCREENSHOT")
        if shot:
            _screenshot(kafka_cfg, client, f"{base}/dashboard?user={user}", tmp_path,
                        ROOT / shot)
    finally:
        for proc in (worker, server):
            stop_process(proc)


def _screenshot(cfg: KafkaSettings, client: httpx.Client, url: str, tmp_path: Path,
                out: Path) -> None:
    """A minute of clicks at 200-800 events/s, watched as an operator would, then drawn."""
    stop = threading.Event()

    def feed() -> None:
        for seed in itertools.count(100):
            if stop.is_set():
                return
            rate = 200 + 600 * (seed % 4) / 3
            _send(cfg, _events(int(rate * 5), seed, int(time.time() * 1000) + 5000), rate=rate)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    for _ in range(60):  # the page open meanwhile: the server samples the worker each second
        client.get("/dashboard/data")
        time.sleep(1.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    _chromium(url, tmp_path / "profile", "--window-size=1400,1480", "--hide-scrollbars",
              f"--screenshot={out}")
    stop.set()
    feeder.join(30)
    assert out.stat().st_size > 10_000
