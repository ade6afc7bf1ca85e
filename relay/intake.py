"""A new request's body, read and checked before anything else happens: the size and time it may take,
JSON within bounds, every field the relay reads, and the parent it chains from (`from_status_url`), with
every rule of chaining. Shared by the native face (`api`) and the OpenAI-compatible one (`facade`)."""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from . import status, tiers
from .archive import Archiver
from .bounds import has_control, more_containers, printable_ascii, raw_too_deep
from .config import Config
from .http import HTTPError
from .paths import RequestPath, expired, is_http_url, parse_status_url
from .security import token_matches
from .store import FileTooLarge, read_under

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


def bad(field: str, message: str) -> HTTPError:
    return HTTPError(400, "invalid_field", f"`{field}` {message}")


def _number(payload: dict[str, Any], field: str, default: float, low: float, high: float) -> float:
    value = payload.get(field, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(field, f"must be a number of seconds between {low:g} and {high:g}")
    if not low <= value <= high:
        raise bad(field, f"must be between {low:g} and {high:g} seconds (got {value:g})")
    return value


def _optional_str(payload: dict[str, Any], field: str, max_len: int = 4096) -> str | None:
    value = payload.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise bad(field, f"must be a non-empty string of at most {max_len} characters")
    if has_control(value):
        raise bad(field, "must not contain control characters (line breaks, tabs, NUL, DEL)")
    return value


def parse_messages(value: Any, config: Config) -> list[dict[str, Any]]:
    if isinstance(value, str):
        try:
            value = _load_bounded(value.encode(), config)
        except orjson.JSONDecodeError:
            raise bad("messages", "is a string but not a JSON array of messages") from None
    if not isinstance(value, list) or not value:
        raise bad("messages", "must be a non-empty array of message objects (or a string holding one)")
    check_count(len(value), config)
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise bad(f"messages[{i}]", "must be an object with a `role`")
        role = item.get("role")
        if not isinstance(role, str) or not role:
            raise bad(f"messages[{i}].role", "is required and must be a non-empty string")
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
        raise bad(
            "messages",
            f"holds {count} messages (chained history included); the limit is {config.server_max_messages} "
            "([server] max_messages): start a new conversation",
        )


def _load_bounded(raw: bytes, config: Config) -> Any:
    """JSON from a client, within the bounds that keep parsing it cheap (see `bounds`): HTTPError
    `body_too_complex` over them, orjson.JSONDecodeError when it is not JSON."""
    if more_containers(raw, config.server_max_json_containers):
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
        raise bad("messages", "is required: an array of {role, content} objects")
    messages = parse_messages(payload["messages"], config)
    model = _optional_str(payload, "model", 256)
    access = payload.get("access")
    if access is not None and access not in ("public", "private"):
        raise bad("access", 'must be "public" or "private"')
    conversation_id = payload.get("conversation_id")
    if conversation_id is not None and (
        not isinstance(conversation_id, str) or not CONVERSATION_ID_RE.fullmatch(conversation_id)
    ):
        raise bad("conversation_id", "must be 1-64 characters of A-Z, a-z, 0-9, _ and -")
    webhook_url = _optional_str(payload, "webhook_url", 2048)
    if webhook_url is not None and not is_http_url(webhook_url):
        raise bad("webhook_url", "must be an absolute http(s) URL")
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


async def load_parent(
    prp: RequestPath, config: Config, field: str = "from_status_url", archiver: Archiver | None = None
) -> dict[str, Any]:
    """The status document a new request chains from (from the disk, else from the archive tier), read
    within the bounds that keep parsing it cheap (HTTPError when it is on another node, expired, missing,
    too large or not a status document). Another node's parent is read from the archive tier once it is
    archived (several hosts sharing one bucket); until then it belongs to its node (400 `wrong_node`)."""
    foreign = prp.node_id != config.server_node_id
    if foreign and (archiver is None or await tiers.size(archiver, prp, "json") is None):
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
        try:
            if foreign:
                raise FileNotFoundError(prp.rel("json"))
            raw = await asyncio.to_thread(read_under, config.data_dir, prp.rel("json"), limit)
        except FileNotFoundError:
            raw = await _archived_parent(archiver, prp, limit)
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
    if more_containers(raw, config.server_max_conversation_containers):
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


async def _archived_parent(archiver: Archiver | None, prp: RequestPath, limit: int) -> bytes:
    """A parent's status document that is only in the archive tier (FileNotFoundError when it is not)."""
    size = await tiers.size(archiver, prp, "json")
    if size is None or archiver is None:
        raise FileNotFoundError(prp.rel("json"))
    if size > limit:
        raise FileTooLarge(prp.rel("json"))
    return await tiers.read(archiver, prp.rel("json"))


def check_parent_state(parent: dict[str, Any]) -> None:
    """A request chains only from a parent that ended well."""
    state = parent.get("status")
    if state not in status.TERMINAL:
        raise HTTPError(409, "parent_running", "the parent request is still running: wait until its status is done")
    if state == "error":
        raise HTTPError(409, "parent_failed", "the parent request ended in error: chain from a request that is done")


async def resolve_parent(req: NewRequest, config: Config, archiver: Archiver | None = None) -> dict[str, Any]:
    """The parent status document of a chained request, after every check of the chaining rules."""
    assert req.from_status_url is not None
    prp = parse_status_url(req.from_status_url, config.public_url)
    if prp is None:
        raise HTTPError(
            400,
            "invalid_from_status_url",
            f"`from_status_url` must be a status_url (…/<id>.json) generated by this relay at {config.public_url}",
        )
    parent = await load_parent(prp, config, archiver=archiver)
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
