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

import asyncio
import bisect
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from .. import api, ledger, status
from ..assemble import SSEParser
from ..config import Config
from ..http import HTTPError
from ..jobs import Events, Job, JobManager
from ..keys import CONFIG, MANAGER
from ..paths import RequestPath
from ..serve import follow, open_file, send_bytes
from ..status import ending_events
from ..upstream import UpstreamError, check_encoding, idle_bounded
from .common import (
    ANSWERS,
    CHAT,
    Caller,
    Stored,
    answering,
    caller,
    ended,
    find,
    in_background,
    json_answer,
    object_id,
    off_loop,
    owned,
    page,
    paging,
    read_payload,
    remove_files,
    stored_answer,
)
from .errors import OpenAIError, not_found
from .translate import check_metadata

log = logging.getLogger("relay.openai")

ENDPOINT = "/v1/chat/completions"
NOT_FORWARDED = {"store", "metadata", "stream", "stream_options"}
MODELS_LIMIT = 1024 * 1024  # bytes of the upstream's model list that are read


class ChatIndex:
    """The stored chat completions of this node, for listing (see the module's docstring).

    Besides the entries by id, each owner's keys `(created, id)` are kept sorted, so a list call finds
    its place (`after`) by bisection and reads only that caller's entries, in order, until its page is
    full; a scan that filters many out gives the loop back every SCAN_STEP entries."""

    SCAN_STEP = 2048

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "openai" / "chat-completions.jsonl"
        self.entries: dict[str, dict[str, Any]] = {}  # id → {id, created, model, owner, metadata}
        self._owned: dict[str, list[tuple[float, str]]] = {}  # owner → sorted (created, id)
        self._lock = asyncio.Lock()

    def load(self, max_age_days: float, now: float | None = None) -> int:
        """In a worker thread at start: the live entries; the file rewritten with only those."""
        cutoff = (time.time() if now is None else now) - max_age_days * 86400
        entries: dict[str, dict[str, Any]] = {}
        try:
            with ledger.open_regular(self.path) as fh:
                raw = fh.read()
        except FileNotFoundError:
            return 0
        lines = 0
        for line in raw.splitlines():
            lines += 1
            try:
                _apply(entries, orjson.loads(line))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a torn last line after a crash
        self.entries = {k: v for k, v in entries.items() if v["created"] >= cutoff}
        owned: dict[str, list[tuple[float, str]]] = {}
        for e in self.entries.values():
            owned.setdefault(e["owner"], []).append((e["created"], e["id"]))
        for keys in owned.values():
            keys.sort()
        self._owned = owned
        if lines > len(self.entries):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_bytes(b"".join(orjson.dumps({"op": "add", **e}) + b"\n" for e in self.entries.values()))
            os.replace(tmp, self.path)
        return len(self.entries)

    def _append(self, op: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o644)
        try:
            os.write(fd, orjson.dumps(op) + b"\n")
        finally:
            os.close(fd)

    def record(self, op: dict[str, Any]) -> None:
        """Apply `op` in memory at once, and append it to the file in the storage pool."""
        old = self.entries.get(op["id"])
        _apply(self.entries, op)
        new = self.entries.get(op["id"])
        if old is not None and new is not old:
            self._unlink(old)
        if new is not None and new is not old:
            bisect.insort(self._owned.setdefault(new["owner"], []), (new["created"], new["id"]))
        in_background(self._write(op))

    def _unlink(self, entry: dict[str, Any]) -> None:
        keys = self._owned.get(entry["owner"])
        if keys is None:
            return
        key = (entry["created"], entry["id"])
        i = bisect.bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            del keys[i]
        if not keys:
            del self._owned[entry["owner"]]

    async def _write(self, op: dict[str, Any]) -> None:
        """One line, in the order the changes were made (one write at a time)."""
        try:
            async with self._lock:
                await asyncio.to_thread(self._append, op)
        except OSError as exc:
            log.error("cannot write the chat completion index: %s", exc.strerror)

    def _expire(self, owner: str, cutoff: float) -> None:
        """Forget the owner's entries older than `cutoff` (the oldest come first); their files are the
        janitor's, and the file's lines go at the next start's compaction."""
        keys = self._owned.get(owner)
        if not keys or keys[0][0] >= cutoff:
            return
        end = bisect.bisect_left(keys, (cutoff, ""))
        for _, cid in keys[:end]:
            self.entries.pop(cid, None)
        del keys[:end]
        if not keys:
            del self._owned[owner]

    async def listed(
        self, owner: str, *, model: str | None, metadata: dict[str, str], max_age_days: float,
        after: str | None, limit: int, descending: bool,
    ) -> tuple[list[str], bool]:  # fmt: skip
        """The owner's ids that pass the filters, oldest first (or newest first), starting after the id
        `after` (none when `after` is not one of the owner's); at most `limit`, and whether more follow."""
        self._expire(owner, time.time() - max_age_days * 86400)
        last: tuple[float, str] | None = None
        if after is not None:
            entry = self.entries.get(after)
            if entry is None or entry["owner"] != owner:
                return [], False
            last = (entry["created"], entry["id"])
        found: list[str] = []
        while True:
            keys = self._owned.get(owner, [])
            if descending:
                end = len(keys) if last is None else bisect.bisect_left(keys, last)
                step = keys[max(0, end - self.SCAN_STEP) : end][::-1]
            else:
                start = 0 if last is None else bisect.bisect_right(keys, last)
                step = keys[start : start + self.SCAN_STEP]
            for key in step:
                e = self.entries[key[1]]
                if (model is None or e["model"] == model) and all(
                    e["metadata"].get(k) == v for k, v in metadata.items()
                ):
                    if len(found) == limit:
                        return found, True
                    found.append(e["id"])
            if len(step) < self.SCAN_STEP:
                return found, False
            last = step[-1]
            await asyncio.sleep(0)  # the loop's turn; the keys may change meanwhile, so the place is found again


