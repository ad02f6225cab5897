"""The operator's page: ``GET /dashboard`` and the JSON it polls.

Everything the page shows comes from what ``/readyz`` and ``/metrics`` come
from: the served :class:`ServingState`, the watcher's swap history, the
process's metrics registry (merged across processes as ``/metrics`` merges
it) and, when ``serve.worker_metrics_url`` is set, the worker's own
``/metrics``, read by the server (the browser may not reach the worker).
The page is one static file with inline CSS, JavaScript and SVG: nothing is
fetched from anywhere but this server, and its Content-Security-Policy says so
to the browser.

Routes: ``/dashboard`` (the page), ``/dashboard/data`` (polled every second),
``/dashboard/user/{user_id}`` (the "try a user" panel: recent clicks and the
answer ``/recommend`` would give).
"""


import logging
import math
import threading
import time
from collections import deque
from functools import cache
from importlib import resources
from typing import Annotated, Any

import httpx
import numpy as np
import orjson
from fastapi import APIRouter, HTTPException, Path, Query, Response
from prometheus_client.parser import text_string_to_metric_families

from stream_rec.metrics import ServingMetrics
from stream_rec.model import tables as T
from stream_rec.serving.batcher import SearchBatcher, answer_on_newest
from stream_rec.serving.overlay import Overlay
from stream_rec.serving.state import ServingState, SnapshotWatcher
from stream_rec.settings import ServeSettings

log = logging.getLogger(__name__)

WINDOW_S = 300        # the charts' span (s)
RATE_SPAN_S = 5.0     # the headline events/s averages over this much (s)
RECENT_SWAPS = 8      # swaps listed in the table
TRY_USERS = 6         # recently active users offered in the "try a user" panel
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "img-src data:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
       "frame-ancestors 'none'")


@cache
def page() -> bytes:
    """The page, shipped as package data beside this module."""
    return resources.files("stream_rec.serving").joinpath("dashboard.html").read_bytes()


def _json(body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS),
                    media_type="application/json", headers={"cache-control": "no-store"})


class WorkerProbe:
    """The worker's ``/metrics``, read at most once per ``min_interval_s`` and remembered.

    Its events counter is sampled on each read, so events/s is measured on
    this server's clock over the last few seconds; a counter that goes back
    (the worker restarted) starts the samples again.
    """

    def __init__(self, url: str, timeout_s: float = 1.0, min_interval_s: float = 1.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.min_interval_s = min_interval_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=64)  # (epoch s, events)
        self._last: dict[str, Any] | None = None
        self._read_at = -math.inf
        self._lock = threading.Lock()

    def read(self) -> dict[str, Any]:
        with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._read_at < self.min_interval_s:
                return self._last
            self._read_at = now
            try:
                r = httpx.get(self.url, timeout=self.timeout_s)
                r.raise_for_status()
                body = self._parse(r.text)
            except (httpx.HTTPError, ValueError) as exc:
                body = {"ok": False, "url": self.url, "error": f"{type(exc).__name__}: {exc}"}
            self._last = body
            return body

    def _parse(self, text: str) -> dict[str, Any]:
        scalars: dict[str, float] = {}
        lag: dict[str, float] = {}
        dead: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "stream_rec_worker_lag_records":
                    lag[s.labels.get("partition", "?")] = s.value
                elif s.name == "stream_rec_worker_dead_letters_total":
                    dead[s.labels.get("reason", "?")] = s.value
                elif not s.labels:
                    scalars[s.name] = s.value
        now = time.time()
        events = scalars.get("stream_rec_worker_events_total")
        if events is not None:
            if self._samples and events < self._samples[-1][1]:
                self._samples.clear()
            self._samples.append((now, events))
        fetch_n = scalars.get("stream_rec_worker_fetch_age_seconds_count", 0.0)
        last_poll = scalars.get("stream_rec_worker_last_poll_seconds")
        return {
            "ok": True, "url": self.url, "events_total": events,
            "events_per_s": _rate(self._samples, now),
            "lag": dict(sorted(lag.items(), key=lambda kv: _partition_key(kv[0]))),
            # every reason code is registered at 0: show the ones that happened
            "dead_letters": dict(sorted(((k, v) for k, v in dead.items() if v),
                                        key=lambda kv: -kv[1])),
            "version": scalars.get("stream_rec_worker_version"),
            "watermark_ms": scalars.get("stream_rec_worker_watermark_ms"),
            "last_poll_age_s": None if not last_poll else max(0.0, now - last_poll),
            "users": scalars.get("stream_rec_worker_users"),
            "items": scalars.get("stream_rec_worker_items"),
            "publishes": scalars.get("stream_rec_worker_publishes_total"),
            "fetch_age_mean_s": scalars.get("stream_rec_worker_fetch_age_seconds_sum", 0.0)
            / fetch_n if fetch_n else None,
        }


