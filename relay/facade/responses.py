"""The Responses API: POST /v1/responses, GET (and resume), cancel, DELETE, input_items.

A response is a relay request like any other (its files in the dated layout, private, a job that calls
the upstream's chat completions as a stream), whose event log holds Responses events instead of the
upstream's chunks (see `events.ResponsesFormat`). Every stream of it, live or resumed at any
`starting_after`, is read from that log; the relay's own stream URL serves the same bytes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
import uuid
from typing import Any

import orjson
from aiohttp import web

from .. import api, intake, status, tiers
from ..archive import Archiver
from ..assemble import assistant_message
from ..config import Config
from ..http import HTTPError
from ..jobs import Job, JobManager
from ..keys import ARCHIVE, CONFIG, MANAGER
from ..paths import RequestPath
from ..serve import follow, open_file
from ..store import seq_offset
from ..webhooks import WebhookSender
from . import events, objects, translate
from .common import (
    ANSWERS,
    RESPONSE,
    Caller,
    Stored,
    answering,
    caller,
    discard,
    ended,
    find,
    find_owned,
    in_background,
    json_answer,
    object_id,
    off_loop,
    owned,
    page,
    paging,
    parse_id,
    read_payload,
    stored_answer,
)
from .errors import OpenAIError, not_found

ENDPOINT = "/v1/responses"

log = logging.getLogger("relay.openai")


def _relay_links(rp: RequestPath, config: Config, authorization: dict[str, Any]) -> dict[str, str]:
    """The relay's own URLs of a response, for a browser: status, event stream (with its stream token),
    and the bearer token that opens them. Given once, when the response is created."""
    stream_url = rp.url(config.public_url, "txt")
    if authorization.get("stream_url_arg"):
        stream_url += "?" + authorization["stream_url_arg"]
    return {"status_url": rp.url(config.public_url, "json"), "stream_url": stream_url,
            "bearer_token": authorization.get("bearer_token", "")}  # fmt: skip


def _headers(links: dict[str, str]) -> dict[str, str]:
    return {"X-Relay-Status-Url": links["status_url"], "X-Relay-Stream-Url": links["stream_url"],
            "X-Relay-Bearer-Token": links["bearer_token"]}  # fmt: skip


async def _history(
    payload: dict[str, Any], config: Config, who: Caller, archiver: Archiver | None
) -> list[dict[str, Any]]:
    """The conversation before this turn: a previous response's messages and answer (without its
    instructions, which OpenAI does not carry over), from the disk or else from the archive tier."""
    prev = payload.get("previous_response_id")
    if prev is None:
        return []
    if not isinstance(prev, str):
        raise OpenAIError(400, "`previous_response_id` must be a string.", param="previous_response_id")
    missing = OpenAIError(404, f"Previous response with id '{prev[:80]}' not found.", param="previous_response_id",
                          code="previous_response_not_found")  # fmt: skip
    prp = parse_id(RESPONSE, prev)
    if prp is None:
        raise missing
    try:
        parent = await intake.load_parent(prp, config, field="previous_response_id", archiver=archiver)
    except HTTPError as exc:
        if exc.status == 404:
            raise missing from None
        raise OpenAIError.of(exc) from None
    oa = parent.get("openai")
    if not isinstance(oa, dict) or oa.get("id") != prev or oa.get("owner") != who.owner:
        raise missing
    try:
        intake.check_parent_state(parent)
    except HTTPError as exc:
        raise OpenAIError(400, exc.message, param="previous_response_id", code=exc.code) from None
    history = (parent.get("parameters") or {}).get("messages") or []
    if oa.get("instructions_first") and history:
        history = history[1:]
    reply = assistant_message((parent.get("response") or {}).get("body"))
    return list(history) + ([reply] if reply else [])


def _closed(archiver: Archiver | None, job: Job) -> None:
    """A response ended: OpenAI's webhook event; and, for `store: false`, its files go (the answer was
    built from memory; a reader still streaming keeps its open file), and so does whatever the archive
    tier may have taken of them (see `common.discard`)."""
    report_ended(job.manager.config, job.manager.webhooks, job.doc, job.rp.request_id)
    if not job.doc["openai"]["echo"]["store"]:
        in_background(_unstored(job.manager.config, archiver, job.rp))


async def _unstored(config: Config, archiver: Archiver | None, rp: RequestPath) -> None:
    try:
        await discard(config, archiver, rp)
    except HTTPError:
        log.warning("request %s (store: false): its archived objects could not be deleted", rp.request_id)


def report_ended(config: Config, webhooks: WebhookSender, doc: dict[str, Any], request_id: str) -> None:
    """OpenAI's webhook event for a response that ended (`[webhooks] openai_url`): `{id, object: event,
    type, created_at, data: {id}}`. Also for one that a restart finished after a crash."""
    url = config.webhooks_openai_url
    kind = objects.WEBHOOK_EVENT.get(objects.response_status(doc))
    if not url or kind is None:
        return
    event_id = "evt_" + uuid.uuid4().hex
    body = orjson.dumps({"id": event_id, "object": "event", "created_at": int(time.time()), "type": kind,
                         "data": {"id": doc["openai"]["id"]}})  # fmt: skip
    webhooks.post_later(url, body, "application/json", request_id, event_id)


async def _start(request: web.Request, who: Caller) -> tuple[Job, dict[str, Any], dict[str, str], bool]:
    """Admission and the job's start, holding a job slot (see `api.in_slot`)."""
    config: Config = request.app[CONFIG]
    manager: JobManager = request.app[MANAGER]
    payload = await read_payload(request)
    body, echo = translate.to_chat(payload, config.upstream_default_model)
    if echo["background"] and not echo["store"]:
        raise OpenAIError(400, "Background responses must be stored: leave `store` true.", param="store")
    new = translate.input_messages(payload["input"])
    instructions = echo["instructions"]
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + await _history(
        payload, config, who, request.app[ARCHIVE]
    ) + new  # fmt: skip
    intake.check_count(len(messages), config)
    api_key, organization = api.upstream_key(request, config)
    api.take_quota(request, who.entry)
    created_at = int(time.time())
    rp = RequestPath.new(config.server_node_id, True, created_at)
    response_id = object_id(RESPONSE, rp)
    endpoints = api.permalinks(rp, config.public_url, True)
    authorization, stored_auth, _ = api.tokens(True, True, endpoints)
    stored_auth.update(owned(RESPONSE, who))
    body = {"model": body.pop("model"), "messages": messages, **body}
    doc = status.queued(created_at=created_at, conversation_id=response_id, endpoint=ENDPOINT,
                        authorization=stored_auth, endpoints=endpoints, timeout=config.upstream_max_timeout,
                        connect_timeout=5, parameters=body)  # fmt: skip
    doc["openai"] = {"object": "response", "id": response_id, "owner": who.owner, "echo": echo,
                     "instructions_first": bool(instructions),
                     "input": translate.input_items(payload["input"], response_id)}  # fmt: skip
    job = Job(manager, rp, stream=True, doc=doc, body=body, api_key=api_key, organization=organization,
              timeout=config.upstream_max_timeout, connect_timeout=5, key_label=who.label,
              log_format=events.ResponsesFormat(response_id, messages))  # fmt: skip
    job.on_close = functools.partial(_closed, request.app[ARCHIVE])
    await api.launch(manager, job, request)
    return job, echo, _relay_links(rp, config, authorization), payload.get("stream") is True


async def create(request: web.Request) -> web.StreamResponse:
    manager: JobManager = request.app[MANAGER]
    try:
        who = caller(request)
        job, echo, links, stream = await api.in_slot(manager, lambda: _start(request, who), request)
    except HTTPError as exc:
        manager.metrics.requests.labels(ENDPOINT, "refused").inc()
        return OpenAIError.of(exc).response()
    except OpenAIError as exc:
        manager.metrics.requests.labels(ENDPOINT, "refused").inc()
        return exc.response()
    stored = Stored(job.rp, job.doc, job)
    if stream:
        return await _stream(request, job.rp, job, None, _headers(links))
    if not echo["background"]:
        await ended(job)
    obj = _object(stored)
    obj["relay"] = links  # an extra field the SDKs ignore; see docs/openai.md
    return await json_answer(request, obj, _headers(links))


def _object(stored: Stored) -> dict[str, Any]:
    """The Response object now: for a running request, with the text assembled so far."""
    doc, job = stored.doc, stored.job
    if job is not None and job.assembler.chunks and doc.get("status") not in status.TERMINAL:
        body = job.assembler.completion(job.body["model"])
        doc = {**doc, "response": {**(doc.get("response") or {}), "body": body}}
    return objects.response_object(doc, stored.messages)


async def _stream(
    request: web.Request, rp: RequestPath, job: Job | None, after: int | None, headers: dict[str, str] | None = None,
    tail: Any = None,
) -> web.StreamResponse:  # fmt: skip
    """The response's events after sequence number `after` (all of them for None), then live ones; `tail`
    is where its closing events start, once it has ended (see `ResponsesFormat.closing_at`)."""
    config: Config = request.app[CONFIG]
    try:
        fd = await open_file(config, rp, "txt")
    except FileNotFoundError:
        return await _archived_stream(request, rp, after, headers, tail)
    try:
        job = job if job is not None and job.events is not None else None
        size = job.size if job is not None else os.fstat(fd).st_size
        offset = 0 if after is None else await asyncio.to_thread(seq_offset, fd, size, after, tail)
        return await follow(request, fd, offset, job, headers, blank=b"")
    finally:
        os.close(fd)


async def _archived_stream(
    request: web.Request, rp: RequestPath, after: int | None, headers: dict[str, str] | None, tail: Any
) -> web.StreamResponse:
    """The events of a response that is only in the archive tier now (so ended): as `_stream` sends them
    from a local log, from the event after `after` (see `tiers.log_offset`)."""
    archiver = request.app[ARCHIVE]
    try:
        offset = await tiers.log_offset(archiver, rp, after, tail)
        if offset is None or archiver is None:
            raise FileNotFoundError(rp.rel("txt"))
        seconds = request.app[CONFIG].server_send_timeout_seconds
        return await tiers.log_from(request, archiver, rp, offset, b": connected\n", headers or {}, seconds)
    except FileNotFoundError:
        raise not_found("response", object_id(RESPONSE, rp)) from None


@answering
async def retrieve(request: web.Request) -> web.StreamResponse:
    who = caller(request)
    if request.query.get("stream") in ("true", "1", "True"):
        after = _starting_after(request)
        rp, job, auth = await find_owned(request, RESPONSE, request.match_info["id"], who)
        return await _stream(request, rp, job, after, tail=auth.get("log_tail"))

    async def make() -> tuple[bytes, bool]:
        stored = await find(request, RESPONSE, request.match_info["id"], who)
        ended = stored.job is None and stored.doc.get("status") in status.TERMINAL
        return await off_loop(request, orjson.dumps, _object(stored)), ended and stored.doc["openai"]["echo"]["store"]

    return await stored_answer(request, RESPONSE, who, make)


def _starting_after(request: web.Request) -> int | None:
    value = request.query.get("starting_after")
    if value is None or value == "":
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 12:
        raise OpenAIError(400, "`starting_after` must be a sequence number (an integer >= 0).",
                          param="starting_after")  # fmt: skip
    return int(value)


@answering
async def cancel(request: web.Request) -> web.Response:
    """Cancel a running response (idempotent): it ends `cancelled` with the output and usage so far."""
    who = caller(request)
    stored = await find(request, RESPONSE, request.match_info["id"], who)
    job = stored.job
    if job is not None:
        job.cancel("stop")
        await job.status_settled.wait()
        return await json_answer(request, _object(stored))
    state = objects.response_status(stored.doc)
    if state not in ("cancelled", "queued", "in_progress"):
        raise OpenAIError(400, f"Cannot cancel a response with status '{state}'.", code="invalid_state")
    return await json_answer(request, _object(stored))


@answering
async def delete(request: web.Request) -> web.Response:
    who = caller(request)
    rid = request.match_info["id"]
    rp, job, _ = await find_owned(request, RESPONSE, rid, who)
    if job is not None:
        job.cancel("stop")
        await ended(job)
    request.app[ANSWERS].drop(rid)
    await discard(request.app[CONFIG], request.app[ARCHIVE], rp)
    return await json_answer(request, {"id": rid, "object": "response.deleted", "deleted": True})


@answering
async def list_input_items(request: web.Request) -> web.Response:
    who = caller(request)
    stored = await find(request, RESPONSE, request.match_info["id"], who)
    after, limit, order = paging(request, default_order="desc")
    items = list(stored.doc["openai"].get("input") or [])
    if order == "desc":
        items.reverse()
    return await json_answer(request, page(items, after, limit))
