"""A development upstream: an OpenAI-compatible server that echoes, and misbehaves on request.

`POST /v1/chat/completions` answers with the last user message echoed back, word by word, as real
`chat.completion.chunk` events (or one `chat.completion` when `stream` is false). It honours `n`,
`max_tokens` / `max_completion_tokens` and `stream_options.include_usage`.

Behaviour is chosen per request, either by the model name (`echo:pace=0.05,fail=503`) or by a `dev`
object in the body (`"dev": {"pace": 0.05}`), which the relay forwards untouched:

| option        | effect                                                                  |
|---------------|-------------------------------------------------------------------------|
| header_delay  | seconds to wait before sending the response headers (first byte)        |
| delay         | seconds to wait after the headers, before the first chunk               |
| pace          | seconds between chunks                                                  |
| fail          | answer with this HTTP status and an OpenAI-style error body             |
| hang          | never answer (1), or hang after this many chunks (n > 1 means after n-1)|
| drop_after    | close the connection abruptly after this many content chunks            |
| malformed_after | send a chunk that is not JSON after this many content chunks          |
| error_after   | send an OpenAI-style `{"error": …}` event after this many chunks        |
| chunks        | emit exactly this many content chunks (cycling the words)               |
| text          | echo this text instead of the last user message                         |
| tool_call     | answer with a tool call (also when `tools` are offered): to the function|
|               | `tool_choice` names, else the first, arguments from its JSON Schema    |
| no_done       | end the stream without `data: [DONE]`                                   |
| json_instead  | answer a streaming request with a plain `chat.completion` JSON body     |
| stamp         | add `x_seq` (0, 1, …) and `x_sent` (CLOCK_MONOTONIC) to content chunks  |
| quirks        | model `quirks:<name>` only: replay `relay/quirks/<name>.sse` verbatim   |
|               | (a stream request; 404 listing the known names when there is no such   |
|               | file), written event by event with `pace` seconds between the writes   |

Hostile modes, for the relay's own tests of what an upstream may send it:

| option        | effect                                                                  |
|---------------|-------------------------------------------------------------------------|
| huge_event    | one content event of this many bytes (sent in 64 KiB writes)            |
| endless_line  | one `data:` line of this many bytes that never ends                     |
| deep          | a chunk whose `usage` nests this many arrays (a non-stream answer too)  |
| deep_logprobs | a chunk whose choice `logprobs` nests this many objects                 |
| burst         | this many tiny content events in a single write                         |
| never_finish  | the first chunk, then half an event, then silence                       |
| fail_bytes    | with `fail`: an error body of this many bytes                           |

The quirks are a provider conformance corpus: each file is the body of a streamed answer as one
provider shapes it (Azure's filter annotations, Gemini's index-less tool calls, DeepSeek's keep-alive
comments, CRLF framing, …), in invented words; `tests/corpus/<name>.json` says what the relay must
make of it. `quirks:` takes no other options in the name: `pace` and `delay` come from `dev`.

`GET /dev/stats` reports `open` (requests being answered right now) and `total`; `POST /dev/reset`
zeroes them. When started with a required key, any other `Authorization` is answered with 401.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import math
import re
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

WORD_RE = re.compile(r"\S+\s*|\s+")
QUIRKS_DIR = Path(__file__).resolve().parent / "quirks"
# The end of an event (or comment): a line end followed by an empty line, with any of the three line
# ends SSE allows (CRLF, lone CR, LF).
EVENT_END_RE = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
Doc = dict[str, Any]
Pieces = list[tuple[list[str], bool]]  # each choice's words, and whether max_tokens cut them


def quirk_names() -> list[str]:
    """The fixtures `quirks:<name>` can replay."""
    return sorted(p.stem for p in QUIRKS_DIR.glob("*.sse"))


def quirk_parts(data: bytes) -> list[bytes]:
    """A fixture's bytes cut after each event (at every blank line), so it goes out in several writes;
    joined, the parts are the fixture unchanged."""
    parts, start = [], 0
    for match in EVENT_END_RE.finditer(data):
        parts.append(data[start : match.end()])
        start = match.end()
    if start < len(data):
        parts.append(data[start:])  # a last event that never ends (a cut-off body)
    return parts


def _options(body: dict[str, Any]) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    model = body.get("model")
    if isinstance(model, str) and model.startswith("quirks:"):
        opts["quirks"] = model.split(":", 1)[1]  # a fixture name, never split into options
    elif isinstance(model, str) and ":" in model:
        for part in model.split(":", 1)[1].split(","):
            key, _, value = part.partition("=")
            if key:
                try:
                    opts[key.strip()] = float(value) if value else 1.0
                except ValueError:
                    opts[key.strip()] = value
    dev = body.get("dev")
    if isinstance(dev, dict):
        opts.update(dev)
    return opts


def _last_user_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _pieces(text: str, chunks: int | None, limit: int | None) -> tuple[list[str], bool]:
    words = WORD_RE.findall(text) or ["(empty)"]
    if chunks:
        words = list(itertools.islice(itertools.cycle(words), chunks))
    truncated = limit is not None and len(words) > limit
    return (words[:limit] if truncated else words), truncated


class DevUpstream:
    """The server's state: counters, and the key it requires (if any)."""

    def __init__(self, required_key: str | None = None, default_pace: float = 0.0) -> None:
        self.required_key = required_key
        self.default_pace = default_pace  # seconds between chunks when the request sets no pace
        self.open = 0
        self.total = 0
        self.last_body: dict[str, Any] | None = None
        self.last_headers: CIMultiDict[str] = CIMultiDict()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/dev/stats", self.stats)
        app.router.add_post("/dev/reset", self.reset)
        return app

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"open": self.open, "total": self.total})

    async def reset(self, request: web.Request) -> web.Response:
        self.total = 0
        return web.json_response({"open": self.open, "total": self.total})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "echo", "object": "model", "owned_by": "dev"}]})

    @staticmethod
    def _error(status: int, message: str, kind: str = "dev_error") -> web.Response:
        body = {"error": {"message": message, "type": kind, "param": None, "code": str(status)}}
        return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self.open += 1
        self.total += 1
        try:
            return await self._completions(request)
        finally:
            self.open -= 1

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        if self.required_key is not None and not hmac.compare_digest(
            request.headers.get("Authorization", "").encode("utf-8", "surrogateescape"),
            f"Bearer {self.required_key}".encode(),
        ):  # (in constant time, as every key the relay compares; tests/test_mutation_gaps.py)
            return self._error(401, "Incorrect API key provided.", "invalid_request_error")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self._error(400, "body is not JSON", "invalid_request_error")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return self._error(400, "`messages` is required", "invalid_request_error")
        self.last_body = body
        self.last_headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() != "authorization")
        opts = _options(body)
        if opts.get("header_delay"):
            await asyncio.sleep(float(opts["header_delay"]))
        if opts.get("hang") == 1 or opts.get("hang") is True:
            await asyncio.sleep(3600)
        if opts.get("fail") and opts.get("fail_bytes"):
            return await _huge_error(request, int(opts["fail"]), int(opts["fail_bytes"]))
        if opts.get("fail"):
            return self._error(int(opts["fail"]), f"dev upstream failure {int(opts['fail'])} as requested")
        if "quirks" in opts:
            return await self._quirk(request, body, opts)
        n = body.get("n") or 1
        if not isinstance(n, int) or not 1 <= n <= 16:
            return self._error(400, "`n` must be between 1 and 16", "invalid_request_error")
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        limit = limit if isinstance(limit, int) and limit > 0 else None
        chunks = int(opts["chunks"]) if opts.get("chunks") else None
        last = body["messages"][-1] if body["messages"] and isinstance(body["messages"][-1], dict) else {}
        base_text = str(opts["text"]) if opts.get("text") else _last_user_text(body["messages"])
        if last.get("role") == "tool" and not opts.get("text"):
            base_text = f"the tool said: {last.get('content')}"  # the second half of a function-call round trip
        pieces = [_pieces(base_text if i == 0 else f"({i}) {base_text}", chunks, limit) for i in range(n)]
        meta = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()),
            "model": str(body.get("model") or "echo").split(":", 1)[0],
            "system_fingerprint": "fp_dev",
        }
        prompt = sum(len(_last_user_text([m]).split()) for m in body["messages"])
        completion = sum(len(p[0]) for p in pieces)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        tool = bool(opts.get("tool_call")) or (_offered(body) is not None and last.get("role") != "tool")
        if not body.get("stream") or opts.get("json_instead"):
            choices = []
            for i, (words, truncated) in enumerate(pieces):
                said = {"content": None, "tool_calls": [_tool_call(i, body)]} if tool else {"content": "".join(words)}
                finish = "tool_calls" if tool else ("length" if truncated else "stop")
                message = {"role": "assistant", **said}
                choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": finish})
            doc = {**meta, "object": "chat.completion", "choices": choices, "usage": usage}
            if opts.get("deep"):
                doc["usage"] = _nested(int(opts["deep"]))
            if opts.get("delay"):
                await asyncio.sleep(float(opts["delay"]))
            return web.Response(body=orjson.dumps(doc), content_type="application/json")
        return await self._stream(request, body, opts, meta, pieces, usage, tool)

    async def _quirk(self, request: web.Request, body: dict[str, Any], opts: dict[str, Any]) -> web.StreamResponse:
        """Replay `relay/quirks/<name>.sse` byte for byte as the body of a 200 event stream, an event a
        write, `pace` seconds apart."""
        name = str(opts["quirks"])
        known = quirk_names()
        if name not in known:  # only names of files in QUIRKS_DIR: no path is ever built from the request
            shown = name if len(name) <= 80 else name[:80] + "…"
            return self._error(404, f"no quirk named {shown!r}; known: {', '.join(known)}", "not_found_error")
        if not body.get("stream"):
            message = 'a quirks: model replays a streamed answer: send "stream": true'
            return self._error(400, message, "invalid_request_error")
        parts = quirk_parts((QUIRKS_DIR / f"{name}.sse").read_bytes())
        pace = float(opts["pace"]) if "pace" in opts else self.default_pace
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        if opts.get("delay"):
            await asyncio.sleep(float(opts["delay"]))
        for i, part in enumerate(parts):
            if i and pace:
                await asyncio.sleep(pace)
            await resp.write(part)
        await resp.write_eof()
        return resp

    async def _stream(
        self, request: web.Request, body: Doc, opts: Doc, meta: Doc, pieces: Pieces, usage: Doc, tool: bool
    ) -> web.StreamResponse:
        """A streamed answer: the role chunk, the content (or tool call) chunks, the finish chunks, the
        usage chunk when asked for, `[DONE]` — unless an option misbehaves on the way."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        if any(opts.get(k) for k in HOSTILE):
            await _hostile(resp, opts, meta)
            return resp
        if opts.get("delay"):
            await asyncio.sleep(float(opts["delay"]))
        out = _Writer(resp, meta)
        role = {"role": "assistant", "content": ""}
        await out.chunk(
            [{"index": i, "delta": role, "logprobs": None, "finish_reason": None} for i in range(len(pieces))]
        )
        if tool:
            await _tool_call_chunks(out, body, len(pieces))
        else:
            pace = float(opts["pace"]) if "pace" in opts else self.default_pace
            if not await _word_chunks(out, request, opts, pieces, pace):
                return resp  # it misbehaved as asked: the stream is over
        for i, (_, truncated) in enumerate(pieces):
            finish = "tool_calls" if tool else ("length" if truncated else "stop")
            await out.chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}])
        stream_options = body.get("stream_options") or {}
        if isinstance(stream_options, dict) and stream_options.get("include_usage"):
            await out.chunk([], {"usage": usage})
        if not opts.get("no_done"):
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


class _Writer:
    """Writes `chat.completion.chunk` events of one answer."""

    def __init__(self, resp: web.StreamResponse, meta: dict[str, Any]) -> None:
        self.resp = resp
        self.meta = meta

    async def chunk(self, choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
        doc = {**self.meta, "object": "chat.completion.chunk", "choices": choices, **(extra or {})}
        await self.resp.write(b"data: " + orjson.dumps(doc) + b"\n\n")


async def _tool_call_chunks(out: _Writer, body: Doc, n: int) -> None:
    """Each choice calls the tool: the call's id and name, then its arguments 8 characters at a time."""
    for i in range(n):
        call = _tool_call(i, body)
        args = call["function"]["arguments"]
        first = {"index": 0, "id": call["id"], "type": "function", "function": {**call["function"], "arguments": ""}}
        await out.chunk([{"index": i, "delta": {"tool_calls": [first]}, "finish_reason": None}])
        for j in range(0, len(args), 8):
            part = {"index": 0, "function": {"arguments": args[j : j + 8]}}
            await out.chunk([{"index": i, "delta": {"tool_calls": [part]}, "finish_reason": None}])


