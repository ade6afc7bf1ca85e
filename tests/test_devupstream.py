"""The development upstream on its own: a real OpenAI-compatible server, checked with the openai SDK."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import aiohttp
import openai
import orjson
import pytest

from relay import devupstream

from .conftest import ROOT, TEST_KEY, Upstream, free_port


def client(upstream: Upstream, key: str = TEST_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=upstream.url, max_retries=0)


async def test_non_streaming_echo_with_n_and_max_tokens(upstream: Upstream) -> None:
    c = client(upstream)
    r = await c.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "a b c d"}], n=2, max_tokens=2
    )
    assert r.object == "chat.completion"
    assert [ch.message.content for ch in r.choices] == ["a b ", "(1) a "]
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 4
    await c.close()


async def test_streaming_echo_parses_with_the_sdk(upstream: Upstream) -> None:
    c = client(upstream)
    stream = await c.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "stream me please"}], stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == "stream me please" and usage is not None
    await c.close()


async def test_pacing_delay_and_failures(upstream: Upstream) -> None:
    c = client(upstream)
    t0 = time.monotonic()
    stream = await c.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "a b c"}], stream=True,
        extra_body={"dev": {"delay": 0.3, "pace": 0.1}},
    )  # fmt: skip
    async for _ in stream:
        pass
    assert time.monotonic() - t0 >= 0.6
    with pytest.raises(openai.InternalServerError):
        await c.chat.completions.create(model="echo:fail=502", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        await client(upstream, "sk-wrong").chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "x"}]
        )
    await c.close()


async def test_counts_open_requests(upstream: Upstream) -> None:
    async with aiohttp.ClientSession() as s:
        body = {"model": "echo:hang", "messages": [{"role": "user", "content": "x"}]}
        headers = {"Authorization": f"Bearer {TEST_KEY}"}
        task = asyncio.create_task(s.post(upstream.url + "/chat/completions", json=body, headers=headers))
        await asyncio.sleep(0.3)
        async with s.get(upstream.url.replace("/v1", "/dev/stats")) as r:
            assert (await r.json())["open"] == 1
        task.cancel()
        await asyncio.sleep(0.3)
        async with s.get(upstream.url.replace("/v1", "/dev/stats")) as r:
            assert (await r.json())["open"] == 0


async def test_dev_upstream_command() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "relay.py", "dev-upstream", "--port", str(port)], cwd=ROOT,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        c = openai.AsyncOpenAI(api_key="anything", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
        for _ in range(100):
            try:
                r = await c.chat.completions.create(model="echo", messages=[{"role": "user", "content": "cli"}])
                break
            except openai.APIConnectionError:
                await asyncio.sleep(0.1)
        assert r.choices[0].message.content == "cli"
        models = await c.models.list()
        assert [m.id for m in models.data] == ["echo"]
        await c.close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


# ----- quirks: the provider conformance corpus, replayed byte for byte ---------------------------------

QUIRKS = devupstream.quirk_names()
CORPUS = ROOT / "tests" / "corpus"


async def post_quirk(upstream: Upstream, model: str, **extra: object) -> tuple[int, dict[str, str], bytes]:
    body = {"model": model, "messages": [{"role": "user", "content": "x"}], "stream": True, **extra}
    async with aiohttp.ClientSession() as s:
        headers = {"Authorization": f"Bearer {TEST_KEY}"}
        async with s.post(upstream.url + "/chat/completions", json=body, headers=headers) as r:
            return r.status, dict(r.headers), await r.read()


def test_every_quirk_has_an_expectation() -> None:
    assert len(QUIRKS) >= 20
    assert sorted(p.stem for p in CORPUS.glob("*.json")) == QUIRKS
    for name in QUIRKS:
        doc = orjson.loads((CORPUS / f"{name}.json").read_bytes())
        assert set(doc) == {"shape", "sources", "outcome", "choices", "usage"}, name
        assert doc["shape"] and doc["sources"] and all(u.startswith("https://") for u in doc["sources"]), name
        assert doc["outcome"]["status"] in ("done", "error"), name
        for choice in doc["choices"]:
            keys = {"index", "content", "refusal", "reasoning", "reasoning_content", "tool_calls", "finish_reason"}
            assert set(choice) == keys, name


@pytest.mark.parametrize("name", QUIRKS)
def test_quirk_parts_cut_at_event_ends_only(name: str) -> None:
    data = (devupstream.QUIRKS_DIR / f"{name}.sse").read_bytes()
    parts = devupstream.quirk_parts(data)
    assert b"".join(parts) == data and len(parts) >= 5
    ends = (b"\n\n", b"\r\r", b"\r\n\r\n", b"\r\r\n")
    assert all(p.endswith(ends) for p in parts[:-1])


@pytest.mark.parametrize("name", QUIRKS)
async def test_quirk_is_served_byte_for_byte(upstream: Upstream, name: str) -> None:
    status, headers, body = await post_quirk(upstream, f"quirks:{name}")
    assert status == 200
    assert headers["Content-Type"] == "text/event-stream"
    assert body == (devupstream.QUIRKS_DIR / f"{name}.sse").read_bytes()


async def test_quirk_writes_are_paced(upstream: Upstream) -> None:
    name = "openai-tools-parallel"
    parts = devupstream.quirk_parts((devupstream.QUIRKS_DIR / f"{name}.sse").read_bytes())
    t0 = time.monotonic()
    status, _, body = await post_quirk(upstream, f"quirks:{name}", dev={"pace": 0.02})
    assert status == 200 and body == b"".join(parts)
    assert time.monotonic() - t0 >= (len(parts) - 1) * 0.02


async def test_unknown_quirk_is_404_listing_the_known_ones(upstream: Upstream) -> None:
    for model in ("quirks:no-such-provider", "quirks:../devupstream", "quirks:", "quirks:openai-usage-last,pace=1"):
        status, _, body = await post_quirk(upstream, model)
        assert status == 404, model
        message = orjson.loads(body)["error"]["message"]
        assert all(name in message for name in QUIRKS), message
    status, _, body = await post_quirk(upstream, "quirks:openai-usage-last", stream=False)
    assert status == 400 and "stream" in orjson.loads(body)["error"]["message"]
