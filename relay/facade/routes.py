"""The routes of the OpenAI-compatible face, and what it loads at start."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from ..keys import CONFIG
from ..paths import RequestPath
from ..webhooks import WebhookSender
from . import chat, events, responses
from .chat_index import INDEX, ChatIndex
from .common import ANSWERS, WORKER, Answers

log = logging.getLogger("relay.openai")


LOG_FORMATS = (events.replay_responses,)  # the face's log formats, for crash recovery (recovery.repair)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/responses", responses.create)
    r.add_get("/v1/responses/{id}", responses.retrieve)
    r.add_delete("/v1/responses/{id}", responses.delete)
    r.add_post("/v1/responses/{id}/cancel", responses.cancel)
    r.add_get("/v1/responses/{id}/input_items", responses.list_input_items)
    r.add_post("/v1/chat/completions", chat.create)
    r.add_get("/v1/chat/completions", chat.list_stored)
    r.add_get("/v1/chat/completions/{id}", chat.retrieve)
    r.add_post("/v1/chat/completions/{id}", chat.update)
    r.add_delete("/v1/chat/completions/{id}", chat.delete)
    r.add_get("/v1/chat/completions/{id}/messages", chat.messages)
    r.add_get("/v1/models", chat.models)
    app[WORKER] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-openai")
    app[ANSWERS] = Answers()
    app.on_cleanup.append(_stop_worker)


async def _stop_worker(app: web.Application) -> None:
    app[WORKER].shutdown(wait=False, cancel_futures=True)


def repaired(app: web.Application, webhooks: WebhookSender, rp: RequestPath, doc: dict[str, Any]) -> None:
    """A request that a restart finished after a crash: a response's webhook event is sent now."""
    oa = doc.get("openai")
    if isinstance(oa, dict) and oa.get("object") == "response":
        responses.report_ended(app[CONFIG], webhooks, doc, rp.request_id)


async def load(app: web.Application) -> None:
    """At start: the index of stored chat completions (see `chat_index.ChatIndex`)."""
    config = app[CONFIG]
    index = ChatIndex(config.data_dir)
    count = await asyncio.to_thread(index.load, config.retention_max_age_days)
    app[INDEX] = index
    log.info("openai: %d stored chat completion(s) in the index", count)
