"""Webhook delivery, and the address checks that keep it from being used against the relay's network.

A webhook URL is checked twice: when the request is accepted (its host must resolve, and only to
public addresses), and again when it is delivered, by the resolver of the HTTP client itself: the
addresses the client connects to are exactly the ones that passed the check, so a name that resolves
differently the second time (DNS rebinding) cannot get through. IP literals, which HTTP clients do not
resolve, are checked directly. Redirects are never followed.

Deliveries are fair between destinations (a receiver's host and port): each destination may have
PER_DESTINATION attempts in flight and MAX_PENDING_PER_DESTINATION deliveries in all (in flight, waiting
for a slot, or between two attempts; more are dropped at once), and all destinations together
MAX_CONNECTIONS attempts. An attempt's time limit starts once it holds its slots, so waiting behind a
slow receiver never counts against a webhook; and a destination's waiters queue at its own slots, so a
slow receiver's backlog never stands in front of another receiver's webhooks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar
from urllib.parse import quote_from_bytes, urlsplit

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from .paths import is_http_url
from .upstream import exception_chain

log = logging.getLogger("relay.webhooks")

NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: the v4 address is the last 32 bits
GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")  # every other IPv6 range is local, reserved or legacy
RESPONSE_LIMIT = 64 * 1024  # bytes of a receiver's answer that are read; the rest is never read
MAX_CONNECTIONS = 100  # delivery attempts in flight at once, all destinations together
PER_DESTINATION = 8  # delivery attempts in flight at once to one destination (host:port)
MAX_PENDING_PER_DESTINATION = 1000  # deliveries to one destination not yet ended; more are dropped
MAX_HOST_LENGTH = 253  # a DNS name, in ASCII (IDNA), without its final dot


class WebhookRefused(Exception):
    """The URL may not be called; the message says why."""


class NonPublicAddress(OSError):
    """A webhook host resolves only to addresses webhooks may not reach (raised by the resolver)."""


def address_allowed(text: str) -> bool:
    """True for a unicast, globally routable address (IPv4, IPv6, and v4 embedded in v6).

    IPv6 must be global unicast (2000::/3), which leaves out IPv4-compatible (::a.b.c.d), IPv4-translated
    (::ffff:0:a.b.c.d), site-local (fec0::/10), unique-local and the local-use NAT64 prefix
    (64:ff9b:1::/48); the well-known NAT64 prefix is allowed only for a public IPv4 address. An IPv6
    address may carry a zone (`fe80::1%eth0`, as resolvers give link-local ones), which does not change
    its range; an IPv4 address written with one is not an address."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in NAT64:
            return address_allowed(str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
        if ip not in GLOBAL_UNICAST_V6:
            return False
        embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and not address_allowed(str(embedded)):
            return False
    return ip.is_global and not ip.is_multicast


def _literal(host: str) -> str | None:
    """The address a URL's host name (`urlsplit(url).hostname`: no brackets) is, if it is an IP literal."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


class GuardedResolver(AbstractResolver):
    """Resolves with `base` and drops every address that is not allowed."""

    def __init__(self, base: AbstractResolver | None = None, allow_private: bool = False) -> None:
        self.base = base
        self.allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self.base is None:
            self.base = ThreadedResolver()
        results = await self.base.resolve(host, port, family)
        if self.allow_private:
            return results
        allowed = [r for r in results if address_allowed(r["host"])]
        if not allowed:
            raise NonPublicAddress(f"{host} resolves only to addresses webhooks may not reach")
        return allowed

    async def close(self) -> None:
        if self.base is not None:
            await self.base.close()


def host_problem(host: str) -> str | None:
    """Why `host` (a URL's host name) cannot be looked up or connected to, else None: the resolver and
    the HTTP client encode it with IDNA, which fails (UnicodeError) on an empty label (`a..b`, `.a`) or a
    label over 63 characters. (IP literals always pass: their one label is short, or they are dotted
    numbers.)"""
    try:
        ascii_host = host.encode("idna")
    except UnicodeError:
        return "has an invalid host name (an empty label, or a label over 63 characters)"
    if len(ascii_host.rstrip(b".")) > MAX_HOST_LENGTH:
        return f"has a host name over {MAX_HOST_LENGTH} characters"
    return None


async def check_url(url: str, resolver: GuardedResolver) -> None:
    """Refuse (WebhookRefused) a webhook URL that is malformed or points at a non-public address."""
    if not is_http_url(url):
        raise WebhookRefused("must be an absolute http(s) URL")
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise WebhookRefused("must not contain credentials")
    try:
        port = parts.port
    except ValueError:
        raise WebhookRefused("has an invalid port") from None
    host = parts.hostname
    problem = host_problem(host)
    if problem is not None:
        raise WebhookRefused(problem)
    if resolver.allow_private:
        return
    literal = _literal(host)
    if literal is not None:
        if not address_allowed(literal):
            raise WebhookRefused("points at a loopback, private, link-local, multicast or reserved address")
        return
    try:
        await resolver.resolve(host, port or 0, socket.AF_UNSPEC)
    except NonPublicAddress:
        raise WebhookRefused("resolves to a loopback, private, link-local, multicast or reserved address") from None
    except (OSError, ValueError):  # (ValueError: what getaddrinfo cannot even ask, such as a NUL)
        raise WebhookRefused(f"host {host[:100]!r} does not resolve") from None


def destination(url: str) -> str:
    """The destination a delivery counts against: the receiver's host and port (`host:port`)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or ""
    return f"{f'[{host}]' if ':' in host else host}:{port or (443 if parts.scheme == 'https' else 80)}"


class _Destination:
    """One destination's slots and the deliveries to it that have not ended."""

    __slots__ = ("slots", "pending", "users")

    def __init__(self, concurrency: int) -> None:
        self.slots = asyncio.Semaphore(concurrency)
        self.pending = 0  # deliveries not yet ended (counted against MAX_PENDING_PER_DESTINATION)
        self.users = 0  # pending deliveries and attempts using `slots` (the entry goes at 0)


async def _drain_bounded(resp: aiohttp.ClientResponse) -> None:
    """Read at most RESPONSE_LIMIT bytes of a receiver's answer; a longer one is cut off (the
    connection is closed, not reused). Only the status matters to the relay."""
    read = 0
    while read <= RESPONSE_LIMIT:
        block = await resp.content.readany()
        if not block:
            return
        read += len(block)
    resp.close()


T = TypeVar("T")
FORM = "application/x-www-form-urlencoded"
LARGE = 64 * 1024  # bodies above this are hashed in a worker thread (hashlib lets go of the GIL)


FORM_SLICE = 256 * 1024


def form_body(doc: dict[str, Any]) -> bytes:
    """The OffloadGPT webhook's body: `response=<the document as JSON>`, form-encoded byte for byte as
    `urlencode` does it, but a slice at a time: `urlencode` of a 15 MiB document ends in one join of 15
    million strings that holds the GIL ~0.2 s, which the loop waits for even when a worker thread runs it."""
    data = orjson.dumps(doc)
    pieces = [quote_from_bytes(data[i : i + FORM_SLICE], safe=" ").replace(" ", "+")
              for i in range(0, len(data), FORM_SLICE)]  # fmt: skip
    return b"response=" + "".join(pieces).encode("ascii")


async def _hashed(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, a signature over a body that is the last argument: off the loop when it is large."""
    if len(args[-1]) > LARGE:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def standard_headers(secret: str, msg_id: str, body: bytes, now: int | None = None) -> dict[str, str]:
    """Standard Webhooks headers (as OpenAI sends them, verified by the SDKs' `webhooks.unwrap`):
    `webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`. A secret written as
    `whsec_<base64>` is that key's bytes (the SDKs decode it the same way); any other secret, its text."""
    timestamp = str(int(time.time()) if now is None else now)
    key = base64.b64decode(secret[6:]) if secret.startswith("whsec_") else secret.encode()
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return {"webhook-id": msg_id, "webhook-timestamp": timestamp,
            "webhook-signature": "v1," + base64.b64encode(mac).decode()}  # fmt: skip


class WebhookSender:
    """Delivers final status documents; one HTTP session for the whole process, fair between destinations
    (see the module's docstring)."""

    def __init__(
        self,
        *,
        secret: str,
        allow_private: bool,
        timeout: float = 10.0,
        attempts: int = 3,
        backoff: float = 1.0,
        base_resolver: AbstractResolver | None = None,
        on_result: Callable[[str], None] | None = None,
        max_connections: int = MAX_CONNECTIONS,
        per_destination: int = PER_DESTINATION,
        max_pending_per_destination: int = MAX_PENDING_PER_DESTINATION,
    ) -> None:
        self.secret = secret
        self.on_result = on_result or (lambda result: None)
        self.resolver = GuardedResolver(base_resolver, allow_private)
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self.per_destination = per_destination
        self.max_pending = max_pending_per_destination
        self._slots = asyncio.Semaphore(max_connections)
        self._destinations: dict[str, _Destination] = {}
        self._session: aiohttp.ClientSession | None = None
        self.tasks: set[asyncio.Task[bool]] = set()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No limit in the pool: the slots of `_slot` are the limits, taken before an attempt starts, so
            # an attempt never waits in the pool (where the wait would count against its time limit).
            connector = aiohttp.TCPConnector(resolver=self.resolver, use_dns_cache=False, limit=0)
            self._session = aiohttp.ClientSession(
                connector=connector,
                trust_env=False,  # no proxy from the environment
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"User-Agent": "offload-relay-webhook"},
            )
        return self._session

    def _destination(self, key: str) -> _Destination:
        dest = self._destinations.get(key)
        if dest is None:
            dest = self._destinations[key] = _Destination(self.per_destination)
        dest.users += 1
        return dest

    def _leave(self, key: str, dest: _Destination) -> None:
        dest.users -= 1
        if dest.users == 0:
            del self._destinations[key]

    @contextlib.asynccontextmanager
    async def _slot(self, url: str) -> AsyncIterator[None]:
        """One attempt's slots: its destination's first (its waiters queue there, behind their own
        destination only), then one of all destinations'."""
        key = destination(url)
        dest = self._destination(key)
        try:
            async with dest.slots, self._slots:
                yield
        finally:
            self._leave(key, dest)

    def pending(self, url: str) -> int:
        """Deliveries to `url`'s destination that have not ended."""
        dest = self._destinations.get(destination(url))
        return dest.pending if dest is not None else 0

    def send_later(self, url: str, doc: dict[str, Any], request_id: str) -> None:
        """The OffloadGPT webhook: POST `response=<status document JSON>`, form-encoded, in the background."""
        self._background(url, lambda: self._send_doc(url, doc, request_id), request_id)

    async def _send_doc(self, url: str, doc: dict[str, Any], request_id: str) -> bool:
        body = await asyncio.to_thread(form_body, doc)  # (a document may hold 16 MiB: ~1.4 s of pure Python)
        return await self._send_counted(url, body, FORM, request_id, f"msg_{request_id}")

    def post_later(self, url: str, body: bytes, content_type: str, request_id: str, msg_id: str) -> None:
        """Deliver `body` in the background (see `send`)."""
        self._background(url, lambda: self._send_counted(url, body, content_type, request_id, msg_id), request_id)

    def _background(self, url: str, delivery: Callable[[], Coroutine[Any, Any, bool]], request_id: str) -> None:
        """Start `delivery` unless its destination has MAX_PENDING_PER_DESTINATION deliveries not yet
        ended: then it is dropped at once (logged, counted as `dropped`), and nothing of it is made."""
        key = destination(url)
        dest = self._destinations.get(key)
        if dest is not None and dest.pending >= self.max_pending:
            log.warning("request %s: webhook dropped: %d deliveries to its receiver are pending", request_id,
                        dest.pending)  # fmt: skip
            self.on_result("dropped")
            return
        dest = self._destination(key)
        dest.pending += 1
        task = asyncio.create_task(delivery(), name=f"webhook-{request_id}")
        self.tasks.add(task)

        def done(task: asyncio.Task[bool]) -> None:
            self.tasks.discard(task)
            dest.pending -= 1
            self._leave(key, dest)

        task.add_done_callback(done)

    async def _send_counted(self, url: str, body: bytes, content_type: str, request_id: str, msg_id: str) -> bool:
        delivered = await self.send(url, body, content_type, request_id, msg_id)
        self.on_result("delivered" if delivered else "failed")
        return delivered

    async def send(self, url: str, body: bytes, content_type: str, request_id: str, msg_id: str) -> bool:
        """POST `body`; retries network errors and 5xx with backoff. True if delivered. Signed, when a
        secret is set, with `X-Relay-Signature` and the Standard Webhooks headers (the same `webhook-id`
        on every attempt, so a receiver can drop a repeat). Each attempt first takes its slots (`_slot`);
        its time limit (`timeout`) starts then. No slot is held between attempts."""
        headers = {"Content-Type": content_type}
        if self.secret:
            headers["X-Relay-Signature"] = await _hashed(sign, self.secret, body)
        host = urlsplit(url).hostname or ""
        literal = _literal(host)
        if literal is not None and not self.resolver.allow_private and not address_allowed(literal):
            log.warning("request %s: webhook refused: non-public address", request_id)
            return False
        if host_problem(host) is not None:  # (a URL from before hosts were checked)
            log.warning("request %s: webhook refused: invalid host name", request_id)
            return False
        for attempt in range(1, self.attempts + 1):
            if self.secret:  # (signed at each attempt: the timestamp is the attempt's)
                headers.update(await _hashed(standard_headers, self.secret, msg_id, body))
            try:
                async with (
                    self._slot(url),
                    self._client().post(url, data=body, headers=headers, allow_redirects=False) as resp,
                ):
                    await _drain_bounded(resp)
                    if resp.status < 300:
                        log.info("request %s: webhook delivered (HTTP %d)", request_id, resp.status)
                        return True
                    if resp.status < 500:
                        log.warning("request %s: webhook answered HTTP %d; not retried", request_id, resp.status)
                        return False
                    problem = f"HTTP {resp.status}"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                problem = type(exc).__name__
                if any(isinstance(e, NonPublicAddress) for e in exception_chain(exc)):
                    log.warning("request %s: webhook refused: host resolves to a non-public address", request_id)
                    return False
            if attempt < self.attempts:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
        log.warning("request %s: webhook failed after %d attempts (%s)", request_id, self.attempts, problem)
        return False

    async def close(self, grace: float = 5.0) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace)
            for task in list(self.tasks):
                task.cancel()
        if self._session is not None:
            await self._session.close()
        await self.resolver.close()
