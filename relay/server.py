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
  the kind of problem, and one log line with the peer address and that kind;
- header values are text before anything reads them (`clean_headers`): aiohttp keeps the bytes of a
  value that are not UTF-8 as lone surrogates (`\\udcff`), which no code can encode, hash, compare
  in constant time or write as JSON, so a relay key or a bearer token with one such byte was a 500. Each
  such byte becomes U+FFFD here, once, for every route and for aiohttp's own reads, so such a credential
  is simply a wrong one (401/403) and such a `Last-Event-ID` an unknown one. (Raw bytes that are not
  ASCII in the request target never get this far: the parser refuses them with a 400; percent-encoded
  ones are decoded by yarl with U+FFFD already.) An `Expect` other than `100-continue` is dropped, as RFC
  9110 §10.1.1 allows: aiohttp would answer it with a plain-text 417 before any middleware could give
  the JSON error body.
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
from multidict import CIMultiDict, CIMultiDictProxy

from .config import Config
from .http import error

log = logging.getLogger("relay.server")

LINGER_SECONDS = 1.0  # after an answer to an unread body, drain what the client still sends at most this long


class GuardedRequestHandler(RequestHandler):
    """aiohttp's protocol: refuses connections over the cap, answers malformed requests without
    repeating them."""

    __slots__ = ()  # as aiohttp's own: no per-connection __dict__ (~300 bytes for every open connection)

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


def text(value: str) -> str:
    """A header value as text: bytes that were not UTF-8 (kept by aiohttp as lone surrogates) as U+FFFD."""
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def clean_headers(message: Any) -> Any:
    """The request message (aiohttp's RawRequestMessage) with header values that are text (see `text`),
    and without an `Expect` the server would refuse in plain text; the message itself when it needs
    neither (nearly always: one `isascii` per value)."""
    headers = message.headers
    expect = headers.get("Expect")
    dropped = expect is not None and expect.lower() != "100-continue"
    if not dropped and all(value.isascii() for value in headers.values()):
        return message
    clean: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if not (dropped and name.lower() == "expect"):
            clean.add(name, text(value))
    return message._replace(headers=CIMultiDictProxy(clean))


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
        make_request = server.request_factory
        server.request_factory = lambda message, *args: make_request(clean_headers(message), *args)
        return server
