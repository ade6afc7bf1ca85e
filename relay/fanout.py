"""Fan-out: new events of a running request written straight to its caught-up readers' sockets.

A reader (see `serve.follow`) that has read everything so far subscribes. Each time the job
announces an append, the new bytes go out as one HTTP/1.1 chunk to every subscriber whose socket is not
backed up, without waking any reader's task: with thousands of readers that is most of the cost of a
live event saved. A subscriber is handed back to its own loop (which reads the file with backpressure)
when its socket holds more than PUSH_BUFFER_LIMIT unsent bytes, and on any wake-up (the end of the
request, a heartbeat). The job knows nothing of this: it only calls its listeners' `appended` and
`woken`.
"""

from __future__ import annotations

import asyncio
import weakref

from aiohttp import web

from .jobs import Job

PUSH_BUFFER_LIMIT = 64 * 1024  # a reader with more than this still unsent goes back to its own loop
PUSHED: web.RequestKey[int] = web.RequestKey("pushed_bytes", int)  # bytes pushed to one request's socket


class Subscriber:
    """One caught-up reader: its socket, the offset it has, and the future its loop waits on."""

    __slots__ = ("transport", "offset", "fut", "pushed")

    def __init__(self, transport: asyncio.Transport, offset: int, fut: asyncio.Future[None]) -> None:
        self.transport = transport
        self.offset = offset
        self.fut = fut
        self.pushed = 0

    def release(self) -> None:
        if not self.fut.done():
            self.fut.set_result(None)


class Fanout:
    """The subscribers of one running job; registered with the job as its listener."""

    def __init__(self, job: Job) -> None:
        self._job = weakref.ref(job)  # the job holds its fan-out (as a listener), not the other way round
        self.subs: list[Subscriber] = []
        job.listen(self)

    @property
    def job(self) -> Job:
        job = self._job()
        assert job is not None  # a job lives as long as a reader follows it
        return job

    async def follow(self, transport: asyncio.Transport, offset: int) -> tuple[int, int]:
        """Let new events be written to this reader's socket until it is handed back. Returns the reader's
        offset then and the bytes pushed. Only for a caught-up reader (offset == size) of a chunked stream."""
        job = self.job
        if job.finished or job.size != offset or transport.get_write_buffer_size() > PUSH_BUFFER_LIMIT:
            return offset, 0
        sub = Subscriber(transport, offset, asyncio.get_running_loop().create_future())
        self.subs.append(sub)
        try:
            await sub.fut
        finally:
            sub.release()
        return sub.offset, sub.pushed

    def appended(self) -> None:
        """Write the job's last append to every subscriber that is caught up and not backed up."""
        events = self.job.events
        if not self.subs or events is None:
            return
        data, start = events.tail, events.tail_start
        if not data:  # (an empty chunk is the end of a chunked body: the reader's stream would end there)
            return
        if len(data) > PUSH_BUFFER_LIMIT:  # (a response's closing events: many MiB) each reader's own loop
            self.woken()  # sends it from the file, a block at a time, as fast as that reader takes it
            return
        frame = b"%x\r\n" % len(data) + data + b"\r\n"
        end, size = start + len(data), len(frame)
        keep = []
        for sub in self.subs:  # (per reader per event: keep this loop lean, it runs R times per event)
            transport = sub.transport
            if sub.offset != start or sub.fut.done() or transport.is_closing():
                sub.release()
                continue
            transport.write(frame)
            sub.offset = end
            sub.pushed += size
            if transport.get_write_buffer_size() > PUSH_BUFFER_LIMIT:
                sub.release()  # a slow reader: its own loop continues, with backpressure
                continue
            keep.append(sub)
        self.subs = keep

    def woken(self) -> None:
        """Hand every socket back to its reader's loop (the end, or a heartbeat)."""
        subs, self.subs = self.subs, []
        for sub in subs:
            sub.release()


_FANOUTS: weakref.WeakKeyDictionary[Job, Fanout] = weakref.WeakKeyDictionary()


def of(job: Job) -> Fanout:
    """The job's fan-out, made when its first reader catches up."""
    fanout = _FANOUTS.get(job)
    if fanout is None:
        fanout = _FANOUTS[job] = Fanout(job)
    return fanout
