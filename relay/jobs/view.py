"""What the pieces of a job see: of the job, of its manager, and of a log format (typing only).

A job (`job.Job`) hands its upstream read (`reading`), its ending (`ending`) and its closing events
(`closing`) to pieces that work on it through these protocols, so that none of them imports the job, and
the job imports none of the manager.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..assemble import Assembler
from ..config import Config
from ..metrics import Metrics
from ..paths import RequestPath
from ..refresh import StatusWriter
from ..store import EventLog, Reserve
from ..upstream import Upstream
from ..webhooks import WebhookSender

T = TypeVar("T")
Events = list[tuple[bytes, str | None]]  # (data, event name) pairs, appended to the log in one write


class Listener(Protocol):
    """What follows a job's event log from the HTTP side (see `fanout`)."""

    def appended(self) -> None: ...  # events were appended (`job.events.tail`)

    def woken(self) -> None: ...  # the job ended, or a heartbeat: readers should look again


class HasDoc(Protocol):
    doc: dict[str, Any]  # the status document


class LogFormat(Protocol):
    """What a job writes to its event log when it is not the relay's own format (upstream chunks as they
    came, then `event: stop|error` and `[DONE]`): the OpenAI-compatible face writes Responses events.
    Handed to the job by the face that made the request (see `Job(log_format=…)`)."""

    def opening(self, job: HasDoc) -> Events: ...  # with the queued status, before the POST answers

    def started(self, job: HasDoc) -> Events: ...  # the upstream call begins

    def chunk(self, line: bytes, chunk: dict[str, Any]) -> Events: ...  # one upstream chunk

    def ending(self, job: HasDoc, status: str, error: tuple[str, str] | None) -> Events: ...  # the doc is final

    def closing_at(self, job: HasDoc, offsets: list[int]) -> None: ...  # where the events of `ending` will start


class Host(Protocol):
    """The job manager, as its jobs use it."""

    config: Config
    upstream: Upstream
    webhooks: WebhookSender
    metrics: Metrics
    reserve: Reserve
    statuses: StatusWriter

    async def on_storage(self, fn: Callable[..., T], *args: Any) -> T: ...

    def release_slot(self) -> None: ...

    def release_key(self, label: str) -> None: ...

    def retry_ending(self, job: Any, status: str, error: tuple[str, str] | None) -> None: ...

    def forget(self, job: Any) -> None: ...

    def counted(self, line: dict[str, Any]) -> None: ...

    def releasing(self, rp: RequestPath) -> None: ...  # (in a worker thread, see JobManager.on_released)


class JobView(Protocol):
    """A job, as its upstream read and its ending work on it."""

    manager: Host
    rp: RequestPath
    stream: bool
    doc: dict[str, Any]
    body: dict[str, Any]
    raw: bytearray  # the upstream's bytes, for `.raw`
    events: EventLog | None
    log_format: LogFormat | None
    assembler: Assembler
    key_label: str
    key_claimed: bool
    status_path: Path
    raw_path: Path
    status_settled: asyncio.Event
    started_at: float
    processed_at: float | None
    first_chunk_at: float | None
    last_read: float | None

    def announce(self) -> None: ...  # events were appended: wake readers, tell listeners
