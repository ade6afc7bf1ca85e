"""Chat Completions on the OpenAI-compatible face: POST /v1/chat/completions, stored completions, models.

Without `store: true` a chat completion is passed through to the upstream as it is (bounded in size
and time; nothing written but its usage-ledger line). With it, it runs as a relay request (files in the
dated layout, private), its id becomes the relay's `chatcmpl-…` (which names where it lives), and it can
be retrieved, listed, its messages listed, its metadata updated, and deleted, by the key that created it,
until it expires.

Listing needs an index: `data_dir/openai/chat-completions.jsonl`, one line per stored completion, per
metadata update and per deletion, read once at start (and compacted then); kept in memory.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import orjson
from aiohttp import web

from .. import api, intake, status
from ..config import Config
from ..http import HTTPError
from ..jobs import Events, Job, JobManager
from ..keys import ARCHIVE, CONFIG, MANAGER
from ..paths import RequestPath
from ..sending import send_bytes
from ..serve import follow, open_file
from ..status import ending_events
from ..upstream import UpstreamError
from .chat_index import INDEX
from .common import (
    ANSWERS,
    CHAT,
    Caller,
    Stored,
    answering,
    caller,
    discard,
    ended,
    find,
    json_answer,
    object_id,
    off_loop,
    owned,
    page,
    paging,
    read_payload,
    stored_answer,
)
from .errors import OpenAIError, not_found
from .passthrough import ENDPOINT, NOT_FORWARDED, pass_through, upstream_error, usage_asked
from .translate import check_metadata

log = logging.getLogger("relay.openai")

MODELS_LIMIT = 1024 * 1024  # bytes of the upstream's model list that are read


class ChatFormat:
    """A stored, streamed chat completion's log: the upstream's chunks under the relay's id. The relay
    asks the upstream for usage on every stream (`[upstream] include_usage`) so that the stored object
    has it; a client that did not ask for it (`stream_options.include_usage`) does not get it, as from
    OpenAI: no usage-only last chunk (code reading `chunk.choices[0]` would fail on it), no `usage` field."""

    def __init__(self, cid: str, usage: bool) -> None:
        self.cid = cid
        self.usage = usage

    def opening(self, job: Job) -> Events:
        return []

    def started(self, job: Job) -> Events:
        return []

    def chunk(self, line: bytes, chunk: dict[str, Any]) -> Events:
        chunk["id"] = self.cid
        if not self.usage and chunk.get("usage") is not None:
            if not chunk.get("choices"):
                return []
            chunk = {k: v for k, v in chunk.items() if k != "usage"}  # (the assembler keeps the original)
        return [(orjson.dumps(chunk), None)]

    def ending(self, job: Job, status: str, error: tuple[str, str] | None) -> Events:
        return ending_events(status, error)

    def closing_at(self, job: Job, offsets: list[int]) -> None:
        pass


def _check(payload: dict[str, Any], config: Config) -> tuple[bool, bool, dict[str, str]]:
    try:
        payload["messages"] = intake.parse_messages(payload.get("messages"), config)
    except HTTPError as exc:
        raise OpenAIError(400, exc.message, param="messages", code=exc.code) from None
    if payload.get("n") not in (None, 1):
        raise OpenAIError(400, "`n` must be 1 on this relay.", param="n", code="unsupported_parameter")
    metadata = payload.get("metadata") or {}
    check_metadata(metadata)
    return payload.get("stream") is True, payload.get("store") is True, metadata


@answering
async def create(request: web.Request) -> web.StreamResponse:
    config: Config = request.app[CONFIG]
    manager: JobManager = request.app[MANAGER]
    who = caller(request)
    payload = None

    async def start() -> Job | None:
        nonlocal payload
        payload = await read_payload(request)
        stream, store, metadata = _check(payload, config)
        api_key, organization = api.upstream_key(request, config)
        api.take_quota(request, who.entry)
        if not store:
            return None
        return await _start_stored(request, who, payload, stream, metadata, api_key, organization)

    job = await api.in_slot(manager, start, request)
    assert payload is not None
    if job is None:
        try:
            return await pass_through(request, payload, who)
        finally:
            manager.release_slot()
            api.release_key(request)
    return await _answer_stored(request, job, payload.get("stream") is True)


async def _start_stored(request: web.Request, who: Caller, payload: dict[str, Any], stream: bool,
                        metadata: dict[str, str], api_key: str, organization: str | None) -> Job:  # fmt: skip
    config: Config = request.app[CONFIG]
    manager: JobManager = request.app[MANAGER]
    created = time.time()  # the index's order: of creation, to the microsecond (ids break no ties)
    created_at = int(created)
    rp = RequestPath.new(config.server_node_id, True, created_at)
    cid = object_id(CHAT, rp)
    body = {k: v for k, v in payload.items() if k not in NOT_FORWARDED}
    body["model"] = body.get("model") or config.upstream_default_model
    endpoints = api.permalinks(rp, config.public_url, stream)
    _, stored_auth, _ = api.tokens(True, stream, endpoints)
    stored_auth.update(owned(CHAT, who))
    doc = status.queued(created_at=created_at, conversation_id=cid, endpoint=ENDPOINT, authorization=stored_auth,
                        endpoints=endpoints, timeout=config.upstream_max_timeout, connect_timeout=5,
                        parameters=body)  # fmt: skip
    doc["openai"] = {"object": "chat.completion", "id": cid, "owner": who.owner, "metadata": metadata}
    job = Job(manager, rp, stream=stream, doc=doc, body=body, api_key=api_key, organization=organization,
              timeout=config.upstream_max_timeout, connect_timeout=5, key_label=who.label,
              log_format=ChatFormat(cid, usage_asked(payload)) if stream else None)  # fmt: skip
    index = request.app[INDEX]

    def indexed(job: Job) -> None:
        if job.doc.get("status") == "done":
            entry = {"op": "add", "id": cid, "created": created, "model": body["model"], "owner": who.owner,
                     "metadata": metadata}  # fmt: skip
            index.record(entry)

    job.on_close = indexed
    await api.launch(manager, job, request)
    return job


async def _answer_stored(request: web.Request, job: Job, stream: bool) -> web.StreamResponse:
    if stream:
        fd = await open_file(request.app[CONFIG], job.rp, "txt")
        try:
            return await follow(request, fd, 0, job, blank=b"")
        finally:
            os.close(fd)
    await ended(job)
    doc = job.doc
    if doc.get("status") != "done":
        err = doc.get("error") or {}
        code = (doc.get("response") or {}).get("status_code")
        status_code = code if isinstance(code, int) and 400 <= code < 600 else 502
        raise OpenAIError(status_code, str(err.get("message", "the request failed")), code=err.get("code"))
    return await json_answer(request, completion_object(doc))


def completion_object(doc: dict[str, Any], metadata: dict[str, str] | None = None) -> dict[str, Any]:
    body = dict((doc.get("response") or {}).get("body") or {})
    body["id"] = doc["openai"]["id"]
    body["metadata"] = doc["openai"].get("metadata", {}) if metadata is None else metadata
    return body


@answering
async def retrieve(request: web.Request) -> web.Response:
    who = caller(request)

    async def make() -> tuple[bytes, bool]:
        stored = await _find_done(request, who)
        return await off_loop(request, orjson.dumps, completion_object(stored.doc, _metadata(request, stored))), True

    return await stored_answer(request, CHAT, who, make)


async def _find_done(request: web.Request, who: Caller) -> Stored:
    cid = request.match_info["id"]
    stored = await find(request, CHAT, cid, who)
    if stored.doc.get("status") != "done" or cid not in request.app[INDEX].entries:
        raise not_found("chat completion", cid)  # (running, failed or deleted)
    return stored


def _metadata(request: web.Request, stored: Stored) -> dict[str, str]:
    entry = request.app[INDEX].entries.get(stored.doc["openai"]["id"])
    return entry["metadata"] if entry else stored.doc["openai"].get("metadata", {})


@answering
async def messages(request: web.Request) -> web.Response:
    who = caller(request)
    stored = await _find_done(request, who)
    after, limit, order = paging(request)
    cid = stored.doc["openai"]["id"]
    items = []
    for i, message in enumerate(stored.messages or ()):
        if isinstance(message, dict):
            items.append({"id": f"{cid}-{i}", "content_parts": None, **message})
    if order == "desc":
        items.reverse()
    return await json_answer(request, page(items, after, limit))


@answering
async def list_stored(request: web.Request) -> web.Response:
    who = caller(request)
    config: Config = request.app[CONFIG]
    after, limit, order = paging(request)
    filters = {}
    for key, value in request.query.items():
        if key.startswith("metadata[") and key.endswith("]"):
            filters[key[9:-1]] = value
    ids, more = await request.app[INDEX].listed(
        who.owner, model=request.query.get("model"), metadata=filters, max_age_days=config.retention_max_age_days,
        after=after, limit=limit, descending=order == "desc",
    )  # fmt: skip
    objects = []
    for cid in ids:  # (at most `limit` status documents are read)
        try:
            stored = await find(request, CHAT, cid, who)
        except OpenAIError:
            continue  # (expired files, not yet out of the index)
        objects.append(completion_object(stored.doc, _metadata(request, stored)))
    answer = page(objects, None, limit)
    answer["has_more"] = more
    return await json_answer(request, answer)


@answering
async def update(request: web.Request) -> web.Response:
    who = caller(request)
    stored = await _find_done(request, who)
    payload = await read_payload(request)
    metadata = payload.get("metadata")
    if metadata is None:
        metadata = {}
    check_metadata(metadata)
    cid = stored.doc["openai"]["id"]
    request.app[INDEX].record({"op": "metadata", "id": cid, "metadata": metadata})
    request.app[ANSWERS].drop(cid)
    return await json_answer(request, completion_object(stored.doc, metadata))


@answering
async def delete(request: web.Request) -> web.Response:
    who = caller(request)
    stored = await _find_done(request, who)
    cid = stored.doc["openai"]["id"]
    request.app[ANSWERS].drop(cid)
    await discard(request.app[CONFIG], request.app[ARCHIVE], stored.rp)  # (503 from an unreachable archive: kept)
    request.app[INDEX].record({"op": "delete", "id": cid})
    return await json_answer(request, {"object": "chat.completion.deleted", "id": cid, "deleted": True})


@answering
async def models(request: web.Request) -> web.Response:
    """GET /v1/models: the upstream's list, as it is (at most MODELS_LIMIT bytes)."""
    config: Config = request.app[CONFIG]
    manager: JobManager = request.app[MANAGER]
    caller(request)
    api_key, organization = api.upstream_key(request, config)
    try:
        status_code, data = await manager.upstream.get("/models", api_key, organization, MODELS_LIMIT)
    except UpstreamError as exc:
        raise upstream_error(exc) from None
    return await send_bytes(request, data, {"Content-Type": "application/json"}, status_code)
