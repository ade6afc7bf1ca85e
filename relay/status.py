"""The status document (`<id>.json`): its shape, every change to it, and what clients see of it.

Pure data, no I/O and no HTTP. The API creates the document here, the job moves it along here, and
crash recovery finishes it with the same `finish` as a job does, so the wire format reads in one place:

    status            queued → streaming (stream) | processing (async) → done | error | stop (final)
    created_at        epoch seconds of the POST
    conversation_id   the parent's, else the request's own id
    README            one sentence on what this state means (README below)
    authorization     {"access"} (+ on disk, never shown, see `public_view`: the token hashes; for an
                      object of the OpenAI face its kind, its owner's hash and where its closing events
                      start. Flat, and in the document's first bytes: see `authorization_span`)
    endpoints         status_url, stream_events_url, stop_url (while running), response_raw_url (at the
                      end, when `.raw` was written), from_status_url (chained)
    request           endpoint, request_at (the POST), processed_at (upstream call started),
                      finished_at, request_time (the upstream call), total_time (from the POST)
    options           timeout, connect_timeout
    parameters        the request sent upstream: model, messages (the whole conversation), the rest
    response          status_code, headers and body (the assembled `chat.completion`, or the text so
                      far while streaming, or the upstream's error body)
    error             {code, message}, when status is error
"""

from __future__ import annotations

from typing import Any

import orjson

from .assemble import assistant_message
from .store import DONE_DATA as DONE

TERMINAL = frozenset({"done", "error", "stop"})  # the values a request ends in; never changed after

README = {
    "queued": "The request is queued and will start in a moment; this document updates as it runs.",
    "streaming": "The answer is streaming: open stream_events_url to receive it live; response.body here "
    "holds the text so far and is refreshed every second.",
    "processing": "The upstream is working on the answer; poll this status_url until status is done.",
    "done": "The answer is complete: response.body holds it.",
    "error": "The request failed: error.message says why, and response holds what the upstream sent.",
    "stop": "The request was stopped by its stop URL: response.body holds the text produced until then.",
}

# the README of the POST answer
STREAM_README = (
    "The `stream_events_url` endpoint below streams data sent by the ChatGPT API. Open it to receive incoming messages."
)
ASYNC_README = "The `status_url` endpoint below updates until the request is done. Poll it to get the result."

INTERRUPTED = ("interrupted", "the relay stopped (crash or kill) while this request was running")
STOP_EVENT = {"status": "stop", "message": "stopped by the stop URL"}


def queued(
    *,
    created_at: int,
    conversation_id: str,
    endpoint: str,
    authorization: dict[str, Any],
    endpoints: dict[str, str],
    timeout: float,
    connect_timeout: float,
    parameters: dict[str, Any],
) -> dict[str, Any]:
    """The document of a request just accepted. `parameters` is embedded as its JSON, encoded once:
    every later write of the document reuses those bytes instead of encoding the history again."""
    return {
        "status": "queued",
        "created_at": created_at,
        "conversation_id": conversation_id,
        "README": README["queued"],
        "authorization": authorization,
        "endpoints": endpoints,
        "request": {
            "endpoint": endpoint,
            "request_at": created_at,
            "finished_at": 0,
            "processed_at": 0,
            "request_time": 0.0,
            "total_time": 0.0,
        },
        "options": {"timeout": timeout, "connect_timeout": connect_timeout},
        "parameters": orjson.Fragment(orjson.dumps(parameters)),
        "response": {},
    }


def chained(
    parent: dict[str, Any],
    messages: list[dict[str, Any]],
    model: str | None,
    access: str | None,
    conversation_id: str | None,
) -> tuple[list[dict[str, Any]], str | None, str | None, str | None]:
    """A turn continuing `parent`: its messages are the parent's, the parent's assistant message and
    the new ones; model, access and conversation id are the parent's unless given."""
    params = parent.get("parameters") or {}
    history = params.get("messages") or []
    history = history if isinstance(history, list) else []
    reply = assistant_message((parent.get("response") or {}).get("body"))
    messages = history + ([reply] if reply else []) + messages
    parent_model = params.get("model")
    model = model or (parent_model if isinstance(parent_model, str) else None)
    access = access or (parent.get("authorization") or {}).get("access")
    conversation_id = conversation_id or parent.get("conversation_id")
    return messages, model, access, conversation_id


def history_length(parent: dict[str, Any]) -> int:
    """How many messages a turn continuing `parent` starts with (its history and its reply)."""
    history = (parent.get("parameters") or {}).get("messages")
    return (len(history) if isinstance(history, list) else 0) + 1


def set_status(doc: dict[str, Any], status: str) -> None:
    doc["status"] = status
    doc["README"] = README[status]


def started(doc: dict[str, Any], stream: bool, now: float) -> None:
    """The upstream call begins."""
    set_status(doc, "streaming" if stream else "processing")
    doc["request"]["processed_at"] = int(now)


