"""A request's files once they are only in the archive tier ([archive] enabled, the local copy removed):
the same URLs answer the same bytes, read from the object store.

Every read is one ranged GET, checked block by block against the request's manifest before a byte is
given out (see `archive`): a resumed stream (`Last-Event-ID`, a byte offset) reads from that offset only.
A store that fails answers 503 `archive_unavailable` (with Retry-After); one that serves other bytes than
were archived answers 502 `archive_integrity`, or, once the answer has begun, has its connection cut, so
that no wrong byte is ever served. Used by the native face (`serve`) and the OpenAI-compatible one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from aiohttp import web

from .archive import Archiver, IntegrityError, NotArchived, StoreError
from .archive.reader import ArchivedRange
from .http import HTTPError
from .paths import RequestPath
from .status import authorization_span, public_bytes, public_head
from .store import MAX_EVENT_SCAN

log = logging.getLogger("relay.archive")

AUTH_HEAD = 16 * 1024  # bytes of a status document that hold its authorization object (as in `serve`)
MAX_DOCUMENT = 64 * 1024 * 1024  # a status document read whole from the archive (a private one, unusual)
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}
NO_STORE = {"Cache-Control": "no-store"}


def _failed(exc: BaseException, rel: str) -> HTTPError:
    """The answer for a store that failed (503) or served other bytes than were archived (502)."""
    if isinstance(exc, IntegrityError):
        log.error("archive: %s: the store served other bytes than were archived (%s)", rel, exc)
        return HTTPError(502, "archive_integrity", "the archive served bytes that do not match what was archived")
    log.warning("archive: %s: %s", rel, exc)
    return HTTPError(503, "archive_unavailable", "the archive cannot be read right now; retry later",
                     {"Retry-After": "10"})  # fmt: skip


async def size(archiver: Archiver | None, rp: RequestPath, ext: str) -> int | None:
    """The size of an archived file of the request; None when it is not archived (or no archive)."""
    if archiver is None:
        return None
    try:
        rng = await archiver.open(rp.rel(ext), 0, 0)  # (the manifest only: no GET of the file)
    except NotArchived:
        return None
    except (StoreError, IntegrityError) as exc:
        raise _failed(exc, rp.rel(ext)) from None
    return rng.size


async def read(archiver: Archiver, rel: str, start: int = 0, end: int | None = None) -> bytes:
    """Bytes [start, end) of an archived file; FileNotFoundError when it is not archived."""
    try:
        return await archiver.read(rel, start, end)
    except NotArchived:
        raise
    except (StoreError, IntegrityError) as exc:
        raise _failed(exc, rel) from None


async def authorization(archiver: Archiver | None, rp: RequestPath) -> dict[str, Any] | None:
    """The authorization object of an archived status document (from its first bytes, as on disk);
    None when the request is not archived."""
    total = await size(archiver, rp, "json")
    if total is None or archiver is None:
        return None
    head = await read(archiver, rp.rel("json"), 0, min(AUTH_HEAD, total))
    span = authorization_span(head)
    if span is not None:
        return span[2]
    doc = orjson.loads(await read(archiver, rp.rel("json"), 0, min(total, MAX_DOCUMENT)))
    auth = doc.get("authorization") if isinstance(doc, dict) else None
    return auth if isinstance(auth, dict) else {}


async def _open(archiver: Archiver, rel: str, start: int, end: int | None = None) -> ArchivedRange:
    try:
        return await archiver.open(rel, start, end)
    except NotArchived:
        raise
    except (StoreError, IntegrityError) as exc:
        raise _failed(exc, rel) from None


async def plain(
    request: web.Request, archiver: Archiver, rp: RequestPath, kind: str, seconds: float
) -> web.StreamResponse:
    """A `.json` or `.raw` URL of an archived request (a private status without its token hashes)."""
    rel = rp.rel(kind)
    total = await size(archiver, rp, kind)
    if total is None:
        raise FileNotFoundError(rel)
    if kind == "json":
        content_type = "application/json"
    else:
        content_type = (
            "text/plain; charset=utf-8" if await size(archiver, rp, "txt") is not None else "application/json"
        )
    headers = {**NO_STORE, "Content-Type": content_type}
    prefix, skip = b"", 0
    if kind == "json" and rp.private:
        head = public_head(await read(archiver, rel, 0, min(AUTH_HEAD, total)))
        if head is None:  # not in the usual order: parsed whole, as from the local file
            data = public_bytes(await read(archiver, rel, 0, min(total, MAX_DOCUMENT)))
            return web.Response(body=data, headers=headers)
        prefix, skip = head
    rng = await _open(archiver, rel, skip)
    resp = web.StreamResponse(headers=headers)
    resp.content_length = len(prefix) + rng.end - rng.start
    return await _send(request, resp, rng, prefix, seconds)


async def events(request: web.Request, archiver: Archiver, rp: RequestPath, resume: str | None,
                 seconds: float) -> web.StreamResponse:  # fmt: skip
    """The event stream of an archived (so finished) request, from the start or after the event `resume`
    names (an event id is the offset where the event starts): one ranged GET from there."""
    rel = rp.rel("txt")
    total = await size(archiver, rp, "txt")
    if total is None:
        raise FileNotFoundError(rel)
    start = 0
    if resume is not None:
        start = _event_offset(resume, total)
        start = await _event_end(archiver, rel, start, total, resume)
        if start >= total:
            return web.Response(status=204, headers={"Cache-Control": "no-cache"})
    if request.method == "HEAD":
        return web.Response(headers=SSE_HEADERS)
    rng = await _open(archiver, rel, start)
    resp = web.StreamResponse(headers=SSE_HEADERS)
    if request.version >= (1, 1):
        resp.enable_chunked_encoding()
    return await _send(request, resp, rng, b": connected\n\n", seconds)


async def _event_end(archiver: Archiver, rel: str, start: int, total: int, event_id: str) -> int:
    """The offset just after the event that starts at `start` (as `store.event_end` finds it in a local
    log): a read of 64 KiB from there, more only for a larger event."""
    head = b"id: %d\n" % start
    window = 64 * 1024
    while True:
        data = await read(archiver, rel, start, min(total, start + window))
        end = data.find(b"\n\n") if data.startswith(head) else -1
        if end >= 0:
            return start + end + 2
        if not data.startswith(head) or start + len(data) >= total or window >= MAX_EVENT_SCAN:
            raise HTTPError(400, "unknown_event_id", f"no event with id {event_id[:40]!r} in this stream")
        window *= 4


def _event_offset(event_id: str, total: int) -> int:
    """The offset an event id names (ids are offsets: digits, no leading zero), within the log."""
    ok = (
        len(event_id) <= 19
        and event_id.isascii()
        and event_id.isdigit()
        and not (len(event_id) > 1 and event_id[0] == "0")
    )
    if not ok or int(event_id) >= total:
        raise HTTPError(400, "unknown_event_id", f"no event with id {event_id[:40]!r} in this stream")
    return int(event_id)


async def _send(request: web.Request, resp: web.StreamResponse, rng: ArchivedRange, prefix: bytes,
                seconds: float) -> web.StreamResponse:  # fmt: skip
    """Send `prefix`, then the range as it comes (each write taken within `seconds`). A store that fails
    or serves wrong bytes once the answer has begun has the connection cut: the client sees a short
    answer, never a wrong one."""
    try:
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        if prefix:
            async with asyncio.timeout(seconds):
                await resp.write(prefix)
        async for chunk in rng:
            async with asyncio.timeout(seconds):
                await resp.write(chunk)
        await resp.write_eof()
    except (StoreError, IntegrityError) as exc:
        _failed(exc, request.path)  # (logged)
        if request.transport is not None:
            request.transport.abort()
    except (ConnectionError, RuntimeError, TimeoutError):
        if request.transport is not None:
            request.transport.abort()
    finally:
        await rng.aclose()
    return resp
