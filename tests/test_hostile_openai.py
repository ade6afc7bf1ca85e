"""Hostile input on the OpenAI-compatible paths: what a client or an upstream sends there is bounded like
everywhere else, refused in OpenAI's error shape, and never holds the relay."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web

from relay.facade.chat_index import INDEX

from .conftest import TEST_KEY, LoopProbe, Relay, RelayFactory, readers, until

HEADERS = {"Content-Type": "application/json", "X-OpenAI-API-Key": TEST_KEY}


async def post(relay: Relay, path: str, body: bytes) -> tuple[int, dict]:
    async with relay.session.post(relay.url + path, data=body, headers=HEADERS) as r:
        return r.status, orjson.loads(await r.read())


def assert_openai_error(doc: dict, code: str | None = None) -> None:
    assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}, doc
    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]
    if code is not None:
        assert doc["error"]["code"] == code, doc


async def test_bodies_are_bounded_and_refused_in_openai_shape(relay: Relay) -> None:
    for path in ("/v1/responses", "/v1/chat/completions"):
        status, doc = await post(relay, path, b"[" * 100 + b"]" * 100)
        assert status == 400
        assert_openai_error(doc, "body_too_complex")
        status, doc = await post(relay, path, b"{" + b'"a":' * 3)
        assert status == 400
        assert_openai_error(doc, "invalid_json")
        status, doc = await post(relay, path, b'{"input": "' + b"x" * (5 * 1024 * 1024) + b'"}')
        assert status == 413
        assert_openai_error(doc, "body_too_large")
    many = orjson.dumps({"model": "echo", "input": [{"role": "user", "content": "x"}] * 10_001})
    status, doc = await post(relay, "/v1/responses", many)
    assert status == 400 and "10000" in doc["error"]["message"]
    status, doc = await post(relay, "/v1/responses", orjson.dumps({"model": "echo", "input": "x", "metadata": {
        f"k{i}": "v" for i in range(17)}}))  # fmt: skip
    assert status == 400 and doc["error"]["param"] == "metadata"
    assert relay.upstream is not None and relay.upstream.state.total == 0


async def test_resume_and_ids_refuse_what_is_not_theirs(relay: Relay) -> None:
    status, doc = await post(relay, "/v1/responses", orjson.dumps({"model": "echo", "input": "x"}))
    assert status == 200
    for bad in ("-1", "1e9", "9" * 13, "x"):
        async with relay.session.get(f"{relay.url}/v1/responses/{doc['id']}?stream=true&starting_after={bad}") as r:
            assert r.status == 400
            assert_openai_error(await r.json())
    for bad in ("resp_", "resp_../../etc/passwd", "resp_1b" + "0" * 50, doc["id"].replace("resp_1", "resp_2"),
                doc["id"][:-1] + "g", "chatcmpl-" + doc["id"][5:]):  # fmt: skip
        async with relay.session.get(f"{relay.url}/v1/responses/{bad}") as r:
            assert r.status == 404, bad
            assert_openai_error(await r.json(), "not_found")
    async with relay.session.put(f"{relay.url}/v1/responses/{doc['id']}") as r:
        assert r.status == 405 and "DELETE" in r.headers["Allow"]
        assert_openai_error(await r.json(), "method_not_allowed")


@pytest.fixture
async def many_calls_upstream() -> AsyncIterator[str]:
    """An upstream whose answer opens a new tool call in every chunk."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(5000):
            call = {"index": i, "id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            chunk = {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {
                "tool_calls": [call]}, "finish_reason": None}]}  # fmt: skip
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/v1"
    await runner.cleanup()


async def test_an_upstream_that_opens_thousands_of_tool_calls_fails_the_response(
    make_relay: RelayFactory, many_calls_upstream: str
) -> None:
    relay = await make_relay(upstream_url=many_calls_upstream)
    status, doc = await post(relay, "/v1/responses", orjson.dumps({"model": "m", "input": "x"}))
    assert status == 200 and doc["status"] == "failed"
    assert "128 tool calls" in doc["error"]["message"]
    async with relay.session.get(f"{relay.url}/v1/responses/{doc['id']}?stream=true") as r:
        text = (await r.read()).decode()
    assert text.count('"type":"response.output_item.done"') == 128 and '"type":"response.failed"' in text


