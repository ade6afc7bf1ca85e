"""The status documents of running requests, rewritten once a second in one pass for all of them.

A running job tells the writer when its status changed (it started, or new text arrived). Once a second,
the writer encodes the status of every job that changed since the last pass and hands the whole batch
to one worker thread, which rewrites each file atomically. One thread hop a second for all requests,
instead of one timer and one hop per request: with hundreds of streams that is most of what the
refreshes used to cost. The contract asks for the text "refreshed at least every second"; new text waits
at most one interval for its pass, and a request that starts shows its new state within START_WITHIN
(starts arriving together share a pass; one that ends sooner is never written as started at all).

A job that ends leaves the writer (`leave`), after the pass that may be writing its status has finished,
so that its terminal status is always the last write.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from pathlib import Path
from typing import Protocol

import orjson

from .store import write_atomic

log = logging.getLogger("relay.refresh")

START_WITHIN = 0.02  # seconds: a request that starts shows `streaming` / `processing` this soon (batched)


class Refreshable(Protocol):
    status_path: Path

    def status_snapshot(self) -> bytes | None: ...  # the encoded status now, None when it must not be written

    def describe(self) -> str: ...  # for log lines


def write_batch(items: list[tuple[Path, bytes]]) -> list[tuple[Path, str]]:
    """Rewrite each file atomically; returns the ones that failed, with the reason."""
    failed = []
    for path, data in items:
        try:
            write_atomic(path, data)
        except OSError as exc:
            failed.append((path, exc.strerror or str(exc)))
    return failed


class StatusWriter:
    def __init__(self, executor: Executor | None = None, interval: float = 1.0) -> None:
        self.interval = interval
        self.executor = executor
        self._changed: dict[Refreshable, None] = {}  # insertion-ordered set
        self._writing: set[Refreshable] = set()
        self._pass: asyncio.Future[list[tuple[Path, str]]] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.passes = 0  # for tests and metrics: how many passes ran

    def changed(self, item: Refreshable, within: float | None = None) -> None:
        """`item`'s status changed: write it in a pass at most `within` seconds from now (default: the
        interval). A new state (queued → streaming) asks for a short `within`; new text waits its turn."""
        self._changed[item] = None
        if within is None and self._timer is not None:
            return  # the usual case, once per chunk: a pass is due within the interval already
        loop = asyncio.get_running_loop()
        due = loop.time() + (self.interval if within is None else within)
        if self._timer is not None and self._timer.when() <= due:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(due, self._run)

    async def leave(self, item: Refreshable) -> None:
        """`item` ends: no more refreshes; returns once a pass writing its status is over."""
        self._changed.pop(item, None)
        if item in self._writing and self._pass is not None:
            await asyncio.wait([self._pass])

    def _run(self) -> None:
        self._timer = None
        if self._pass is not None and not self._pass.done():  # a slow disk: the next pass waits its turn
            self._timer = asyncio.get_running_loop().call_later(START_WITHIN, self._run)
            return
        items, self._changed = list(self._changed), {}
        batch: list[tuple[Path, bytes]] = []
        for item in items:
            try:
                data = item.status_snapshot()
            except (orjson.JSONEncodeError, ValueError, TypeError):
                log.exception("%s: cannot encode the status", item.describe())
                continue
            if data is not None:
                batch.append((item.status_path, data))
        if not batch:
            return
        self._writing = set(items)
        self.passes += 1
        loop = asyncio.get_running_loop()
        self._pass = loop.run_in_executor(self.executor, write_batch, batch)
        self._pass.add_done_callback(self._written)

    def _written(self, fut: asyncio.Future[list[tuple[Path, str]]]) -> None:
        if fut is self._pass:  # (a new pass may have started between this one's end and this callback)
            self._writing = set()
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            log.error("status refresh pass failed: %r", exc)
            return
        for path, reason in fut.result():
            log.warning("could not refresh status %s: %s", path.name, reason)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._changed.clear()
