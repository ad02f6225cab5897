"""HTTP serving: ``/recommend``, ``/similar``, health, readiness, metrics and the dashboard.

Each handler reads :attr:`SnapshotWatcher.current` once and answers entirely
from that state, so a swap in the middle of a request cannot mix versions.
"""


import asyncio
import logging
import os
import shutil
import ssl
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, HTTPException, Path, Query, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, SecretStr

from stream_rec.logs import uvicorn_log_config
from stream_rec.metrics import ServingMetrics
from stream_rec.serving import dashboard
from stream_rec.serving.auth import ApiKeys, BearerAuth
from stream_rec.serving.batcher import SearchBatcher, answer_on_newest
from stream_rec.serving.follower import TopicFollower
from stream_rec.serving.http import configure, uvicorn_options
from stream_rec.serving.overlay import Overlay
from stream_rec.serving.state import ServingState, SnapshotWatcher
from stream_rec.settings import ServeSettings, Settings
from stream_rec.snapshot import SnapshotStore

log = logging.getLogger(__name__)

IdParam = Annotated[str, Path(min_length=1, max_length=256)]


class Scored(BaseModel):
    item_id: str
    score: float


class Recommended(BaseModel):
    """The answer of ``/recommend``: documents the schema; bodies are written with orjson."""

    user_id: str
    version: int
    watermark: int | None
    fallback: bool
    items: list[Scored]


class Similar(BaseModel):
    item_id: str
    version: int
    watermark: int | None
    items: list[Scored]


class _Observe:
    """Counts and times every request per route, as plain ASGI middleware.

    (Starlette's ``@app.middleware("http")`` wraps each response in a stream
    and costs more than the search itself on this hot path.)
    """

    def __init__(self, app: Any, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "other")
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


def _json(body: dict[str, Any]) -> Response:
    """Serialise with orjson directly: the hot path skips response-model validation."""
    return Response(orjson.dumps(body), media_type="application/json")