def _partition_key(p: str) -> tuple[int, str]:
    return (int(p), "") if p.isdigit() else (1 << 30, p)


def _rate(samples: deque[tuple[float, float]], now: float) -> float | None:
    """Counter increase per second over the samples of the last ``RATE_SPAN_S``."""
    recent = [s for s in samples if now - s[0] <= RATE_SPAN_S + 1.0]
    if len(recent) < 2 or recent[-1][0] - recent[0][0] < 0.5:
        return None
    return (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])


def timeline(watcher: SnapshotWatcher, now: float) -> dict[str, Any]:
    """The swap history as per-second series over the last ``WINDOW_S``.

    ``rate``: events that entered versions created in each second (the events
    count of a version minus its predecessor's, at the version's creation
    time); ``versions``: the newest version swapped in by each second;
    ``delay``: the largest creation → swap delay (s) in each second.
    """
    swaps = list(watcher.history)
    start = math.floor(now) - WINDOW_S
    rate: dict[int, float] = {}
    versions: dict[int, int] = {}
    delay: dict[int, float] = {}
    for prev, swap in zip([None, *swaps], swaps):
        if prev is not None and swap.created_at >= start \
                and prev.events is not None and swap.events is not None:
            t = math.floor(swap.created_at)
            rate[t] = rate.get(t, 0.0) + max(0, swap.events - prev.events)
        if swap.swapped_at >= start:
            t = math.floor(swap.swapped_at)
            versions[t] = max(versions.get(t, 0), swap.version)
            if swap.created_at:
                delay[t] = max(delay.get(t, 0.0), swap.swapped_at - swap.created_at)
    if rate:  # seconds without a version in between learned nothing that is served yet
        first = min(rate)
        rate = {t: rate.get(t, 0.0) for t in range(first, math.floor(now))}
    recent = [{"version": s.version, "kind": s.kind, "created_at": s.created_at,
               "swapped_at": s.swapped_at, "delay_s": s.swapped_at - s.created_at
               if s.created_at else None, "events": s.events, "load_ms": s.load_s * 1000}
              for s in swaps[-RECENT_SWAPS:][::-1]]
    return {"rate": sorted(rate.items()), "versions": sorted(versions.items()),
            "delay": sorted(delay.items()), "recent": recent,
            "events_per_s": _versions_rate(swaps, now)}


def _versions_rate(swaps: list[Any], now: float) -> float | None:
    """Events/s that entered versions created in the last ``RATE_SPAN_S``."""
    swaps = [s for s in swaps if s.events is not None]
    if not swaps:
        return None
    cutoff = now - RATE_SPAN_S
    base = next((s for s in reversed(swaps) if s.created_at < cutoff), None)
    if base is None:  # the history starts inside the window
        base = swaps[0]
        span = now - base.created_at
    else:
        span = RATE_SPAN_S
    return max(0, swaps[-1].events - base.events) / span if span > 0 else None


