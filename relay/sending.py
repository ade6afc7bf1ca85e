"""Writing to a reader's socket: answers in blocks, with backpressure and a time limit per block, and the
blocks of an event log as HTTP/1.1 chunks (from memory for a live reader, with `sendfile` from the file
when nothing is queued ahead, else read and queued behind it). Used by the native face (`serve`) and the
OpenAI-compatible one (`facade`)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

from aiohttp import web

from . import fanout
from .jobs import Job
from .keys import CONFIG

READ_BLOCK = 256 * 1024
SPLIT_WRITE_BYTES = 16 * 1024  # a block of the log at least this large is written beside its framing


async def send_bytes(
    request: web.Request, data: bytes, headers: dict[str, str], status: int = 200
) -> web.StreamResponse:
    """An answer already in memory (an OpenAI object, a passed-through answer): small ones at once,
    large ones in blocks, so that a reader that takes nothing is dropped like any other."""
    if len(data) <= READ_BLOCK:
        return web.Response(body=data, status=status, headers=headers)
    view = memoryview(data)

    async def read(offset: int, n: int) -> bytes:
        return view[offset : offset + n]  # type: ignore[return-value]

    return await send_blocks(request, web.StreamResponse(status=status, headers=headers), len(data), read)


async def send_blocks(
    request: web.Request, resp: web.StreamResponse, size: int, read: Callable[[int, int], Awaitable[bytes]]
) -> web.StreamResponse:
    """Send `size` bytes READ_BLOCK at a time, each taken by the reader within [server]
    send_timeout_seconds; a reader that stalls or leaves is cut off."""
    resp.content_length = size
    await resp.prepare(request)
    if request.method == "HEAD":
        return resp
    offset = 0
    seconds = request.app[CONFIG].server_send_timeout_seconds
    try:
        while offset < size:
            block = await read(offset, min(READ_BLOCK, size - offset))
            if not block:
                break
            await send(resp, block, seconds)
            offset += len(block)
        await resp.write_eof()
    except (ConnectionError, RuntimeError, TimeoutError):
        if request.transport is not None:
            request.transport.abort()
    return resp


def next_block(fd: int, offset: int, size: int, job: Job | None) -> bytes:
    """The log's next bytes from `offset` (at most READ_BLOCK): for a live reader, the bytes just appended,
    without a read; else from the file."""
    events = job.events if job is not None else None
    if events is not None and offset == events.tail_start:
        data = events.tail
        if len(data) > READ_BLOCK:  # (then the rest from the file, with backpressure)
            data = bytes(memoryview(data)[:READ_BLOCK])
        return data
    return os.pread(fd, min(size - offset, READ_BLOCK), offset)


async def send(resp: web.StreamResponse, data: bytes, seconds: float) -> None:
    """Write to a reader, waiting at most `seconds` for its socket to take the bytes."""
    async with asyncio.timeout(seconds):
        await resp.write(data)


async def send_block(
    request: web.Request, resp: web.StreamResponse, fd: int, offset: int, size: int, job: Job | None, seconds: float
) -> int:
    """Send the log's next block from `offset` as one chunk; returns its length (0: nothing more to read).

    A block read from the file goes from the page cache to the socket with `sendfile` when the socket has
    nothing else queued (no copy through Python: what nginx does for static files); whatever the socket
    does not take at once is read and queued behind it, so the bytes stay in order."""
    events = job.events if job is not None else None
    n = min(size - offset, READ_BLOCK)
    live = events is not None and offset == events.tail_start  # (the bytes just appended: from memory)
    out = None if live or n < SPLIT_WRITE_BYTES else sendfile_socket(request, resp)
    if out is None:
        data = next_block(fd, offset, size, job)
        if data:
            await send_chunk(request, resp, data, seconds)
        return len(data)
    transport = request.transport
    assert transport is not None
    head = b"%x\r\n" % n
    head_sent = sent = 0
    if transport.get_write_buffer_size() == 0:  # nothing queued: these bytes may go to the socket directly
        try:
            head_sent = os.write(out, head)
            if head_sent == len(head):
                sent = os.sendfile(out, fd, offset, n)
        except (BlockingIOError, InterruptedError):
            pass
        except ConnectionError:
            raise
        except OSError:
            pass  # (a file system without sendfile: the rest goes the ordinary way)
    rest = os.pread(fd, n - sent, offset + sent) if sent < n else b""
    if sent + len(rest) != n:  # the log is append-only; a shorter file is damage: the chunk cannot be completed
        transport.abort()
        raise ConnectionError("the event log is shorter than its size")
    await _queued_chunk(request, transport, (head[head_sent:], rest), len(head) + n, seconds)
    return n


async def _queued_chunk(
    request: web.Request, transport: asyncio.Transport, pieces: tuple[bytes, ...], size: int, seconds: float
) -> None:
    """Queue the rest of one chunk (`pieces`, then its CRLF; `size` bytes with its head) on the transport,
    count the chunk like the fan-out's pushes (`PUSHED`, for the access log), and wait at most `seconds`
    for the reader to take it."""
    transport.writelines((*pieces, b"\r\n"))
    request[fanout.PUSHED] = request.get(fanout.PUSHED, 0) + size + 2
    async with asyncio.timeout(seconds):
        await request.writer.drain()


def sendfile_socket(request: web.Request, resp: web.StreamResponse) -> int | None:
    """The reader's socket, when the log's bytes may be written to it directly: a chunked response on a
    plain (not TLS) transport that is open. None otherwise."""
    transport = request.transport
    if not resp.chunked or transport is None or transport.is_closing():
        return None
    if transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    return sock.fileno() if sock is not None else None


async def send_chunk(request: web.Request, resp: web.StreamResponse, data: bytes, seconds: float) -> None:
    """`send` for the blocks of the log. A large block goes to the socket as one HTTP/1.1 chunk with its
    framing beside it, not joined to it: aiohttp joins a chunk to its framing before writing it (a copy of
    up to READ_BLOCK per block, half the CPU of a replay), where the transport's `writelines` hands the
    pieces to the socket as they are. The bytes are counted like the fan-out's (`PUSHED`)."""
    transport = request.transport
    if len(data) < SPLIT_WRITE_BYTES or not resp.chunked or transport is None or transport.is_closing():
        await send(resp, data, seconds)
        return
    head = b"%x\r\n" % len(data)
    await _queued_chunk(request, transport, (head, data), len(head) + len(data), seconds)
