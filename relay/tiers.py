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
from .store import MAX_EVENT_SCAN, FileTooLarge, closing_places, sequence_number

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
    except (StoreError, IntegrityError) as exc:  # (NotArchived, a FileNotFoundError, goes through)
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
    data = await read(archiver, rp.rel("json"), 0, min(total, MAX_DOCUMENT))
    doc = await asyncio.to_thread(orjson.loads, data)  # (a whole document: parsed off the loop)
    auth = doc.get("authorization") if isinstance(doc, dict) else None
    return auth if isinstance(auth, dict) else {}


async def _open(archiver: Archiver, rel: str, start: int, end: int | None = None) -> ArchivedRange:
    try:
        return await archiver.open(rel, start, end)
    except (StoreError, IntegrityError) as exc:  # (NotArchived, a FileNotFoundError, goes through)
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
            whole = await read(archiver, rel, 0, min(total, MAX_DOCUMENT))
            data = await asyncio.to_thread(public_bytes, whole)  # (parsed whole: off the loop)
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


async def document(archiver: Archiver | None, rp: RequestPath, limit: int = MAX_DOCUMENT) -> bytes:
    """The whole archived status document of a request (for the OpenAI-compatible face, which parses it
    off the loop); FileNotFoundError when it is not archived (or no archive), FileTooLarge when it is
    larger than `limit` bytes."""
    total = await size(archiver, rp, "json")
    if total is None or archiver is None:
        raise FileNotFoundError(rp.rel("json"))
    if total > limit:
        raise FileTooLarge(total)
    return await read(archiver, rp.rel("json"))


async def forget(archiver: Archiver | None, rp: RequestPath) -> None:
    """A request deleted on purpose: its objects leave the archive (nothing without an archive); 503
    `archive_unavailable` when the store cannot be reached (the client tries the DELETE again)."""
    if archiver is None:
        return
    try:
        await archiver.forget(rp)
    except (StoreError, IntegrityError) as exc:
        raise _failed(exc, rp.rel("json")) from None


SEARCH_BLOCK = 256 * 1024  # the unit of the reads of a search in an archived log (the manifest's block)
SEARCH_BLOCKS = 80  # blocks a search keeps (a search that lands in a 16 MiB event reads that far)


class _Blocks:
    """An archived file read in aligned blocks, each fetched once (one ranged GET) while a search runs."""

    def __init__(self, archiver: Archiver, rel: str, total: int) -> None:
        self.archiver, self.rel, self.total = archiver, rel, total
        self._kept: dict[int, bytes] = {}

    async def pread(self, n: int, at: int) -> bytes:
        end = min(at + n, self.total)
        parts = []
        while at < end:
            index = at // SEARCH_BLOCK
            block = self._kept.get(index)
            if block is None:
                start = index * SEARCH_BLOCK
                block = await read(self.archiver, self.rel, start, min(start + SEARCH_BLOCK, self.total))
                self._kept[index] = block
                if len(self._kept) > SEARCH_BLOCKS:
                    del self._kept[next(iter(self._kept))]
            skip = at - index * SEARCH_BLOCK
            piece = block[skip : skip + end - at]
            parts.append(piece)
            at += len(piece)
        return b"".join(parts)


async def log_offset(archiver: Archiver | None, rp: RequestPath, after: int | None, tail: Any = None) -> int | None:
    """Where a Responses stream resumed after sequence number `after` starts in the archived log (0 for
    None), as `store.seq_offset` finds it in a local one: the same binary search, over ranged reads of
    SEARCH_BLOCK bytes (a few GETs whatever the position; none among the closing events `tail` places).
    None when the log is not archived."""
    total = await size(archiver, rp, "txt")
    if total is None or archiver is None:
        return None
    if after is None:
        return 0
    blocks = _Blocks(archiver, rp.rel("txt"), total)
    end = total
    if closing_places(tail, total):
        first, starts = tail[0], tail[1:]
        if after >= first:
            return int(starts[min(after - first + 1, len(starts) - 1)])
        end = starts[0]
    lo, hi = 0, end  # events starting before lo are <= after; events starting at or after hi are > after
    while lo < hi:
        mid = (lo + hi) // 2
        start = await _next_event(blocks, mid, end)
        if start >= hi:
            hi = mid
            continue
        seq = sequence_number(await blocks.pread(512, start))
        if seq is None or seq > after:  # ([DONE] and other unnumbered events come last)
            hi = start
        else:
            lo = start + 1
    return await _next_event(blocks, lo, end)


async def _next_event(blocks: _Blocks, pos: int, end: int) -> int:
    """The offset of the first event that starts at or after `pos` (`end` when none does before it)."""
    if pos <= 0:
        return 0
    at = max(pos - 2, 0)  # a start at `pos` shows as "\n\nid: " two bytes before it
    window = 4096
    while at < end:
        data = await blocks.pread(min(window, end - at), at)
        if not data:
            break
        i = data.find(b"\n\nid: ")
        while i >= 0:
            start = at + i + 2
            if start >= pos and (await blocks.pread(24, start)).startswith(b"id: %d\n" % start):
                return start
            i = data.find(b"\n\nid: ", i + 1)
        at += max(len(data) - 6, 1)  # the pattern may straddle two reads
        window = min(window * 4, MAX_EVENT_SCAN)
    return end


async def log_from(request: web.Request, archiver: Archiver, rp: RequestPath, offset: int, prefix: bytes,
                   headers: dict[str, str], seconds: float) -> web.StreamResponse:  # fmt: skip
    """An archived (so finished) event log from `offset` to its end, after `prefix`, as `serve.follow`
    sends a finished local one: one ranged GET; FileNotFoundError when it is not archived."""
    rng = await _open(archiver, rp.rel("txt"), offset)
    resp = web.StreamResponse(headers={**SSE_HEADERS, **headers})
    if request.version >= (1, 1):
        resp.enable_chunked_encoding()
    return await _send(request, resp, rng, prefix, seconds)
