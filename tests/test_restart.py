"""Restarts and crashes of a real relay process: kill -9 mid-stream, SIGTERM with a grace period."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import orjson

from .conftest import TEST_KEY, Upstream, free_port, msg, parse_sse, read_until_cut, start_relay, text_of, wait_healthy


async def test_kill_9_during_20_streams_then_restart(tmp_path: Path, upstream: Upstream) -> None:
    port = free_port()
    data = tmp_path / "data"
    url = f"http://127.0.0.1:{port}"
    proc = start_relay(port, data, upstream)
    try:
        await wait_healthy(url, proc)
        async with aiohttp.ClientSession() as s:
            docs = []
            for i in range(20):
                body = msg(" ".join(f"s{i}w{j}" for j in range(200)), model="echo:pace=0.02")
                async with s.post(url + "/v1/stream-chatgpt", json=body, headers={"X-OpenAI-API-Key": TEST_KEY}) as r:
                    docs.append(await r.json())
            readers = [asyncio.create_task(read_until_cut(s, d["endpoints"]["stream_events_url"])) for d in docs]
            await asyncio.sleep(1.0)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            await asyncio.gather(*readers)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(list((data / "running").glob("*.json"))) == 20  # every one was left running

    proc = start_relay(port, data, upstream)
    try:
        await wait_healthy(url, proc)
        async with aiohttp.ClientSession() as s:
            for d in docs:
                async with s.get(d["endpoints"]["status_url"]) as r:
                    status = orjson.loads(await r.read())  # whole JSON
                assert status["status"] == "error" and status["error"]["code"] == "interrupted"
                assert "stop_url" not in status["endpoints"]
                async with s.get(d["endpoints"]["stream_events_url"]) as r:
                    body = (await r.read()).decode()
                assert body.endswith("\n\n")
                events = parse_sse(body)
                assert events[-1].data == "[DONE]" and events[-2].event == "error"
                assert orjson.loads(events[-2].data)["error"]["code"] == "interrupted"
                for e in events[:-2]:
                    orjson.loads(e.data)  # no half event
                partial = text_of(events)
                assert partial and status["response"]["body"]["choices"][0]["message"]["content"] == partial
                # ids stay valid across the restart: resume in the middle
                mid = events[len(events) // 2]
                async with s.get(d["endpoints"]["stream_events_url"], headers={"Last-Event-ID": mid.id}) as r:
                    assert parse_sse((await r.read()).decode()) == events[len(events) // 2 + 1 :]
                async with s.get(status["endpoints"]["response_raw_url"]) as r:
                    assert r.status == 200
        assert list((data / "running").glob("*.json")) == []
        # and the relay works as usual after the repair
        async with aiohttp.ClientSession() as s:
            headers = {"X-OpenAI-API-Key": TEST_KEY}
            async with s.post(url + "/v1/stream-chatgpt", json=msg("after"), headers=headers) as r:
                doc = await r.json()
            async with s.get(doc["endpoints"]["stream_events_url"]) as r:
                assert text_of(parse_sse((await r.read()).decode())) == "after"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


async def test_sigterm_refuses_new_requests_and_lets_running_ones_finish(tmp_path: Path, upstream: Upstream) -> None:
    port = free_port()
    data = tmp_path / "data"
    url = f"http://127.0.0.1:{port}"
    proc = start_relay(port, data, upstream, grace=3)
    headers = {"X-OpenAI-API-Key": TEST_KEY}
    try:
        await wait_healthy(url, proc)
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/stream-chatgpt", json=msg("a b c d e f g h i j", model="echo:pace=0.15"),
                              headers=headers) as r:  # fmt: skip
                finishing = await r.json()
            async with s.post(url + "/v1/stream-chatgpt", json=msg("x", model="echo:delay=60"), headers=headers) as r:
                hanging = await r.json()
            reader = asyncio.create_task(s.get(finishing["endpoints"]["stream_events_url"]))
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            async with s.post(url + "/v1/stream-chatgpt", json=msg("late"), headers=headers) as r:
                assert r.status == 503
                assert (await r.json())["error"]["code"] == "shutting_down" and r.headers["Retry-After"]
            resp = await reader
            body = (await resp.read()).decode()
            assert text_of(parse_sse(body)) == "a b c d e f g h i j"  # finished within the grace period
            assert proc.wait(timeout=20) == 0
            assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
    done = orjson.loads((data / finishing["endpoints"]["status_url"][len(url) + 1 :]).read_bytes())
    assert done["status"] == "done"
    hung = orjson.loads((data / hanging["endpoints"]["status_url"][len(url) + 1 :]).read_bytes())
    assert hung["status"] == "error" and hung["error"]["code"] == "interrupted"
    assert list((data / "running").glob("*.json")) == []
