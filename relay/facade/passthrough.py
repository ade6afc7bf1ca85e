"""Chat completions passed through (not stored): the upstream's answer as it comes, bounded in size and
time; nothing written but the usage ledger's line. A client that did not ask for usage gets none
(`HiddenUsage`), though the relay asks the upstream for it for the ledger."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

import orjson
from aiohttp import web

from .. import api, ledger
from ..assemble import SSEParser
from ..config import Config
from ..jobs import JobManager
from ..keys import CONFIG, MANAGER
from ..sending import send_bytes
from ..upstream import UpstreamError, check_encoding, idle_bounded
from .common import Caller, in_background
from .errors import OpenAIError

log = logging.getLogger("relay.openai")

ENDPOINT = "/v1/chat/completions"
NOT_FORWARDED = {"store", "metadata", "stream", "stream_options"}


def upstream_error(exc: UpstreamError) -> OpenAIError:
    code = exc.status_code if exc.status_code and 400 <= exc.status_code < 600 else 502
    return OpenAIError(code, exc.message, code=exc.code)


def usage_asked(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


USAGE_RE = re.compile(rb'"usage"\s*:\s*(\{(?:[^{}]|\{[^{}]*\})*\})')
TAIL = 8192  # bytes of a passed-through answer kept to find its usage (the upstream puts it last)


class HiddenUsage:
    """A passed-through stream whose client did not ask for usage though the relay did (so that the
    usage ledger has the upstream's own count, not an estimate): the usage-only last chunk (no `choices`)
    is held back, as OpenAI would not have sent it; every other event goes through byte for byte. Events
    are passed on whole: the bytes after a block's last event boundary wait for the next block (a client
    cannot use half an event anyway), and what is left at the end goes out as it is."""

    BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
    SMALL = 64 * 1024  # a usage-only chunk is a few hundred bytes; larger events are never parsed

    def __init__(self) -> None:
        self.pending = bytearray()  # (appended to: an event of many blocks is not copied again per block)

    def feed(self, block: bytes) -> bytes:
        start = max(0, len(self.pending) - 3)  # only the new bytes are searched (a boundary may straddle)
        self.pending += block
        end = -1
        for m in self.BOUNDARY.finditer(self.pending, start):
            end = m.end()
        if end < 0:
            return b""
        ready = bytes(self.pending[:end])
        del self.pending[:end]
        if b'"usage"' not in ready:
            return ready
        kept, at = [], 0
        for m in self.BOUNDARY.finditer(ready):
            event = ready[at : m.end()]
            if not self._usage_only(event):
                kept.append(event)
            at = m.end()
        return b"".join(kept)

    def flush(self) -> bytes:
        rest = bytes(self.pending)
        self.pending.clear()
        return rest

    def _usage_only(self, event: bytes) -> bool:
        if len(event) > self.SMALL or b'"usage"' not in event:
            return False
        parser = SSEParser(self.SMALL)  # (a whole event, at most SMALL bytes)
        datas = parser.feed(event) + parser.flush()
        if len(datas) != 1:
            return False
        try:
            chunk = orjson.loads(datas[0])
        except orjson.JSONDecodeError:
            return False
        return isinstance(chunk, dict) and chunk.get("choices") == [] and isinstance(chunk.get("usage"), dict)


class Passage:
    """What the usage ledger needs of a passed-through completion, gathered as its bytes go by: the tail
    (where the upstream's `usage` is, when it reports one) and the number of stream events (about one
    token each, for an estimate when it does not)."""

    def __init__(self) -> None:
        self.started = time.time()
        self.first: float | None = None
        self.tail = b""
        self.events = 0
        self.outcome, self.code = "done", None

    def saw(self, block: bytes) -> None:
        if self.first is None:
            self.first = time.time()
        self.events += block.count(b"data: ") - block.count(b"data: [DONE]")
        self.tail = (self.tail + block)[-TAIL:]

    def usage(self) -> dict[str, Any] | None:
        found = None
        for m in USAGE_RE.finditer(self.tail):
            found = m.group(1)
        try:
            usage = orjson.loads(found) if found else None
        except orjson.JSONDecodeError:
            return None
        return usage if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int) else None

    def line(self, config: Config, who: Caller, body: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        doc: dict[str, Any] = {
            "status": self.outcome,
            "error": {"code": self.code} if self.code else None,
            "authorization": {"access": "private"},  # (nothing of it is kept to be opened)
            "request": {"endpoint": ENDPOINT, "total_time": round(now - self.started, 3)},
            "response": {"body": {"usage": self.usage()}},
        }
        ttft = self.first - self.started if self.first else None
        line = ledger.entry(doc, request_id=str(uuid.uuid4()), node=config.server_node_id, key=who.label, path="",
                            ttft=ttft, now=now, params=body)  # fmt: skip
        if line["estimated"]:  # no usage reported: the prompt from its text, the answer from its events
            line["completion_tokens"] = max(self.events - 2, 0)  # (less the role and finish chunks)
            line["total_tokens"] = line["prompt_tokens"] + line["completion_tokens"]
        return line


def _record(request: web.Request, who: Caller, body: dict[str, Any], passage: Passage) -> None:
    """The usage ledger's line of a passed-through completion (written in the background)."""
    config: Config = request.app[CONFIG]
    manager: JobManager = request.app[MANAGER]
    line = passage.line(config, who, body)

    async def write() -> None:
        try:
            await manager.on_storage(ledger.append, config.data_dir, line, config.storage_fsync)
        except (OSError, RuntimeError) as exc:
            log.error("cannot write a usage ledger line: %s", exc)
            return
        manager.counted(line)

    in_background(write())


