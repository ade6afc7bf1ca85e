"""Bad bytes in ordinary places: non-UTF-8 bytes, control bytes and over-long values in every header the
relay (or aiohttp below it) reads, in path segments and in query strings, on every route, sent over raw
sockets so that nothing on the way cleans them. None may get a 5xx; every request gets an answer; a JSON
route refuses in its face's JSON error shape; a bad credential gets the 401/403 a wrong one gets.

The routes come from the app's router, so a new route fails `test_every_route_is_fuzzed` until it is
given a target here.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import TEST_KEY, Relay, RelayFactory, msg

RELAY_KEY = "relay-key-bytes-0123456789"
ADMIN_KEY = "admin-key-bytes-0123456789"
ORIGIN = "https://app.example"

# Non-UTF-8 (a stray continuation byte, a lone lead byte, an encoded surrogate, an over-long slash, a code
# point above U+10FFFF), control bytes, and bytes that are fine: the values are spliced into good ones.
BAD = [b"\xff", b"\xc3", b"\xc3(", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf5\x80\x80\x80", b"\x01", b"\x7f", b"\x00",
       b"\x1b[2J", "é".encode(), b"\x80abc\xfe"]  # fmt: skip
LONG = [b"a" * 8000, b"\xff" * 8000, b"a" * 9000]  # under and over aiohttp's 8190-byte field limit
# What Hypothesis splices: any bytes but the ones that end a header line, and no leading or trailing
# blank (which the parser strips, making the value a good one again, unlike its `x`-spliced twin).
SPLICE = st.binary(min_size=1, max_size=24).filter(
    lambda b: b"\r" not in b and b"\n" not in b and b[:1] not in (b" ", b"\t") and b[-1:] not in (b" ", b"\t")
)


@dataclass
class Target:
    """A concrete request on one route: what a good client sends."""

    route: str  # "<METHOD> <canonical path>" as the router names it
    method: str
    path: str  # with a real id where the route has one
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    face: str = "native"  # native | openai | plain (not a JSON route: /metrics, /, /static/)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


async def send(relay: Relay, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> Answer:
    """One request on a fresh connection, as bytes; the answer read until the relay closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.config.server_port)
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    if body or method in (b"POST", b"DELETE"):
        lines.append(b"Content-Length: %d" % len(body))
    try:
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 15)
    finally:
        writer.close()
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", data)
    assert m, f"no answer to {method!r} {target[:200]!r}: {data[:200]!r}"
    head, _, rest = data.partition(b"\r\n\r\n")
    answer_headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        answer_headers[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
    if answer_headers.get("transfer-encoding") == "chunked":
        rest = dechunk(rest)
    return Answer(int(m[1]), answer_headers, rest)


def dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


def error_shape(answer: Answer, face: str) -> str | None:
    """What is wrong with an error answer's body for its face, else None."""
    if face == "plain" and "application/json" not in answer.headers.get("content-type", ""):
        return None
    try:
        doc = answer.json()
    except orjson.JSONDecodeError:
        return f"not JSON: {answer.body[:200]!r}"
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict) or not isinstance(err.get("message"), str) or not err["message"]:
        return f"no error object: {doc!r}"
    native = doc.get("status") == "error" and isinstance(err.get("code"), str)
    openai = set(err) == {"message", "type", "param", "code"} and isinstance(err["type"], str)
    if err.get("code") == "bad_request" and native:
        return None  # a malformed request, refused by the server below the app, before any route
    if face == "openai" and not openai:
        return f"not OpenAI's error shape: {doc!r}"
    if face == "native" and not native:
        return f"not the relay's error shape: {doc!r}"
    if face == "plain" and not (native or openai):
        return f"no error shape: {doc!r}"
    return None


@dataclass
class World:
    relay: Relay
    targets: list[Target]
    private_status: str  # path of a finished private request's status document
    private_stream: str
    bearer: str


