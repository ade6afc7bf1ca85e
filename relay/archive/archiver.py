"""The archiver: uploads ended requests, verifies them, records them, removes local copies when due.

Work is driven by the durable state of `state.py`: `ended()` writes a pending entry before it returns, a
fixed number of workers (`max_concurrent_uploads`) take entries as they fall due, and a failed attempt
(store down, slow, answering errors or other bytes) leaves everything local and tries again after an
exponential backoff with jitter. The order for one request is: hash the local files, upload them,
read each back and compare size and SHA-256, upload the manifest and read it back, check the local
files did not change meanwhile, write the record; only then is the pending entry removed and the local
copies become removable (at once, after `keep_local_hours`, or never).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ..config import Config
from ..paths import RequestPath
from .client import ArchiveError, Bucket, IntegrityError, NotArchived, describe_error
from .manifest import EXTS, MAX_MANIFEST_BYTES, hash_request, stamp
from .reader import ArchivedRange, Reader
from .settings import ArchiveSettings
from .state import Pending, State, remove_empty_parents, request_of

log = logging.getLogger("relay.archive")


class Gone(ArchiveError):
    """The request's files are no longer on local disk (expired or deleted): nothing to upload."""


class Changed(ArchiveError):
    """A local file changed while it was being archived: archived again."""