def create_app(store: SnapshotStore, cfg: ServeSettings | None = None,
               metrics: ServingMetrics | None = None, watch: bool = True,
               follow: Settings | None = None, overlay: Overlay | None = None) -> FastAPI:
    """The serving application over ``store``; ``watch=False`` leaves polling to the caller.

    With ``follow`` (the settings naming the broker, topic and event contract)
    and ``cfg.follow_topic``, the server also reads the click topic into an
    overlay of each user's clicks past the served version (see
    :mod:`stream_rec.serving.overlay`). ``overlay`` passes one in directly
    (tests feed it themselves).
    """
    cfg = cfg or ServeSettings()
    metrics = metrics or ServingMetrics(
        multiprocess_dir=cfg.metrics_dir if cfg.workers > 1 else None)
    keys = ApiKeys.from_settings(cfg)
    follower: TopicFollower | None = None
    if overlay is None and follow is not None and cfg.follow_topic:
        overlay = Overlay(history=follow.model.history, max_events=cfg.overlay_max_events)
        follower = TopicFollower(follow.kafka, follow.events, overlay, metrics,
                                 partitions=cfg.follow_partitions)
    topic = follow.kafka.topic if follow is not None else None

    def rebase(current: ServingState) -> None:
        if overlay is not None:
            offsets = current.manifest.offsets
            overlay.rebase(offsets.get(topic, {}) if topic else
                           next(iter(offsets.values()), {}), current.version)

    watcher = SnapshotWatcher(store, cfg.poll_interval_ms / 1000.0, metrics,
                              index_kind=cfg.index, nprobe=cfg.nprobe, on_swap=rebase,
                              content_alpha=cfg.content_alpha,
                              vector_dtype=cfg.vector_dtype)
    KParam = Annotated[int, Query(ge=1, le=cfg.max_k, description="number of items")]

    batcher = SearchBatcher(cfg.max_batch, cfg.search_threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if watch:
            watcher.start()
            if follower is not None:
                follower.start()
        yield
        if follower is not None:
            follower.stop()
        watcher.stop()
        batcher.close()
        metrics.exited()

    app = FastAPI(title="stream-rec", version="0.1.0", lifespan=lifespan)
    app.state.watcher = watcher
    app.state.metrics = metrics
    app.state.batcher = batcher
    app.state.overlay = overlay
    app.state.follower = follower

    def ready() -> ServingState:
        current = watcher.current
        if current is None:
            raise HTTPException(503, "no snapshot loaded yet")
        return current

    if keys is not None:
        app.add_middleware(BearerAuth, keys=keys)  # inside _Observe: 401s are counted too
    app.add_middleware(_Observe, metrics=metrics)

    @app.get("/recommend/{user_id}", response_model=Recommended)
    async def recommend(user_id: IdParam, k: KParam = cfg.default_k) -> Response:
        """Top-k unseen items for a user; unknown users get recently popular items."""
        answered = await answer_on_newest(watcher, batcher, user_id, k, overlay)
        if answered is None:
            raise HTTPException(503, "no snapshot loaded yet")
        return _json(answered[1])

    @app.get("/similar/{item_id}", response_model=Similar)
    async def similar(item_id: IdParam, k: KParam = cfg.default_k) -> Response:
        """Items nearest to an item in the embedding space."""
        current = ready()
        plan = current.plan_similar(item_id)
        if plan is None or plan.query is None:
            raise HTTPException(404, f"unknown item {item_id!r}")
        hits = await asyncio.wrap_future(
            batcher.search(current.index, plan.query, k, plan.exclude))
        return _json(current.answer_similar(item_id, hits, plan, k))

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> Response:
        current = watcher.current
        if current is None:
            return JSONResponse({"ready": False, "reason": "no snapshot loaded yet"}, 503)
        return JSONResponse(current.status(follower or overlay))

    @app.get("/metrics", response_class=PlainTextResponse)  # documented as text, not JSON
    def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(dashboard.router(watcher, metrics, batcher, cfg, overlay, follower))
    return app


def serve(store: SnapshotStore, settings: Settings) -> None:
    """Run the server in the foreground until SIGTERM or Ctrl+C.

    With ``cfg.workers`` > 1, uvicorn runs that many processes on the same port,
    each with its own copy of the snapshot and index: HTTP handling is bound to
    one core per process, so more processes answer more requests per second.
    They share their metrics through files in ``cfg.metrics_dir`` (see
    :mod:`stream_rec.metrics`). With ``cfg.ssl_certfile`` the server speaks
    HTTPS only.
    """
    import uvicorn

    cfg = settings.serve
    _check_access(cfg)
    tls = {"ssl_certfile": cfg.ssl_certfile, "ssl_keyfile": cfg.ssl_keyfile,
           "ssl_keyfile_password": cfg.ssl_keyfile_password.get_secret_value()
           if cfg.ssl_keyfile_password else None}
    common: dict[str, Any] = dict(host=cfg.host, port=cfg.port, log_level="warning",
                                  access_log=False, log_config=uvicorn_log_config(),
                                  **uvicorn_options(cfg), **tls)
    log.info("serving on %s://%s:%d from %s (%d process%s)",
             "https" if cfg.ssl_certfile else "http", cfg.host, cfg.port, store.url,
             cfg.workers, "es" if cfg.workers > 1 else "")
    if cfg.workers == 1:
        uvicorn.run(create_app(store, cfg, follow=settings), **common)
        return
    made = cfg.metrics_dir is None
    metrics_dir = tempfile.mkdtemp(prefix="stream-rec-metrics-") if made else cfg.metrics_dir
    os.makedirs(metrics_dir, exist_ok=True)
    for name in os.listdir(metrics_dir):  # counts of an earlier run must not be added
        if name.endswith(".db"):
            os.remove(os.path.join(metrics_dir, name))
    # Worker processes rebuild the app from the environment: pass the effective values,
    # and the metrics directory to prometheus_client before they import it.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ["STREAM_REC_STORE__PATH"] = store.url
    os.environ["STREAM_REC_STORE__KEEP_VERSIONS"] = str(store.keep_versions)
    os.environ["STREAM_REC_KAFKA__BOOTSTRAP"] = settings.kafka.bootstrap
    os.environ["STREAM_REC_KAFKA__TOPIC"] = settings.kafka.topic
    effective = cfg.model_copy(update={"metrics_dir": metrics_dir})
    for name, value in effective:
        if value is not None:
            os.environ[f"STREAM_REC_SERVE__{name.upper()}"] = \
                value.get_secret_value() if isinstance(value, SecretStr) else str(value)
    try:
        uvicorn.run("stream_rec.serving.app:app_from_environment", factory=True,
                    workers=cfg.workers, **common)
    finally:
        if made:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _check_access(cfg: ServeSettings) -> None:
    """A key file or certificate that cannot work fails here, in one line, before any process."""
    ApiKeys.from_settings(cfg)
    if cfg.ssl_certfile:
        password = cfg.ssl_keyfile_password.get_secret_value() \
            if cfg.ssl_keyfile_password else None
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
                cfg.ssl_certfile, cfg.ssl_keyfile, password)
        except OSError as exc:  # missing file, bad PEM, wrong passphrase (ssl.SSLError)
            raise ValueError(f"serve.ssl_certfile / serve.ssl_keyfile: {exc}") from None


def app_from_environment() -> FastAPI:
    """The app of one serving process, configured from settings (file + environment)."""
    from stream_rec.settings import load_settings

    settings = load_settings()
    configure(settings.serve)  # this process's HTTP limits
    return create_app(SnapshotStore(settings.store.path, settings.store.keep_versions),
                      settings.serve, follow=settings)
