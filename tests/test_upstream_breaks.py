"""Named regression tests for the upstream breaks an independent run found (each failed on the code before
its fix); the generated tests in test_upstream_fuzz.py cover their classes.

- one tool-call delta with `index: null` after an `index: 0` made the answer impossible to assemble: the
  request stayed `streaming` for good, its readers waited forever, and a restart left it so;
- a body compressed against `Accept-Encoding: identity` ended as `upstream_disconnected` with no text;
- broken chunked framing after the first event left the request running until its whole timeout;
- an upstream that connected and then closed, or answered garbage instead of HTTP, was `upstream_unreachable`.
"""

from __future__ import annotations

import asyncio
import gzip
import time
import uuid
from pathlib import Path

import orjson
import pytest

from relay.paths import RequestPath

from .conftest import OPENAI_HEADERS, Relay, RelayFactory, held, msg, parse_sse, read_stream, until
from .scripted import Script, ScriptedUpstream


def sse(*chunks: dict[str, object], done: bool = True) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + (b"data: [DONE]\n\n" if done else b"")


def chunk(delta: dict[str, object], finish: str | None = None) -> dict[str, object]:
    return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip


NULL_INDEX = sse(
    chunk(
        {
            "role": "assistant",
            "tool_calls": [
                {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{"}}
            ],
        }
    ),  # fmt: skip
    chunk({"tool_calls": [{"index": None, "function": {"arguments": "}"}}]}),
    chunk({}, "tool_calls"),
)


async def run(relay: Relay, up: ScriptedUpstream, script: Script) -> tuple[dict[str, object], str]:
    doc = await relay.start(msg("hi", model=up.register(script)))
    code, _, text = await read_stream(relay.session, doc["endpoints"]["stream_events_url"])
    assert code == 200
    return await relay.wait_status(doc["endpoints"]["status_url"], timeout=10), text


async def test_a_tool_call_with_a_null_index_after_index_0_ends_the_request(
    scripted_relay: Relay, scripted: ScriptedUpstream
) -> None:
    final, text = await run(scripted_relay, scripted, Script([NULL_INDEX]))
    assert final["status"] == "done"
    (call,) = final["response"]["body"]["choices"][0]["message"]["tool_calls"]  # one call, continued
    assert call["id"] == "call_1" and call["function"] == {"name": "f", "arguments": "{}"}
    assert [e.data for e in parse_sse(text)][-1] == "[DONE]"
    await until(
        lambda: held(scripted_relay) == {"jobs": 0, "slots": 0, "markers": 0, "retries": 0}, what="nothing held"
    )


async def test_a_restart_ends_a_request_whose_log_holds_such_chunks(make_relay: RelayFactory, tmp_path: Path) -> None:
    """A crash while such a request ran: recovery rebuilds its answer from the log (it used to quarantine
    the marker and leave the request `streaming`)."""
    data = tmp_path / "crashed"
    rp = RequestPath.new(1, False, int(time.time()) - 60)
    rp = RequestPath(rp.node_id, rp.access, rp.created, str(uuid.uuid4()))
    rp.directory(data).mkdir(parents=True)
    doc = {"status": "streaming", "created_at": int(time.time()) - 60, "authorization": {"access": "public"},
           "endpoints": {"status_url": "x"}, "request": {"endpoint": "stream-chatgpt", "request_at": 1},
           "parameters": {"model": "m", "messages": []}, "response": {}}  # fmt: skip
    rp.file(data, "json").write_bytes(orjson.dumps(doc))
    rp.file(data, "txt").write_bytes(NULL_INDEX.replace(b"data: [DONE]\n\n", b"")[:-10])  # torn at the end
    (data / "running").mkdir()
    (data / "running" / rp.marker_name).write_bytes(b'{"webhook_url": null}')
    relay = await make_relay(data_dir=data)
    code, final = await relay.get_json(rp.url(relay.url, "json"))
    assert code == 200 and final["status"] == "error" and final["error"]["code"] == "interrupted"
    assert final["response"]["body"]["choices"][0]["message"]["tool_calls"][0]["id"] == "call_1"
    code, _, text = await read_stream(relay.session, rp.url(relay.url, "txt"))
    assert [e.data for e in parse_sse(text)][-1] == "[DONE]"
    assert not (data / "running" / "quarantine").exists()


async def test_a_compressed_body_is_an_invalid_response_not_a_disconnect(
    scripted_relay: Relay, scripted: ScriptedUpstream
) -> None:
    body = gzip.compress(sse(chunk({"content": "hello"}, "stop")))
    script = Script([body], headers=[("Content-Type", "text/event-stream"), ("Content-Encoding", "gzip")])
    final, _ = await run(scripted_relay, scripted, script)
    assert final["status"] == "error" and final["error"]["code"] == "upstream_invalid_response"
    assert "Content-Encoding: gzip" in final["error"]["message"]
    passed = {"model": scripted.register(script), "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with scripted_relay.session.post(scripted_relay.url + "/v1/chat/completions", data=orjson.dumps(passed),
                                   headers=OPENAI_HEADERS) as r:  # fmt: skip
        assert r.status == 502  # never the compressed bytes, labelled as plain text
        assert "Content-Encoding" in (await r.json())["error"]["message"]


async def test_a_body_that_is_not_an_event_stream_says_so(scripted_relay: Relay, scripted: ScriptedUpstream) -> None:
    final, _ = await run(scripted_relay, scripted, Script([b"<html>\x00\xffnot events</html>"]))
    assert final["status"] == "error" and final["error"]["code"] == "upstream_invalid_response"


@pytest.mark.parametrize("face", ["native", "responses", "chat-stored", "chat-passed"])
async def test_garbled_chunked_framing_ends_in_seconds(
    scripted_relay: Relay, scripted: ScriptedUpstream, face: str
) -> None:
    script = Script([sse(chunk({"content": "first"}), done=False)], end="garbled")
    started = time.monotonic()
    if face == "native":
        final, _ = await run(scripted_relay, scripted, script)
        assert final["status"] == "error" and final["error"]["code"] == "upstream_disconnected", final["error"]
        assert final["response"]["body"]["choices"][0]["message"]["content"] == "first"
    else:
        name = scripted.register(script)
        path, body = ("/v1/responses", {"model": name, "input": "hi", "stream": True}) if face == "responses" else (
            "/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                                     "store": face == "chat-stored"})  # fmt: skip
        async with scripted_relay.session.post(
            scripted_relay.url + path, data=orjson.dumps(body), headers=OPENAI_HEADERS
        ) as r:
            assert r.status == 200
            try:
                await r.read()
            except Exception:  # a passed-through stream that broke is cut for its client too
                assert face == "chat-passed"
    assert time.monotonic() - started < 8  # the idle bound (1 s here), not the 600 s timeout
    await until(lambda: scripted.open == 0, what="the upstream connection closed")


async def test_a_stalled_answer_that_is_not_an_event_stream_ends_in_seconds(
    scripted_relay: Relay, scripted: ScriptedUpstream
) -> None:
    """Found by the fuzzer: the relay keeps the first bytes of a non-SSE answer to a stream request for its
    error, and that read had no idle bound (the request ran to its whole timeout)."""
    started = time.monotonic()
    script = Script([b": OPENROUTER"], headers=[("Content-Type", "application/json")], end="hang")
    final, _ = await run(scripted_relay, scripted, script)
    assert final["status"] == "error" and final["error"]["code"] == "upstream_disconnected"
    assert time.monotonic() - started < 8


async def test_an_upstream_that_connected_is_not_unreachable(make_relay: RelayFactory) -> None:
    async def closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-not-http\r\n\r\n")
        await writer.drain()
        writer.close()

    for handler, code in ((closes, "upstream_disconnected"), (garbage, "upstream_invalid_response")):
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        relay = await make_relay(upstream_url=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1")
        doc = await relay.start(msg("hi"))
        final = await relay.wait_status(doc["endpoints"]["status_url"])
        assert final["error"]["code"] == code, final["error"]
        server.close()


async def test_a_stored_stream_whose_chunks_are_all_hidden_still_ends_with_its_ending(
    scripted_relay: Relay, scripted: ScriptedUpstream
) -> None:
    """Found by the fuzzer: a chunk that the stored chat completion's log leaves out (a usage-only chunk
    its client did not ask for) still woke the caught-up readers, and the fan-out pushed them an empty
    HTTP chunk, which is the end of a chunked body: the client's stream ended without its ending, and the
    later events were written after that end, as garbage on its keep-alive connection."""
    usage = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip
    name = scripted.register(Script([sse(usage, done=False)], pause=0.2, end="close"))
    body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "stream": True, "store": True}
    async with scripted_relay.session.post(scripted_relay.url + "/v1/chat/completions", data=orjson.dumps(body),
                                   headers=OPENAI_HEADERS) as r:  # fmt: skip
        assert r.status == 200
        events = parse_sse((await r.read()).decode())
    assert [e.data for e in events][-1] == "[DONE]" and events[-2].event == "error"
    async with scripted_relay.session.get(
        scripted_relay.url + "/healthz"
    ) as r:  # the same keep-alive connection: still HTTP
        assert r.status == 200


async def test_a_trickle_of_bytes_without_events_does_not_defeat_the_idle_bound(
    scripted_relay: Relay, scripted: ScriptedUpstream
) -> None:
    """Found by an independent attack: the idle bound counted bytes, so an upstream dripping a byte (or a
    blank line, or a comment) every half second held the request until its whole timeout."""
    blocks = [sse(chunk({"content": "first"}), done=False)] + [b"\n"] * 12 + [b": still here\n\n"] * 4
    started = time.monotonic()
    final, _ = await run(scripted_relay, scripted, Script(blocks, pause=0.4, end="hang"))
    assert final["status"] == "error" and final["error"]["code"] == "upstream_disconnected"
    assert time.monotonic() - started < 5