@dataclass(frozen=True)
class Backlog:
    """What /metrics and the operator page show of the archive."""

    pending: int  # ended requests not yet archived
    pending_bytes: int  # their local bytes
    oldest_pending_seconds: float  # how long the oldest of them has waited (0 when none)
    failing: int  # pending requests whose last attempt failed
    failures: int  # failed attempts since start
    integrity_failures: int  # of which: the store served other bytes or another size
    archived: int  # requests archived since start
    archived_bytes: int
    local_removed: int  # requests whose local copies were removed since start
    last_error: str | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Archiver:
    """See the package's docstring for the API."""

    def __init__(self, config: Config, data_dir: Path | None = None) -> None:
        self.settings = ArchiveSettings.from_config(config)
        self.data_dir = Path(data_dir if data_dir is not None else config.data_dir)
        self.state = State(self.data_dir / "archive")
        self.bucket = Bucket(self.settings)
        self._pending: dict[str, Pending] = {}
        self._ready: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._keep: list[tuple[float, str]] = []
        self._keep_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._busy: dict[str, asyncio.Event] = {}
        self.reader = Reader(self.settings, self.bucket, self.state)
        self._counts = dict(failures=0, integrity_failures=0, archived=0, archived_bytes=0, local_removed=0)
        self._last_error: str | None = None

    # the lifecycle

    async def start(self) -> None:
        """Load the state left on disk (pending uploads resume) and start the workers."""
        await asyncio.to_thread(self.state.create)
        for p in await asyncio.to_thread(self.state.load_pending):
            self._pending[p.base] = p
            self._schedule(p.base, p.due)
        self._keep = await asyncio.to_thread(self.state.load_keep)
        heapq.heapify(self._keep)
        self._tasks = [
            asyncio.create_task(self._worker(), name=f"archive-{i}") for i in range(self.settings.max_uploads)
        ]
        self._tasks.append(asyncio.create_task(self._keeper(), name="archive-keep"))
        if self._pending:
            log.info("archive: %d pending upload(s) resumed", len(self._pending))

    async def stop(self) -> None:
        """Stop the workers; uploads in flight are dropped and resume at the next start."""
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def ended(self, rp: RequestPath) -> None:
        """Hand over a request whose ending is durable; returns once its pending entry is on disk."""
        if rp.base in self._pending:
            return
        self._adopt(await asyncio.to_thread(self._save_pending, rp))

    def ending(self, rp: RequestPath, loop: asyncio.AbstractEventLoop) -> None:
        """From a worker thread, while a request's ending is made durable and before its running marker
        is removed (see `JobManager.on_released`): its pending entry written, then handed to `loop`. An
        OSError leaves the marker, and the ending is retried, so a kill -9 never loses the upload."""
        pending = self._save_pending(rp)
        try:
            loop.call_soon_threadsafe(self._adopt, pending)
        except RuntimeError:  # the loop has closed (shutdown): the entry on disk is resumed at the next start
            pass

    def _save_pending(self, rp: RequestPath) -> Pending:
        now = time.time()
        p = Pending(rp.base, ended=now, due=now + self.settings.upload_after, bytes=sum(_sizes(self.data_dir, rp)))
        self.state.save_pending(p)
        return p

    def _adopt(self, p: Pending) -> None:
        if p.base not in self._pending:
            self._pending[p.base] = p
            self._schedule(p.base, p.due)

    def backlog(self) -> Backlog:
        now = time.time()
        pending = self._pending.values()
        return Backlog(
            pending=len(self._pending),
            pending_bytes=sum(p.bytes for p in pending),
            oldest_pending_seconds=max((now - min(p.ended for p in pending)) if pending else 0.0, 0.0),
            failing=sum(1 for p in pending if p.error),
            last_error=self._last_error,
            **self._counts,
        )

    # the queue

    def _schedule(self, base: str, due: float) -> None:
        if base in self._queued or base in self._timers:
            return
        delay = due - time.time()
        if delay <= 0:
            self._queued.add(base)
            self._ready.put_nowait(base)
        else:
            self._timers[base] = asyncio.get_running_loop().call_later(delay, self._due, base)

    def _due(self, base: str) -> None:
        self._timers.pop(base, None)
        self._schedule(base, 0)

    async def _worker(self) -> None:
        while True:
            base = await self._ready.get()
            self._queued.discard(base)
            if base in self._pending:
                await self._attempt(base)

    async def _attempt(self, base: str) -> None:
        p = self._pending[base]
        self._busy[base] = done = asyncio.Event()  # (a `forget` of this request waits for the attempt)
        try:
            try:
                record = await self._archive(base)
                await self._settle(base, record)
            except Gone:
                log.info("archive: %s is gone from local disk before it was archived; dropped", base)
            await asyncio.to_thread(self.state.drop_pending, base)
            self._pending.pop(base, None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # (whatever failed, the local files stay and it is tried again)
            await self._failed(p, exc)
        finally:
            del self._busy[base]
            done.set()

    async def _failed(self, p: Pending, exc: BaseException) -> None:
        if not isinstance(exc, ArchiveError):
            log.exception("archive: unexpected failure on %s", p.base)
        self._counts["failures"] += 1
        if isinstance(exc, IntegrityError):
            self._counts["integrity_failures"] += 1
        p.attempts += 1
        p.error = self._last_error = describe_error(exc)
        ceiling = min(self.settings.retry_max, self.settings.retry_min * 2 ** min(p.attempts - 1, 40))
        now = time.time()
        p.due = now + random.uniform(ceiling / 2, ceiling)
        level = logging.WARNING if p.attempts & (p.attempts - 1) == 0 else logging.DEBUG  # (1st, 2nd, 4th, …)
        log.log(level, "archive: %s failed (attempt %d, next in %.1f s): %s", p.base, p.attempts, p.due - now, p.error)
        self._schedule(p.base, p.due)
        try:  # (not durable: only the backlog's numbers would be lost)
            await asyncio.to_thread(self.state.save_pending, p, False)
        except OSError as write_error:
            log.warning("archive: cannot update the pending entry of %s: %s", p.base, write_error)

    # one request

    async def _archive(self, base: str) -> dict[str, Any]:
        """Upload, verify and record one request (or its record, when that was done before)."""
        record = await asyncio.to_thread(self.state.read_record, base)
        if record is not None:
            return record
        rp = request_of(base)
        manifest = await asyncio.to_thread(hash_request, self.data_dir, rp) if rp else None
        if rp is None or manifest is None:
            raise Gone(base)
        s = self.settings
        for ext, fs in manifest.files.items():
            await self.bucket.put_file(s.key(rp.rel(ext)), rp.file(self.data_dir, ext), fs.size)
        for ext, fs in manifest.files.items():
            try:
                size, sha = await self.bucket.digest(s.key(rp.rel(ext)))
            except NotArchived:
                raise IntegrityError(f"{rp.rel(ext)}: missing from the store right after its upload") from None
            if (size, sha) != (fs.size, fs.sha256):
                raise IntegrityError(
                    f"{rp.rel(ext)}: the store holds {size} bytes, SHA-256 {sha[:12]}…, not what was sent"
                )
        encoded = manifest.encode()
        await self.bucket.put_bytes(s.key(rp.rel("manifest.json")), encoded)
        if await self.bucket.get_bytes(s.key(rp.rel("manifest.json")), MAX_MANIFEST_BYTES) != encoded:
            raise IntegrityError(f"{rp.rel('manifest.json')}: the store holds other bytes than were sent")
        stamps = {ext: fs.stamp for ext, fs in manifest.files.items()}
        if await asyncio.to_thread(_stamps, self.data_dir, rp) != stamps:
            raise Changed(f"{base}: a local file changed during its upload")
        record = {
            "manifest": orjson.loads(manifest.encode()),
            "archived_at": time.time(),
            "stamps": stamps,
            "local": True,
        }
        await asyncio.to_thread(self.state.write_record, base, record)
        self._counts["archived"] += 1
        self._counts["archived_bytes"] += manifest.bytes
        log.info("archive: %s archived (%d file(s), %d bytes, verified)", base, len(manifest.files), manifest.bytes)
        return record

    async def _settle(self, base: str, record: dict[str, Any]) -> None:
        """After the record: remove the local copies now, or plan their removal, or keep them."""
        keep = self.settings.keep_local
        if keep is None or not record.get("local", True):
            return
        if keep <= 0:
            if await self._remove_local(base) == "changed":
                raise Changed(f"{base}: a local file changed after it was archived")
            return
        due = float(record.get("archived_at", 0)) + keep
        await asyncio.to_thread(self.state.save_keep, base, due)
        heapq.heappush(self._keep, (due, base))
        self._keep_wake.set()

    async def _remove_local(self, base: str) -> str:
        """Remove a request's local files if they are exactly the ones verified: "removed". When one
        changed, nothing is removed and its record is dropped, to archive it again: "changed"."""
        record = await asyncio.to_thread(self.state.read_record, base)
        rp = request_of(base)
        if record is None or rp is None or record.get("local") is False:
            return "gone"
        outcome = await asyncio.to_thread(_unlink_verified, self.data_dir, rp, record.get("stamps", {}))
        if outcome == "changed":
            log.warning("archive: %s changed after it was archived: archiving it again", base)
            await asyncio.to_thread(self.state.drop_record, base)
            self.reader.forget(base)
            return outcome
        record["local"] = False
        await asyncio.to_thread(self.state.write_record, base, record, False)
        self._counts["local_removed"] += 1
        return outcome

    async def _keeper(self) -> None:
        """Remove local copies as their `keep_local_hours` run out."""
        while True:
            self._keep_wake.clear()
            now = time.time()
            while self._keep and self._keep[0][0] <= now:
                _due, base = heapq.heappop(self._keep)
                if self.settings.keep_local is None:  # ("forever" now: planned before a change of mind)
                    await asyncio.to_thread(self.state.drop_keep, base)
                    continue
                try:
                    if await self._remove_local(base) == "changed" and (rp := request_of(base)) is not None:
                        await self.ended(rp)
                    await asyncio.to_thread(self.state.drop_keep, base)
                except (OSError, ArchiveError) as exc:
                    log.warning("archive: cannot remove the local copy of %s: %s", base, exc)
                    heapq.heappush(self._keep, (now + self.settings.retry_max, base))
            delay = self._keep[0][0] - time.time() if self._keep else 3600.0
            try:
                await asyncio.wait_for(self._keep_wake.wait(), max(delay, 0.01))
            except TimeoutError:
                pass

    # reading

    async def open(self, rel: str, start: int = 0, end: int | None = None) -> ArchivedRange:
        """Bytes [start, end) of an archived file: see `Reader.open`."""
        return await self.reader.open(rel, start, end)

    async def read(self, rel: str, start: int = 0, end: int | None = None) -> bytes:
        """`open(…)`'s bytes, whole."""
        return await (await self.reader.open(rel, start, end)).read()

    # expiry and deletion

    async def expire(self, cutoff: float, batch: int = 500) -> int:
        """Forget archived requests created before `cutoff` (epoch seconds): their objects are deleted
        (unless `expire_objects` is false: a bucket rule does it) and their records removed. Returns how
        many; StoreError leaves the rest for the next run."""
        count = 0
        while True:
            bases = await asyncio.to_thread(self.state.expired_records, cutoff, batch)
            for base in bases:
                rp = request_of(base)
                if rp is not None:
                    await self._forget(rp, self.settings.expire_objects)
                    count += 1
            if len(bases) < batch:
                return count

    async def forget(self, rp: RequestPath) -> None:
        """Delete a request from the archive now (its objects, record and pending upload): for a request
        deleted on purpose. StoreError when the store cannot be reached (then try again)."""
        await self._forget(rp, True)

    async def _forget(self, rp: RequestPath, delete_objects: bool) -> None:
        base = rp.base
        if (busy := self._busy.get(base)) is not None:
            await busy.wait()  # (an upload in flight would otherwise put back what is deleted here)
        if base in self._pending:
            self._pending.pop(base)
            await asyncio.to_thread(self.state.drop_pending, base)
        if delete_objects:
            for ext in ("manifest.json", *EXTS):  # (the manifest first: a half-deleted request is not served)
                await self.bucket.delete(self.settings.key(rp.rel(ext)))
        self.reader.forget(base)
        await asyncio.to_thread(self._drop_record, base)

    def _drop_record(self, base: str) -> None:
        self.state.drop_record(base)
        self.state.drop_keep(base)
        remove_empty_parents(self.state.record_path(base).parent, self.state.records_dir)


# blocking helpers (run in threads)


def _sizes(data_dir: Path, rp: RequestPath) -> list[int]:
    out = []
    for ext in EXTS:
        try:
            out.append(rp.file(data_dir, ext).stat().st_size)
        except FileNotFoundError:
            pass
    return out


def _stamps(data_dir: Path, rp: RequestPath) -> dict[str, tuple[int, int]]:
    return {ext: s for ext in EXTS if (s := stamp(rp.file(data_dir, ext))) is not None}


def _unlink_verified(data_dir: Path, rp: RequestPath, stamps: dict[str, Any]) -> str:
    """Remove the request's local files if each is the one verified (same inode and mtime): "removed";
    "changed" (nothing removed) when one is not."""
    now = _stamps(data_dir, rp)
    if any(ext not in stamps or tuple(stamps[ext]) != s for ext, s in now.items()):
        return "changed"
    for ext in EXTS:
        rp.file(data_dir, ext).unlink(missing_ok=True)
    return "removed"
