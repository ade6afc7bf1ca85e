"""One background job per request: upstream → files, stop, timeouts, the terminal state.

A job owns its request's files while it runs. Per network read from the upstream it parses the
events, appends them to the `.txt` log in one write, and wakes the readers waiting on that request.
The status document is refreshed at most once a second while streaming and written once more at the
end. Whatever happens (upstream error, timeout, stop, shutdown, a bug) the job ends in exactly one
terminal status, with `[DONE]` as the last event of a stream and `.raw` written.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import aiofiles.os
import orjson

from . import ledger
from .assemble import Assembler, EventTooLarge, SSEParser
from .bounds import containers, raw_too_deep
from .config import Config
from .metrics import Metrics
from .operator import UsageBook
from .paths import RequestPath
from .recovery import remove_marker, write_marker
from .refresh import START_WITHIN, StatusWriter
from .status import TERMINAL, encodable, ending_events, public_view, raw_written, response_body
from .status import finish as finish_doc
from .status import started as start_doc
from .store import DONE_DATA, EventLog, Reserve, event_size, write_atomic, write_json_atomic
from .upstream import Upstream, UpstreamError, check_encoding
from .webhooks import WebhookSender

log = logging.getLogger("relay.jobs")


T = TypeVar("T")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
TAIL_HOLD_SECONDS = 2.0
INTERNAL_ERROR = ("internal_error", "the relay failed unexpectedly; see its log")


TURN_SECONDS = 0.005  # longest stretch a job parses buffered upstream bytes before letting others run
UPSTREAM_MAX_CONTAINERS = 100_000  # arrays + objects in one upstream event or answer (~50 ms to parse at worst)


class Turns:
    """Lets the event loop turn when one task has worked for TURN_SECONDS without it turning.

    Reading a body that is already buffered does not suspend the reading task: an upstream that bursts
    megabytes at once would otherwise be parsed in one go while every other request waits. A callback
    scheduled at the start of a stretch runs only once the loop turns, so it tells whether it did."""

    __slots__ = ("turned", "since")

    def __init__(self) -> None:
        self.turned = True
        self.since = 0.0

    def _turn(self) -> None:
        self.turned = True

    async def check(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.turned:  # the loop turned since the last block: a new stretch starts
            self.turned = False
            self.since = now
            loop.call_soon(self._turn)
        elif now - self.since > TURN_SECONDS:
            await asyncio.sleep(0)


class Listener(Protocol):
    """What follows a job's event log from the HTTP side (see `fanout`)."""

    def appended(self) -> None: ...  # events were appended (`job.events.tail`)

    def woken(self) -> None: ...  # the job ended, or a heartbeat: readers should look again


Events = list[tuple[bytes, str | None]]


class LogFormat(Protocol):
    """What a job writes to its event log when it is not the relay's own format (upstream chunks as they
    came, then `event: stop|error` and `[DONE]`): the OpenAI-compatible face writes Responses events."""

    def opening(self, job: Job) -> Events: ...  # with the queued status, before the POST answers

    def started(self, job: Job) -> Events: ...  # the upstream call begins

    def chunk(self, line: bytes, chunk: dict[str, Any]) -> Events: ...  # one upstream chunk

    def ending(self, job: Job, status: str, error: tuple[str, str] | None) -> Events: ...  # the doc is final

    def closing_at(self, job: Job, offsets: list[int]) -> None: ...  # where the events of `ending` will start


def _now() -> float:
    return asyncio.get_running_loop().time()


def _stream_failure(chunk: dict[str, Any]) -> str | None:
    """The upstream's error text when a stream chunk reports a failure: an `error` member (Anthropic's
    compatibility layer sends it alone, OpenRouter beside a choice), or a choice ending with
    `finish_reason: "error"`. None for an ordinary chunk."""
    err = chunk.get("error")
    if err is None or err is False or err == "" or err == {}:
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not any(
            isinstance(c, dict) and c.get("finish_reason") == "error" for c in choices
        ):
            return None
        return 'the upstream ended its answer with finish_reason "error"'
    text = err.get("message") if isinstance(err, dict) else err
    if not isinstance(text, str):
        text = orjson.dumps(text).decode() if isinstance(text, (int, float, bool, list, dict)) else ""
    return f"the upstream reported an error mid-stream: {text[:500]}"


