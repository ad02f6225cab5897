"""Access: the bearer token, the dashboard's session cookie, key files, and the settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from stream_rec.serving.app import create_app
from stream_rec.serving.auth import COOKIE, ApiKeys
from stream_rec.settings import ServeSettings, SettingsError, load_settings
from stream_rec.snapshot import SnapshotStore
from tests.support import trained_state

KEY = "correct-horse-battery-staple"
CLOSED = ["/recommend/u1", "/similar/i1", "/metrics", "/dashboard", "/dashboard/data",
          "/dashboard/user/u1", "/openapi.json", "/docs", "/no-such-path"]


@pytest.fixture
def client(tmp_path: Path):
    store = SnapshotStore(tmp_path / "store")
    store.publish(trained_state(), offsets={}, watermark=5)
    app = create_app(store, ServeSettings(api_key=KEY), watch=False)
    app.state.watcher.poll_once()
    with TestClient(app) as c:
        yield c


def test_probes_are_open_and_everything_else_needs_the_token(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json()["version"] == 1
    for path in CLOSED:
        r = client.get(path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"] == 'Bearer realm="stream-rec"', path
    for header in (f"Bearer {KEY}x", f"Basic {KEY}", "Bearer", f"bearer {KEY[:-1]}"):
        r = client.get("/recommend/u1", headers={"Authorization": header})
        assert r.status_code == 401, header
    assert 'error="invalid_token"' in client.get(
        "/metrics", headers={"Authorization": "Bearer wrong"}).headers["www-authenticate"]
    ok = {"Authorization": f"Bearer {KEY}"}
    assert client.get("/recommend/u1", headers=ok).json()["version"] == 1
    assert client.get("/dashboard/data", headers=ok).status_code == 200
    assert client.get("/metrics", headers=ok).status_code == 200
    assert client.get("/recommend/u1", headers={"Authorization": f"bearer  {KEY} "}
                      ).status_code == 200  # the scheme is case-insensitive
    # Refusals are counted like any other request.
    assert 'stream_rec_requests_total{endpoint="other",status="401"}' in \
        client.get("/metrics", headers=ok).text


def test_a_browser_signs_in_once_and_the_cookie_opens_only_the_dashboard(
        client: TestClient) -> None:
    page = client.get("/dashboard", headers={"Accept": "text/html"})
    assert page.status_code == 401 and 'action="/dashboard/login"' in page.text
    assert client.get("/dashboard/login").status_code == 200
    bad = client.post("/dashboard/login", data={"key": "guess"}, follow_redirects=False)
    assert bad.status_code == 401 and "not accepted" in bad.text and COOKIE not in bad.headers \
        .get("set-cookie", "")
    r = client.post("/dashboard/login", data={"key": KEY}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/dashboard"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/dashboard" in cookie
    assert "Secure" not in cookie  # plain HTTP here; HTTPS adds it (test_server_processes)
    assert KEY not in cookie
    assert client.get("/dashboard").status_code == 200  # the client keeps the cookie
    assert client.get("/dashboard/data").json()["served"]["version"] == 1
    # The cookie is sent only under /dashboard by browsers; sent anyway, it opens nothing else.
    session = client.cookies[COOKIE]
    for path in ("/recommend/u1", "/metrics"):
        assert client.get(path, headers={"Cookie": f"{COOKIE}={session}"}).status_code == 401
    client.cookies.clear()
    def data(cookie: str) -> int:
        return client.get("/dashboard/data", headers={"Cookie": f"{COOKIE}={cookie}"}).status_code

    assert data(session) == 200
    assert data(session[:-1] + ("0" if session[-1] != "0" else "1")) == 401


def test_a_key_file_accepts_every_key_listed_and_follows_rotation(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{KEY}\n\nsecond-key-0123456789\n")
    keys = ApiKeys(path=str(path), recheck_s=0.0)
    assert keys.accepts(KEY) and keys.accepts("second-key-0123456789")
    assert not keys.accepts("second-key") and not keys.accepts("")
    path.write_text("third-key-0123456789abc\n")
    os.utime(path, ns=(1, 1))  # a new mtime even within the filesystem's resolution
    assert keys.accepts("third-key-0123456789abc") and not keys.accepts(KEY)
    path.unlink()  # mid-rotation: keep what was read
    assert keys.accepts("third-key-0123456789abc")
    path.write_text("short\n")
    with pytest.raises(ValueError, match="at least 16"):
        ApiKeys(path=str(path))
    with pytest.raises(ValueError, match="cannot read"):
        ApiKeys(path=str(tmp_path / "missing"))


def test_access_settings_fail_at_start_without_echoing_secrets(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("STREAM_REC_"):
            monkeypatch.delenv(k)
    cases = [
        ({"STREAM_REC_SERVE__API_KEY": "tooshort"}, "at least 16"),
        ({"STREAM_REC_SERVE__API_KEY": KEY, "STREAM_REC_SERVE__API_KEY_FILE": "/k"},
         "not both"),
        ({"STREAM_REC_SERVE__SSL_KEYFILE": "/k.pem"}, "needs serve.ssl_certfile"),
        ({"STREAM_REC_SERVE__WORKER_METRICS_URL": "worker:9100"}, "http:// or https://"),
    ]
    for env, message in cases:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            with pytest.raises(SettingsError, match=message) as err:
                load_settings()
            assert "tooshort" not in str(err.value) and KEY not in str(err.value)
    monkeypatch.setenv("STREAM_REC_SERVE__API_KEY", KEY)
    settings = load_settings()
    assert settings.serve.api_key.get_secret_value() == KEY
    assert KEY not in str(settings.masked())
