"""Talking to the OpenAI-compatible server, and turning its failures into clear error codes.

One `openai.AsyncOpenAI` client with one shared HTTP connection pool serves the whole process. The key
of each request is passed per call as a header, so no client is built per request and the key lives
only in that call's arguments. The body is read as raw bytes (no pydantic model per chunk): the job
needs the exact upstream bytes for `.raw` and for the event log anyway.

No exception raised from here carries the key: messages are built from status codes, exception class
names and the upstream's own error text.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx2
import openai
import orjson
from openai._constants import RAW_RESPONSE_HEADER

log = logging.getLogger("relay.upstream")

QUIET_LOGGERS = ("openai", "httpx", "httpx2", "httpcore", "httpcore2")


def quiet_sdk_loggers() -> None:
    """The SDK logs request options (headers, so the key) at debug level: keep it and its transport quiet,
    whatever the relay's own log level."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


quiet_sdk_loggers()


class UpstreamError(Exception):
    """A failed upstream call: a snake_case `code`, a message for humans, and what the upstream sent."""

    def __init__(
        self,
        code: str,
        message: str,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status_code = status_code
        self.headers = headers or {}
        self.body = body


@dataclass
class UpstreamResponse:
    status_code: int
    headers: dict[str, str]
    content_type: str
    chunks: AsyncIterator[bytes] = field(repr=False)


def _error_text(body: bytes) -> str:
    """The upstream's own error message, if its body is the usual `{"error": {"message": …}}`."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body[:200].decode("utf-8", "replace").strip()
        return text
    if isinstance(doc, dict):
        err = doc.get("error", doc)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"][:500]
        if isinstance(err, str):
            return err[:500]
    return ""


def exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what caused it, outermost first (transport errors come wrapped several times)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _refused(exc: BaseException) -> bool:
    """True when the root of `exc` is a failed connect that was not a timeout (refused, no route, DNS)."""
    chain = exception_chain(exc)[1:]  # what the SDK's own timeout error wraps
    connector = any(isinstance(e, aiohttp.ClientConnectorError) for e in chain)
    return connector and not any(isinstance(e, (aiohttp.ServerTimeoutError, TimeoutError)) for e in chain)


def _cause(exc: BaseException) -> str:
    """The innermost error as `Name: text` (transport errors carry no key, only addresses and errno)."""
    cause = exception_chain(exc)[-1]
    text = str(cause).strip()
    name = type(cause).__name__
    return f"{name}: {text}" if text else name


class Upstream:
    """The shared client. `open()` runs one chat-completion call and yields its raw body."""

    def __init__(self, base_url: str, max_connections: int = 1000) -> None:
        self.base_url = base_url.rstrip("/")
        # The SDK's aiohttp transport: the same SDK and httpx2 interface, but the bytes are read by
        # aiohttp's C HTTP parser instead of h11 + anyio, which took half the relay's CPU per chunk.
        self.http = openai.DefaultAioHttpClient(
            limits=httpx2.Limits(max_connections=max_connections, max_keepalive_connections=100),
            event_hooks={"response": [_bound_error_body]},
        )
        self.client = openai.AsyncOpenAI(
            api_key="per-request",  # replaced by each call's Authorization header
            base_url=self.base_url,
            max_retries=0,
            http_client=self.http,
        )

    async def close(self) -> None:
        await self.client.close()

    @asynccontextmanager
    async def open(
        self,
        body: dict[str, Any],
        *,
        stream: bool,
        api_key: str,
        organization: str | None,
        connect_timeout: float,
        include_usage: bool,
    ) -> AsyncIterator[UpstreamResponse]:
        """POST /chat/completions; yields the response whose `chunks` are the raw body bytes.

        The body goes out as one orjson encoding of the request (no SDK model or transform per message,
        whose cost grows with the history). Raises UpstreamError for HTTP errors, unreachable servers
        and connect timeouts; errors while reading `chunks` are raised as UpstreamError too.
        """
        fields: dict[str, Any] = {"stream": stream}
        if stream and include_usage:
            fields["stream_options"] = {"include_usage": True}
        headers = _headers(api_key, organization)
        del api_key
        try:
            http = await self._post(orjson.dumps({**body, **fields}), headers, stream, connect_timeout)
        finally:
            del headers
        try:
            yield UpstreamResponse(
                status_code=http.status_code,
                headers=dict(http.headers.items()),
                content_type=http.headers.get("content-type", ""),
                chunks=_read(http),
            )
        finally:
            await http.aclose()

    async def _post(self, content: bytes, headers: dict[str, str], stream: bool, connect_timeout: float) -> Any:
        """Send the request through the SDK (base URL, auth, transport); its failures as UpstreamError."""
        try:
            return await self.client.post(
                "/chat/completions",
                cast_to=httpx2.Response,  # the transport's response itself, body not read yet
                content=content,
                options={"headers": headers, "timeout": httpx2.Timeout(None, connect=connect_timeout)},
                stream=stream,
            )
        except openai.APIStatusError as exc:
            raise UpstreamError(
                "upstream_error",
                f"the upstream answered HTTP {exc.status_code}"
                + (f": {text}" if (text := _error_text(exc.response.content)) else ""),
                status_code=exc.status_code,
                headers=dict(exc.response.headers.items()),
                body=exc.response.content,
            ) from None
        except openai.APITimeoutError as exc:
            if _refused(exc):  # the aiohttp transport reports a refused connection as a connect timeout
                raise self._unreachable(exc) from None
            raise UpstreamError(
                "timeout", f"could not connect to the upstream at {self.base_url} within {connect_timeout:g} s"
            ) from None
        except openai.APIConnectionError as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: BaseException) -> UpstreamError:
        return UpstreamError(
            "upstream_unreachable", f"could not connect to the upstream at {self.base_url} ({_cause(exc)})"
        )


def _headers(api_key: str, organization: str | None) -> dict[str, str]:
    headers = {
        "Authorization": f"Bearer {api_key}",
        "Content-Type": "application/json",
        "Accept-Encoding": "identity",  # no decompression: every size limit counts the bytes as sent
        RAW_RESPONSE_HEADER: "stream",  # hand back the response unread, like `with_streaming_response`
    }
    if organization:
        headers["OpenAI-Organization"] = organization
    return headers


ERROR_BODY_LIMIT = 64 * 1024  # bytes of an upstream error answer that are kept (the SDK reads it whole)


async def _bound_error_body(response: httpx2.Response) -> None:
    """Keep at most ERROR_BODY_LIMIT bytes of an upstream error answer, then close it. Runs before the
    SDK turns the status into an exception, which would otherwise read the whole body into memory."""
    if response.status_code < 400:
        return
    body = bytearray()
    parts = response.aiter_raw()
    try:
        async for part in parts:
            body += part
            if len(body) >= ERROR_BODY_LIMIT:
                break
    except httpx2.HTTPError:
        pass
    finally:
        await parts.aclose()
    response._content = bytes(body[:ERROR_BODY_LIMIT])
    await response.aclose()


def _aiohttp_body(http: httpx2.Response) -> aiohttp.StreamReader | None:
    """The body of the aiohttp response under the SDK's transport, when that is what `http` wraps."""
    stream = getattr(http, "stream", None)
    for _ in range(4):  # httpx2's client wraps the transport's stream (BoundAsyncStream._stream)
        response = getattr(stream, "_aiohttp_response", None)
        if isinstance(response, aiohttp.ClientResponse):
            return response.content
        stream = getattr(stream, "_stream", None)
    return None


async def _read(http: httpx2.Response) -> AsyncIterator[bytes]:
    """The body's bytes as they arrive. Straight from aiohttp's stream reader when the SDK's aiohttp
    transport is underneath (the httpx2 wrappers cost ~10 µs a network read), else through httpx2."""
    direct = _aiohttp_body(http)
    try:
        if direct is not None:
            async for block in direct.iter_any():
                yield block
        else:
            async for block in http.aiter_raw():
                yield block
    except (httpx2.HTTPError, aiohttp.ClientError) as exc:
        raise UpstreamError(
            "upstream_disconnected", f"the upstream connection broke mid-response ({_cause(exc)})"
        ) from None