async def world(make_relay: RelayFactory) -> World:
    """A relay with relay keys, admin keys and one allowed origin, and one of everything to ask for."""
    relay = await make_relay(auth_api_keys=[RELAY_KEY], auth_admin_keys=[ADMIN_KEY], server_cors_origins=[ORIGIN])
    key = {"Authorization": f"Bearer {RELAY_KEY}", "X-OpenAI-API-Key": TEST_KEY}
    base = relay.url
    private = await relay.start(msg("private words", access="private"), headers=key, key=None)
    bearer = private["authorization"]["bearer_token"]
    private_status = private["endpoints"]["status_url"][len(base) :]
    private_stream = private["endpoints"]["stream_events_url"][len(base) :]
    await relay.wait_status(base + private_status, headers={"Authorization": f"Bearer {bearer}"})
    public = await relay.start(msg("public words"), endpoint="/v1/async-chatgpt", headers=key, key=None)
    public_status = public["endpoints"]["status_url"][len(base) :]
    await relay.wait_status(base + public_status)

    async def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with relay.session.post(base + path, json=body, headers=key) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    resp_id = (await post("/v1/responses", {"model": "echo", "input": "hello"}))["id"]
    chat_id = (await post("/v1/chat/completions", {**msg("hello"), "store": True}))["id"]
    relay_auth = {"Authorization": f"Bearer {RELAY_KEY}", "X-OpenAI-API-Key": TEST_KEY,
                  "Content-Type": "application/json"}  # fmt: skip
    admin_auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    private_auth = {"Authorization": f"Bearer {bearer}"}
    body = orjson.dumps(msg("fuzz"))
    rbody = orjson.dumps({"model": "echo", "input": "fuzz"})
    stem = private_status[: -len(".json")]
    r, c = f"/v1/responses/{resp_id}", f"/v1/chat/completions/{chat_id}"
    # fmt: off
    targets = [
        Target("GET /metrics", "GET", "/metrics", face="plain"),
        Target("POST /v1/stream-chatgpt", "POST", "/v1/stream-chatgpt", relay_auth, body),
        Target("POST /v1/async-chatgpt", "POST", "/v1/async-chatgpt", relay_auth, body),
        Target("GET /healthz", "GET", "/healthz"),
        Target("GET /v1/info", "GET", "/v1/info"),
        Target("GET /openapi.json", "GET", "/openapi.json"),
        Target("GET /v1/admin/running", "GET", "/v1/admin/running", admin_auth),
        Target("POST /v1/admin/running/{id}/stop", "POST", "/v1/admin/running/0123-not-running/stop", admin_auth),
        Target("GET /v1/admin/finished", "GET", "/v1/admin/finished?limit=5&outcome=done", admin_auth),
        Target("GET /v1/admin/stats", "GET", "/v1/admin/stats", admin_auth),
        Target("POST /v1/responses", "POST", "/v1/responses", relay_auth, rbody, "openai"),
        Target("GET /v1/responses/{id}", "GET", r, relay_auth, face="openai"),
        Target("GET /v1/responses/{id}", "GET", r + "?stream=true&starting_after=1",
               {**relay_auth, "Last-Event-ID": "1"}, face="openai"),
        Target("POST /v1/responses/{id}/cancel", "POST", r + "/cancel", relay_auth, face="openai"),
        Target("GET /v1/responses/{id}/input_items", "GET", r + "/input_items?limit=5&order=desc", relay_auth,
               face="openai"),
        Target("DELETE /v1/responses/{id}", "DELETE", r, relay_auth, face="openai"),
        Target("POST /v1/chat/completions", "POST", "/v1/chat/completions", relay_auth, body, "openai"),
        Target("GET /v1/chat/completions", "GET", "/v1/chat/completions?model=echo&metadata[a]=b&limit=3",
               relay_auth, face="openai"),
        Target("GET /v1/chat/completions/{id}", "GET", c, relay_auth, face="openai"),
        Target("POST /v1/chat/completions/{id}", "POST", c, relay_auth, b'{"metadata":{"a":"b"}}', "openai"),
        Target("GET /v1/chat/completions/{id}/messages", "GET", c + "/messages?after=x", relay_auth, face="openai"),
        Target("DELETE /v1/chat/completions/{id}", "DELETE", c, relay_auth, face="openai"),
        Target("GET /v1/models", "GET", "/v1/models", relay_auth, face="openai"),
        Target("GET /", "GET", "/", face="plain"),
        Target("GET /static/{file}", "GET", "/static/app.js", {"Range": "bytes=0-10", "If-None-Match": '"x"'},
               face="plain"),
        Target("* /{node}/r/{tail}", "GET", private_status, private_auth),
        Target("* /{node}/r/{tail}", "GET", private_stream, {**private_auth, "Last-Event-ID": "0"}),
        Target("* /{node}/r/{tail}", "GET", stem + ".raw", private_auth),
        Target("* /{node}/r/{tail}", "POST", stem + "/stop", private_auth),
        Target("* /{node}/r/{tail}", "GET", public_status),
        Target("* /{node}/r/{tail}", "GET", public_status[: -len(".json")] + ".raw"),
        Target("OPTIONS", "OPTIONS", "/v1/responses", {"Origin": ORIGIN}, face="openai"),
    ]
    # fmt: on
    return World(relay, targets, private_status, private_stream, bearer)


