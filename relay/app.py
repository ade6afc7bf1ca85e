"""Wiring everything into one `web.Application`: routes, signals, the shared upstream client."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger, AbstractResolver

from . import api, janitor, ledger, operator, recovery, serve, site
from .archive import Archiver
from .book import UsageBook
from .config import Config
from .facade import routes as facade
from .facade.common import drain
from .fanout import PUSHED
from .jobs import JobManager
from .keys import ARCHIVE, BOOK, CONFIG, MANAGER, METRICS, QUOTAS, READERS
from .metrics import Metrics
from .quotas import Quotas
from .status import public_view
from .upstream import Upstream
from .webhooks import WebhookSender

log = logging.getLogger("relay")

STATIC = Path(__file__).resolve().parent.parent / "static"

RESOLVER: web.AppKey[AbstractResolver] = web.AppKey("resolver")


def make_app(config: Config, resolver: AbstractResolver | None = None) -> web.Application:
    """The relay. `resolver` replaces the system DNS resolver for webhooks (tests use it)."""
    app = web.Application(middlewares=[site.json_errors])  # POST bodies are read (and bounded) by api
    app[CONFIG] = config
    app[READERS] = [0]
    app[METRICS] = Metrics()
    app.router.add_get("/metrics", app[METRICS].handler)
    if resolver is not None:
        app[RESOLVER] = resolver
    app.router.add_post("/v1/stream-chatgpt", api.stream_chatgpt)
    app.router.add_post("/v1/async-chatgpt", api.async_chatgpt)
    app.router.add_get("/healthz", site.healthz)
    app.router.add_get("/v1/info", site.info)
    app[site.OPENAPI_DOC] = site.load_openapi()
    app.router.add_get("/openapi.json", site.openapi)
    operator.add_routes(app)
    facade.add_routes(app)
    app.router.add_get("/", site.console)
    files = [*STATIC.iterdir(), *(p for p in (STATIC / "vendor" / "uplot").iterdir() if p.suffix in (".js", ".css"))]
    app[site.STATIC_FILES] = {p.relative_to(STATIC).as_posix(): p for p in files if p.is_file() and not p.is_symlink()}
    app.router.add_get("/static/{file:.+}", site.static_file)
    app.router.add_route("*", r"/{node:\d+}/r/{tail:.*}", serve.handle_file)
    app.on_response_prepare.append(site.add_cors)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_shutdown)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config: Config = app[CONFIG]
    upstream = Upstream(config.upstream_base_url, config.upstream_max_connections)
    webhooks = WebhookSender(
        secret=config.webhooks_secret,
        allow_private=config.webhooks_allow_private_addresses,
        timeout=config.webhooks_timeout_seconds,
        attempts=config.webhooks_max_attempts,
        backoff=config.webhooks_backoff_seconds,
        base_resolver=app.get(RESOLVER),
        on_result=lambda result: metrics.webhooks.labels(result).inc(),
    )
    metrics = app[METRICS]
    manager = JobManager(config, upstream, webhooks, metrics)
    app[MANAGER] = manager
    metrics.bind(manager.running, lambda: app[READERS][0])
    config.data_dir.mkdir(parents=True, exist_ok=True)
    archiver = await _start_archive(app, manager)  # (first: repaired requests are handed to it too)
    repaired = recovery.repair(config.data_dir, config.server_node_id, config.public_url, reserve=manager.reserve,
                               formats=facade.LOG_FORMATS, released=manager.releasing)  # fmt: skip
    for rp, doc, webhook_url in repaired:
        if webhook_url:
            webhooks.send_later(webhook_url, public_view(doc), rp.request_id)
        facade.repaired(app, webhooks, rp, doc)
    book = UsageBook()
    loaded = book.load(config.data_dir)  # the operator page's recent history, from the ledger's tail
    log.info("usage: %d request(s) of the last 24 hours read from the ledger", loaded)
    manager.on_counted(book.add)
    app[BOOK] = book
    if not manager.reserve.ensure():  # after the repairs, which may have needed its room
        log.warning("cannot allocate the %d-byte reserve in %s: the disk is full or read-only",
                    config.storage_reserve_bytes, config.data_dir)  # fmt: skip
    app[QUOTAS] = Quotas(config)
    await facade.load(app)
    background = [
        asyncio.create_task(_janitor_loop(app), name="janitor"),
        asyncio.create_task(_heartbeat_loop(app), name="heartbeat"),
        asyncio.create_task(app[MANAGER].watch_idle(), name="idle-upstreams"),
    ]
    yield
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await drain()  # the chat index's last lines, files of unstored responses
    if archiver is not None:
        await archiver.stop()  # (an upload in flight resumes at the next start)
    await webhooks.close()  # (the jobs ended in _shutdown, before the server stopped its handlers)
    await upstream.close()


async def _start_archive(app: web.Application, manager: JobManager) -> Archiver | None:
    """The archive tier ([archive] enabled): its pending uploads resumed, and every request that ends handed
    to it (its pending entry written before the request's running marker is removed)."""
    config = app[CONFIG]
    archiver = Archiver(config) if config.archive_enabled else None
    app[ARCHIVE] = archiver
    if archiver is None:
        return None
    await archiver.start()
    app[METRICS].bind_archive(lambda: archiver.backlog().as_dict())
    loop = asyncio.get_running_loop()
    manager.on_released(lambda rp: archiver.ending(rp, loop))
    return archiver


async def _heartbeat_loop(app: web.Application) -> None:
    """Wake every waiting reader once per interval, so each sends a keep-alive comment."""
    interval = app[CONFIG].server_heartbeat_seconds
    manager = app[MANAGER]
    while True:
        await asyncio.sleep(interval)
        for job in list(manager.jobs.values()):
            job.heartbeat()


async def _janitor_loop(app: web.Application) -> None:
    config = app[CONFIG]
    manager = app[MANAGER]
    while True:
        try:
            report = await janitor.run_once(
                config.data_dir,
                config.server_node_id,
                config.retention_max_age_days,
                lambda request_id: manager.get(request_id) is not None,
                config.retention_janitor_batch,
            )
            app[METRICS].janitor_requests.inc(report.requests)
            app[METRICS].janitor_bytes.inc(report.bytes)
            archiver = app[ARCHIVE]
            if archiver is not None:  # (its objects too, unless [archive] expire_objects leaves them to a rule)
                gone = await archiver.expire(time.time() - config.retention_max_age_days * 86400)
                if gone:
                    log.info("janitor: removed %d expired request(s) from the archive", gone)
            gone = await asyncio.to_thread(
                ledger.remove_expired, config.data_dir, config.retention_usage_max_age_months
            )
            if gone:
                log.info("janitor: removed %d usage ledger file(s) older than %d months", gone,
                         config.retention_usage_max_age_months)  # fmt: skip
        except Exception:
            log.exception("janitor run failed")
        await asyncio.sleep(config.retention_janitor_interval_seconds)


async def _shutdown(app: web.Application) -> None:
    """Stop taking requests; let running ones finish (or interrupt them) so their readers can close."""
    await app[MANAGER].shutdown(app[CONFIG].server_shutdown_grace_seconds)


class AccessLogger(AbstractAccessLogger):
    """Method, path as sent (still percent-encoded, so no control character) without the query string
    (it may hold a stream token), status, size, time."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, duration: float) -> None:
        self.logger.info(
            '%s "%s %s" %s %s %.3fs',
            request.remote,
            request.method,
            request.rel_url.raw_path,
            response.status,
            response.body_length + request.get(PUSHED, 0),  # event-stream bytes pushed below the response
            duration,
        )
