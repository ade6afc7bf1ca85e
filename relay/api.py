"""The two POST endpoints: relay key, body limits, validation, chaining, creating the request.

The answer is sent only after the request's status file exists on disk, so every URL in it works the
moment the client reads it. Any refusal happens before a file is created or the upstream is called.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from aiohttp import web

from . import ledger, status
from .bounds import containers, has_control, printable_ascii, raw_too_deep
from .config import ApiKey, Config
from .http import HTTPError, json_response
from .jobs import Job, JobManager
from .keys import CONFIG, KEY_CLAIM, MANAGER, QUOTAS
from .paths import RequestPath, expired, is_http_url, parse_status_url
from .quotas import QuotaExceeded
from .security import find_key, hash_token, new_token, relay_key, token_matches
from .store import FileTooLarge, read_under
from .webhooks import WebhookRefused, check_url

log = logging.getLogger("relay.api")

T = TypeVar("T")

CONVERSATION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
RELAY_FIELDS = {
    "messages",
    "model",
    "access",
    "timeout",
    "connect_timeout",
    "from_status_url",
    "from_bearer_token",
    "conversation_id",
    "webhook_url",
}
SET_BY_RELAY = {"stream", "stream_options"}


@dataclass
class NewRequest:
    messages: list[dict[str, Any]]
    model: str | None
    access: str | None
    timeout: float
    connect_timeout: float
    from_status_url: str | None
    from_bearer_token: str | None
    conversation_id: str | None
    webhook_url: str | None
    forwarded: dict[str, Any]


def _bad(field: str, message: str) -> HTTPError:
    return HTTPError(400, "invalid_field", f"`{field}` {message}")


def _number(payload: dict[str, Any], field: str, default: float, low: float, high: float) -> float:
    value = payload.get(field, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(field, f"must be a number of seconds between {low:g} and {high:g}")
    if not low <= value <= high:
        raise _bad(field, f"must be between {low:g} and {high:g} seconds (got {value:g})")
    return value


def _optional_str(payload: dict[str, Any], field: str, max_len: int = 4096) -> str | None:
    value = payload.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise _bad(field, f"must be a non-empty string of at most {max_len} characters")
    if has_control(value):
        raise _bad(field, "must not contain control characters (line breaks, tabs, NUL, DEL)")
    return value


def parse_messages(value: Any, config: Config) -> list[dict[str, Any]]:
    if isinstance(value, str):
        try:
            value = _load_bounded(value.encode(), config)
        except orjson.JSONDecodeError:
            raise _bad("messages", "is a string but not a JSON array of messages") from None
    if not isinstance(value, list) or not value:
        raise _bad("messages", "must be a non-empty array of message objects (or a string holding one)")
    check_count(len(value), config)
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise _bad(f"messages[{i}]", "must be an object with a `role`")
        role = item.get("role")
        if not isinstance(role, str) or not role:
            raise _bad(f"messages[{i}].role", "is required and must be a non-empty string")
    return value


def _too_complex(config: Config) -> HTTPError:
    return HTTPError(
        400,
        "body_too_complex",
        f"the body holds more than {config.server_max_json_containers} arrays and objects (`[` and `{{` "
        "characters, inside strings too); send a smaller request ([server] max_json_containers)",
    )


def _too_deep(config: Config) -> HTTPError:
    return HTTPError(
        400,
        "body_too_complex",
        f"the body nests arrays and objects more than {config.server_max_json_depth} levels deep "
        "([server] max_json_depth)",
    )


def check_count(count: int, config: Config) -> None:
    if count > config.server_max_messages:
        raise _bad(
            "messages",
            f"holds {count} messages (chained history included); the limit is {config.server_max_messages} "
            "([server] max_messages): start a new conversation",
        )


def _load_bounded(raw: bytes, config: Config) -> Any:
    """JSON from a client, within the bounds that keep parsing it cheap (see `bounds`): HTTPError
    `body_too_complex` over them, orjson.JSONDecodeError when it is not JSON."""
    if containers(raw) > config.server_max_json_containers:
        raise _too_complex(config)
    value = orjson.loads(raw)
    if raw_too_deep(raw, value, config.server_max_json_depth):
        raise _too_deep(config)
    return value


def parse_body(raw: bytes, config: Config) -> Any:
    """The JSON of a POST body."""
    try:
        return _load_bounded(raw, config)
    except orjson.JSONDecodeError as exc:
        raise HTTPError(400, "invalid_json", f"the body is not valid JSON ({exc})") from None


def header_value(request: web.Request, name: str) -> str | None:
    """A header that carries a key or an id: visible ASCII only, never echoed back."""
    value = (request.headers.get(name) or "").strip()
    if not value:
        return None
    if len(value) > 1024 or not printable_ascii(value):
        raise HTTPError(
            400,
            "invalid_header",
            f"the {name} header must be at most 1024 visible ASCII characters (no spaces or control characters)",
        )
    return value


def validate(payload: Any, config: Config) -> NewRequest:
    """Check every field the relay reads; everything else is forwarded upstream untouched."""
    if not isinstance(payload, dict):
        raise HTTPError(400, "invalid_json", "the body must be a JSON object with at least `messages`")
    if "messages" not in payload:
        raise _bad("messages", "is required: an array of {role, content} objects")
    messages = parse_messages(payload["messages"], config)
    model = _optional_str(payload, "model", 256)
    access = payload.get("access")
    if access is not None and access not in ("public", "private"):
        raise _bad("access", 'must be "public" or "private"')
    conversation_id = payload.get("conversation_id")
    if conversation_id is not None and (
        not isinstance(conversation_id, str) or not CONVERSATION_ID_RE.fullmatch(conversation_id)
    ):
        raise _bad("conversation_id", "must be 1-64 characters of A-Z, a-z, 0-9, _ and -")
    webhook_url = _optional_str(payload, "webhook_url", 2048)
    if webhook_url is not None and not is_http_url(webhook_url):
        raise _bad("webhook_url", "must be an absolute http(s) URL")
    forwarded = {k: v for k, v in payload.items() if k not in RELAY_FIELDS and k not in SET_BY_RELAY}
    return NewRequest(
        messages=messages,
        model=model,
        access=access,
        timeout=_number(payload, "timeout", 90, 1, config.upstream_max_timeout),
        connect_timeout=_number(payload, "connect_timeout", 5, 1, 10),
        from_status_url=_optional_str(payload, "from_status_url", 2048),
        from_bearer_token=_optional_str(payload, "from_bearer_token", 512),
        conversation_id=conversation_id,
        webhook_url=webhook_url,
        forwarded=forwarded,
    )


async def read_body(request: web.Request, limit: int, seconds: float) -> bytes:
    """The whole body, at most `limit` bytes, sent within `seconds` (slow senders get 408)."""
    too_big = HTTPError(413, "body_too_large", f"the request body is larger than the limit of {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_big
    data = bytearray()
    try:
        async with asyncio.timeout(seconds):
            async for block in request.content.iter_chunked(65536):
                data += block
                if len(data) > limit:
                    raise too_big
    except TimeoutError:
        raise HTTPError(
            408,
            "body_timeout",
            f"the request body did not arrive within {seconds:g} s ([server] body_timeout_seconds)",
            {"Connection": "close"},
        ) from None
    return bytes(data)


async def load_parent(prp: RequestPath, config: Config, field: str = "from_status_url") -> dict[str, Any]:
    """The status document a new request chains from, read within the bounds that keep parsing it cheap
    (HTTPError when it is on another node, expired, missing, too large or not a status document)."""
    if prp.node_id != config.server_node_id:
        raise HTTPError(
            400,
            "wrong_node",
            f"`{field}` belongs to relay node {prp.node_id}; send the request to that node "
            f"(this is node {config.server_node_id})",
        )
    missing = HTTPError(404, "parent_not_found", f"`{field}` does not exist here (expired or never created)")
    if expired(prp, config.retention_max_age_days):
        raise missing
    try:
        limit = config.server_max_conversation_bytes
        raw = await asyncio.to_thread(read_under, config.data_dir, prp.rel("json"), limit)
    except FileNotFoundError:
        raise missing from None
    except FileTooLarge:
        raise HTTPError(
            413,
            "conversation_too_large",
            f"the conversation of `{field}` is larger than {config.server_max_conversation_bytes} bytes "
            "([server] max_conversation_bytes): start a new conversation",
        ) from None
    # Parsing holds the GIL wherever it runs: a long history of tiny arrays within the byte limit would
    # hold the loop (1,000,000 empty arrays: ~0.45 s). Counted in C first, like a POST body.
    if containers(raw) > config.server_max_conversation_containers:
        raise HTTPError(
            413,
            "conversation_too_large",
            f"the conversation of `{field}` holds more than {config.server_max_conversation_containers} "
            "arrays and objects ([server] max_conversation_containers): start a new conversation",
        )
    try:
        parent = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise HTTPError(404, "parent_not_found", f"`{field}` does not hold a status document") from None
    if not isinstance(parent, dict):
        raise HTTPError(404, "parent_not_found", f"`{field}` does not hold a status document")
    return parent


def check_parent_state(parent: dict[str, Any]) -> None:
    """A request chains only from a parent that ended well."""
    state = parent.get("status")
    if state not in status.TERMINAL:
        raise HTTPError(409, "parent_running", "the parent request is still running: wait until its status is done")
    if state == "error":
        raise HTTPError(409, "parent_failed", "the parent request ended in error: chain from a request that is done")


async def resolve_parent(req: NewRequest, config: Config) -> dict[str, Any]:
    """The parent status document of a chained request, after every check of the chaining rules."""
    assert req.from_status_url is not None
    prp = parse_status_url(req.from_status_url, config.public_url)
    if prp is None:
        raise HTTPError(
            400,
            "invalid_from_status_url",
            f"`from_status_url` must be a status_url (…/<id>.json) generated by this relay at {config.public_url}",
        )
    parent = await load_parent(prp, config)
    auth = parent.get("authorization") or {}
    if auth.get("access") == "private" and not token_matches(req.from_bearer_token, auth.get("bearer_token_sha256")):
        raise HTTPError(
            403,
            "forbidden",
            "`from_status_url` is private: send its bearer_token as `from_bearer_token`"
            if not req.from_bearer_token
            else "`from_bearer_token` does not match `from_status_url`",
        )
    check_parent_state(parent)
    return parent


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
    parent = await resolve_parent(req, config) if req.from_status_url else None
    if req.webhook_url:
        try:
            await check_url(req.webhook_url, manager.webhooks.resolver)
        except WebhookRefused as exc:
            raise _bad("webhook_url", str(exc)) from None
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