# Every header the relay reads (grep `headers` in relay/), and those aiohttp reads below it (the body's
# framing and type, conditional and range requests of static files, cookies, encodings, forwarding).
HEADERS = [
    "Authorization", "X-RapidAPI-Key", "X-OpenAI-API-Key", "X-OpenAI-Organization", "Last-Event-ID", "Origin",
    "Content-Type", "Cookie", "Range", "If-None-Match", "If-Modified-Since", "If-Range", "If-Match",
    "Accept-Encoding", "Accept", "Host", "Forwarded", "X-Forwarded-For", "Expect", "Upgrade", "User-Agent",
    "Access-Control-Request-Method", "Access-Control-Request-Headers", "Content-Encoding",
]  # fmt: skip
CREDENTIALS = {"Authorization", "X-RapidAPI-Key"}  # a bad one must get what a wrong one gets
PLAUSIBLE = {"Origin": ORIGIN, "Last-Event-ID": "1", "Range": "bytes=0-10", "If-None-Match": '"x"',
             "Cookie": "a=b", "Content-Type": "application/json", "X-OpenAI-Organization": "org-1",
             "X-RapidAPI-Key": RELAY_KEY, "If-Modified-Since": "Sat, 01 Jan 2000 00:00:00 GMT",
             "Accept-Encoding": "gzip", "Host": "127.0.0.1"}  # fmt: skip


def splice(value: str, bad: bytes, at: int) -> bytes:
    raw = value.encode()
    at = min(at, len(raw))
    return raw[:at] + bad + raw[at:]


async def ask(relay: Relay, t: Target, headers: dict[str, bytes], target: bytes | None = None) -> Answer:
    hdrs = [(k.encode(), v) for k, v in headers.items() if k != "Host"]
    if "Host" in headers:  # (send replaces the default one)
        hdrs.append((b"Host", headers["Host"]))
    return await send(relay, t.method.encode(), target or t.path.encode(), hdrs, t.body)


async def header_case(relay: Relay, t: Target, name: str, bad: bytes, at: int) -> None:
    """`bad` spliced at `at` into the target's value of header `name` (or a plausible one)."""
    value = t.headers.get(name) or PLAUSIBLE.get(name, "v")
    if name == "Authorization":
        at = max(at, len("Bearer ")) if value.startswith("Bearer ") else at  # the token, not the scheme
    headers = {k: v.encode() for k, v in t.headers.items()}
    headers[name] = splice(value, bad, at)
    got = await ask(relay, t, headers)
    what = f"{t.method} {t.path} {name}: {headers[name][:80]!r}"
    assert got.status < 500, f"{what} -> {got.status} {got.body[:300]!r}"
    if got.status >= 400:
        problem = error_shape(got, t.face)
        assert problem is None, f"{what} -> {got.status} {problem}"
    if name in CREDENTIALS and got.status in (401, 403, 200) and bad.strip():
        headers[name] = splice(value, b"x" * len(bad), at)  # the same credential, wrong but well-formed
        wrong = await ask(relay, t, headers)
        assert got.status == wrong.status, f"{what} -> {got.status}, a wrong one gets {wrong.status}"


@pytest.fixture
async def bytes_world(make_relay: RelayFactory) -> World:
    return await world(make_relay)


def registered_routes(app: Any) -> set[str]:
    """`<METHOD> <path>` of every route the app's router holds (HEAD twins left out), parameters as `{name}`."""
    out = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        path = re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", info.get("formatter") or info.get("path", ""))
        out.add(f"{route.method} {path}")
    return out


async def test_every_route_is_fuzzed(bytes_world: World) -> None:
    registered = registered_routes(bytes_world.relay.app)
    fuzzed = {t.route for t in bytes_world.targets}
    assert registered <= fuzzed, f"routes without a fuzz target: {sorted(registered - fuzzed)}"
    assert len(registered) >= 24


# ----- the known breaks, each by name --------------------------------------------------------------------


