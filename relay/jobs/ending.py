"""The ending of a job: its files, written once, and retried until the disk takes them.

`Ending.write` puts the final answer and the terminal state in the status document, then writes `.raw`,
the terminal status and the log's closing events (see `closing`), then the usage ledger's line; the log is
made durable and the running marker removed last, so a restart repairs whatever a crash interrupts. An
ending that cannot be built or encoded (a bug) is written as `internal_error` at once; writes the disk
refuses are retried in the background (`retry`) with the marker kept until they succeed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson

from .. import ledger
from ..recovery import remove_marker
from ..status import encodable, ending_events, raw_written, response_body
from ..status import finish as finish_doc
from ..store import write_atomic
from .closing import append_closing, append_tail, mark_closing
from .view import JobView

log = logging.getLogger("relay.jobs")

TAIL_HOLD_SECONDS = 2.0
INTERNAL_ERROR = ("internal_error", "the relay failed unexpectedly; see its log")

Error = tuple[str, str] | None


class Ending:
    """The files of one job's ending, and what it still owes of them."""

    def __init__(self, job: JobView) -> None:
        self.job = job
        self.ledger_line: dict[str, Any] | None = None  # written to the usage ledger (once)
        self._raw_tried = False
        self._status_written = False
        self._tail_written = False
        self._answer_broken = False  # the assembled answer could not be built or encoded
        self._tail_hold: asyncio.Future[None] | None = None

    async def write(self, status: str, error: Error, now: float) -> tuple[str, Error, list[str]]:
        """Write the ending; returns the status and error it ended with and the pieces still to write.
        Never raises: an ending that cannot be built or encoded becomes `internal_error`."""
        problems = ["not written"]
        try:
            self._ending_doc(status, error, now)
            problems = await self._write_files(status, error)
        except Exception:  # a bug (an answer that cannot be built or encoded), not a full disk: ended at once
            log.exception("request %s: internal error while finishing", self.job.rp.request_id)
            status, error = "error", INTERNAL_ERROR
            problems = await self._write_internal_error(now)
        self.settled()  # whatever happened above: a stop URL waiting on it answers now
        if not problems:
            problems = await self._done_with_files()
        return status, error, problems

    async def retry(self, status: str, error: Error) -> None:
        """Write the pieces of the ending that failed, until the disk takes them; then drop the marker."""
        delay = 1.0
        try:
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                try:
                    problems = await self._write_files(status, error)
                except Exception:  # not the disk: retrying cannot help; the marker stays for the next start
                    log.exception("request %s: cannot write its ending; the next start repairs it",
                                  self.job.rp.request_id)  # fmt: skip
                    return
                if not problems:
                    problems = await self._done_with_files()
                if not problems:
                    log.info("request %s: ending written after the disk came back", self.job.rp.request_id)
                    return
        finally:
            self.close_files()  # given up (shutdown): the marker stays and the next start repairs it

    def settled(self) -> None:
        """The terminal status is on disk (or cannot be written now): the upstream call is over, so the
        job's slot is free for a new request, and a stop URL waiting on it answers."""
        job = self.job
        if not job.status_settled.is_set():
            job.status_settled.set()
            job.manager.release_slot()
            if job.key_claimed:
                job.key_claimed = False
                job.manager.release_key(job.key_label)

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

    def close_files(self) -> None:
        if self.job.events is not None:
            self.job.events.close()

    def _ending_doc(self, status: str, error: Error, now: float) -> None:
        job = self.job
        if job.stream and not self._answer_broken and (job.assembler.chunks or status == "done"):
            response_body(job.doc, job.assembler.completion(job.body["model"]))
        finish_doc(job.doc, status, error, now=now, since=job.started_at, processed_at=job.processed_at)

    async def _write_internal_error(self, now: float) -> list[str]:
        """End as `internal_error` after the ending could not be built or encoded: the answer is left out
        (the text received stays in the event log and `.raw`), and whatever else of the document cannot be
        encoded is dropped, so this ending can always be written; only the disk can still refuse it."""
        self._answer_broken = True
        self.job.doc["response"] = {}
        try:
            self._ending_doc("error", INTERNAL_ERROR, now)
            self.job.doc = encodable(self.job.doc)
            return await self._write_files("error", INTERNAL_ERROR)
        except Exception:
            log.exception("request %s: cannot write its ending", self.job.rp.request_id)
            return ["ending: internal error"]

    async def _write_files(self, status: str, error: Error) -> list[str]:
        """Write what is still missing of the ending: `.raw` and the terminal status (one worker-thread
        hop, each durable when `[storage] fsync` is on), then the log's last events. Returns the pieces
        that failed; the log is made durable with the marker's removal (`_release_files`)."""
        job = self.job
        manager = job.manager
        problems: list[str] = []
        if not self._status_written:
            write_raw = not self._raw_tried and (not error or error[0] != "storage_error")  # a full disk: status first
            self._raw_tried = True  # a `.raw` that cannot be written is left out, not retried
            problem = await manager.on_storage(
                self._status_files, write_raw, manager.config.storage_fsync, status, error
            )
            if problem:
                problems.append(problem)
        self.settled()
        await self._held()
        if job.events is not None and not self._tail_written:
            try:
                if job.log_format is None:
                    append_tail(job, ending_events(status, error))
                else:  # a format's closing events may repeat the whole answer: encoded and written off the loop
                    await manager.on_storage(append_closing, job, job.log_format, status, error)
                self._tail_written = True
                job.announce()
            except OSError as exc:
                problems.append(f".txt: {exc.strerror}")
        return problems

    def _status_files(self, write_raw: bool, durable: bool, status: str, error: Error) -> str | None:
        """In a worker thread: `.raw` (when asked), then the terminal status. Returns a problem, or None.
        Raises (orjson) for a status that cannot be encoded: the caller then ends as internal_error."""
        job = self.job
        if job.log_format is not None and job.events is not None and not self._tail_written:
            mark_closing(job, job.log_format, job.events.size, status, error)
        if write_raw:
            try:
                write_atomic(job.raw_path, bytes(job.raw), durable, sync_parent=False)  # the status syncs the folder
                raw_written(job.doc, job.rp.url(job.manager.config.public_url, "raw"))
            except OSError as exc:
                log.warning("request %s: cannot write .raw: %s", job.rp.request_id, exc.strerror)
        data = orjson.dumps(job.doc)
        try:
            job.manager.reserve.retrying(lambda: write_atomic(job.status_path, data, durable))
        except OSError as exc:
            return f".json: {exc.strerror}"
        self._status_written = True
        return None

    async def _done_with_files(self) -> list[str]:
        """Release the files (see `_release_files`); never raises, so the request always ends: an unexpected
        failure is a problem like a failed write, and the ending is retried with the marker kept."""
        had_line = self.ledger_line is not None
        manager = self.job.manager
        try:
            problems = await manager.on_storage(self._release_files, manager.config.storage_fsync)
        except Exception:
            log.exception("request %s: cannot release its files", self.job.rp.request_id)
            problems = ["release: internal error"]
        if not had_line and self.ledger_line is not None:  # written just now (once, even if a retry follows)
            manager.counted(self.ledger_line)
        return problems

    def _release_files(self, durable: bool) -> list[str]:
        """In a worker thread, once the ending is written: the usage ledger's line, the log made durable
        and closed, then the running marker dropped (from then on a restart leaves the request alone)."""
        job = self.job
        cfg = job.manager.config
        if self.ledger_line is None:
            first = job.first_chunk_at - job.processed_at if job.first_chunk_at and job.processed_at else None
            line = ledger.entry(job.doc, request_id=job.rp.request_id, node=cfg.server_node_id, key=job.key_label,
                                path=job.rp.base, ttft=first, now=time.time(), params=job.body)  # fmt: skip
            try:
                ledger.append(cfg.data_dir, line, durable)
            except OSError as exc:
                return [f"usage ledger: {exc.strerror}"]
            self.ledger_line = line
        if job.events is not None and durable:
            try:
                job.events.sync()
            except OSError as exc:
                return [f".txt: {exc.strerror}"]
        self.close_files()
        try:
            job.manager.releasing(job.rp)  # (the archive's pending entry: durable before the marker goes)
            remove_marker(cfg.data_dir, job.rp)
        except OSError as exc:
            return [f"marker: {exc.strerror}"]
        return []
