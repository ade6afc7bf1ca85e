"""GET of status / raw files, the tail-following event stream, the stop URL.

Every request for a file goes through `_locate`, which parses the raw URL path (see `paths.py`),
refuses expired requests, and checks private tokens, before anything touches the disk. A URL of another
node (several hosts sharing one bucket) is answered from the archive tier only, when there is one: an
ended request of that node once it is archived (nginx sends it here when its owner is down); its running
requests and its files not yet uploaded belong to its owner (404 here). Without an archive, another
node's URL is 404.

Files are opened with `store.open_under`: no symlink is followed anywhere below the data directory,
and only regular files are served, from the descriptor that was opened.

The event stream replays the `.txt` file from an offset, then follows the running job. A caught-up
reader gets new events written straight to its socket (`fanout.Fanout.follow`) until its socket
holds more than 64 KiB unsent; then, and for replay, its own loop reads the file with `pread` and
writes with backpressure. So a reader that stops reading costs at most ~64 KiB of buffer (plus what
the kernel holds) and is dropped after [server] send_timeout_seconds without progress.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from . import fanout, tiers
from .archive import Archiver
from .config import Config
from .http import HTTPError, json_response
from .jobs import Job, JobManager
from .keys import ARCHIVE, CONFIG, MANAGER, READERS
from .paths import RequestPath, expired, parse_request_path
from .security import bearer, token_matches
from .sending import READ_BLOCK, send, send_block, send_blocks, send_bytes
from .status import authorization_span, public_bytes, public_head
from .store import event_end, open_under, opens_in_one_call, read_json_under

log = logging.getLogger("relay.serve")

STOP_ANSWER_LEAD = 0.05  # seconds between the stop's answer and the stream's end reaching readers
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}
NO_STORE = {"Cache-Control": "no-store"}


def _not_found() -> HTTPError:
    return HTTPError(404, "not_found", "no such request here: the URL is wrong, or the request has expired")


async def _stored_auth(
    manager: JobManager, config: Config, rp: RequestPath, archiver: Archiver | None
) -> dict[str, Any]:
    """The stored token hashes of a request: in memory while it runs, else from the head of its status
    document on disk (see `read_auth`)."""
    job = manager.get(rp.request_id)
    if job is not None and job.rp == rp:
        return job.doc["authorization"]
    try:
        if rp.node_id != config.server_node_id:
            raise FileNotFoundError(rp.rel("json"))  # (another node's: in the archive, or not here)
        return await asyncio.to_thread(read_auth, config.data_dir, rp.rel("json"))
    except FileNotFoundError:
        auth = await tiers.authorization(archiver, rp)  # (only in the archive now, or nowhere)
        if auth is None:
            raise _not_found() from None
        return auth
    except ValueError:
        raise _not_found() from None


AUTH_HEAD = 16 * 1024  # bytes of a status document that hold its authorization object


def read_auth(data_dir: Path, rel: str) -> dict[str, Any]:
    """In a worker thread: the authorization object of a status document on disk, from its first bytes,
    so that checking a token never parses an answer of many MiB (the whole file only when unusual)."""
    fd = open_under(data_dir, rel)
    try:
        span = authorization_span(os.pread(fd, AUTH_HEAD, 0))
    finally:
        os.close(fd)
    if span is not None:
        return span[2]
    doc = read_json_under(data_dir, rel)
    if not isinstance(doc, dict):
        raise ValueError("not a status document")
    auth = doc.get("authorization")
    return auth if isinstance(auth, dict) else {}


async def open_file(config: Config, rp: RequestPath, ext: str) -> int:
    """A descriptor of the request's file (see `store.open_under`). Where the kernel opens it in one
    `openat2`, on the loop: that costs what one read of the file costs, and the file's reads are made on
    the loop too (a worker thread's hop cost a fifth of a replay's CPU). Elsewhere the walk below the data
    directory (two system calls per directory) runs in a worker thread."""
    if opens_in_one_call():
        return open_under(config.data_dir, rp.rel(ext))
    return await asyncio.to_thread(open_under, config.data_dir, rp.rel(ext))


async def _exists(config: Config, rp: RequestPath, ext: str) -> bool:
    """True when the request has this file, as a regular file reached without symlinks."""
    try:
        os.close(await open_file(config, rp, ext))
    except FileNotFoundError:
        return False
    return True


def _check_token(request: web.Request, auth: dict[str, Any], kind: str) -> None:
    """Private requests: the bearer token opens everything, the stream token only the `.txt`."""
    token = bearer(request)
    if kind == "txt" and token is None:
        token = request.query.get("stream_token")
    if not token:
        hint = "Authorization: Bearer <bearer_token>" + (" or ?stream_token=<token>" if kind == "txt" else "")
        raise HTTPError(
            401, "unauthorized", f"this request is private: send {hint}", {"WWW-Authenticate": 'Bearer realm="relay"'}
        )
    if token_matches(token, auth.get("bearer_token_sha256")):
        return
    if kind == "txt" and token_matches(token, auth.get("stream_token_sha256")):
        return
    raise HTTPError(403, "forbidden", "the token does not open this URL")


async def _locate(request: web.Request) -> tuple[RequestPath, str]:
    """The request a URL names, and its kind; a private one's token checked."""
    config: Config = request.app[CONFIG]
    manager: JobManager = request.app[MANAGER]
    parsed = parse_request_path(request.rel_url.raw_path)
    if parsed is None:
        raise _not_found()
    rp, kind = parsed
    if rp.node_id != config.server_node_id and request.app[ARCHIVE] is None:
        raise _not_found()
    if manager.get(rp.request_id) is None and expired(rp, config.retention_max_age_days):
        raise _not_found()
    if rp.private:
        _check_token(request, await _stored_auth(manager, config, rp, request.app[ARCHIVE]), kind)
    return rp, kind