class Job:
    """A running request. Readers hold a reference to follow its event log."""

    def __init__(
        self,
        manager: JobManager,
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
        self.ledger_line: dict[str, Any] | None = None  # written to the usage ledger at the ending
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
        self.finished = False
        self.task: asyncio.Task[None] | None = None
        self.started = False
        self.cancel_reason: str | None = None  # "stop" (stop URL) or "interrupted" (shutdown)
        self.first_chunk_at: float | None = None
        self.last_read: float | None = None  # loop time of the last upstream read (see JobManager.watch_idle)
        self.started_at = time.time()
        self.processed_at: float | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._listeners: list[Listener] = []
        self._saw_done = False
        self._finishing = False
        self._raw_tried = False
        self._status_written = False
        self._tail_written = False
        self._answer_broken = False  # the assembled answer could not be built or encoded (see _write_internal_error)
        self.status_settled = asyncio.Event()  # the terminal status is on disk (or could not be written)
        self._tail_hold: asyncio.Future[None] | None = None

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

    def _announce(self) -> None:
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
                self._announce()
            async with asyncio.timeout(self.timeout):
                if self.stream:
                    await self._run_stream()
                else:
                    await self._run_async()
        except TimeoutError:
            status, error = (
                "error",
                ("timeout", f"the upstream call took longer than the timeout of {self.timeout:g} s"),
            )
        except UpstreamError as exc:
            status, error = "error", (exc.code, exc.message)
            self._keep_upstream_error(exc)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                task.uncancel()
            if self.cancel_reason == "stop":
                status = "stop"
            elif self.cancel_reason == "idle":
                status, error = "error", ("upstream_disconnected", f"the upstream sent nothing for "
                                          f"{self.manager.config.upstream_idle_timeout_seconds:g} s in the middle of "
                                          "its answer ([upstream] idle_timeout_seconds)")  # fmt: skip
            else:
                status, error = "error", ("interrupted", "the relay shut down before the request finished")
        except OSError as exc:
            log.error("request %s: storage error: %s", self.rp.request_id, exc.strerror)
            if exc.errno in NO_SPACE:
                self.manager.reserve.release()  # room to write the terminal state
            status, error = (
                "error",
                ("storage_error", f"the relay could not write the request's files ({exc.strerror})"),
            )
        except Exception:
            log.exception("request %s: internal error", self.rp.request_id)
            status, error = "error", INTERNAL_ERROR
        finally:
            self._api_key = None  # the key is dropped as soon as the upstream call ends
            self._organization = None
        await self._finish(status, error)

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

    def _keep_raw(self, block: bytes) -> None:
        """Keep the upstream's bytes for `.raw`, up to [upstream] max_response_bytes."""
        limit = self.manager.config.upstream_max_response_bytes
        if len(self.raw) + len(block) > limit:
            raise UpstreamError(
                "upstream_response_too_large",
                f"the upstream response is larger than {limit} bytes ([upstream] max_response_bytes)",
            )
        self.raw += block

    async def _run_stream(self) -> None:
        cfg = self.manager.config
        parser = SSEParser(cfg.upstream_max_event_bytes)
        async with self.manager.upstream.open(self.body, **self._call_args()) as resp:
            self.doc["response"] = {"status_code": resp.status_code, "headers": resp.headers}
            check_encoding(resp.headers)
            if "text/event-stream" not in resp.content_type:
                async for block in resp.chunks:
                    self.last_read = _now()
                    self._keep_raw(block[: 64 * 1024 - len(self.raw)])
                    if len(self.raw) >= 64 * 1024:
                        break
                raise UpstreamError(
                    "upstream_invalid_response",
                    f"the upstream answered with Content-Type {resp.content_type or 'none'!r} instead of an "
                    "event stream; check upstream.base_url",
                    status_code=resp.status_code,
                    headers=resp.headers,
                    body=bytes(self.raw),
                )
            try:
                turns = Turns()
                async for block in resp.chunks:
                    self._keep_raw(block)
                    datas = parser.feed(block)
                    if datas or self.last_read is None:  # progress is an event, not a byte (or a comment)
                        self.last_read = _now()
                    self._handle(datas)
                    if self._saw_done:
                        break
                    await turns.check()
                if not self._saw_done:
                    self._handle(parser.flush())
            except EventTooLarge:
                raise UpstreamError(
                    "upstream_event_too_large",
                    f"the upstream sent a stream event larger than {cfg.upstream_max_event_bytes} bytes "
                    "([upstream] max_event_bytes)",
                ) from None
        if not self._saw_done and not self.assembler.all_finished():
            if self.raw and not self.assembler.chunks:
                raise UpstreamError(
                    "upstream_invalid_response",
                    f"the upstream's answer is not an event stream: {len(self.raw)} bytes without one `data:` event",
                )
            raise UpstreamError(
                "upstream_disconnected", "the upstream closed the stream before the answer was complete"
            )

    def _handle(self, datas: list[bytes]) -> None:
        """Turn parsed upstream events into log events; on a bad one, keep the good ones before it."""
        if not datas:
            return
        assert self.events is not None
        out: Events = []
        chunks: list[dict[str, Any]] = []
        fmt = self.log_format
        try:
            for data in datas:
                if data == DONE_DATA:
                    self._saw_done = True
                    break
                line, chunk = self._chunk(data)
                if fmt is None:
                    out.append((line, None))
                else:
                    out.extend(fmt.chunk(line, chunk))
                chunks.append(chunk)
                failure = _stream_failure(chunk)
                if failure is not None:  # (OpenRouter) an error chunk that still has choices: kept, then the end
                    raise UpstreamError("upstream_error", failure, body=data)
        finally:
            if chunks:
                if self.first_chunk_at is None:
                    self.first_chunk_at = time.time()
                if out:
                    self.events.append(out)
                for chunk in chunks:  # only what is on disk counts towards the assembled answer
                    self.assembler.add(chunk)
                if out:  # (a format may write nothing for a chunk: an announce would push an empty chunk)
                    self._announce()
                self.manager.statuses.changed(self)

    def _parse(self, data: bytes, what: str) -> Any:
        """Upstream JSON, within the bounds that keep parsing and re-serialising it cheap."""
        cfg = self.manager.config
        if containers(data) > UPSTREAM_MAX_CONTAINERS:
            raise UpstreamError(
                "upstream_invalid_response",
                f"the upstream sent {what} with more than {UPSTREAM_MAX_CONTAINERS} arrays and objects",
            )
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamError("upstream_invalid_response", f"the upstream sent {what} that is not JSON") from None
        if raw_too_deep(data, value, cfg.upstream_max_json_depth):
            raise UpstreamError(
                "upstream_invalid_response",
                f"the upstream sent {what} nested more than {cfg.upstream_max_json_depth} levels deep "
                "([upstream] max_json_depth)",
            )
        return value

    def _chunk(self, data: bytes) -> tuple[bytes, dict[str, Any]]:
        """Check one upstream event; returns the bytes to log and the parsed chunk."""
        chunk = self._parse(data, "a stream event")
        if not isinstance(chunk, dict):
            raise UpstreamError(
                "upstream_invalid_response", "the upstream sent a stream event that is not a JSON object"
            )
        failure = _stream_failure(chunk)
        if failure is not None and not chunk.get("choices"):
            raise UpstreamError("upstream_error", failure, body=data)
        choices = chunk.get("choices")
        rewrite = b"\n" in data or b"\r" in data
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict) and "delta" not in choice:
                    choice["delta"] = {}
                    rewrite = True
        return (orjson.dumps(chunk) if rewrite else data), chunk

    def status_snapshot(self) -> bytes | None:
        """The status as it stands, encoded for the refresh pass (see `refresh`); with the text so far."""
        if self.finished or self._finishing or self.doc["status"] in TERMINAL:
            return None
        if self.stream and self.assembler.chunks:
            response_body(self.doc, self.assembler.completion(self.body["model"]))
        return orjson.dumps(self.doc)

    def describe(self) -> str:
        return f"request {self.rp.request_id}"

    async def _run_async(self) -> None:
        async with self.manager.upstream.open(self.body, **self._call_args()) as resp:
            self.doc["response"] = {"status_code": resp.status_code, "headers": resp.headers}
            check_encoding(resp.headers)
            async for block in resp.chunks:
                self.last_read = _now()
                self._keep_raw(block)
        self.first_chunk_at = time.time()
        body = self._parse(bytes(self.raw), "an answer")
        if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
            raise UpstreamError("upstream_invalid_response", "the upstream answer has no `choices`")
        response_body(self.doc, body)

    def _keep_upstream_error(self, exc: UpstreamError) -> None:
        if exc.status_code is None and not exc.body:
            return
        response = self.doc.setdefault("response", {})
        if exc.status_code is not None and "status_code" not in response:
            response["status_code"] = exc.status_code
            response["headers"] = exc.headers
        if exc.body and not self.raw:
            self.raw += exc.body
        if exc.status_code is not None and exc.body and not self.assembler.chunks:
            try:
                response["body"] = self._parse(exc.body, "an error body")
            except UpstreamError:
                response["body"] = exc.body.decode("utf-8", "replace")

    async def _finish(self, status: str, error: tuple[str, str] | None) -> None:
        """Write the ending (terminal status, `[DONE]`), then give back everything the request held.

        Whatever goes wrong here, the request ends: an ending that cannot be encoded becomes
        `internal_error`; writes that fail are retried in the background until the disk takes them
        (the running marker stays until then, so a restart repairs what a crash interrupts)."""
        self._finishing = True  # from here on, a stop or a shutdown no longer cancels the task
        await self.manager.statuses.leave(self)  # the terminal status must be the last write
        now = time.time()
        problems = ["not written"]
        try:
            self._ending_doc(status, error, now)
            problems = await self._write_ending(status, error)
        except Exception:  # a bug (an answer that cannot be built or encoded), not a full disk: ended at once
            log.exception("request %s: internal error while finishing", self.rp.request_id)
            status, error = "error", INTERNAL_ERROR
            problems = await self._write_internal_error(now)
        self._settled()  # whatever happened above: a stop URL waiting on it answers now
        if not problems:
            problems = await self._done_with_files()
        if problems:
            self.manager.retry_ending(self, status, error)
        self._close_out(status, error, now, problems)

    async def _write_internal_error(self, now: float) -> list[str]:
        """End as `internal_error` after the ending could not be built or encoded: the answer is left out
        (the text received stays in the event log and `.raw`), and whatever else of the document cannot be
        encoded is dropped, so this ending can always be written; only the disk can still refuse it."""
        self._answer_broken = True
        self.doc["response"] = {}
        try:
            self._ending_doc("error", INTERNAL_ERROR, now)
            self.doc = encodable(self.doc)
            return await self._write_ending("error", INTERNAL_ERROR)
        except Exception:
            log.exception("request %s: cannot write its ending", self.rp.request_id)
            return ["ending: internal error"]

    async def _done_with_files(self) -> list[str]:
        """Release the files (see `_release_files`); never raises, so the request always ends: an unexpected
        failure is a problem like a failed write, and the ending is retried with the marker kept."""
        had_line = self.ledger_line is not None
        try:
            problems = await self.manager.on_storage(self._release_files, self.manager.config.storage_fsync)
        except Exception:
            log.exception("request %s: cannot release its files", self.rp.request_id)
            problems = ["release: internal error"]
        if not had_line and self.ledger_line is not None:  # written just now (once, even if a retry follows)
            self.manager.counted(self.ledger_line)
        return problems

    def _release_files(self, durable: bool) -> list[str]:
        """In a worker thread, once the ending is written: the usage ledger's line, the log made durable
        and closed, then the running marker dropped (from then on a restart leaves the request alone)."""
        if self.ledger_line is None:
            cfg = self.manager.config
            first = self.first_chunk_at - self.processed_at if self.first_chunk_at and self.processed_at else None
            line = ledger.entry(self.doc, request_id=self.rp.request_id, node=cfg.server_node_id, key=self.key_label,
                                path=self.rp.base, ttft=first, now=time.time(), params=self.body)  # fmt: skip
            try:
                ledger.append(cfg.data_dir, line, durable)
            except OSError as exc:
                return [f"usage ledger: {exc.strerror}"]
            self.ledger_line = line
        if self.events is not None and durable:
            try:
                self.events.sync()
            except OSError as exc:
                return [f".txt: {exc.strerror}"]
        self._close_files()
        try:
            remove_marker(self.manager.config.data_dir, self.rp)
        except OSError as exc:
            return [f"marker: {exc.strerror}"]
        return []

    def _ending_doc(self, status: str, error: tuple[str, str] | None, now: float) -> None:
        if self.stream and not self._answer_broken and (self.assembler.chunks or status == "done"):
            response_body(self.doc, self.assembler.completion(self.body["model"]))
        finish_doc(self.doc, status, error, now=now, since=self.started_at, processed_at=self.processed_at)

    async def _write_ending(self, status: str, error: tuple[str, str] | None) -> list[str]:
        """Write what is still missing of the ending: `.raw` and the terminal status (one worker-thread
        hop, each durable when `[storage] fsync` is on), then the log's last events. Returns the pieces
        that failed; the log is made durable with the marker's removal (`_release_files`)."""
        problems: list[str] = []
        if not self._status_written:
            write_raw = not self._raw_tried and (not error or error[0] != "storage_error")  # a full disk: status first
            self._raw_tried = True  # a `.raw` that cannot be written is left out, not retried
            problem = await self.manager.on_storage(
                self._ending_files, write_raw, self.manager.config.storage_fsync, status, error
            )
            if problem:
                problems.append(problem)
        self._settled()
        await self._held()
        if self.events is not None and not self._tail_written:
            try:
                if self.log_format is None:
                    self._append_tail(ending_events(status, error))
                else:  # a format's closing events may repeat the whole answer: encoded and written off the loop
                    await self.manager.on_storage(self._append_closing, self.log_format, status, error)
                self._tail_written = True
                self._announce()
            except OSError as exc:
                problems.append(f".txt: {exc.strerror}")
        return problems

    def _append_tail(self, tail: Events) -> None:
        events = self.events
        assert events is not None
        self._with_reserve(lambda: events.append(tail))

    def _mark_closing(self, fmt: LogFormat, at: int, status: str, error: tuple[str, str] | None) -> None:
        """Make the format's closing events now (it keeps them for `_append_closing`) and tell it where each
        will start, for the terminal status to record. A format that fails here fails again there."""
        try:
            tail = fmt.ending(self, status, error)
        except Exception:
            return
        offsets = []
        for data, name in tail:
            offsets.append(at)
            at += event_size(at, data, name)
        fmt.closing_at(self, offsets)

    def _append_closing(self, fmt: LogFormat, status: str, error: tuple[str, str] | None) -> None:
        """In a worker thread: the format's last events (each encoded in its own step, so the loop gets
        the GIL between them), appended. Readers look at the log's size, which moves last. Should the
        format fail (a bug), the relay's own ending is written, so the stream still ends with [DONE]."""
        try:
            tail = fmt.ending(self, status, error)
        except Exception:
            log.exception("request %s: cannot make its closing events; writing the relay's own", self.rp.request_id)
            tail = ending_events(status, error)
        self._append_tail(tail)

    def _ending_files(self, write_raw: bool, durable: bool, status: str, error: tuple[str, str] | None) -> str | None:
        """In a worker thread: `.raw` (when asked), then the terminal status. Returns a problem, or None.
        Raises (orjson) for a status that cannot be encoded: the caller then ends as internal_error."""
        if self.log_format is not None and self.events is not None and not self._tail_written:
            self._mark_closing(self.log_format, self.events.size, status, error)
        if write_raw:
            try:
                write_atomic(self.raw_path, bytes(self.raw), durable, sync_parent=False)  # the status syncs the folder
                raw_written(self.doc, self.rp.url(self.manager.config.public_url, "raw"))
            except OSError as exc:
                log.warning("request %s: cannot write .raw: %s", self.rp.request_id, exc.strerror)
        data = orjson.dumps(self.doc)
        try:
            self._with_reserve(lambda: write_atomic(self.status_path, data, durable))
        except OSError as exc:
            return f".json: {exc.strerror}"
        self._status_written = True
        return None

    def _settled(self) -> None:
        """The terminal status is on disk (or cannot be written now): the upstream call is over, so the
        job's slot is free for a new request, and a stop URL waiting on it answers."""
        if not self.status_settled.is_set():
            self.status_settled.set()
            self.manager.release_slot()
            if self.key_claimed:
                self.key_claimed = False
                self.manager.release_key(self.key_label)

    def hold_tail(self, until: asyncio.Future[None]) -> None:
        """Keep the stream's last events (`event: stop`, `[DONE]`) back until `until` is done (at most
        TAIL_HOLD_SECONDS): the stop URL answers its client first, whose script only counts an answer as
        stopped when the stop's answer arrives while its stream is still open."""
        self._tail_hold = until

    async def _held(self) -> None:
        hold, self._tail_hold = self._tail_hold, None
        if hold is not None and not hold.done():
            try:
                await asyncio.wait_for(asyncio.shield(hold), TAIL_HOLD_SECONDS)
            except TimeoutError:
                pass

    def _close_files(self) -> None:
        if self.events is not None:
            self.events.close()

    def _close_out(self, status: str, error: tuple[str, str] | None, now: float, problems: list[str]) -> None:
        """Give back what the request held (slot, readers, gauge) and report it; runs exactly once."""
        self.finished = True  # first what others wait for: readers, the slot, the gauge
        self._wake()
        self.manager.forget(self)
        endpoints = self.doc["endpoints"]
        metrics = self.manager.metrics
        metrics.requests.labels(self.doc["request"]["endpoint"], status).inc()
        if error:
            metrics.errors.labels(error[0]).inc()
        if self.first_chunk_at and self.processed_at:
            metrics.first_chunk.observe(self.first_chunk_at - self.processed_at)
        metrics.bytes_written.inc(self.size + (len(self.raw) if "response_raw_url" in endpoints else 0))
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

    async def retry_ending(self, status: str, error: tuple[str, str] | None) -> None:
        """Write the pieces of the ending that failed, until the disk takes them; then drop the marker."""
        delay = 1.0
        try:
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                try:
                    problems = await self._write_ending(status, error)
                except Exception:  # not the disk: retrying cannot help; the marker stays for the next start
                    log.exception("request %s: cannot write its ending; the next start repairs it", self.rp.request_id)
                    return
                if not problems:
                    problems = await self._done_with_files()
                if not problems:
                    log.info("request %s: ending written after the disk came back", self.rp.request_id)
                    return
        finally:
            self._close_files()  # given up (shutdown): the marker stays and the next start repairs it

    def _with_reserve(self, write: Callable[[], object]) -> None:
        """Run a small write; on a full disk, give back the reserve and try once more."""
        try:
            write()
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            self.manager.reserve.release()
            write()

    def cancel(self, reason: str) -> None:
        """Cancel the upstream call in whatever phase it is; a job not yet started sees the flag."""
        if self.cancel_reason is not None or self.finished or self._finishing:
            return
        self.cancel_reason = reason
        if self.started and self.task is not None and not self.task.done():
            self.task.cancel()


