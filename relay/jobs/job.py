"""One background job per request: its life from the queued status to the terminal one.

A job owns its request's files while it runs. It creates them (`create_files`, before the POST answers),
runs the upstream call (`run`; the read loop is `reading.UpstreamRead`), and ends exactly once: whatever
happens (upstream error, timeout, stop, shutdown, a bug) it ends in one terminal status, with `[DONE]` as
the last event of a stream and `.raw` written (`ending.Ending`). Readers follow its event log
(`wait_for_more`, or as listeners, see `fanout`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from .. import ledger
from ..assemble import Assembler
from ..paths import RequestPath
from ..recovery import remove_marker, write_marker
from ..refresh import START_WITHIN
from ..status import TERMINAL, public_view, response_body
from ..status import started as start_doc
from ..store import NO_SPACE, EventLog, write_json_atomic
from ..upstream import UpstreamError
from .ending import INTERNAL_ERROR, Ending
from .reading import UpstreamRead
from .view import Host, Listener, LogFormat

log = logging.getLogger("relay.jobs")

Error = tuple[str, str] | None


class Job:
    """A running request. Readers hold a reference to follow its event log."""

    def __init__(
        self,
        manager: Host,
        rp: RequestPath,
        *,
        stream: bool,
        doc: dict[str, Any],
        body: dict[str, Any],
        api_key: str,
        organization: str | None,
        timeout: float,
        connect_timeout: float,
        webhook_url: str | None = None,
        key_label: str = ledger.OPEN,
        log_format: LogFormat | None = None,
    ) -> None:
        self.manager = manager
        self.log_format = log_format
        self.on_close: Callable[[Job], None] | None = None  # told once the request has ended
        self.webhook_url = webhook_url
        self.key_label = key_label
        self.key_claimed = False  # it holds one of its key's running requests (see JobManager.claim_key)
        self.rp = rp
        self.stream = stream
        self.doc = doc
        self.body = body
        self._api_key: str | None = api_key
        self._organization = organization
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        data_dir = manager.config.data_dir
        self.status_path = rp.file(data_dir, "json")
        self.raw_path = rp.file(data_dir, "raw")
        self.events: EventLog | None = None
        self.raw = bytearray()
        self.assembler = Assembler()
        self.reading = UpstreamRead(self)
        self.ending = Ending(self)
        self.finished = False
        self.task: asyncio.Task[None] | None = None
        self.started = False
        self.cancel_reason: str | None = None  # "stop" (stop URL), "idle", or "interrupted" (shutdown)
        self.first_chunk_at: float | None = None
        self.last_read: float | None = None  # loop time of the last upstream read (see JobManager.watch_idle)
        self.started_at = time.time()
        self.processed_at: float | None = None
        self.finishing = False  # the ending is being written: a stop or a shutdown no longer cancels it
        self.status_settled = asyncio.Event()  # the terminal status is on disk (or could not be written)
        self._waiters: list[asyncio.Future[None]] = []
        self._listeners: list[Listener] = []

    # ----- files -----------------------------------------------------------------------------------

    def create_files(self) -> None:
        """Write the queued status (and the empty event log). Called before the POST answers."""
        data_dir = self.manager.config.data_dir
        if not self.manager.reserve.ensure():
            raise OSError(errno.ENOSPC, "no space left to keep the reserve")
        try:
            # (a half-written marker is removed below too)
            write_marker(data_dir, self.rp, self.webhook_url, self.key_label)
            self.rp.directory(data_dir).mkdir(parents=True, exist_ok=True)
            if self.stream:
                self.events = EventLog(self.rp.file(data_dir, "txt"))
                if self.log_format is not None:
                    self.events.append(self.log_format.opening(self))
            write_json_atomic(self.status_path, self.doc)
        except BaseException:  # whatever failed, nothing of this request is left behind
            if self.events is not None:
                self.events.close()
            for ext in ("txt", "json"):
                try:
                    self.rp.file(data_dir, ext).unlink(missing_ok=True)
                except OSError:
                    pass
            try:
                remove_marker(data_dir, self.rp)
            except OSError:
                pass
            raise

    @property
    def size(self) -> int:
        """Bytes of the event log that readers may read."""
        return self.events.size if self.events else 0

    # ----- readers ---------------------------------------------------------------------------------

    async def wait_for_more(self, offset: int) -> None:
        """Return when the log grows past `offset`, the job finishes, or the heartbeat ticks.

        One future per waiting reader and no timer of its own: the app's heartbeat task wakes every
        running job's readers at once (see `heartbeat`), which is far cheaper with thousands of readers.
        """
        if self.finished or self.size > offset:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    def listen(self, listener: Listener) -> None:
        """Tell `listener` of every append and every wake-up, until the job ends."""
        self._listeners.append(listener)

    def announce(self) -> None:
        """Events were appended: wake the readers waiting, tell the listeners."""
        self._wake_waiters()
        for listener in self._listeners:
            listener.appended()

    def _wake_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _wake(self) -> None:
        """Wake every reader: the waiting ones, and those the listeners hold."""
        self._wake_waiters()
        for listener in self._listeners:
            listener.woken()

    heartbeat = _wake  # readers woken with nothing new write a keep-alive comment

    # ----- running ---------------------------------------------------------------------------------

    async def run(self) -> None:
        status, error = "done", None
        try:
            self.started = True
            if self.cancel_reason:
                raise asyncio.CancelledError  # stopped (or shut down) before it began
            self.processed_at = time.time()
            start_doc(self.doc, self.stream, self.processed_at)
            self.manager.statuses.changed(self, within=START_WITHIN)  # on disk in a batched pass, ~20 ms
            if self.log_format is not None and self.events is not None:
                self.events.append(self.log_format.started(self))
                self.announce()
            async with asyncio.timeout(self.timeout):
                if self.stream:
                    await self.reading.stream(self._call_args())
                else:
                    await self.reading.answer(self._call_args())
        except BaseException as exc:  # (each kind of failure is one terminal state, see `_outcome`)
            status, error = self._outcome(exc)
        finally:
            self._api_key = None  # the key is dropped as soon as the upstream call ends
            self._organization = None
        await self._finish(status, error)

    def _outcome(self, exc: BaseException) -> tuple[str, Error]:
        """The terminal state a failure of the upstream call ends the request with."""
        if isinstance(exc, TimeoutError):
            return "error", ("timeout", f"the upstream call took longer than the timeout of {self.timeout:g} s")
        if isinstance(exc, UpstreamError):
            self.reading.keep_error(exc)
            return "error", (exc.code, exc.message)
        if isinstance(exc, asyncio.CancelledError):
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                task.uncancel()
            if self.cancel_reason == "stop":
                return "stop", None
            if self.cancel_reason == "idle":
                idle = self.manager.config.upstream_idle_timeout_seconds
                return "error", ("upstream_disconnected", f"the upstream sent nothing for {idle:g} s in the middle "
                                 "of its answer ([upstream] idle_timeout_seconds)")  # fmt: skip
            return "error", ("interrupted", "the relay shut down before the request finished")
        if isinstance(exc, OSError):
            log.error("request %s: storage error: %s", self.rp.request_id, exc.strerror)
            if exc.errno in NO_SPACE:
                self.manager.reserve.release()  # room to write the terminal state
            return "error", ("storage_error", f"the relay could not write the request's files ({exc.strerror})")
        if not isinstance(exc, Exception):  # (KeyboardInterrupt, SystemExit: not ours to turn into a state)
            raise exc
        log.exception("request %s: internal error", self.rp.request_id, exc_info=exc)
        return "error", INTERNAL_ERROR

    def _call_args(self) -> dict[str, Any]:
        cfg = self.manager.config
        assert self._api_key is not None
        return {
            "stream": self.stream,
            "api_key": self._api_key,
            "organization": self._organization,
            "connect_timeout": self.connect_timeout,
            "include_usage": cfg.upstream_include_usage,
        }

    def status_snapshot(self) -> bytes | None:
        """The status as it stands, encoded for the refresh pass (see `refresh`); with the text so far."""
        if self.finished or self.finishing or self.doc["status"] in TERMINAL:
            return None
        if self.stream and self.assembler.chunks:
            response_body(self.doc, self.assembler.completion(self.body["model"]))
        return orjson.dumps(self.doc)

    def describe(self) -> str:
        return f"request {self.rp.request_id}"

    def cancel(self, reason: str) -> None:
        """Cancel the upstream call in whatever phase it is; a job not yet started sees the flag."""
        if self.cancel_reason is not None or self.finished or self.finishing:
            return
        self.cancel_reason = reason
        if self.started and self.task is not None and not self.task.done():
            self.task.cancel()

    def hold_tail(self, until: asyncio.Future[None]) -> None:
        """Keep the stream's closing events back until `until` is done (see `Ending.hold_tail`)."""
        self.ending.hold_tail(until)

    # ----- the end ---------------------------------------------------------------------------------

    async def _finish(self, status: str, error: Error) -> None:
        """Write the ending (terminal status, `[DONE]`), then give back everything the request held.

        Whatever goes wrong here, the request ends: an ending that cannot be encoded becomes
        `internal_error`; writes that fail are retried in the background until the disk takes them
        (the running marker stays until then, so a restart repairs what a crash interrupts)."""
        self.finishing = True  # from here on, a stop or a shutdown no longer cancels the task
        await self.manager.statuses.leave(self)  # the terminal status must be the last write
        now = time.time()
        status, error, problems = await self.ending.write(status, error, now)
        if problems:
            self.manager.retry_ending(self, status, error)
        self._close_out(status, error, now, problems)

    def _close_out(self, status: str, error: Error, now: float, problems: list[str]) -> None:
        """Give back what the request held (slot, readers, gauge) and report it; runs exactly once."""
        self.finished = True  # first what others wait for: readers, the slot, the gauge
        self._wake()
        self.manager.forget(self)
        self._count(status, error)
        if self.webhook_url:
            self.manager.webhooks.send_later(self.webhook_url, public_view(self.doc), self.rp.request_id)
        if self.on_close is not None:
            try:
                self.on_close(self)
            except Exception:
                log.exception("request %s: its end could not be reported", self.rp.request_id)
        ttfb = f"{self.first_chunk_at - self.processed_at:.3f}" if self.first_chunk_at and self.processed_at else "-"
        log.info(
            "request %s %s status=%s%s chunks=%d ttfb=%s total=%.3f%s",
            self.rp.request_id,
            "stream" if self.stream else "async",
            status,
            f" code={error[0]}" if error else "",
            self.assembler.chunks,
            ttfb,
            now - self.started_at,
            f" write_errors={'; '.join(problems)} (retrying)" if problems else "",
        )

    def _count(self, status: str, error: Error) -> None:
        metrics = self.manager.metrics
        metrics.requests.labels(self.doc["request"]["endpoint"], status).inc()
        if error:
            metrics.errors.labels(error[0]).inc()
        if self.first_chunk_at and self.processed_at:
            metrics.first_chunk.observe(self.first_chunk_at - self.processed_at)
        metrics.bytes_written.inc(self.size + (len(self.raw) if "response_raw_url" in self.doc["endpoints"] else 0))