def response_body(doc: dict[str, Any], body: Any) -> None:
    """The answer so far (streaming), or the final one."""
    doc.setdefault("response", {})["body"] = body


def finish(
    doc: dict[str, Any],
    status: str,
    error: tuple[str, str] | None,
    *,
    now: float,
    since: float,
    processed_at: float | None = None,
    raw_url: str | None = None,
) -> None:
    """The terminal document, for a job and for crash recovery alike. `since` is the POST's time
    (total_time counts from it); `processed_at` when the upstream call started (else the document's)."""
    set_status(doc, status)
    if error:
        doc["error"] = {"code": error[0], "message": error[1]}
    req = doc.setdefault("request", {})
    req["finished_at"] = int(now)
    started_at = processed_at if processed_at is not None else float(req.get("processed_at") or 0)
    if started_at:
        req["processed_at"] = int(started_at)
        req["request_time"] = round(now - started_at, 3)
    req["total_time"] = round(now - since, 3)
    endpoints = doc.setdefault("endpoints", {})
    endpoints.pop("stop_url", None)
    if raw_url:
        endpoints["response_raw_url"] = raw_url


def encodable(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` without the top-level members that cannot be encoded (the last resort of an ending that failed
    to encode: a bug, never a reason to leave a request unended)."""
    kept: dict[str, Any] = {}
    for key, value in doc.items():
        try:
            orjson.dumps(value)
        except (TypeError, ValueError):
            continue
        kept[str(key)] = value
    return kept


def raw_written(doc: dict[str, Any], url: str) -> None:
    """`.raw` is on disk: the document links it."""
    doc.setdefault("endpoints", {})["response_raw_url"] = url


def public_view(doc: dict[str, Any]) -> dict[str, Any]:
    """The status document as clients see it: without the stored token hashes."""
    auth = doc.get("authorization") or {}
    if set(auth) <= {"access"}:
        return doc
    return {**doc, "authorization": _shown(auth)}


def _shown(auth: dict[str, Any]) -> dict[str, Any]:
    """What clients see of a stored authorization object."""
    return {"access": auth.get("access", "private")}


AUTH_KEY = b'"authorization":'


def authorization_span(data: bytes) -> tuple[int, int, dict[str, Any]] | None:
    """Where the top-level `authorization` object of an encoded status document is, and what it holds,
    without parsing the rest (which holds the whole conversation and answer). The keys before it are
    scalars without braces or brackets (the order of `queued`), and its value is flat; both are checked,
    so any other document gives None (parse it whole then)."""
    i = data.find(AUTH_KEY)
    if i <= 0 or data[:1] != b"{" or data.count(b"{", 0, i) != 1 or data.find(b"[", 0, i) != -1:
        return None
    start = i + len(AUTH_KEY)
    end = data.find(b"}", start) + 1
    if data[start : start + 1] != b"{" or end == 0:
        return None
    try:
        value = orjson.loads(data[start:end])
    except orjson.JSONDecodeError:
        return None
    return (start, end, value) if isinstance(value, dict) else None


def public_head(data: bytes) -> tuple[bytes, int] | None:
    """The first bytes of an encoded status document as clients see them, up to and with its
    authorization object (see `authorization_span`; None when it cannot be found there), and where in
    `data` the rest of the document, unchanged, resumes."""
    span = authorization_span(data)
    if span is None:
        return None
    start, end, auth = span
    return data[:start] + orjson.dumps(_shown(auth)), end


def public_bytes(data: bytes) -> bytes:
    """`public_view` of an encoded status document, as bytes: the authorization object replaced in place
    when it can be found (`public_head`), else the document parsed, viewed and encoded."""
    head = public_head(data)
    if head is None:
        return orjson.dumps(public_view(orjson.loads(data)))
    shown, end = head
    return shown + data[end:]


def ending_events(status: str, error: tuple[str, str] | None) -> list[tuple[bytes, str | None]]:
    """The last events of a stream's log for an ending: `event: error` / `event: stop`, then `[DONE]`."""
    events: list[tuple[bytes, str | None]] = []
    if error:
        events.append((orjson.dumps({"error": {"code": error[0], "message": error[1]}}), "error"))
    elif status == "stop":
        events.append((orjson.dumps(STOP_EVENT), "stop"))
    events.append((DONE, None))
    return events


def stated_ending(events: list[tuple[str | None, bytes]]) -> tuple[str, tuple[str, str] | None] | None:
    """The ending a log already states, when it ends with `[DONE]` (the inverse of `ending_events`)."""
    if not events or events[-1][1] != DONE:
        return None
    if len(events) >= 2 and events[-2][0] == "stop":
        return "stop", None
    if len(events) >= 2 and events[-2][0] == "error":
        try:
            err = orjson.loads(events[-2][1]).get("error")
            return "error", (str(err["code"]), str(err["message"]))
        except (ValueError, AttributeError, KeyError, TypeError):
            return "error", INTERRUPTED
    return "done", None