class JobManager:
    """The running jobs of this process, by request id."""

    def __init__(self, config: Config, upstream: Upstream, webhooks: WebhookSender, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.upstream = upstream
        self.webhooks = webhooks
        self.jobs: dict[str, Job] = {}
        self._slots = 0  # claimed by POSTs being admitted, and by running jobs
        self.per_key: dict[str, int] = {}  # running jobs, passed-through answers and admissions, by key name
        self.retries: set[asyncio.Task[None]] = set()  # endings waiting for the disk
        self.accepting = True
        self.reserve = Reserve(config.data_dir / "reserve.bin", config.storage_reserve_bytes)
        # File work off the event loop, in two pools: new requests' files never queue behind endings
        # (fsync) and status refreshes, so a POST's single thread hop stays short under load.
        self.intake = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-intake")
        self.storage = ThreadPoolExecutor(max_workers=2, thread_name_prefix="relay-storage")
        self.statuses = StatusWriter(self.storage)
        self.book = UsageBook()

    async def on_intake(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in the intake pool (the files of a new request)."""
        return await aiofiles.os.wrap(fn)(*args, executor=self.intake)

    async def on_storage(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in the storage pool (endings, refreshes)."""
        return await aiofiles.os.wrap(fn)(*args, executor=self.storage)

    def running(self) -> int:
        return len(self.jobs)

    def claim_slot(self) -> bool:
        """Take one of the `max_concurrent_jobs` slots (False when none is free). A slot is held from the
        first await of a POST until its job ends, so the limit holds however many POSTs arrive at once."""
        if self._slots >= self.config.server_max_concurrent_jobs:
            return False
        self._slots += 1
        return True

    def release_slot(self) -> None:
        self._slots -= 1

    def key_share(self) -> int:
        """How many running requests one relay key may hold ([quotas] max_running_per_key; 0: three
        quarters of [server] max_concurrent_jobs when several keys are configured, so that one key's slow
        upstream or burst always leaves a quarter to the others; no limit with a single key)."""
        cfg = self.config
        if cfg.quotas_max_running_per_key > 0:
            return cfg.quotas_max_running_per_key
        if len(cfg.auth_api_keys) >= 2:
            return max(1, cfg.server_max_concurrent_jobs * 3 // 4)
        return 0

    def claim_key(self, label: str) -> bool:
        """Count one more running request of key `label`; False (nothing counted) over its share."""
        held = self.per_key.get(label, 0)
        share = self.key_share()
        if share and held >= share:
            return False
        self.per_key[label] = held + 1
        return True

    def release_key(self, label: str) -> None:
        held = self.per_key.get(label, 0) - 1
        if held > 0:
            self.per_key[label] = held
        else:
            self.per_key.pop(label, None)

    def get(self, request_id: str) -> Job | None:
        return self.jobs.get(request_id)

    def start(self, job: Job) -> None:
        self.jobs[job.rp.request_id] = job
        job.task = asyncio.create_task(job.run(), name=f"job-{job.rp.request_id}")

    async def watch_idle(self) -> None:
        """End the requests whose upstream went silent in the middle of an answer (a stalled or garbled
        transfer that never errors) after [upstream] idle_timeout_seconds: one timer for all jobs; a job only
        notes the time of each read."""
        idle = self.config.upstream_idle_timeout_seconds
        if idle <= 0:
            return
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, idle / 4))
            now = loop.time()
            for job in list(self.jobs.values()):
                if job.last_read is not None and not job._finishing and now - job.last_read > idle:
                    job.cancel("idle")

    def retry_ending(self, job: Job, status: str, error: tuple[str, str] | None) -> None:
        task = asyncio.create_task(job.retry_ending(status, error), name=f"ending-{job.rp.request_id}")
        self.retries.add(task)
        task.add_done_callback(self.retries.discard)

    def counted(self, line: dict[str, Any]) -> None:
        """A request's usage line is in the ledger: the operator page's book and the token counters."""
        self.book.add(line)
        self.metrics.count_tokens(line)

    def forget(self, job: Job) -> None:
        self.jobs.pop(job.rp.request_id, None)  # (its slot was given back when its status was settled)

    def stop(self, request_id: str) -> bool:
        """Cancel a running job (any phase). False when it is not running here."""
        job = self.jobs.get(request_id)
        if job is None or job.task is None or job.finished:
            return False
        job.cancel("stop")
        return True

    async def shutdown(self, grace: float) -> None:
        """Refuse new requests, let running ones finish for `grace` seconds, interrupt the rest. Called by
        the command line on SIGTERM (while the relay still listens) and by the app as it shuts down; the
        second call finds nothing left to do."""
        self.accepting = False
        tasks = [j.task for j in self.jobs.values() if j.task is not None]
        if tasks and grace > 0:
            log.info("shutting down: waiting up to %gs for %d running request(s)", grace, len(tasks))
            await asyncio.wait(tasks, timeout=grace)
        rest = [j.task for j in self.jobs.values() if j.task is not None and not j.task.done()]
        for job in list(self.jobs.values()):
            job.cancel("interrupted")
        if rest:
            log.info("shutting down: interrupted %d request(s)", len(rest))
            await asyncio.wait(rest)
        retries = list(self.retries)
        for task in retries:  # endings still waiting for the disk: their markers stay for the next start
            task.cancel()
        if retries:
            log.warning("shutting down: %d ending(s) not yet on disk; the next start repairs them", len(retries))
            await asyncio.wait(retries)
        self.statuses.close()
        self.intake.shutdown(wait=False)
        self.storage.shutdown(wait=False)
