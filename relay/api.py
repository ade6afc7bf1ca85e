"""The two POST endpoints: relay key, body limits, validation, chaining, creating the request.

The answer is sent only after the request's status file exists on disk, so every URL in it works the
moment the client reads it. Any refusal happens before a file is created or the upstream is called.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from . import ledger, status
from .config import ApiKey, Config
from .http import HTTPError, json_response
from .intake import NewRequest, bad, check_count, header_value, parse_body, read_body, resolve_parent, validate
from .jobs import Job, JobManager
from .keys import ARCHIVE, CONFIG, KEY_CLAIM, MANAGER, QUOTAS
from .paths import RequestPath
from .quotas import QuotaExceeded
from .security import find_key, hash_token, new_token, relay_key
from .webhooks import WebhookRefused, check_url

log = logging.getLogger("relay.api")

T = TypeVar("T")


@dataclass
class Admitted:
    """What the checks before any file is written produced."""

    req: NewRequest
    api_key: str
    organization: str | None
    parent: dict[str, Any] | None
    key_label: str = ledger.OPEN  # the relay key's name, for the usage ledger


def authorize(request: web.Request, config: Config) -> ApiKey | None:
    """The relay access key of the request (None in open mode); HTTPError 401 when one is needed."""
    api_key_entry = find_key(relay_key(request), config.auth_api_keys)
    if config.auth_api_keys and api_key_entry is None:
        raise HTTPError(
            401,
            "unauthorized",
            "send a valid relay access key as X-RapidAPI-Key or Authorization: Bearer <key>",
            {"WWW-Authenticate": 'Bearer realm="relay"'},
        )
    return api_key_entry


def upstream_key(request: web.Request, config: Config) -> tuple[str, str | None]:
    """The upstream key (the client's X-OpenAI-API-Key, else the relay's) and organization."""
    api_key = header_value(request, "X-OpenAI-API-Key") or config.upstream_api_key
    organization = header_value(request, "X-OpenAI-Organization")
    if not api_key:
        raise HTTPError(
            400,
            "missing_api_key",
            "send the upstream key in the X-OpenAI-API-Key header (this relay has no upstream key configured)",
        )
    return api_key, organization


def take_quota(request: web.Request, api_key_entry: ApiKey | None) -> None:
    """The key's share of running requests (held by the request until it ends, see `in_slot`), then its
    monthly and per-minute quotas."""
    label = ledger.key_label(api_key_entry)
    manager: JobManager = request.app[MANAGER]
    if request.get(KEY_CLAIM) is None:
        if not manager.claim_key(label):
            message = (f"this relay key already has {manager.key_share()} requests running "
                       "([quotas] max_running_per_key); retry when one ends")  # fmt: skip
            raise HTTPError(429, "too_many_running", message, {"Retry-After": "1"})
        request[KEY_CLAIM] = label
    try:
        request.app[QUOTAS].take(api_key_entry)
    except QuotaExceeded as exc:
        raise HTTPError(429, "quota_exceeded", exc.message, {"Retry-After": str(exc.retry_after)}) from None
    except OSError as exc:
        log.error("cannot record quota usage: %s", exc.strerror)
        raise _storage_unavailable() from None


def hand_over_key(request: web.Request, job: Job) -> None:
    """The request's claim on its key's share goes to its job, which gives it back when it ends."""
    if request.get(KEY_CLAIM) is not None:
        request[KEY_CLAIM] = None
        job.key_claimed = True


def release_key(request: web.Request) -> None:
    """Give back the request's claim on its key's share, if it still holds one."""
    label = request.get(KEY_CLAIM)
    if label is not None:
        request[KEY_CLAIM] = None
        request.app[MANAGER].release_key(label)


async def admit(request: web.Request, manager: JobManager, config: Config) -> Admitted:
    """Every refusal of the contract, in order: shutdown, relay key, body, fields, upstream key,
    parent, webhook URL, quota. Raises HTTPError. The caller holds a job slot while this runs."""
    api_key_entry = authorize(request, config)
    raw = await read_body(request, config.server_max_body_bytes, config.server_body_timeout_seconds)
    req = validate(parse_body(raw, config), config)
    api_key, organization = upstream_key(request, config)
    parent = await resolve_parent(req, config, request.app[ARCHIVE]) if req.from_status_url else None
    if req.webhook_url:
        try:
            await check_url(req.webhook_url, manager.webhooks.resolver)
        except WebhookRefused as exc:
            raise bad("webhook_url", str(exc)) from None
    take_quota(request, api_key_entry)
    return Admitted(req, api_key, organization, parent, ledger.key_label(api_key_entry))


def _storage_unavailable() -> HTTPError:
    return HTTPError(
        507,
        "storage_unavailable",
        "the relay cannot write to its data directory right now; retry later",
        {"Retry-After": "30"},
    )


def conversation(adm: Admitted, config: Config) -> tuple[list[dict[str, Any]], str, str | None, str | None]:
    """Messages, model, access and conversation id of the new request, chained onto its parent."""
    req, parent = adm.req, adm.parent
    messages, model, access, conversation_id = req.messages, req.model, req.access, req.conversation_id
    if parent is not None:
        check_count(status.history_length(parent) + len(messages), config)
        messages, model, access, conversation_id = status.chained(parent, messages, model, access, conversation_id)
    return messages, model or config.upstream_default_model, access, conversation_id


async def in_slot(manager: JobManager, start: Callable[[], Awaitable[T]], request: web.Request | None = None) -> T:
    """Run `start` (admission, then the job's start) holding one of the job slots; the slot goes to the
    job when `start` returns, and back when it raises (with the request's claim on its key's share)."""
    if not manager.accepting:
        raise HTTPError(503, "shutting_down", "the relay is shutting down; retry in a moment", {"Retry-After": "5"})
    if not manager.claim_slot():  # taken before the first await, so the limit holds under concurrency
        raise HTTPError(
            503, "busy", "the relay is at its limit of running requests; retry shortly", {"Retry-After": "1"}
        )
    try:
        return await start()
    except BaseException:
        manager.release_slot()
        if request is not None:
            release_key(request)
        raise


async def create(request: web.Request, stream: bool) -> web.Response:
    config: Config = request.app[CONFIG]
    manager: JobManager = request.app[MANAGER]

    async def start() -> web.Response:
        adm = await admit(request, manager, config)
        return await _start(request, manager, config, adm, stream)

    try:
        return await in_slot(manager, start, request)
    except HTTPError as exc:
        manager.metrics.refusals.labels(str(exc.status)).inc()
        manager.metrics.requests.labels(request.path, "refused").inc()
        return exc.response()


async def launch(manager: JobManager, job: Job, request: web.Request | None = None) -> None:
    """Create the request's files (its one thread hop, ~0.2 ms of file work) and start its job."""
    try:
        await manager.on_intake(job.create_files)
    except OSError as exc:
        log.error("refusing a new request: cannot write to the data directory: %s", exc.strerror)
        raise _storage_unavailable() from None
    manager.start(job)
    if request is not None:
        hand_over_key(request, job)


def permalinks(rp: RequestPath, base: str, stream: bool) -> dict[str, str]:
    """The request's URLs: status, event stream (streamed requests), stop."""
    endpoints = {"status_url": rp.url(base, "json")}
    if stream:
        endpoints["stream_events_url"] = rp.url(base, "txt")
    endpoints["stop_url"] = rp.url(base, "stop")
    return endpoints


def tokens(
    private: bool, stream: bool, endpoints: dict[str, str]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """The `authorization` of the answer (tokens in clear), the one stored (their hashes only), and the
    answer's endpoints (a private request's bearer token repeated there, for older clients)."""
    authorization: dict[str, Any] = {"access": "private" if private else "public"}
    stored = dict(authorization)
    answer_endpoints = dict(endpoints)
    if private:
        bearer_token, stream_token = new_token(), new_token()
        authorization["bearer_token"] = bearer_token
        stored["bearer_token_sha256"] = hash_token(bearer_token)
        if stream:
            authorization["stream_url_arg"] = f"stream_token={stream_token}"
            stored["stream_token_sha256"] = hash_token(stream_token)
        answer_endpoints["bearer_token"] = bearer_token
    return authorization, stored, answer_endpoints


async def _start(
    request: web.Request, manager: JobManager, config: Config, adm: Admitted, stream: bool
) -> web.Response:
    """Create the request's files and its job; the answer with the permalinks."""
    messages, model, access, conversation_id = conversation(adm, config)
    private = access == "private"
    created_at = int(time.time())
    rp = RequestPath.new(config.server_node_id, private, created_at)
    conversation_id = conversation_id or rp.request_id
    endpoints = permalinks(rp, config.public_url, stream)
    authorization, stored_auth, answer_endpoints = tokens(private, stream, endpoints)
    if adm.parent is not None:
        endpoints["from_status_url"] = adm.req.from_status_url  # type: ignore[assignment]
    body = {"model": model, "messages": messages, **adm.req.forwarded}
    doc = status.queued(
        created_at=created_at,
        conversation_id=conversation_id,
        endpoint=request.path,
        authorization=stored_auth,
        endpoints=endpoints,
        timeout=adm.req.timeout,
        connect_timeout=adm.req.connect_timeout,
        parameters=body,
    )
    job = Job(
        manager,
        rp,
        stream=stream,
        doc=doc,
        body=body,
        api_key=adm.api_key,
        organization=adm.organization,
        timeout=adm.req.timeout,
        connect_timeout=adm.req.connect_timeout,
        webhook_url=adm.req.webhook_url,
        key_label=adm.key_label,
    )
    await launch(manager, job, request)
    log.info(
        "request %s accepted endpoint=%s model=%s access=%s%s",
        rp.request_id,
        request.path,
        model,
        authorization["access"],
        " chained" if adm.parent is not None else "",
    )
    return json_response(
        {
            "status": "success",
            "created_at": created_at,
            "conversation_id": conversation_id,
            "README": status.STREAM_README if stream else status.ASYNC_README,
            "authorization": authorization,
            "endpoints": answer_endpoints,
        }
    )


async def stream_chatgpt(request: web.Request) -> web.Response:
    return await create(request, stream=True)


async def async_chatgpt(request: web.Request) -> web.Response:
    return await create(request, stream=False)
