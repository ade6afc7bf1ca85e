"""Talking to the OpenAI-compatible server, and turning its failures into clear error codes.

The `openai` SDK supplies what it is the reference for: the endpoint URL under the configured base URL
and the identification headers an OpenAI-compatible server expects (`User-Agent`, `X-Stainless-*`),
read once when the relay starts. Each call is then one aiohttp request on a shared connection pool: the
SDK's per-call path (request options, header merging, httpx2's wrappers) cost ~0.6 ms of CPU per request,
a quarter of the relay's whole cost per request when requests are short. The body is read as raw bytes
(no object per chunk): the job needs the exact upstream bytes for `.raw` and for the event log anyway.
Retries stay off, as they were with the SDK (`max_retries=0`): a relay must not send a paid request twice.

The key of each request is passed per call as a header and lives only in that call's arguments. No
exception raised from here carries the key: messages are built from status codes, exception class
names and the upstream's own error text.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import orjson
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

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


def _cause(exc: BaseException) -> str:
    """The innermost error as `Name: text` (transport errors carry no key, only addresses and errno)."""
    cause = exception_chain(exc)[-1]
    text = str(cause).strip()
    name = type(cause).__name__
    return f"{name}: {text}" if text else name


class Upstream:
    """The shared client. `open()` runs one chat-completion call and yields its raw body."""

    def __init__(self, base_url: str, max_connections: int = 1000) -> None:
        sdk = openai.AsyncOpenAI(api_key="unused", base_url=base_url.rstrip("/"), max_retries=0)
        self.base_url = str(sdk.base_url).rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.identity = {k: v for k, v in sdk.default_headers.items() if isinstance(v, str)}
        self.identity["Accept-Encoding"] = "identity"  # no decompression: every size limit counts bytes as sent
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:  # made inside the running loop, on first use
            # HTTPS_PROXY / HTTP_PROXY / NO_PROXY, as the SDK's client honoured them: looked up once here, not
            # per call (aiohttp's trust_env does it per request, in a worker thread, reading ~/.netrc each time)
            try:
                proxy, proxy_auth = get_env_proxy_for_url(URL(self.url))
            except LookupError:
                proxy, proxy_auth = None, None
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0, keepalive_timeout=30),
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                proxy=proxy,
                proxy_auth=proxy_auth,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

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

        The body goes out as one orjson encoding of the request (no model or transform per message, whose
        cost would grow with the history). Raises UpstreamError for HTTP errors, unreachable servers and
        connect timeouts; errors while reading `chunks` are raised as UpstreamError too.
        """
        fields: dict[str, Any] = {"stream": stream}
        if stream and include_usage:
            fields["stream_options"] = {"include_usage": True}
        headers = _headers(self.identity, api_key, organization)
        del api_key
        try:
            resp = await self._post(orjson.dumps({**body, **fields}), headers, connect_timeout)
        finally:
            del headers
        try:
            if resp.status >= 400:
                raise await self._status_error(resp)
            yield UpstreamResponse(
                status_code=resp.status,
                headers={str(k): v for k, v in resp.headers.items()},  # keys are istr, which orjson refuses
                content_type=resp.headers.get("Content-Type", ""),
                chunks=_read(resp.content),
            )
        finally:
            resp.release()  # back to the pool when the body was read to its end, else the connection closes

    async def get(self, path: str, api_key: str, organization: str | None, limit: int) -> tuple[int, bytes]:
        """GET `path` under the base URL (the model list): status and body, at most `limit` bytes."""
        headers = _headers(self.identity, api_key, organization)
        del api_key
        try:
            async with self.session.get(
                self.base_url + path, headers=headers, timeout=aiohttp.ClientTimeout(total=30), allow_redirects=False
            ) as resp:
                if resp.status >= 400:
                    raise await self._status_error(resp)
                data = bytearray()
                async for block in resp.content.iter_chunked(READ_BLOCK):
                    data += block
                    if len(data) > limit:
                        raise UpstreamError("upstream_response_too_large", f"the upstream answer is over {limit} bytes")
                return resp.status, bytes(data)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise UpstreamError(
                "upstream_unreachable", f"could not reach the upstream at {self.base_url} ({_cause(exc)})"
            ) from None
        finally:
            del headers

    async def _post(self, content: bytes, headers: dict[str, str], connect_timeout: float) -> aiohttp.ClientResponse:
        """Send the request; a failure to connect as UpstreamError."""
        try:
            return await self.session.post(
                self.url,
                data=content,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout),
                allow_redirects=False,
            )
        except aiohttp.ServerTimeoutError:  # (connect timeouts are ServerTimeoutError too)
            raise UpstreamError(
                "timeout", f"could not connect to the upstream at {self.base_url} within {connect_timeout:g} s"
            ) from None
        except aiohttp.ServerDisconnectedError as exc:  # connected: it closed before its answer's headers
            raise UpstreamError(
                "upstream_disconnected",
                f"the upstream at {self.base_url} closed the connection before answering ({_cause(exc)})",
            ) from None
        except aiohttp.ClientResponseError as exc:  # connected: what came back is not an HTTP answer
            raise UpstreamError(
                "upstream_invalid_response",
                f"the upstream at {self.base_url} sent an answer that is not valid HTTP ({_cause(exc)[:300]})",
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(
                "upstream_unreachable", f"could not connect to the upstream at {self.base_url} ({_cause(exc)})"
            ) from None

    async def _status_error(self, resp: aiohttp.ClientResponse) -> UpstreamError:
        """An HTTP error answer, with at most ERROR_BODY_LIMIT bytes of its body (the rest is never read)."""
        body = bytearray()
        try:
            while len(body) < ERROR_BODY_LIMIT:
                part = await resp.content.read(ERROR_BODY_LIMIT - len(body))
                if not part:
                    break
                body += part
        except (aiohttp.ClientError, OSError):
            pass
        data = bytes(body)
        text = _error_text(data)
        return UpstreamError(
            "upstream_error",
            f"the upstream answered HTTP {resp.status}" + (f": {text}" if text else ""),
            status_code=resp.status,
            headers={str(k): v for k, v in resp.headers.items()},  # keys are istr, which orjson refuses
            body=data,
        )


def _headers(identity: dict[str, str], api_key: str, organization: str | None) -> dict[str, str]:
    headers = {**identity, "Authorization": f"Bearer {api_key}"}
    if organization:
        headers["OpenAI-Organization"] = organization
    return headers


ERROR_BODY_LIMIT = 64 * 1024  # bytes of an upstream error answer that are kept


READ_BLOCK = 16 * 1024  # at most this much per step: a burst of tiny events cannot hold the loop long


async def _read(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The body's bytes as they arrive, straight from aiohttp's stream reader, READ_BLOCK at a time."""
    try:
        async for block in content.iter_chunked(READ_BLOCK):
            yield block
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamError(
            "upstream_disconnected", f"the upstream connection broke mid-response ({_cause(exc)})"
        ) from None


async def idle_bounded(chunks: AsyncIterator[bytes], idle: float) -> AsyncIterator[bytes]:
    """`chunks`, ended by an UpstreamError when, after the first block, no block comes for `idle` seconds
    (0: no bound). A transfer that stalls or whose framing is garbled can hang a read without an error."""
    iterator = chunks.__aiter__()
    first = True
    while True:
        try:
            if first or idle <= 0:
                block = await iterator.__anext__()
            else:
                async with asyncio.timeout(idle):
                    block = await iterator.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise UpstreamError(
                "upstream_disconnected",
                f"the upstream sent nothing for {idle:g} s in the middle of its answer "
                "([upstream] idle_timeout_seconds)",
            ) from None
        first = False
        yield block


def check_encoding(headers: dict[str, str]) -> None:
    """The relay asks for the body as it is (`Accept-Encoding: identity`): every size bound counts bytes as
    sent, and a compressed body would read as garbage. An upstream (or a proxy) that compresses anyway is
    told apart from a network fault."""
    for name, value in headers.items():
        if name.lower() == "content-encoding" and value.strip().lower() not in ("", "identity"):
            raise UpstreamError(
                "upstream_invalid_response",
                f"the upstream compressed its answer (Content-Encoding: {value[:40]}) although the relay asked for "
                "none (Accept-Encoding: identity); turn compression off on the upstream or the proxy before it",
            )