async def test_a_relay_key_with_a_non_utf8_byte_gets_401_not_500(bytes_world: World) -> None:
    relay = bytes_world.relay
    body = orjson.dumps(msg("x"))
    for name, value in ((b"X-RapidAPI-Key", b"\xff"), (b"Authorization", b"Bearer " + RELAY_KEY.encode() + b"\xc3")):
        for path in (b"/v1/stream-chatgpt", b"/v1/async-chatgpt", b"/v1/responses", b"/v1/chat/completions"):
            got = await send(relay, b"POST", path, [(name, value), (b"Content-Type", b"application/json")], body)
            assert got.status == 401, (name, path, got.status, got.body)
            assert got.headers["www-authenticate"].startswith("Bearer")
        got = await send(relay, b"GET", b"/v1/models", [(name, value)], b"")
        assert got.status == 401, (name, got.status, got.body)


async def test_a_bearer_token_with_a_non_utf8_byte_gets_403_not_500(bytes_world: World) -> None:
    relay, w = bytes_world.relay, bytes_world
    stem = w.private_status[: -len(".json")]
    for path, method in ((w.private_status, b"GET"), (w.private_stream, b"GET"), (stem + ".raw", b"GET"),
                         (stem + "/stop", b"POST"), (stem + "/stop", b"GET")):  # fmt: skip
        for token in (b"\xff", w.bearer.encode() + b"\xff", b"\xc3" + w.bearer.encode()[1:]):
            got = await send(relay, method, path.encode(), [(b"Authorization", b"Bearer " + token)], b"")
            assert got.status == 403, (path, token, got.status, got.body)
            assert got.json()["error"]["code"] == "forbidden"
    for token in (b"%FF", b"%C3", b"%ED%A0%80", w.bearer.encode() + b"%FF"):  # a stream token in the query
        got = await send(relay, b"GET", w.private_stream.encode() + b"?stream_token=" + token, [], b"")
        assert got.status == 403, (token, got.body)
    got = await send(relay, b"GET", w.private_stream.encode() + b"?stream_token=\xff", [], b"")
    assert (got.status, got.json()["error"]["code"]) == (400, "bad_request")  # (raw: the parser refuses the URL)
    got = await send(relay, b"GET", b"/v1/admin/stats", [(b"Authorization", b"Bearer \xff" + ADMIN_KEY.encode())], b"")
    assert got.status == 403, got.body


async def test_from_status_url_with_an_unclosed_bracket_is_refused_not_500(bytes_world: World) -> None:
    relay = bytes_world.relay
    key = {"Authorization": f"Bearer {RELAY_KEY}"}
    for url in ("http://[::1/1/r/pub/2026/01/01/00/00/00/12345678-1234-4234-8234-123456789012.json",
                relay.url.replace("127.0.0.1", "[127.0.0.1") + bytes_world.private_status,
                "http://]/x.json", "http://[v1.x]:99999/1/r/a.json"):  # fmt: skip
        status, _, doc = await relay.post(msg("x", from_status_url=url), headers=key)
        assert status == 400, (url, status, doc)
        assert doc["error"]["code"] == "invalid_from_status_url", doc


# ----- the whole class: every route, every header, path segments, query strings ---------------------------


async def test_bad_bytes_in_every_header_of_every_route(bytes_world: World) -> None:
    """The fixed table: each bad value spliced into every header (at its start, 8 or 16 bytes in), on every
    route, and over-long values into five (some 9,500 requests, and the wrong-credential twins)."""
    for t in bytes_world.targets:
        for name in HEADERS:
            for bad in BAD:
                at = len(bad) % 3 * 8  # start, inside, or (clamped) past the end
                await header_case(bytes_world.relay, t, name, bad, at)
        for name in ("Authorization", "Origin", "Last-Event-ID", "X-OpenAI-API-Key", "Cookie"):
            for bad in LONG:
                await header_case(bytes_world.relay, t, name, bad, 1000)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_random_bytes_in_headers(bytes_world: World, data: st.DataObject) -> None:
    t = data.draw(st.sampled_from(bytes_world.targets), label="target")
    name = data.draw(st.sampled_from(HEADERS), label="header")
    bad = data.draw(SPLICE, label="bytes")
    at = data.draw(st.integers(0, 64), label="at")
    await header_case(bytes_world.relay, t, name, bad, at)


QUERY_NAMES = ["stream_token", "last_event_id", "limit", "after", "order", "stream", "starting_after", "model",
               "metadata[a]", "outcome", "key", "code", "access", "x"]  # fmt: skip
