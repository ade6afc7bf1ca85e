"""The upstream read loop of one job: the answer's bytes in, the log's events out.

Per network read from the upstream, `UpstreamRead.stream` parses the events, checks each (size, depth,
JSON object, a failure reported mid-stream), appends them to the `.txt` log in one write (in the job's log
format), feeds the assembler, and wakes the job's readers. `answer` reads a non-streamed answer whole.
Everything the upstream does wrong raises `UpstreamError` with the code the request ends with.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from ..assemble import EventTooLarge, SSEParser
from ..bounds import more_containers, raw_too_deep
from ..status import response_body
from ..store import DONE_DATA
from ..upstream import UpstreamError, check_encoding
from .view import Events, JobView

TURN_SECONDS = 0.002  # longest stretch a job parses buffered upstream bytes before letting others run
# (another request needs several turns of the loop: its delay is a few stretches, docs/security.md)
UPSTREAM_MAX_CONTAINERS = 100_000  # arrays + objects in one upstream event or answer (~50 ms to parse at worst)
SNIFF_BYTES = 64 * 1024  # of an answer that is not an event stream, kept for `.raw`


def _now() -> float:
    return asyncio.get_running_loop().time()


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


def stream_failure(chunk: dict[str, Any]) -> str | None:
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


class UpstreamRead:
    """Reads one job's upstream answer into the job (its `.raw` bytes, log, assembler, status)."""

    def __init__(self, job: JobView) -> None:
        self.job = job
        self.config = job.manager.config
        self.saw_done = False  # the upstream sent `data: [DONE]`

    def keep_raw(self, block: bytes) -> None:
        """Keep the upstream's bytes for `.raw`, up to [upstream] max_response_bytes."""
        limit = self.config.upstream_max_response_bytes
        if len(self.job.raw) + len(block) > limit:
            raise UpstreamError(
                "upstream_response_too_large",
                f"the upstream response is larger than {limit} bytes ([upstream] max_response_bytes)",
            )
        self.job.raw += block

    async def stream(self, call_args: dict[str, Any]) -> None:
        """A streamed answer, event by event, until `[DONE]` or the end of the body."""
        job = self.job
        parser = SSEParser(self.config.upstream_max_event_bytes)
        async with job.manager.upstream.open(job.body, **call_args) as resp:
            job.doc["response"] = {"status_code": resp.status_code, "headers": resp.headers}
            check_encoding(resp.headers)
            if "text/event-stream" not in resp.content_type:
                await self._not_an_event_stream(resp)
            try:
                turns = Turns()
                async for block in resp.chunks:
                    self.keep_raw(block)
                    datas = parser.feed(block)
                    if datas or job.last_read is None:  # progress is an event, not a byte (or a comment)
                        job.last_read = _now()
                    self._handle(datas)
                    if self.saw_done:
                        break
                    await turns.check()
                if not self.saw_done:
                    self._handle(parser.flush())
            except EventTooLarge:
                raise UpstreamError(
                    "upstream_event_too_large",
                    f"the upstream sent a stream event larger than {self.config.upstream_max_event_bytes} bytes "
                    "([upstream] max_event_bytes)",
                ) from None
        if not self.saw_done and not job.assembler.all_finished():
            if job.raw and not job.assembler.chunks:
                raise UpstreamError(
                    "upstream_invalid_response",
                    f"the upstream's answer is not an event stream: {len(job.raw)} bytes without one `data:` event",
                )
            raise UpstreamError(
                "upstream_disconnected", "the upstream closed the stream before the answer was complete"
            )

    async def _not_an_event_stream(self, resp: Any) -> None:
        """An answer of another content type: its first bytes kept for `.raw`, then the error."""
        job = self.job
        async for block in resp.chunks:
            job.last_read = _now()
            self.keep_raw(block[: SNIFF_BYTES - len(job.raw)])
            if len(job.raw) >= SNIFF_BYTES:
                break
        raise UpstreamError(
            "upstream_invalid_response",
            f"the upstream answered with Content-Type {resp.content_type or 'none'!r} instead of an "
            "event stream; check upstream.base_url",
            status_code=resp.status_code,
            headers=resp.headers,
            body=bytes(job.raw),
        )

    def _handle(self, datas: list[bytes]) -> None:
        """Turn parsed upstream events into log events; on a bad one, keep the good ones before it."""
        if not datas:
            return
        job = self.job
        assert job.events is not None
        out: Events = []
        chunks: list[dict[str, Any]] = []
        fmt = job.log_format
        try:
            for data in datas:
                if data == DONE_DATA:
                    self.saw_done = True
                    break
                line, chunk, failure = self._chunk(data)
                if fmt is None:
                    out.append((line, None))
                else:
                    out.extend(fmt.chunk(line, chunk))
                chunks.append(chunk)
                if failure is not None:  # (OpenRouter) an error chunk that still has choices: kept, then the end
                    raise UpstreamError("upstream_error", failure, body=data)
        finally:
            if chunks:
                if job.first_chunk_at is None:
                    job.first_chunk_at = time.time()
                if out:
                    job.events.append(out)
                for chunk in chunks:  # only what is on disk counts towards the assembled answer
                    job.assembler.add(chunk)
                if out:  # (a format may write nothing for a chunk: an announce would push an empty chunk)
                    job.announce()
                job.manager.statuses.changed(job)

    def parse(self, data: bytes, what: str) -> Any:
        """Upstream JSON, within the bounds that keep parsing and re-serialising it cheap."""
        depth = self.config.upstream_max_json_depth
        if more_containers(data, UPSTREAM_MAX_CONTAINERS):
            raise UpstreamError(
                "upstream_invalid_response",
                f"the upstream sent {what} with more than {UPSTREAM_MAX_CONTAINERS} arrays and objects",
            )
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamError("upstream_invalid_response", f"the upstream sent {what} that is not JSON") from None
        if raw_too_deep(data, value, depth):
            raise UpstreamError(
                "upstream_invalid_response",
                f"the upstream sent {what} nested more than {depth} levels deep ([upstream] max_json_depth)",
            )
        return value

    def _chunk(self, data: bytes) -> tuple[bytes, dict[str, Any], str | None]:
        """Check one upstream event; returns the bytes to log, the parsed chunk and the failure it reports
        beside its choices (kept, then the request ends: see `stream_failure`)."""
        chunk = self.parse(data, "a stream event")
        if not isinstance(chunk, dict):
            raise UpstreamError(
                "upstream_invalid_response", "the upstream sent a stream event that is not a JSON object"
            )
        failure = stream_failure(chunk)
        if failure is not None and not chunk.get("choices"):
            raise UpstreamError("upstream_error", failure, body=data)
        choices = chunk.get("choices")
        rewrite = b"\n" in data or b"\r" in data
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict) and "delta" not in choice:
                    choice["delta"] = {}
                    rewrite = True
        return (orjson.dumps(chunk) if rewrite else data), chunk, failure

    async def answer(self, call_args: dict[str, Any]) -> None:
        """A non-streamed answer: read whole, then checked and put in the status document."""
        job = self.job
        async with job.manager.upstream.open(job.body, **call_args) as resp:
            job.doc["response"] = {"status_code": resp.status_code, "headers": resp.headers}
            check_encoding(resp.headers)
            async for block in resp.chunks:
                job.last_read = _now()
                self.keep_raw(block)
        job.first_chunk_at = time.time()
        body = self.parse(bytes(job.raw), "an answer")
        if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
            raise UpstreamError("upstream_invalid_response", "the upstream answer has no `choices`")
        response_body(job.doc, body)

    def keep_error(self, exc: UpstreamError) -> None:
        """Put what the upstream said with its error (status, headers, body) in the document and `.raw`."""
        job = self.job
        if exc.status_code is None and not exc.body:
            return
        response = job.doc.setdefault("response", {})
        if exc.status_code is not None and "status_code" not in response:
            response["status_code"] = exc.status_code
            response["headers"] = exc.headers
        if exc.body and not job.raw:
            job.raw += exc.body
        if exc.status_code is not None and exc.body and not job.assembler.chunks:
            try:
                response["body"] = self.parse(exc.body, "an error body")
            except UpstreamError:
                response["body"] = exc.body.decode("utf-8", "replace")