async def _word_chunks(out: _Writer, request: web.Request, opts: Doc, pieces: Pieces, pace: float) -> bool:
    """The words of every choice, interleaved, on a fixed schedule. False when an option ended the stream
    early (drop_after, malformed_after, error_after)."""
    sent = 0
    started = 0.0
    for step in range(max(len(p[0]) for p in pieces)):
        for i, (words, _) in enumerate(pieces):
            if step >= len(words):
                continue
            if not await _misbehave(out.resp, request, opts, sent):
                return False
            if pace:  # on a fixed schedule, so that pacing does not drift with load
                started = started or time.monotonic()
                await asyncio.sleep(max(0.0, started + (sent + 1) * pace - time.monotonic()))
            stamp = {"x_seq": sent, "x_sent": time.monotonic()} if opts.get("stamp") else None
            delta = {"content": words[step]}
            await out.chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}], stamp)
            sent += 1
    return True


async def _misbehave(resp: web.StreamResponse, request: web.Request, opts: dict[str, Any], sent: int) -> bool:
    """Before content chunk number `sent`: drop, corrupt, fail or hang when asked. False when the stream ended."""
    if opts.get("drop_after") is not None and sent >= int(opts["drop_after"]):
        assert request.transport is not None
        request.transport.close()
        return False
    if opts.get("malformed_after") is not None and sent >= int(opts["malformed_after"]):
        await resp.write(b"data: {this is not json\n\n")
        await resp.write_eof()
        return False
    if opts.get("error_after") is not None and sent >= int(opts["error_after"]):
        err = {"error": {"message": "dev upstream error mid-stream", "type": "server_error", "code": None}}
        await resp.write(b"data: " + orjson.dumps(err) + b"\n\n")
        await resp.write_eof()
        return False
    hang = opts.get("hang")
    if hang and hang != 1 and hang is not True and sent >= int(hang) - 1:
        await asyncio.sleep(3600)
    return True


