"""The background job and the files it writes: statuses, assembly, every way an upstream fails."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from pathlib import Path

import orjson
import pytest

from .conftest import TEST_KEY, Relay, RelayFactory, all_files, msg, parse_sse, read_stream, text_of


def rel_file(relay: Relay, url: str) -> Path:
    return relay.data_dir / url[len(relay.url) + 1 :]


async def file_events(relay: Relay, doc: dict) -> list:
    """The events of the request's `.txt` file once its stream has ended. The terminal status is written
    before the stream's last events (docs/api.md), so a client that saw the status read its stream to the
    close first, as this does; the file then holds everything."""
    url = doc["endpoints"]["stream_events_url"]
    code, _, _ = await read_stream(relay.session, url)
    assert code in (200, 204), code
    return parse_sse(rel_file(relay, url).read_text())


async def test_files_on_disk_follow_the_contract(relay: Relay) -> None:
    doc = await relay.start(msg("one two three four"))
    ep = doc["endpoints"]
    final = await relay.wait_status(ep["status_url"])
    status_file = rel_file(relay, ep["status_url"])
    txt = rel_file(relay, ep["stream_events_url"])
    raw = status_file.with_suffix(".raw")
    assert orjson.loads(status_file.read_bytes()) == final
    # .txt: exactly the bytes of the stream, ids are the byte offsets at which each event starts
    code, headers, body = await read_stream(relay.session, ep["stream_events_url"])
    file_bytes = txt.read_bytes()
    assert body.replace(": connected\n\n", "", 1).encode() == file_bytes
    events = parse_sse(file_bytes.decode())
    for e in events:
        assert file_bytes[int(e.id) :].startswith(f"id: {e.id}\n".encode())
    assert events[-1].data == "[DONE]"
    # every upstream chunk is one event, byte for byte as the upstream sent it
    upstream_datas = [line[len(b"data: ") :] for line in raw.read_bytes().split(b"\n") if line.startswith(b"data: ")]
    assert [e.data.encode() for e in events] == upstream_datas
    assert final["endpoints"]["response_raw_url"] == ep["status_url"][: -len(".json")] + ".raw"
    assert "stop_url" not in final["endpoints"]


async def test_status_goes_queued_streaming_done(relay: Relay) -> None:
    doc = await relay.start(msg("a b c d e", model="echo:pace=0.15"))
    url = doc["endpoints"]["status_url"]
    seen = []
    while True:
        _, d = await relay.get_json(url)
        if not seen or seen[-1] != d["status"]:
            seen.append(d["status"])
        if d["status"] == "done":
            break
        await asyncio.sleep(0.02)
    assert seen[-2:] == ["streaming", "done"]
    assert set(seen) <= {"queued", "streaming", "done"}
    final = d
    assert final["README"]
    req = final["request"]
    assert req["request_at"] == final["created_at"]
    assert req["finished_at"] >= req["processed_at"] >= req["request_at"]
    assert 0 < req["request_time"] <= req["total_time"]


async def test_partial_text_is_visible_while_streaming(relay: Relay) -> None:
    words = " ".join(f"w{i}" for i in range(30))
    doc = await relay.start(msg(words, model="echo:pace=0.1"))
    url = doc["endpoints"]["status_url"]
    await asyncio.sleep(1.6)
    _, d = await relay.get_json(url)
    assert d["status"] == "streaming"
    partial = d["response"]["body"]["choices"][0]["message"]["content"]
    assert words.startswith(partial) and 3 < len(partial) < len(words)
    # the file is never torn while it is rewritten
    for _ in range(40):
        raw = rel_file(relay, url).read_bytes()
        orjson.loads(raw)
        await asyncio.sleep(0.02)
    final = await relay.wait_status(url)
    assert final["response"]["body"]["choices"][0]["message"]["content"] == words


async def test_assembled_completion_with_n_usage_and_max_tokens(relay: Relay) -> None:
    doc = await relay.start(msg("alpha beta gamma delta", n=3, max_tokens=3))
    final = await relay.wait_status(doc["endpoints"]["status_url"])
    body = final["response"]["body"]
    assert body["object"] == "chat.completion"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "alpha beta gamma "}
    assert body["choices"][1]["message"]["content"] == "(1) alpha beta "
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 9
    events = await file_events(relay, doc)
    assert text_of(events, 2) == "(2) alpha beta "


async def test_tool_calls_are_assembled(relay: Relay) -> None:
    doc = await relay.start(msg("Paris", model="echo:tool_call"))
    final = await relay.wait_status(doc["endpoints"]["status_url"])
    choice = final["response"]["body"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["id"] == "call_dev_0" and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert orjson.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}


async def test_every_chunk_event_keeps_a_delta(relay: Relay) -> None:
    doc = await relay.start(msg("x y"))
    await relay.wait_status(doc["endpoints"]["status_url"])
    for e in (await file_events(relay, doc))[:-1]:
        chunk = orjson.loads(e.data)
        assert chunk["object"] == "chat.completion.chunk"
        for c in chunk["choices"]:
            assert "delta" in c


async def upstream_failure(relay: Relay, body: dict, code: str, endpoint: str = "/v1/stream-chatgpt") -> dict:
    doc = await relay.start(body, endpoint=endpoint)
    final = await relay.wait_status(doc["endpoints"]["status_url"])
    assert final["status"] == "error", final
    assert final["error"]["code"] == code, final["error"]
    assert final["error"]["message"]
    if endpoint == "/v1/stream-chatgpt":
        events = await file_events(relay, doc)
        assert events[-1].data == "[DONE]"
        assert events[-2].event == "error"
        assert orjson.loads(events[-2].data)["error"]["code"] == code
        final["_events"] = events
    assert rel_file(relay, doc["endpoints"]["status_url"]).with_suffix(".raw").exists()
    return final


async def test_upstream_http_error(relay: Relay) -> None:
    final = await upstream_failure(relay, msg("x", model="echo:fail=503"), "upstream_error")
    assert final["response"]["status_code"] == 503
    assert "503" in final["error"]["message"]
    assert final["response"]["body"]["error"]["message"].startswith("dev upstream failure 503")
    raw = rel_file(relay, final["endpoints"]["status_url"]).with_suffix(".raw").read_bytes()
    assert orjson.loads(raw)["error"]["code"] == "503"


async def test_upstream_rejects_key(relay: Relay) -> None:
    doc = await relay.start(msg("x"), key="sk-wrong-key-000000")
    final = await relay.wait_status(doc["endpoints"]["status_url"])
    assert final["status"] == "error" and final["response"]["status_code"] == 401
    assert "Incorrect API key" in final["error"]["message"]


async def test_async_upstream_error(relay: Relay) -> None:
    final = await upstream_failure(relay, msg("x", model="echo:fail=429"), "upstream_error", "/v1/async-chatgpt")
    assert final["response"]["status_code"] == 429


async def test_total_timeout(relay: Relay) -> None:
    t0 = time.monotonic()
    final = await upstream_failure(relay, msg("a b c d", model="echo:hang=3", timeout=1), "timeout")
    assert time.monotonic() - t0 < 10
    assert final["response"]["body"]["choices"][0]["message"]["content"] == "a b "  # partial text kept
    assert text_of(final["_events"]) == "a b "


async def test_connect_timeout(make_relay: RelayFactory, blackhole: tuple[int, set[int]]) -> None:
    port, _ = blackhole
    relay = await make_relay(upstream_url=f"http://127.0.0.1:{port}/v1")
    t0 = time.monotonic()
    final = await upstream_failure(relay, msg("x", connect_timeout=1), "timeout")
    assert "connect" in final["error"]["message"]
    assert time.monotonic() - t0 < 8


async def test_unreachable_upstream(make_relay: RelayFactory) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    relay = await make_relay(upstream_url=f"http://127.0.0.1:{port}/v1")
    await upstream_failure(relay, msg("x"), "upstream_unreachable")


async def test_malformed_chunk_keeps_what_came_before(relay: Relay) -> None:
    final = await upstream_failure(
        relay, msg("one two three four", model="echo:malformed_after=2"), "upstream_invalid_response"
    )
    assert text_of(final["_events"]) == "one two "
    assert final["response"]["body"]["choices"][0]["message"]["content"] == "one two "


async def test_error_event_mid_stream(relay: Relay) -> None:
    final = await upstream_failure(relay, msg("one two three", model="echo:error_after=1"), "upstream_error")
    assert "mid-stream" in final["error"]["message"]
    assert text_of(final["_events"]) == "one "


async def test_dropped_connection_mid_stream(relay: Relay) -> None:
    final = await upstream_failure(
        relay, msg("one two three four five", model="echo:drop_after=3"), "upstream_disconnected"
    )
    assert text_of(final["_events"]) == "one two three "
    assert final["response"]["body"]["choices"][0]["message"]["content"] == "one two three "


async def test_stream_without_done_but_finished_is_done(relay: Relay) -> None:
    doc = await relay.start(msg("no done here", model="echo:no_done"))
    final = await relay.wait_status(doc["endpoints"]["status_url"])
    assert final["status"] == "done"
    assert (await file_events(relay, doc))[-1].data == "[DONE]"


async def test_non_streaming_answer_to_stream_request_is_a_clear_error(relay: Relay) -> None:
    final = await upstream_failure(relay, msg("x", model="echo:json_instead"), "upstream_invalid_response")
    assert "event stream" in final["error"]["message"]


async def test_key_never_reaches_files_or_logs(make_relay: RelayFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("openai", "httpx2", "httpcore2", "aiohttp"):
        caplog.set_level(logging.DEBUG, logger=name)
    relay = await make_relay()
    secret = TEST_KEY
    other = "sk-other-SECRETVALUE-123456"
    runs = [
        (msg("ok"), secret, "/v1/stream-chatgpt"),
        (msg("x", model="echo:fail=500"), secret, "/v1/stream-chatgpt"),
        (msg("x", model="echo:fail=401"), other, "/v1/async-chatgpt"),
        (msg("x"), other, "/v1/stream-chatgpt"),  # the upstream refuses this key
        (msg("a b c", model="echo:drop_after=1"), secret, "/v1/stream-chatgpt"),
        (msg("a b c", model="echo:hang=2", timeout=1), secret, "/v1/stream-chatgpt"),
    ]
    for body, key, endpoint in runs:
        doc = await relay.start(body, key=key, endpoint=endpoint)
        await relay.wait_status(doc["endpoints"]["status_url"])
    files = all_files(relay.data_dir)
    assert len(files) >= 3 * len(runs) - 1
    for p in files:
        data = p.read_bytes()
        assert secret.encode() not in data and other.encode() not in data, p
        assert b"SECRETVALUE" not in data and b"UPSTREAMKEY" not in data, p
    logged = "\n".join(r.getMessage() + str(r.exc_info or "") + str(r.args) for r in caplog.records)
    assert "status=error" in logged  # the logs did record the failures
    assert "UPSTREAMKEY" not in logged and "SECRETVALUE" not in logged