def server_metrics(metrics: ServingMetrics) -> dict[str, Any]:
    """Requests, swaps, refusals and visible delay, read from what ``/metrics`` exposes."""
    requests: dict[str, dict[str, float]] = {}
    scalars: dict[str, float] = {}
    for family in metrics.collected().collect():
        for s in family.samples:
            if s.name == "stream_rec_requests_total":
                by_status = requests.setdefault(s.labels["endpoint"], {})
                by_status[s.labels["status"]] = s.value
            elif not s.labels:
                scalars[s.name] = s.value
    n = scalars.get("stream_rec_snapshot_visible_delay_seconds_count", 0.0)
    return {"requests": requests,
            "swaps": scalars.get("stream_rec_snapshot_swaps_total", 0.0),
            "refused": scalars.get("stream_rec_snapshot_refused_total", 0.0),
            "visible_delay_mean_s": scalars.get(
                "stream_rec_snapshot_visible_delay_seconds_sum", 0.0) / n if n else None}


class _ActiveUsers:
    """The users with the newest clicks in a version, computed once per version."""

    def __init__(self) -> None:
        self._version: int | None = None
        self._users: list[str] = []

    def of(self, current: ServingState) -> list[str]:
        if current.version != self._version:
            state = current.state
            last = state.tables[T.USER_LAST_TS]
            live = np.array([bool(u) for u in state.user_ids], dtype=bool)
            ts = np.where(live[:len(last)], last, np.iinfo(np.int64).min)
            top = np.argsort(-ts, kind="stable")[:TRY_USERS] if len(ts) else []
            self._users = [state.user_ids[int(r)] for r in top if live[int(r)]]
            self._version = current.version
        return self._users


def router(watcher: SnapshotWatcher, metrics: ServingMetrics, batcher: SearchBatcher,
           cfg: ServeSettings, overlay: Overlay | None = None,
           follow: Any | None = None) -> APIRouter:
    """The dashboard's routes over a server's watcher, metrics and batcher."""
    r = APIRouter()
    probe = WorkerProbe(cfg.worker_metrics_url) if cfg.worker_metrics_url else None
    active = _ActiveUsers()
    UserParam = Annotated[str, Path(min_length=1, max_length=256)]
    KParam = Annotated[int, Query(ge=1, le=min(cfg.max_k, 100))]

    @r.get("/dashboard", include_in_schema=False)
    def dashboard() -> Response:
        return Response(page(), media_type="text/html; charset=utf-8",
                        headers={"content-security-policy": CSP, "cache-control": "no-store"})

    @r.get("/dashboard/data", include_in_schema=False)
    def data() -> Response:
        now = time.time()
        current = watcher.current
        served: dict[str, Any] = {"ready": False, "reason": "no snapshot loaded yet"}
        if current is not None:
            served = {**current.status(follow or overlay), "kind": current.manifest.kind,
                      "loaded_at": current.loaded_at,
                      "age_s": now - current.manifest.created_at
                      if current.manifest.created_at else None}
        history = timeline(watcher, now)
        worker = probe.read() if probe is not None else None
        live = worker.get("events_per_s") if worker and worker.get("ok") else None
        return _json({
            "now": now, "served": served, "server": server_metrics(metrics),
            "history": history, "worker": worker,
            "events_per_s": live if live is not None else history["events_per_s"],
            "events_per_s_from": "worker" if live is not None else "versions",
            "try_users": active.of(current) if current is not None else [],
        })

    @r.get("/dashboard/user/{user_id}", include_in_schema=False)
    async def user(user_id: UserParam, k: KParam = cfg.default_k) -> Response:
        answered = await answer_on_newest(watcher, batcher, user_id, k, overlay)  # /recommend's
        if answered is None:
            raise HTTPException(503, "no snapshot loaded yet")
        current, body = answered
        body["recent"] = [{"item_id": c.item_id, "ts": c.ts}
                          for c in current.recent_clicks(user_id, overlay=overlay)]
        return _json(body)

    return r