HOSTILE = ("huge_event", "endless_line", "deep", "deep_logprobs", "burst", "never_finish")


def _nested(depth: int, key: str | None = None) -> orjson.Fragment:
    """JSON of `depth` nested arrays (or objects with one `key`), as text: orjson refuses to encode
    more than 254 levels, and a hostile upstream is not bound by that."""
    if key:
        return orjson.Fragment(f'{{"{key}":' * depth + "1" + "}" * depth)
    return orjson.Fragment("[" * depth + "1" + "]" * depth)


async def _hostile(resp: web.StreamResponse, opts: dict[str, Any], meta: dict[str, Any]) -> None:
    """The hostile stream modes (see the module docstring); each ends with a proper finish when it ends."""

    def chunk(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> bytes:
        return b"data: " + orjson.dumps(
            {**meta, "object": "chat.completion.chunk", "choices": choices, **(extra or {})}
        )

    def content(text: str) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": {"content": text}, "finish_reason": None}]

    finish = chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]) + b"\n\ndata: [DONE]\n\n"
    block = b"x" * 65536
    if opts.get("huge_event") or opts.get("endless_line"):
        size = int(opts.get("huge_event") or opts["endless_line"])
        head = chunk(content("")).rsplit(b'""', 1)
        await resp.write(head[0] + b'"')
        for _ in range(size // len(block)):
            await resp.write(block)
        if opts.get("endless_line"):
            return  # the line never ends: the body ends without a line break
        await resp.write(b'"' + head[1] + b"\n\n" + finish)
    elif opts.get("deep"):
        await resp.write(chunk(content("deep")) + b"\n\n" + chunk([], {"usage": _nested(int(opts["deep"]))}))
        await resp.write(b"\n\n" + finish)
    elif opts.get("deep_logprobs"):
        logprobs = _nested(int(opts["deep_logprobs"]), "content")
        event = [{"index": 0, "delta": {"content": "x"}, "logprobs": logprobs, "finish_reason": None}]
        await resp.write(chunk(event) + b"\n\n" + finish)
    elif opts.get("burst"):
        one = chunk(content("a")) + b"\n\n"
        await resp.write(one * int(opts["burst"]) + finish)
    elif opts.get("never_finish"):
        await resp.write(chunk(content("started")) + b'\n\ndata: {"id": "')
        await asyncio.sleep(3600)


async def _huge_error(request: web.Request, status: int, size: int) -> web.StreamResponse:
    """An error answer with a body of `size` bytes, sent in 64 KiB writes."""
    resp = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
    resp.content_length = size
    await resp.prepare(request)
    head = b'{"error": {"message": "huge error body", "type": "dev_error", "pad": "'
    await resp.write(head)
    left = size - len(head) - 3
    block = b"x" * 65536
    while left > 0:
        await resp.write(block[:left])
        left -= len(block)
    await resp.write(b'"}}')
    return resp


def _offered(body: Doc) -> Doc | None:
    """The function to call: the one `tool_choice` names, else the first offered (None: "none", or none)."""
    tools = body.get("tools") if isinstance(body.get("tools"), list) else []
    fns = [f for t in tools if isinstance(t, dict) and isinstance(f := t.get("function"), dict) and "name" in f]
    choice = body.get("tool_choice")
    pick = choice.get("function", choice) if isinstance(choice, dict) else {}  # chat's shape, or Responses'
    named = pick.get("name") if isinstance(pick, dict) else None
    return None if choice == "none" else next((f for f in fns if f["name"] == named), fns[0] if fns else None)


FORMATS = {"date": "2025-01-01", "date-time": "2025-01-01T00:00:00Z", "email": "dev@x.test", "uri": "https://x.test/"}


def _value(schema: Any, text: str, root: Any, left: list[int], depth: int = 0) -> Any:
    """A value `schema` accepts: const, default, enum[0], examples[0], the first of anyOf/oneOf/allOf, a local
    $ref's, else by type (all properties, `text` in free strings); 8 levels and `left[0]` values at most."""
    left[0] -= 1
    if isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and left[0] > 0:
        target = root
        for part in filter(None, schema["$ref"].removeprefix("#").split("/")):
            target = target.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(target, dict) else None
        return _value(target, text, root, left, depth)
    if not isinstance(schema, dict):
        return text
    for key in ("const", "default", "enum", "examples", "anyOf", "oneOf", "allOf"):
        if key in ("const", "default") and key in schema:
            return schema[key]
        if isinstance(schema.get(key), list) and schema[key]:
            return _value(schema[key][0], text, root, left, depth) if key.endswith("Of") else schema[key][0]
    kind = schema.get("type")
    kind = next((k for k in kind if k != "null"), "null") if isinstance(kind, list) else kind
    if kind == "object" or (kind is None and isinstance(schema.get("properties"), dict)):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) and depth < 8 else {}
        return {k: _value(sub, text, root, left, depth + 1) for k, sub in props.items() if left[0] > 0}
    num = {k: v for k, v in schema.items() if k.endswith(("imum", "Length", "Items")) and type(v) in (int, float)}
    if kind == "array":
        count = min(int(num.get("minItems", 1)), int(num.get("maxItems", 8)), 8 if depth < 8 else 0)
        return [_value(schema.get("items"), text, root, left, depth + 1) for _ in range(count) if left[0] > 0]
    if kind in ("integer", "number"):
        value = min(num.get("minimum", num.get("exclusiveMinimum", 0) + 1), num.get("maximum", math.inf))
        return math.ceil(value) if kind == "integer" else value
    if kind in ("boolean", "null"):
        return True if kind == "boolean" else None
    value = FORMATS.get(str(schema.get("format")), text).ljust(min(int(num.get("minLength", 0)), 256), "x")
    return value[: int(num.get("maxLength", len(value)))]


def _tool_call(i: int, body: Doc) -> Doc:
    """Choice `i`'s call of the offered function (`get_weather` of the user's text when none is offered)."""
    text = _last_user_text(body["messages"])[:40] or "echo"
    fn = _offered(body)
    params = (fn.get("parameters") or {"type": "object"}) if fn else None
    args = _value(params, text, params, [200]) if fn else {"city": text, "unit": "celsius"}
    call = {"name": str(fn["name"]) if fn else "get_weather", "arguments": orjson.dumps(args).decode()}
    return {"id": f"call_dev_{i}", "type": "function", "function": call}


async def start(
    host: str = "127.0.0.1", port: int = 0, required_key: str | None = None, default_pace: float = 0.0
) -> tuple[web.AppRunner, DevUpstream, int]:
    """Start the dev upstream on a real socket; returns the runner (to clean up), the state and the port."""
    dev = DevUpstream(required_key, default_pace)
    runner = web.AppRunner(dev.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
    actual = sockets[0].getsockname()[1] if sockets else port
    return runner, dev, actual