def _apply(entries: dict[str, dict[str, Any]], op: dict[str, Any]) -> None:
    """One line of the index (added, metadata replaced, deleted), read back or made now."""
    kind, cid = op["op"], op["id"]
    if kind == "add":
        if not isinstance(op["created"], (int, float)):
            raise TypeError("created")
        entries[cid] = {k: op[k] for k in ("id", "created", "model", "owner", "metadata")}
    elif kind == "metadata" and cid in entries:
        entries[cid]["metadata"] = op["metadata"]
    elif kind == "delete":
        entries.pop(cid, None)


INDEX: web.AppKey[ChatIndex] = web.AppKey("chat_index")


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


def _upstream_error(exc: UpstreamError) -> OpenAIError:
    code = exc.status_code if exc.status_code and 400 <= exc.status_code < 600 else 502
    return OpenAIError(code, exc.message, code=exc.code)


def _check(payload: dict[str, Any], config: Config) -> tuple[bool, bool, dict[str, str]]:
    try:
        payload["messages"] = api.parse_messages(payload.get("messages"), config)
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
            return await _pass_through(request, payload, who)
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
              log_format=ChatFormat(cid, _usage_asked(payload)) if stream else None)  # fmt: skip
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


def _usage_asked(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def completion_object(doc: dict[str, Any], metadata: dict[str, str] | None = None) -> dict[str, Any]:
    body = dict((doc.get("response") or {}).get("body") or {})
    body["id"] = doc["openai"]["id"]
    body["metadata"] = doc["openai"].get("metadata", {}) if metadata is None else metadata
    return body


USAGE_RE = re.compile(rb'"usage"\s*:\s*(\{(?:[^{}]|\{[^{}]*\})*\})')
TAIL = 8192  # bytes of a passed-through answer kept to find its usage (the upstream puts it last)


class HiddenUsage:
    """A passed-through stream whose client did not ask for usage though the relay did (so that the
    usage ledger has the upstream's own count, not an estimate): the usage-only last chunk (no `choices`)
    is held back, as OpenAI would not have sent it; every other event goes through byte for byte. Events
    are passed on whole: the bytes after a block's last event boundary wait for the next block (a client
    cannot use half an event anyway), and what is left at the end goes out as it is."""

    BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
    SMALL = 64 * 1024  # a usage-only chunk is a few hundred bytes; larger events are never parsed

    def __init__(self) -> None:
        self.pending = bytearray()  # (appended to: an event of many blocks is not copied again per block)

    def feed(self, block: bytes) -> bytes:
        start = max(0, len(self.pending) - 3)  # only the new bytes are searched (a boundary may straddle)
        self.pending += block
        end = -1
        for m in self.BOUNDARY.finditer(self.pending, start):
            end = m.end()
        if end < 0:
            return b""
        ready = bytes(self.pending[:end])
        del self.pending[:end]
        if b'"usage"' not in ready:
            return ready
        kept, at = [], 0
        for m in self.BOUNDARY.finditer(ready):
            event = ready[at : m.end()]
            if not self._usage_only(event):
                kept.append(event)
            at = m.end()
        return b"".join(kept)

    def flush(self) -> bytes:
        rest = bytes(self.pending)
        self.pending.clear()
        return rest

    def _usage_only(self, event: bytes) -> bool:
        if len(event) > self.SMALL or b'"usage"' not in event:
            return False
        parser = SSEParser(self.SMALL)  # (a whole event, at most SMALL bytes)
        datas = parser.feed(event) + parser.flush()
        if len(datas) != 1:
            return False
        try:
            chunk = orjson.loads(datas[0])
        except orjson.JSONDecodeError:
            return False
        return isinstance(chunk, dict) and chunk.get("choices") == [] and isinstance(chunk.get("usage"), dict)


class Passage:
    """What the usage ledger needs of a passed-through completion, gathered as its bytes go by: the tail
    (where the upstream's `usage` is, when it reports one) and the number of stream events (about one
    token each, for an estimate when it does not)."""

    def __init__(self) -> None:
        self.started = time.time()
        self.first: float | None = None
        self.tail = b""
        self.events = 0
        self.outcome, self.code = "done", None

    def saw(self, block: bytes) -> None:
        if self.first is None:
            self.first = time.time()
        self.events += block.count(b"data: ") - block.count(b"data: [DONE]")
        self.tail = (self.tail + block)[-TAIL:]

    def usage(self) -> dict[str, Any] | None:
        found = None
        for m in USAGE_RE.finditer(self.tail):
            found = m.group(1)
        try:
            usage = orjson.loads(found) if found else None
        except orjson.JSONDecodeError:
            return None
        return usage if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int) else None

    def line(self, config: Config, who: Caller, body: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        doc: dict[str, Any] = {
            "status": self.outcome,
            "error": {"code": self.code} if self.code else None,
            "authorization": {"access": "private"},  # (nothing of it is kept to be opened)
            "request": {"endpoint": ENDPOINT, "total_time": round(now - self.started, 3)},
            "response": {"body": {"usage": self.usage()}},
        }
        ttft = self.first - self.started if self.first else None
        line = ledger.entry(doc, request_id=str(uuid.uuid4()), node=config.server_node_id, key=who.label, path="",
                            ttft=ttft, now=now, params=body)  # fmt: skip
        if line["estimated"]:  # no usage reported: the prompt from its text, the answer from its events
            line["completion_tokens"] = max(self.events - 2, 0)  # (less the role and finish chunks)
            line["total_tokens"] = line["prompt_tokens"] + line["completion_tokens"]
        return line


def _record(request: web.Request, who: Caller, body: dict[str, Any], passage: Passage) -> None:
    """The usage ledger's line of a passed-through completion (written in the background)."""
    config: Config = request.app[CONFIG]
    manager: JobManager = request.app[MANAGER]
    line = passage.line(config, who, body)

    async def write() -> None:
        try:
            await manager.on_storage(ledger.append, config.data_dir, line, config.storage_fsync)
        except (OSError, RuntimeError) as exc:
            log.error("cannot write a usage ledger line: %s", exc)
            return
        manager.counted(line)

    in_background(write())


async def _pass_through(request: web.Request, payload: dict[str, Any], who: Caller) -> web.StreamResponse:
    """An unstored chat completion: the upstream's answer as it comes. Nothing of it is written but its
    line in the usage ledger (tokens as the upstream reported them, else estimated)."""
    config: Config = request.app[CONFIG]
    manager: JobManager = request.app[MANAGER]
    api_key, organization = api.upstream_key(request, config)
    stream = payload.get("stream") is True
    asked = _usage_asked(payload)
    include_usage = asked or config.upstream_include_usage  # (the ledger wants the upstream's count)
    hidden = HiddenUsage() if stream and include_usage and not asked else None
    body = {k: v for k, v in payload.items() if k not in NOT_FORWARDED}
    body["model"] = body.get("model") or config.upstream_default_model
    limit = config.upstream_max_response_bytes
    passage = Passage()
    try:
        async with asyncio.timeout(config.upstream_max_timeout):
            async with manager.upstream.open(body, stream=stream, api_key=api_key, organization=organization,
                                             connect_timeout=5, include_usage=include_usage) as up:  # fmt: skip
                del api_key
                check_encoding(up.headers)
                headers = {"Content-Type": up.content_type or "application/json", "Cache-Control": "no-store"}
                if not stream:
                    data = bytearray()
                    async for block in idle_bounded(up.chunks, config.upstream_idle_timeout_seconds):
                        data += block
                        if len(data) > limit:
                            raise UpstreamError("upstream_response_too_large", "the upstream answer is too large")
                    passage.saw(bytes(data[-TAIL:]))
                    return await send_bytes(request, bytes(data), headers)
                resp = web.StreamResponse(headers={**headers, "X-Accel-Buffering": "no"})
                await resp.prepare(request)
                sent = 0
                try:
                    async for block in idle_bounded(up.chunks, config.upstream_idle_timeout_seconds):
                        sent += len(block)
                        if sent > limit:
                            passage.outcome, passage.code = "error", "upstream_response_too_large"
                            break  # (the client sees the stream end without [DONE])
                        passage.saw(block)
                        if hidden is not None:
                            block = hidden.feed(block)
                        if block:
                            async with asyncio.timeout(config.server_send_timeout_seconds):
                                await resp.write(block)
                    rest = hidden.flush() if hidden is not None else b""
                    async with asyncio.timeout(config.server_send_timeout_seconds):
                        if rest:
                            await resp.write(rest)
                        await resp.write_eof()
                except UpstreamError as exc:
                    passage.outcome, passage.code = "error", exc.code
                    if request.transport is not None:
                        request.transport.abort()
                except (ConnectionError, RuntimeError, TimeoutError):
                    passage.outcome = "stop"  # the client went away or stopped reading; so does the upstream
                    if request.transport is not None:
                        request.transport.abort()
                return resp
    except UpstreamError as exc:
        passage.outcome, passage.code = "error", exc.code
        raise _upstream_error(exc) from None
    except TimeoutError:
        passage.outcome, passage.code = "error", "timeout"
        raise OpenAIError(504, "the upstream did not answer within [upstream] max_timeout", code="timeout") from None
    finally:
        _record(request, who, body, passage)


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
    request.app[INDEX].record({"op": "delete", "id": cid})
    request.app[ANSWERS].drop(cid)
    await asyncio.to_thread(remove_files, request.app[CONFIG], stored.rp)
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
        raise _upstream_error(exc) from None
    return await send_bytes(request, data, {"Content-Type": "application/json"}, status_code)
