"""The development upstream on its own: a real OpenAI-compatible server, checked with the openai SDK."""

from __future__ import annotations

import asyncio
import datetime
import subprocess
import sys
import time
from typing import Literal

import aiohttp
import openai
import orjson
import pytest
from pydantic import BaseModel, Field

from relay import devupstream

from .conftest import ROOT, TEST_KEY, RelayFactory, Upstream, free_port


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


# ----- tool calls: the tool the request offers, with arguments its schema accepts ------------------------


class Address(BaseModel):
    street: str
    postcode: str = Field(min_length=5, max_length=5)


class LookupOrder(BaseModel):
    """Find an order (a LangChain-style tool: a pydantic model, strict in the openai SDK)."""

    order_id: str
    quantity: int = Field(ge=2, le=10)
    ratio: float = Field(gt=0)
    express: bool
    speed: Literal["standard", "express"]
    tags: list[str] = Field(min_length=2)
    address: Address
    note: str | None
    when: datetime.date


class GetTime(BaseModel):
    timezone: str


ORDER = [{"role": "user", "content": "order 42"}]


async def test_the_first_offered_tool_is_called_with_arguments_its_schema_accepts(upstream: Upstream) -> None:
    c = client(upstream)
    tools = [openai.pydantic_function_tool(LookupOrder), openai.pydantic_function_tool(GetTime)]
    r = await c.chat.completions.parse(model="echo", messages=ORDER, tools=tools)
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls or []
    assert call.function.name == "LookupOrder"  # not get_weather: a tool the caller never offered
    order = call.function.parsed_arguments  # the SDK validated the arguments against the model
    assert order == LookupOrder(order_id="order 42", quantity=2, ratio=1, express=True, speed="standard",
                                tags=["order 42", "order 42"], address=Address(street="order 42", postcode="order"),
                                note="order 42", when=datetime.date(2025, 1, 1))  # fmt: skip
    async with c.chat.completions.stream(model="echo", messages=ORDER, tools=tools, tool_choice="required") as s:
        final = await s.get_final_completion()
    (streamed,) = final.choices[0].message.tool_calls or []
    assert streamed.function.name == "LookupOrder" and streamed.function.parsed_arguments == order
    await c.close()


async def test_tool_choice_names_the_tool_or_turns_calls_off(upstream: Upstream) -> None:
    c = client(upstream)
    tools = [openai.pydantic_function_tool(LookupOrder), openai.pydantic_function_tool(GetTime)]
    chosen = {"type": "function", "function": {"name": "GetTime"}}
    r = await c.chat.completions.parse(model="echo", messages=ORDER, tools=tools, tool_choice=chosen)
    (call,) = r.choices[0].message.tool_calls or []
    assert call.function.name == "GetTime" and call.function.parsed_arguments == GetTime(timezone="order 42")
    r = await c.chat.completions.parse(model="echo", messages=ORDER, tools=tools, tool_choice="none")
    assert r.choices[0].message.content == "order 42" and not r.choices[0].message.tool_calls
    answered = [*ORDER, r.choices[0].message.model_dump(exclude_none=True) | {"tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]  # fmt: skip
    r = await c.chat.completions.parse(model="echo", messages=answered, tools=tools)
    assert r.choices[0].message.content == "the tool said: 12:00"
    await c.close()


async def test_plain_json_schemas_get_their_const_enum_default_examples_and_refs(upstream: Upstream) -> None:
    parameters = {
        "type": "object",
        "properties": {
            "kind": {"const": "search"},
            "lang": {"type": "string", "enum": ["fr", "en"]},
            "limit": {"type": "integer", "default": 20},
            "query": {"type": "string", "examples": ["weather in Oslo"]},
            "at": {"type": "string", "format": "date-time"},
            "score": {"type": ["number", "null"], "minimum": 0.5, "maximum": 0.75},
            "filters": {"type": "array", "items": {"$ref": "#/$defs/filter"}, "minItems": 2, "maxItems": 3},
            "tree": {"$ref": "#/$defs/node"},
            "anything": {},
        },
        "$defs": {
            "filter": {"type": "object", "properties": {"field": {"type": "string"}, "on": {"type": "boolean"}}},
            "node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/node"}}},  # endless: cut
        },
    }
    tools = [{"type": "function", "function": {"name": "search_docs", "parameters": parameters}}]
    c = client(upstream)
    r = await c.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}], tools=tools)
    (call,) = r.choices[0].message.tool_calls or []
    args = orjson.loads(call.function.arguments)
    tree = args.pop("tree")
    assert args == {"kind": "search", "lang": "fr", "limit": 20, "query": "weather in Oslo",
                    "at": "2025-01-01T00:00:00Z", "score": 0.5, "filters": [{"field": "hi", "on": True}] * 2,
                    "anything": "hi"}  # fmt: skip
    depth = 0
    while tree:
        tree, depth = tree["child"], depth + 1
    assert 1 < depth < 10  # the recursive schema nests a few levels, then stops
    await c.close()


async def test_a_forced_tool_call_with_no_tool_offered_is_still_get_weather(upstream: Upstream) -> None:
    c = client(upstream)
    r = await c.chat.completions.create(model="echo:tool_call", messages=[{"role": "user", "content": "Oslo"}])
    (call,) = r.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    assert orjson.loads(call.function.arguments) == {"city": "Oslo", "unit": "celsius"}
    await c.close()


async def test_the_offered_tool_through_the_relay(make_relay: RelayFactory) -> None:
    """What an agent framework sees through the relay's Chat Completions face: the tool it offered."""
    relay = await make_relay()
    c = openai.AsyncOpenAI(base_url=relay.url + "/v1", api_key="open-mode", max_retries=0,
                           default_headers={"X-OpenAI-API-Key": TEST_KEY})  # fmt: skip
    tools = [openai.pydantic_function_tool(GetTime), openai.pydantic_function_tool(LookupOrder)]
    async with c.chat.completions.stream(model="echo", messages=ORDER, tools=tools) as s:
        final = await s.get_final_completion()
    (call,) = final.choices[0].message.tool_calls or []
    assert call.function.name == "GetTime" and call.function.parsed_arguments == GetTime(timezone="order 42")
    await c.close()
