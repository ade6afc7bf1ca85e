"""The closing events of a job's stream: what the log ends with, in either log format.

The relay's own format ends with `event: stop` or `event: error`, then `[DONE]` (`status.ending_events`).
A face's format (`LogFormat`, the Responses events of the OpenAI-compatible face) makes its own closing
events, which may repeat the whole answer: they are made and encoded in a worker thread, and their places
in the log are recorded in the terminal status before they are written (for resuming by sequence number).
"""

from __future__ import annotations

import logging

from ..status import ending_events
from ..store import event_size
from .view import Events, JobView, LogFormat

log = logging.getLogger("relay.jobs")


def append_tail(job: JobView, tail: Events) -> None:
    """Append the closing events in one write (giving the reserve back should the disk be full)."""
    events = job.events
    assert events is not None
    job.manager.reserve.retrying(lambda: events.append(tail))


def mark_closing(job: JobView, fmt: LogFormat, at: int, status: str, error: tuple[str, str] | None) -> None:
    """Make the format's closing events now (it keeps them for `append_closing`) and tell it where each
    will start, for the terminal status to record. A format that fails here fails again there."""
    try:
        tail = fmt.ending(job, status, error)
    except Exception:
        return
    offsets = []
    for data, name in tail:
        offsets.append(at)
        at += event_size(at, data, name)
    fmt.closing_at(job, offsets)


def append_closing(job: JobView, fmt: LogFormat, status: str, error: tuple[str, str] | None) -> None:
    """In a worker thread: the format's last events (each encoded in its own step, so the loop gets the GIL
    between them), appended. Readers look at the log's size, which moves last. Should the format fail (a
    bug), the relay's own ending is written, so the stream still ends with [DONE]."""
    try:
        tail = fmt.ending(job, status, error)
    except Exception:
        log.exception("request %s: cannot make its closing events; writing the relay's own", job.rp.request_id)
        tail = ending_events(status, error)
    append_tail(job, tail)