async def test_a_client_that_leaves_a_passed_through_stream_closes_the_upstream_call(relay: Relay) -> None:
    body = orjson.dumps(
        {"model": "echo:pace=0.05", "stream": True, "messages": [{"role": "user", "content": "a " * 300}]}
    )
    async with aiohttp.ClientSession() as s:
        async with s.post(relay.url + "/v1/chat/completions", data=body, headers=HEADERS) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            await r.content.readline()
            await until(lambda: relay.upstream.state.open == 1, what="the upstream call is open")
    await until(lambda: relay.upstream.state.open == 0, what="the upstream call is closed")
    assert not list(relay.data_dir.glob("1/r/**/*.json"))  # nothing written for an unstored completion
    ledger = relay.data_dir / "usage"
    await until(lambda: any(ledger.glob("*.jsonl")), what="its usage line")
    (line,) = [orjson.loads(x) for f in ledger.glob("*.jsonl") for x in f.read_bytes().splitlines()]
    assert line["outcome"] == "stop" and line["estimated"] and line["completion_tokens"] < 300


def test_every_error_code_of_the_facade_is_documented() -> None:
    import re

    from .conftest import ROOT

    used = set()
    for path in (ROOT / "relay" / "facade").glob("*.py"):
        used |= set(re.findall(r'code="([a-z_]+)"', path.read_text()))
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", (ROOT / "docs" / "openai.md").read_text(), re.M))
    assert used and used <= documented, sorted(used - documented)


async def test_a_response_as_large_as_the_limits_allow_does_not_hold_the_loop(make_relay: RelayFactory) -> None:
    """A 15 MiB answer in 15,000 events of 1 KiB, sent as fast as the upstream can: its closing events repeat
    the text four times (as OpenAI's stream does), about 60 MiB of JSON, encoded and written off the loop,
    one event at a time."""
    relay = await make_relay(upstream_max_response_bytes=20 * 1024 * 1024)
    body = orjson.dumps({"model": "echo:chunks=15000", "input": "x" * 1024})
    async with LoopProbe(relay) as probe:
        async with relay.session.post(relay.url + "/v1/responses", data=body, headers=HEADERS) as r:
            status, raw = r.status, await r.read()
    doc = orjson.loads(raw)  # (after the probe: the test's own parse of 15 MiB would hold the loop it probes)
    assert status == 200 and doc["status"] == "completed", doc.get("error")
    assert len(doc["output"][0]["content"][0]["text"]) == 15_000 * 1024
    assert probe.worst < 0.25, f"loop held {probe.worst:.3f}s"


async def test_wrong_values_are_refused_naming_the_field(relay: Relay) -> None:
    cases = [
        ({"input": []}, "input"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"input": [{"type": "message", "content": "x"}]}, "input[0].role"),
        ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input[0].content[0]"),
        ({"input": [{"type": "function_call", "call_id": "c"}]}, "input[0]"),
        ({"input": "x", "tools": {"type": "function"}}, "tools"),
        ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
        ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
        ({"input": "x", "stream": "yes"}, "stream"),
        ({"input": "x", "instructions": ["a"]}, "instructions"),
        ({"input": "x", "model": 5}, "model"),
        ({"input": "x", "previous_response_id": 5}, "previous_response_id"),
        ({}, "input"),
    ]
    for body, param in cases:
        status, doc = await post(relay, "/v1/responses", orjson.dumps({"model": "echo", **body}))
        assert status == 400, (body, doc)
        assert_openai_error(doc)
        assert doc["error"]["param"] == param and param in doc["error"]["message"], (body, doc)
    assert relay.upstream is not None and relay.upstream.state.total == 0