async def handle_file(request: web.Request) -> web.StreamResponse:
    """Dispatch every `/<node>/r/…` URL."""
    try:
        rp, kind = await _locate(request)
        if kind == "stop":
            if request.method not in ("GET", "POST"):
                raise HTTPError(405, "method_not_allowed", "use GET or POST on a stop URL", {"Allow": "GET, POST"})
            return await _stop(request, rp)
        if request.method not in ("GET", "HEAD"):
            raise HTTPError(405, "method_not_allowed", "this URL only answers GET", {"Allow": "GET, HEAD"})
        if kind == "txt":
            return await _events(request, rp)
        return await _plain(request, rp, kind)
    except HTTPError as exc:
        return exc.response()


def _foreign(request: web.Request, rp: RequestPath) -> bool:
    """True for a URL of another node: only its archived files are served here (see the module's doc)."""
    return rp.node_id != request.app[CONFIG].server_node_id


async def _plain(request: web.Request, rp: RequestPath, kind: str) -> web.StreamResponse:
    config: Config = request.app[CONFIG]
    if _foreign(request, rp):
        return await _archived(request, rp, kind)
    if kind == "json":
        content_type = "application/json"
    else:
        content_type = "text/plain; charset=utf-8" if await _exists(config, rp, "txt") else "application/json"
    try:
        fd = await open_file(config, rp, kind)
    except FileNotFoundError:
        if kind == "raw" and await _exists(config, rp, "json"):
            raise HTTPError(404, "not_ready", "the raw upstream response is written when the request ends") from None
        return await _archived(request, rp, kind)
    try:
        if kind == "json" and rp.private:
            return await _private_status(request, fd)
        return await _send_fd(request, fd, content_type)
    finally:
        os.close(fd)


async def _private_status(request: web.Request, fd: int) -> web.StreamResponse:
    """A private status document without its token hashes: the file as it is, its authorization object
    (in its first bytes) replaced, so that nothing parses or encodes the answer it holds per reader."""
    head = public_head(await asyncio.to_thread(os.pread, fd, AUTH_HEAD, 0))
    if head is None:  # not a document the relay wrote in its usual order: parsed whole
        try:
            data = await asyncio.to_thread(_public_status, fd)
        except ValueError:
            raise _not_found() from None
        return await send_bytes(request, data, {**NO_STORE, "Content-Type": "application/json"})
    shown, end = head
    return await _send_fd(request, fd, "application/json", prefix=shown, skip=end)


def _public_status(fd: int) -> bytes:
    """In a worker thread: `public_bytes` of the whole status document behind `fd`."""
    size = os.fstat(fd).st_size
    try:
        return public_bytes(os.pread(fd, size, 0))
    except (orjson.JSONDecodeError, TypeError, AttributeError):
        raise ValueError("not a status document") from None


async def _send_fd(
    request: web.Request, fd: int, content_type: str, prefix: bytes = b"", skip: int = 0
) -> web.StreamResponse:
    """Serve an opened regular file (`prefix` in place of its first `skip` bytes): small ones in one
    answer, large ones in blocks read off the loop."""
    size = os.fstat(fd).st_size - skip + len(prefix)
    headers = {**NO_STORE, "Content-Type": content_type}
    if size <= READ_BLOCK:
        return web.Response(body=prefix + os.pread(fd, size - len(prefix), skip), headers=headers)

    async def read(offset: int, n: int) -> bytes:
        if offset < len(prefix):
            return prefix[offset : offset + n]
        return await asyncio.to_thread(os.pread, fd, n, skip + offset - len(prefix))

    return await send_blocks(request, web.StreamResponse(headers=headers), size, read)


async def _stop(request: web.Request, rp: RequestPath) -> web.Response:
    config: Config = request.app[CONFIG]
    manager: JobManager = request.app[MANAGER]
    job = manager.get(rp.request_id)
    if job is not None and job.rp == rp:
        # The order clients rely on: the terminal status on disk, then this answer, then the stream's
        # `event: stop` and `[DONE]` (held back by the job until the answer is written).
        hold: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        job.hold_tail(hold)
        manager.stop(rp.request_id)
        try:
            await job.status_settled.wait()
            resp = json_response({"status": "success"})
            await resp.prepare(request)
            await resp.write_eof()
        finally:
            asyncio.get_running_loop().call_later(STOP_ANSWER_LEAD, _release, hold)
        return resp
    local = not _foreign(request, rp) and await _exists(config, rp, "json")
    if not local and await tiers.size(request.app[ARCHIVE], rp, "json") is None:
        raise _not_found()
    return json_response({"status": "success"})


