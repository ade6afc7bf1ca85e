"""The HTTP server below the app: a cap on open connections, a time limit on request headers, and
malformed requests answered without echoing them.

aiohttp's defaults suit a trusted network: it holds any number of connections, waits 75 s for a
request's headers, and answers a malformed request line or header with a body (and a log line with a
traceback) that repeats the offending bytes, which may carry a stream token or an upstream key. The
runner made here changes exactly that, on aiohttp's own server and protocol classes:

- at most `[server] max_connections` open client connections; the next ones are closed at once;
- a connection must send complete request headers within `[server] header_timeout_seconds` of
  connecting or of its previous answer (aiohttp's keep-alive timer, which covers both);
- after answering a request whose body was not read (413, 408), what the client still sends is
  drained for at most a second (aiohttp: 10 s), then the connection is closed;
- a malformed request gets `400 {"status": "error", "error": {"code": "bad_request", …}}` naming only
  the kind of problem, and one log line with the peer address and that kind.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from .config import Config
from .http import error

log = logging.getLogger("relay.server")

LINGER_SECONDS = 1.0  # after an answer to an unread body, drain what the client still sends at most this long


class GuardedRequestHandler(RequestHandler):
    """aiohttp's protocol: refuses connections over the cap, answers malformed requests without
    repeating them."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._manager
        if isinstance(server, GuardedServer) and server.full():
            self._manager = None  # never started: connection_lost has nothing to give back
            transport.abort()
            server.refused()
            return
        super().connection_made(transport)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        kind = type(exc).__name__
        log.info("rejected a malformed HTTP request from %s (%s)", request.remote, kind)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was sent already")
        resp = error(status if 400 <= status < 500 else 400, "bad_request", f"malformed HTTP request ({kind})")
        resp.force_close()
        return resp


class GuardedServer(web.Server):
    """aiohttp's server, with a cap on open connections."""

    max_connections = 4096
    _refused_logged_at = 0.0

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)

    def full(self) -> bool:
        return len(self._connections) >= self.max_connections

    def refused(self) -> None:
        now = time.monotonic()
        if now - self._refused_logged_at > 60:  # one line a minute, however many are refused
            self._refused_logged_at = now
            log.warning(
                "closing new connections: %d are open, the limit is [server] max_connections = %d",
                len(self._connections),
                self.max_connections,
            )


SPARE_DESCRIPTORS = 512  # for files, the upstream pool and webhooks, beside the client connections


def connection_cap(configured: int) -> int:
    """`[server] max_connections`, lowered when the process may not open that many descriptors (the
    cap must bite before the descriptors run out, or every accept fails and asyncio floods the log)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or configured + SPARE_DESCRIPTORS <= soft:
        return configured
    cap = max(16, soft - SPARE_DESCRIPTORS)
    log.warning(
        "[server] max_connections = %d needs more open files than the limit of %d (ulimit -n; "
        "LimitNOFILE under systemd): using %d",
        configured,
        soft,
        cap,
    )
    return cap


class RelayRunner(web.AppRunner):
    """An AppRunner whose server is a GuardedServer."""

    def __init__(self, app: web.Application, config: Config, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", config.server_header_timeout_seconds)
        kwargs.setdefault("lingering_time", LINGER_SECONDS)
        super().__init__(app, **kwargs)
        self._max_connections = connection_cap(config.server_max_connections)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = GuardedServer
        assert isinstance(server, GuardedServer)
        server.max_connections = self._max_connections
        return server