async def pass_through(request: web.Request, payload: dict[str, Any], who: Caller) -> web.StreamResponse:
    """An unstored chat completion: the upstream's answer as it comes. Nothing of it is written but its
    line in the usage ledger (tokens as the upstream reported them, else estimated)."""
    config: Config = request.app[CONFIG]
    manager: JobManager = request.app[MANAGER]
    api_key, organization = api.upstream_key(request, config)
    stream = payload.get("stream") is True
    asked = usage_asked(payload)
    include_usage = asked or config.upstream_include_usage  # (the ledger wants the upstream's count)
    hidden = HiddenUsage() if stream and include_usage and not asked else None
    body = {k: v for k, v in payload.items() if k not in NOT_FORWARDED}
    body["model"] = body.get("model") or config.upstream_default_model
    limit = config.upstream_max_response_bytes
    passage = Passage()
    try:
        async with asyncio.timeout(config.upstream_max_timeout):
            async with manager.upstream.open(body, stream=stream, api_key=api_key, organization=organization,
                                             connect_timeout=5, include_usage=include_usage) as up:  # fmt: skip
                del api_key
                check_encoding(up.headers)
                headers = {"Content-Type": up.content_type or "application/json", "Cache-Control": "no-store"}
                if not stream:
                    data = bytearray()
                    async for block in idle_bounded(up.chunks, config.upstream_idle_timeout_seconds):
                        data += block
                        if len(data) > limit:
                            raise UpstreamError("upstream_response_too_large", "the upstream answer is too large")
                    passage.saw(bytes(data[-TAIL:]))
                    return await send_bytes(request, bytes(data), headers)
                return await _relay_stream(request, up.chunks, headers, passage, hidden)
    except UpstreamError as exc:
        passage.outcome, passage.code = "error", exc.code
        raise upstream_error(exc) from None
    except TimeoutError:
        passage.outcome, passage.code = "error", "timeout"
        raise OpenAIError(504, "the upstream did not answer within [upstream] max_timeout", code="timeout") from None
    finally:
        _record(request, who, body, passage)


async def _relay_stream(request: web.Request, chunks: Any, headers: dict[str, str], passage: Passage,
                        hidden: HiddenUsage | None) -> web.StreamResponse:  # fmt: skip
    """A passed-through stream, block by block as the upstream sends it; a client that goes away or stops
    reading ends it (and the upstream call), and so does an upstream that fails or sends too much."""
    config: Config = request.app[CONFIG]
    limit = config.upstream_max_response_bytes
    resp = web.StreamResponse(headers={**headers, "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    sent = 0
    try:
        async for block in idle_bounded(chunks, config.upstream_idle_timeout_seconds):
            sent += len(block)
            if sent > limit:
                passage.outcome, passage.code = "error", "upstream_response_too_large"
                break  # (the client sees the stream end without [DONE])
            passage.saw(block)
            if hidden is not None:
                block = hidden.feed(block)
            if block:
                async with asyncio.timeout(config.server_send_timeout_seconds):
                    await resp.write(block)
        rest = hidden.flush() if hidden is not None else b""
        async with asyncio.timeout(config.server_send_timeout_seconds):
            if rest:
                await resp.write(rest)
            await resp.write_eof()
    except UpstreamError as exc:
        passage.outcome, passage.code = "error", exc.code
        if request.transport is not None:
            request.transport.abort()
    except (ConnectionError, RuntimeError, TimeoutError):
        passage.outcome = "stop"  # the client went away or stopped reading; so does the upstream
        if request.transport is not None:
            request.transport.abort()
    return resp