async def _archived(request: web.Request, rp: RequestPath, kind: str) -> web.StreamResponse:
    """A file that is no longer on the local disk: from the archive tier when it is there (see `tiers`)."""
    archiver = request.app[ARCHIVE]
    if archiver is None:
        raise _not_found()
    seconds = request.app[CONFIG].server_send_timeout_seconds
    try:
        if kind == "txt":
            return await tiers.events(request, archiver, rp, _resume_id(request), seconds)
        return await tiers.plain(request, archiver, rp, kind, seconds)
    except FileNotFoundError:
        raise _not_found() from None


def _release(hold: asyncio.Future[None]) -> None:
    if not hold.done():
        hold.set_result(None)


def _resume_id(request: web.Request) -> str | None:
    value = request.headers.get("Last-Event-ID")
    if value is None or not value.strip():
        value = request.query.get("last_event_id")
    if value is None or not value.strip():
        return None
    return value.strip()


async def _events(request: web.Request, rp: RequestPath) -> web.StreamResponse:
    config: Config = request.app[CONFIG]
    manager: JobManager = request.app[MANAGER]
    if _foreign(request, rp):
        return await _archived(request, rp, "txt")
    job: Job | None = manager.get(rp.request_id)
    if job is not None and (job.rp != rp or job.events is None):
        job = None
    try:
        fd = await open_file(config, rp, "txt")
    except FileNotFoundError:
        return await _archived(request, rp, "txt")
    try:
        size = job.size if job is not None else os.fstat(fd).st_size
        offset = 0
        resume = _resume_id(request)
        if resume is not None:
            end = event_end(fd, resume, size)
            if end is None:
                raise HTTPError(400, "unknown_event_id", f"no event with id {resume[:40]!r} in this stream")
            offset = end
            if offset >= size and (job is None or job.finished):
                return web.Response(status=204, headers={"Cache-Control": "no-cache"})
        if request.method == "HEAD":
            return web.Response(headers=SSE_HEADERS)
        return await follow(request, fd, offset, job)
    finally:
        os.close(fd)


async def follow(
    request: web.Request,
    fd: int,
    offset: int,
    job: Job | None,
    headers: dict[str, str] | None = None,
    blank: bytes = b"\n",
) -> web.StreamResponse:
    """Send the event log from `offset`, then what the running job appends, until it ends.

    Comments (`: connected`, `: keep-alive`) end with `blank` after their line: a blank line for the
    relay's own readers, nothing for the OpenAI SDKs, whose parsers (Python's at least) turn a blank line
    after any event id into an event with no data, which they then fail to parse as JSON."""
    resp = web.StreamResponse(headers={**SSE_HEADERS, **(headers or {})})
    if request.version >= (1, 1):
        resp.enable_chunked_encoding()  # explicit, so that new events may be pushed as chunks (see fanout)
    await resp.prepare(request)
    readers = request.app[READERS]
    readers[0] += 1
    seconds = request.app[CONFIG].server_send_timeout_seconds
    try:
        await send(resp, b": connected\n" + blank, seconds)
        while True:
            size = job.size if job is not None else os.fstat(fd).st_size
            if offset < size:
                sent = await send_block(request, resp, fd, offset, size, job, seconds)
                if not sent:
                    break
                offset += sent
                continue
            if job is None or job.finished:
                break
            offset = await _caught_up(request, resp, job, offset)
            if not job.finished and job.size <= offset:
                await send(resp, b": keep-alive\n" + blank, seconds)
        await resp.write_eof()
    except (ConnectionError, RuntimeError):
        pass  # the reader went away; the request itself carries on
    except TimeoutError:
        log.info("dropped an event-stream reader that took no bytes for %gs", seconds)
        if request.transport is not None:
            request.transport.abort()
    finally:
        readers[0] -= 1
    return resp


async def _caught_up(request: web.Request, resp: web.StreamResponse, job: Job, offset: int) -> int:
    """A reader at the end of a running job's log: its new events are pushed to its socket while it keeps
    up (see `fanout`); a backed-up one waits for more here. Returns the reader's new offset."""
    transport = request.transport
    if (
        resp.chunked
        and transport is not None
        and offset == job.size
        and transport.get_write_buffer_size() <= fanout.PUSH_BUFFER_LIMIT  # a backed-up one waits below
    ):
        offset, pushed = await fanout.of(job).follow(transport, offset)  # caught up: events are pushed
        request[fanout.PUSHED] = request.get(fanout.PUSHED, 0) + pushed
    else:
        await job.wait_for_more(offset)
    return offset
