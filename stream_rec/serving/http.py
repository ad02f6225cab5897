"""The server's HTTP limits: how many connections, how long idle, how long to send headers.

uvicorn bounds idle keep-alive connections and, with ``limit_concurrency``, the
connections and requests it holds (beyond it: 503), but nothing bounds how long
a client may take to send a request's headers: any byte cancels its keep-alive
timer, so a client that trickles a header line every few seconds holds a
connection, and with the concurrency limit a share of the server, for ever.
:class:`HeaderDeadlineProtocol` gives every request ``header_timeout_s`` from
the moment its connection opens (or its previous response ends) to its last
header byte, then closes the connection.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from stream_rec.settings import ServeSettings

PROTOCOL = "stream_rec.serving.http:HeaderDeadlineProtocol"
_header_timeout_s = 10.0  # this process's deadline, set by :func:`configure`


def configure(cfg: ServeSettings) -> None:
    """Use ``cfg``'s deadline in this process (each server process calls it at start)."""
    global _header_timeout_s
    _header_timeout_s = cfg.header_timeout_s


def uvicorn_options(cfg: ServeSettings) -> dict[str, Any]:
    """uvicorn keyword arguments for the limits in ``cfg``."""
    configure(cfg)
    return {"http": PROTOCOL, "limit_concurrency": cfg.max_connections,
            "timeout_keep_alive": cfg.keep_alive_s, "backlog": cfg.backlog,
            "timeout_graceful_shutdown": cfg.graceful_shutdown_s}


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for each request's headers."""

    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # a next request whose headers are already in
        super().on_response_complete()
        if not pipelined and not self.transport.is_closing():
            self._arm()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(_header_timeout_s, self._late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _late(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()
