"""The running jobs of this process: slots, fair shares per key, the pools for file work, shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import aiofiles.os

from ..config import Config
from ..metrics import Metrics
from ..paths import RequestPath
from ..refresh import StatusWriter
from ..store import Reserve
from ..upstream import Upstream
from ..webhooks import WebhookSender
from .job import Job

log = logging.getLogger("relay.jobs")

T = TypeVar("T")


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
        self.count_listeners: list[Callable[[dict[str, Any]], None]] = []  # told of every ledger line written
        self.release_listeners: list[Callable[[RequestPath], None]] = []  # see on_released (worker thread)

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
                if job.last_read is not None and not job.finishing and now - job.last_read > idle:
                    job.cancel("idle")

    def retry_ending(self, job: Job, status: str, error: tuple[str, str] | None) -> None:
        task = asyncio.create_task(job.ending.retry(status, error), name=f"ending-{job.rp.request_id}")
        self.retries.add(task)
        task.add_done_callback(self.retries.discard)

    def on_counted(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Tell `listener` of every usage line written to the ledger (the operator view's book)."""
        self.count_listeners.append(listener)

    def on_released(self, listener: Callable[[RequestPath], None]) -> None:
        """Tell `listener` of every request whose ending is being made durable: called in a storage worker
        thread (so it must be thread-safe and may write to disk), after the ending's files and before the
        running marker is removed. Should it raise (an OSError: a full disk), the marker stays and the
        ending is retried, so what it writes survives a kill -9 as the ending does (the archive tier)."""
        self.release_listeners.append(listener)

    def releasing(self, rp: RequestPath) -> None:
        for listener in self.release_listeners:
            listener(rp)

    def counted(self, line: dict[str, Any]) -> None:
        """A request's usage line is in the ledger: the token counters, and the listeners."""
        self.metrics.count_tokens(line)
        for listener in self.count_listeners:
            listener(line)

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