RAW_URL_BYTES = st.binary(min_size=1, max_size=16).filter(lambda b: not (set(b) & set(b" \r\n\t#?")))


def percent(raw: bytes) -> bytes:
    return b"".join(b"%%%02X" % c for c in raw)


# Raw bytes that are not ASCII or are controls never pass the parser (400): percent-encoded, they reach
# the routes and the handlers, decoded (NUL, line breaks, `/`, `%`, bytes that are not UTF-8).
URL_BYTES = RAW_URL_BYTES | st.binary(min_size=1, max_size=16).map(percent)
URL_BAD = BAD[:8] + [percent(b) for b in BAD] + [
    b"%00", b"%0D%0A", b"%2F", b"%25", b"%2E%2E", b"%", b"%FF" * 1500, b"a" * 9000,  # (9000: over the line limit)
]  # fmt: skip


async def url_case(relay: Relay, t: Target, target: bytes, face: str | None = None) -> None:
    """The target's request to `target` instead of its own URL; `face` "plain" when the path changed (and
    with it, maybe, the face that answers)."""
    headers = {k: v.encode() for k, v in t.headers.items()}
    got = await ask(relay, t, headers, target)
    what = f"{t.method} {target[:200]!r}"
    assert got.status < 500, f"{what} -> {got.status} {got.body[:300]!r}"
    if got.status >= 400:
        problem = error_shape(got, face or t.face)
        assert problem is None, f"{what} -> {got.status} {problem}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_random_bytes_in_path_segments(bytes_world: World, data: st.DataObject) -> None:
    t = data.draw(st.sampled_from(bytes_world.targets), label="target")
    path, _, query = t.path.encode().partition(b"?")
    segments = path.split(b"/")
    i = data.draw(st.integers(1, len(segments) - 1), label="segment")
    bad = data.draw(st.sampled_from(URL_BAD) | URL_BYTES, label="bytes")
    at = data.draw(st.integers(0, len(segments[i])), label="at")
    segments[i] = segments[i][:at] + bad + segments[i][at:]
    await url_case(bytes_world.relay, t, b"/".join(segments) + (b"?" + query if query else b""), "plain")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_random_bytes_in_query_strings(bytes_world: World, data: st.DataObject) -> None:
    t = data.draw(st.sampled_from(bytes_world.targets), label="target")
    name = data.draw(st.sampled_from(QUERY_NAMES).map(str.encode) | URL_BYTES, label="name")
    value = data.draw(st.sampled_from(URL_BAD) | URL_BYTES, label="value")
    path = t.path.encode()
    await url_case(bytes_world.relay, t, path + (b"&" if b"?" in path else b"?") + name + b"=" + value)


async def test_bad_bytes_in_the_query_of_every_route(bytes_world: World) -> None:
    """The fixed table: every query parameter any route reads, on every route, each with a third of the
    bad values (a different third for each parameter), raw and percent-encoded."""
    for t in bytes_world.targets:
        path = t.path.encode()
        for i, name in enumerate(QUERY_NAMES):
            for bad in URL_BAD[i % 3 :: 3]:
                await url_case(
                    bytes_world.relay, t, path + (b"&" if b"?" in path else b"?") + name.encode() + b"=" + bad
                )


async def test_an_unknown_expectation_is_ignored_and_100_continue_still_works(bytes_world: World) -> None:
    """aiohttp answers an `Expect` other than 100-continue with a plain-text 417 before any middleware (and
    a 500 when the value held a byte that is not UTF-8); the relay drops it, as RFC 9110 allows."""
    relay = bytes_world.relay
    for value in (b"foo", b"100-continue\xff", b"\xc3"):
        got = await send(relay, b"GET", b"/v1/responses/nope", [(b"Expect", value)], b"")
        assert got.status == 401 and "message" in got.json()["error"], (value, got.status, got.body)
    body = orjson.dumps(msg("x"))
    key = [(b"Authorization", f"Bearer {RELAY_KEY}".encode()), (b"X-OpenAI-API-Key", TEST_KEY.encode())]
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.config.server_port)
    try:
        head = [b"POST /v1/async-chatgpt HTTP/1.1", b"Host: x", b"Connection: close", b"Expect: 100-continue",
                b"Content-Length: %d" % len(body)] + [k + b": " + v for k, v in key]  # fmt: skip
        writer.write(b"\r\n".join(head) + b"\r\n\r\n")
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
