"""Who may ask: an optional bearer token in front of everything but the health probes.

With ``serve.api_key`` (or ``serve.api_key_file``) set, every request except
``/healthz`` and ``/readyz`` (what orchestrators and load balancers probe)
needs ``Authorization: Bearer <key>``; anything else gets 401 with
``WWW-Authenticate: Bearer`` (RFC 6750). Keys are compared in constant time,
through their SHA-256 digests, so neither content nor length leaks.

A browser cannot send that header when it opens a page, so the dashboard also
accepts a session cookie: ``POST /dashboard/login`` with the key sets it
(HttpOnly, SameSite=Strict, Secure over HTTPS, path ``/dashboard``). The
cookie is an HMAC of the key, valid while the key is, and opens nothing but
the dashboard.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import os
import threading
import time
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import cookie_parser

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
PAGE = "/dashboard"
LOGIN = "/dashboard/login"
COOKIE = "stream_rec_session"
_SESSION_CONTEXT = b"stream-rec dashboard session v1"
_MAX_FORM_BYTES = 4096


class ApiKeys:
    """The keys accepted now: one fixed key, or the lines of a file re-read when it changes.

    The file is checked at most every ``recheck_s`` seconds (one ``stat``); a
    file caught missing or empty mid-rotation keeps the previous keys.
    """

    def __init__(self, key: str | None = None, path: str | None = None,
                 recheck_s: float = 1.0) -> None:
        if (key is None) == (path is None):
            raise ValueError("ApiKeys needs exactly one of key and path")
        self.path = path
        self.recheck_s = recheck_s
        self._keys: tuple[bytes, ...] = (key.encode(),) if key is not None else ()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if path is not None:
            self._reload(first=True)

    @classmethod
    def from_settings(cls, cfg: Any) -> ApiKeys | None:
        """From ``serve.api_key`` / ``serve.api_key_file``; ``None`` when access is open."""
        if cfg.api_key is not None:
            return cls(key=cfg.api_key.get_secret_value())
        if cfg.api_key_file is not None:
            return cls(path=cfg.api_key_file)
        return None

    def _reload(self, first: bool = False) -> None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp == self._stamp:
                return
            with open(self.path, encoding="utf-8") as f:
                keys = tuple(line.strip().encode() for line in f if line.strip())
        except OSError as exc:
            if first:
                raise ValueError(f"cannot read serve.api_key_file {self.path}: "
                                 f"{exc.strerror}") from None
            return
        from stream_rec.settings import MIN_KEY_CHARS

        if any(len(k) < MIN_KEY_CHARS for k in keys):
            if first:
                raise ValueError(f"serve.api_key_file {self.path}: every key needs at least "
                                 f"{MIN_KEY_CHARS} characters")
            return
        if keys:
            self._keys, self._stamp = keys, stamp
        elif first:
            raise ValueError(f"serve.api_key_file {self.path} holds no key")

    def keys(self) -> tuple[bytes, ...]:
        if self.path is not None and time.monotonic() - self._checked >= self.recheck_s:
            with self._lock:
                if time.monotonic() - self._checked >= self.recheck_s:
                    self._reload()
                    self._checked = time.monotonic()
        return self._keys

    def accepts(self, presented: str) -> bool:
        """Is ``presented`` one of the keys? Constant time in its content and length."""
        digest = hashlib.sha256(presented.encode()).digest()
        ok = False
        for key in self.keys():  # every key is compared: no early exit
            ok |= hmac.compare_digest(digest, hashlib.sha256(key).digest())
        return ok

    @staticmethod
    def session_for(key: str) -> str:
        return hmac.new(key.encode(), _SESSION_CONTEXT, hashlib.sha256).hexdigest()

    def accepts_session(self, cookie: str) -> bool:
        ok = False
        for key in self.keys():
            want = hmac.new(key, _SESSION_CONTEXT, hashlib.sha256).hexdigest()
            ok |= hmac.compare_digest(cookie.encode(), want.encode())
        return ok


class BearerAuth:
    """ASGI middleware: the bearer token (or, on the dashboard, its session cookie).

    Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``, which would wrap
    every response in a stream on the hot path.
    """

    def __init__(self, app: Any, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if path == LOGIN:
            await self._login(scope, receive, send)
            return
        headers = _headers(scope)
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token and self.keys.accepts(token.strip()):
            await self.app(scope, receive, send)
            return
        if _on_page(path):
            cookie = cookie_parser(headers.get("cookie", "")).get(COOKIE)
            if cookie and self.keys.accepts_session(cookie):
                await self.app(scope, receive, send)
                return
        await _unauthorized(scope, send, invalid=bool(token), page=_on_page(path)
                            and "text/html" in headers.get("accept", ""))

    async def _login(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """GET: the form. POST ``key=…``: the session cookie and back to the page, or 401."""
        if scope["method"] == "GET":
            await _respond(send, 200, _login_page(scope), "text/html; charset=utf-8")
            return
        if scope["method"] != "POST":
            await _respond(send, 405, b"method not allowed", "text/plain",
                           [(b"allow", b"GET, POST")])
            return
        body = await _read_body(receive, _MAX_FORM_BYTES)
        key = (parse_qs(body.decode("utf-8", "replace")).get("key") or [""])[0].strip()
        if not key or not self.keys.accepts(key):
            await _respond(send, 401, _login_page(scope, failed=True),
                           "text/html; charset=utf-8", [_challenge(invalid=True)])
            return
        cookie = (f"{COOKIE}={self.keys.session_for(key)}; Path={PAGE}; HttpOnly; "
                  "SameSite=Strict" + ("; Secure" if scope.get("scheme") == "https" else ""))
        await _respond(send, 303, b"", "text/plain", [
            (b"location", (scope.get("root_path", "") + PAGE).encode()),
            (b"set-cookie", cookie.encode()), (b"cache-control", b"no-store")])


def _on_page(path: str) -> bool:
    return path == PAGE or path.startswith(PAGE + "/")


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


def _challenge(invalid: bool) -> tuple[bytes, bytes]:
    value = 'Bearer realm="stream-rec"' + (', error="invalid_token"' if invalid else "")
    return (b"www-authenticate", value.encode())


async def _unauthorized(scope: dict[str, Any], send: Any, invalid: bool, page: bool) -> None:
    if page:  # a person at a browser: the login form, still a 401
        await _respond(send, 401, _login_page(scope), "text/html; charset=utf-8",
                       [_challenge(invalid)])
        return
    detail = b'{"detail":"invalid bearer token"}' if invalid else \
        b'{"detail":"missing bearer token: Authorization: Bearer <serve.api_key>"}'
    await _respond(send, 401, detail, "application/json", [_challenge(invalid)])


async def _respond(send: Any, status: int, body: bytes, ctype: str,
                   extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode()),
               *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Any, limit: int) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > limit or not message.get("more_body"):
            return body[:limit]


def _login_page(scope: dict[str, Any], failed: bool = False) -> bytes:
    action = html.escape(scope.get("root_path", "") + LOGIN)
    note = '<p class="bad">That key is not accepted.</p>' if failed else ""
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>stream-rec · sign in</title><style>
body{{font:15px system-ui,sans-serif;background:#f4f5f7;color:#1d2430;display:grid;
place-items:center;min-height:90vh}}form{{background:#fff;padding:24px 28px;border-radius:8px;
box-shadow:0 1px 3px #0002;min-width:300px}}h1{{font-size:18px;margin:0 0 12px}}
input{{width:100%;padding:8px;margin:8px 0 12px;box-sizing:border-box;font:inherit}}
button{{padding:8px 14px;font:inherit}}.bad{{color:#b42318}}</style></head><body>
<form method="post" action="{action}"><h1>stream-rec dashboard</h1>{note}
<label for="key">API key (<code>serve.api_key</code>)</label>
<input id="key" name="key" type="password" autocomplete="current-password" autofocus>
<button type="submit">Open the dashboard</button></form></body></html>""".encode()