async def test_readers_that_never_read_a_large_object_are_dropped(make_relay: RelayFactory) -> None:
    """A Response object of ~8 MiB, asked for by clients that never read: each is cut off after the send
    timeout, holding at most one block beyond what the kernel takes, as on the relay's own URLs."""
    relay = await make_relay(server_send_timeout_seconds=2, server_header_timeout_seconds=2,
                             upstream_max_response_bytes=20 * 1024 * 1024)  # fmt: skip
    status, doc = await post(relay, "/v1/responses", orjson.dumps({"model": "echo:chunks=8000", "input": "x" * 1024}))
    assert status == 200 and doc["status"] == "completed"
    server = relay.runner.server
    assert server is not None
    readers = []
    for _ in range(10):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", relay.config.server_port))
        s.sendall(f"GET /v1/responses/{doc['id']} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        readers.append(s)  # and never read
    await asyncio.sleep(1)
    buffers = [t.get_write_buffer_size() for t in server._connections.values()]  # type: ignore[attr-defined]
    assert len(buffers) >= 10 and max(buffers) <= 2 * 256 * 1024, buffers  # not the whole 8 MiB object
    await until(lambda: not server._connections, timeout=20, what="stalled readers dropped")  # type: ignore[attr-defined]
    for s in readers:
        s.close()


async def test_listing_a_large_index_of_stored_completions_does_not_hold_the_loop(make_relay: RelayFactory,
                                                                                 tmp_path) -> None:  # fmt: skip
    """400,000 stored completions on the node, half of them the caller's: a list call whose filter matches
    none of them scans all of the caller's entries, in steps that give the loop back; the newest page is
    found without a scan."""
    from relay.facade.common import owner_of

    data = tmp_path / "big"
    (data / "openai").mkdir(parents=True)
    now, mine, theirs = time.time(), owner_of("open"), owner_of("someone")
    lines = (orjson.dumps({"op": "add", "id": f"chatcmpl-gone{i:06d}", "created": now - 86400 + i * 0.1,
                           "model": "echo", "owner": mine if i % 2 else theirs, "metadata": {"n": str(i)}})
             for i in range(400_000))  # fmt: skip
    (data / "openai" / "chat-completions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    relay = await make_relay(data_dir=data)
    status, stored = await post(relay, "/v1/chat/completions", orjson.dumps(
        {"model": "echo", "messages": [{"role": "user", "content": "kept"}], "store": True}))  # fmt: skip
    assert status == 200, stored
    async with LoopProbe(relay) as probe:
        for _ in range(3):
            async with relay.session.get(relay.url + "/v1/chat/completions?metadata[n]=none", headers=HEADERS) as r:
                assert r.status == 200
                assert orjson.loads(await r.read()) == {"object": "list", "data": [], "first_id": None,
                                                        "last_id": None, "has_more": False}  # fmt: skip
    assert probe.worst < 0.25, f"loop held {probe.worst:.3f}s"
    await until(lambda: relay.app[INDEX].entries.get(stored["id"]) is not None, what="the stored completion indexed")
    async with relay.session.get(relay.url + "/v1/chat/completions?order=desc&limit=1", headers=HEADERS) as r:
        page = orjson.loads(await r.read())
    assert [c["id"] for c in page["data"]] == [stored["id"]] and page["has_more"] is True


async def test_many_clients_polling_a_large_finished_response_do_not_hold_the_loop(make_relay: RelayFactory) -> None:
    """A finished Response object is as large as its answer (here 15 MiB). Twenty clients GET it at once,
    twice, and read its first 64 KiB: the first GETs share one read and encoding, made in the face's
    worker thread, and later ones are answered from the kept bytes (a parse and an encoding per GET held
    the loop 1.2 s on the loop, 0.27 s in the worker thread). A DELETE drops what was kept."""
    relay = await make_relay(upstream_max_response_bytes=20 * 1024 * 1024)
    status, doc = await post(relay, "/v1/responses", orjson.dumps({"model": "echo:chunks=15000", "input": "x" * 1024}))
    assert status == 200 and doc["status"] == "completed"
    url = f"{relay.url}/v1/responses/{doc['id']}"
    async with LoopProbe(relay) as probe:
        for _ in range(2):
            await readers(url, f"X-OpenAI-API-Key: {TEST_KEY}", 20, limit=64 * 1024)
    assert probe.worst < 0.25, f"loop held {probe.worst:.3f}s"
    async with relay.session.get(url, headers=HEADERS) as r:
        got = orjson.loads(await r.read())
    assert got["status"] == "completed" and got["output"] == doc["output"] and got["usage"] == doc["usage"]
    async with relay.session.delete(url, headers=HEADERS) as r:
        assert r.status == 200
    async with relay.session.get(url, headers=HEADERS) as r:
        assert r.status == 404


async def test_many_resumes_at_the_end_of_a_large_response_do_not_hold_the_loop(make_relay: RelayFactory) -> None:
    """A 15 MiB response's closing events repeat its answer four times. Twenty clients resume its stream
    at once, after its last delta and among its closing events, and read its first 64 KiB: each finds its
    place from the status document's first bytes, not by parsing the document or reading through the
    closing events (which read ~180 MB per resume and held the loop 0.9-1.5 s). The events are right."""
    relay = await make_relay(upstream_max_response_bytes=20 * 1024 * 1024)
    status, doc = await post(relay, "/v1/responses", orjson.dumps({"model": "echo:chunks=15000", "input": "x" * 1024}))
    assert status == 200 and doc["status"] == "completed"

    async def resumed(after: int) -> list[dict]:
        async with relay.session.get(f"{url}&starting_after={after}", headers=HEADERS) as r:
            body = await r.read()
        return [orjson.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: {")]

    url = f"{relay.url}/v1/responses/{doc['id']}?stream=true"
    last_delta = max(e["sequence_number"] for e in await resumed(14_990) if e["type"].endswith(".delta"))
    async with LoopProbe(relay) as probe:
        for after in (last_delta, last_delta + 2):
            await readers(f"{url}&starting_after={after}", f"X-OpenAI-API-Key: {TEST_KEY}", 20, limit=64 * 1024)
    assert probe.worst < 0.25, f"loop held {probe.worst:.3f}s"
    events = await resumed(last_delta)
    assert [e["type"] for e in events] == ["response.output_text.done", "response.content_part.done",
                                           "response.output_item.done", "response.completed"]  # fmt: skip
    assert [e["sequence_number"] for e in events] == list(range(last_delta + 1, last_delta + 5))
    assert [e["type"] for e in await resumed(last_delta + 2)] == ["response.output_item.done", "response.completed"]


async def test_live_readers_at_the_end_of_a_large_response_do_not_hold_the_loop(make_relay: RelayFactory) -> None:
    """Ten clients follow an 8 MiB response's stream live to its end. Its closing events (~32 MiB, the
    text four times) are appended at once: pushing them to every caught-up reader copied them into each
    one's socket buffer on the loop (ten held it 0.56 s; twenty of a 15 MiB one, 3.2 s and 1.2 GB); now
    each reader's own loop sends them from the file, a block at a time, as fast as that reader takes them."""
    relay = await make_relay()
    body = orjson.dumps({"model": "echo:chunks=8000,pace=0.0002", "input": "x" * 1024, "background": True})
    status, doc = await post(relay, "/v1/responses", body)
    assert status == 200 and doc["status"] == "queued"
    url = f"{relay.url}/v1/responses/{doc['id']}?stream=true"
    async with LoopProbe(relay) as probe:
        await readers(url, f"X-OpenAI-API-Key: {TEST_KEY}", 10)
    assert probe.worst < 0.25, f"loop held {probe.worst:.3f}s"
    async with relay.session.get(f"{relay.url}/v1/responses/{doc['id']}", headers=HEADERS) as r:
        assert (await r.json())["status"] == "completed"
