"""Generated upstream streams through a real relay, on both faces: whatever an upstream sends, every
request ends.

Hypothesis draws whole upstream answers from the provider corpus's grammar and breaks them (see
`tests/fuzzing.py`); the scripted upstream sends each over a real socket. For every example, on the
OffloadGPT face and on one of the OpenAI face's three paths (a streamed Response, a stored streamed chat
completion, a passed-through one):
- the POST is answered without a 5xx; the request reaches a terminal status within a bound;
- its stream ends, with exactly one `[DONE]`, last; its status document parses;
- nothing is left held: running jobs, job slots, running markers, ending retries, upstream connections;
- the usage ledger has exactly one line for it, with non-negative integer token counts.

`make test` runs a bounded, reproducible slice (the `test` profile: derandomized); `make fuzz` runs the
`fuzz` profile (random, many more examples). A slice of examples kills a relay process with -9 in the
middle of its stream and starts it again: every request ends terminal (`test_kill_9_mid_stream`).
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import (
    OPENAI_HEADERS,
    TEST_KEY,
    Relay,
    Upstream,
    free_port,
    held,
    msg,
    parse_sse,
    read_stream,
    start_relay,
    until,
    wait_healthy,
)
from .fuzzing import streams
from .scripted import Script, ScriptedUpstream

NOTHING_HELD = {"jobs": 0, "slots": 0, "markers": 0, "retries": 0}
FACES = ("responses", "chat-stored", "chat-passed")


def ledger_lines(data_dir: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for f in sorted((data_dir / "usage").glob("*.jsonl"))
            for line in f.read_bytes().splitlines() if line.strip()]  # fmt: skip


def check_ledger_line(line: dict[str, Any]) -> None:
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = line[key]
        assert isinstance(value, int) and not isinstance(value, bool) and value >= 0, (key, line)


def check_stream_end(body: str) -> list[str]:
    datas = [e.data for e in parse_sse(body)]
    assert datas.count("[DONE]") == 1 and datas[-1] == "[DONE]", datas[-3:]
    return datas


async def native(relay: Relay, up: ScriptedUpstream, script: Script) -> str:
    """One request on the OffloadGPT face; returns its request id."""
    name = up.register(script)
    status, _, doc = await relay.post(msg("hello", model=name))
    assert status == 200, doc
    links = doc["endpoints"]
    try:
        async with asyncio.timeout(15):
            code, _, text = await read_stream(relay.session, links["stream_events_url"])
    except TimeoutError:
        raise AssertionError(f"the stream of {script!r} did not end") from None
    assert code == 200
    check_stream_end(text)
    final = await relay.wait_status(links["status_url"], timeout=15)
    assert final["status"] in ("done", "error")
    assert final["status"] != "error" or isinstance(final["error"]["code"], str)
    if "response_raw_url" in final["endpoints"]:
        async with relay.session.get(final["endpoints"]["response_raw_url"]) as r:
            assert r.status == 200
    return links["status_url"].rsplit("/", 1)[1].removesuffix(".json")


async def openai_face(relay: Relay, up: ScriptedUpstream, script: Script, face: str) -> None:
    name = up.register(script)
    s = relay.session
    if face == "responses":
        body: dict[str, Any] = {"model": name, "input": "hello", "stream": True}
        async with s.post(relay.url + "/v1/responses", data=orjson.dumps(body), headers=OPENAI_HEADERS) as r:
            assert r.status == 200, await r.text()
            datas = check_stream_end((await r.read()).decode())
        last = orjson.loads(datas[-2])
        assert last["type"] in ("response.completed", "response.failed", "response.incomplete"), last["type"]
        async with s.get(f"{relay.url}/v1/responses/{last['response']['id']}", headers=OPENAI_HEADERS) as r:
            assert r.status == 200
            assert (await r.json())["status"] in ("completed", "failed", "incomplete")
        return
    store = face == "chat-stored"
    body = {"model": name, "messages": [{"role": "user", "content": "hello"}], "stream": True, "store": store}
    async with s.post(relay.url + "/v1/chat/completions", data=orjson.dumps(body), headers=OPENAI_HEADERS) as r:
        assert r.status < 500 or (not store and r.status in (502, 504)), (r.status, await r.text())
        try:
            data = await r.read()
        except aiohttp.ClientPayloadError:
            assert not store  # a passed-through stream that broke upstream is cut for its client too
            return
    if r.status == 200 and store:
        check_stream_end(data.decode())
    elif r.status != 200:
        assert "error" in orjson.loads(data)


async def settled(relay: Relay, up: ScriptedUpstream, ledger_before: int, requests: int) -> None:
    await until(lambda: held(relay) == NOTHING_HELD, timeout=10, what=f"nothing held ({held(relay)})")
    await until(lambda: up.open == 0, timeout=10, what="no upstream connection left")
    await until(lambda: len(ledger_lines(relay.data_dir)) >= ledger_before + requests, timeout=5,
                what="a ledger line per request")  # fmt: skip
    await asyncio.sleep(0.05)
    lines = ledger_lines(relay.data_dir)
    assert len(lines) == ledger_before + requests, lines[ledger_before:]
    for line in lines[ledger_before:]:
        check_ledger_line(line)


@pytest.mark.timeout(1800)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(script=streams(), face=st.sampled_from(FACES))
async def test_any_upstream_stream_ends_every_request(
    scripted_relay: Relay, scripted: ScriptedUpstream, script: Script, face: str
) -> None:
    before = len(ledger_lines(scripted_relay.data_dir))
    request_id = await native(scripted_relay, scripted, script)
    await openai_face(scripted_relay, scripted, script, face)
    await settled(scripted_relay, scripted, before, 2)
    assert sum(1 for line in ledger_lines(scripted_relay.data_dir) if line["id"] == request_id) == 1


@settings(max_examples=4, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
          deadline=None)  # fmt: skip
@given(script=streams(ends=("hang",)))
async def test_kill_9_mid_stream(tmp_path_factory: pytest.TempPathFactory, scripted: ScriptedUpstream,
                                 upstream: Upstream, script: Script) -> None:  # fmt: skip
    """A relay killed with -9 while its upstream streams (and then stalls): after a start, every request
    (streamed, async and a chained turn) is terminal, its stream has one `[DONE]`, last, and its ledger
    line is written once."""
    data = tmp_path_factory.mktemp("kill")
    port = free_port()
    upstream.url = scripted.url  # start_relay points the relay at `upstream.url`
    proc = start_relay(port, data, upstream)  # (the stall lasts until the kill, well within the idle bound)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url, proc)
        name = scripted.register(script)
        served = scripted.total
        async with aiohttp.ClientSession() as s:
            posted = []
            for endpoint in ("/v1/stream-chatgpt", "/v1/async-chatgpt"):
                async with s.post(url + endpoint, data=orjson.dumps(msg("hi", model=name)),
                                  headers={"X-OpenAI-API-Key": TEST_KEY}) as r:  # fmt: skip
                    assert r.status == 200
                    posted.append((await r.json())["endpoints"])
            quick = scripted.register(Script([b'data: {"choices": [{"index": 0, "delta": {"content": "ok"}, '
                                              b'"finish_reason": "stop"}]}\n\ndata: [DONE]\n\n']))  # fmt: skip
            async with s.post(url + "/v1/stream-chatgpt", data=orjson.dumps(msg("first", model=quick)),
                              headers={"X-OpenAI-API-Key": TEST_KEY}) as r:  # fmt: skip
                parent = (await r.json())["endpoints"]["status_url"]
            for _ in range(200):  # a finished parent, then a chained turn that streams when the relay dies
                async with s.get(parent) as r:
                    if (await r.json())["status"] == "done":
                        break
                await asyncio.sleep(0.05)
            chained = {"from_status_url": parent, **msg("more", model=name)}
            async with s.post(url + "/v1/stream-chatgpt", data=orjson.dumps(chained),
                              headers={"X-OpenAI-API-Key": TEST_KEY}) as r:  # fmt: skip
                assert r.status == 200, await r.text()
                posted.append((await r.json())["endpoints"])
            await until(lambda: scripted.total >= served + 4, timeout=10, what="the upstream calls made")
            await asyncio.sleep(0.1)  # (their first bytes on the way)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = start_relay(port, data, upstream)
        await wait_healthy(url, proc)
        async with aiohttp.ClientSession() as s:
            for links in posted:
                async with s.get(links["status_url"]) as r:
                    assert r.status == 200
                    doc = await r.json()
                assert doc["status"] in ("done", "error", "stop"), doc["status"]
                if "stream_events_url" in links:
                    code, _, text = await read_stream(s, links["stream_events_url"])
                    assert code == 200
                    check_stream_end(text)
        ids = [links["status_url"].rsplit("/", 1)[1].removesuffix(".json") for links in posted]
        lines = ledger_lines(data)
        for request_id in ids:
            assert sum(1 for line in lines if line["id"] == request_id) == 1
        for line in lines:
            check_ledger_line(line)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
    assert not os.path.exists(data / "running" / "quarantine" / "files")
