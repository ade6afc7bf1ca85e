"""The OpenAI-compatible face, judged by the official Python SDK (`openai`) against the running relay
and the dev upstream: Responses in the background, streamed, dropped and resumed, cancelled, chained,
with function tools and JSON schemas; stored chat completions; webhooks; errors; key scoping."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from pydantic import BaseModel

from relay.facade.common import RESPONSE, parse_id

from .conftest import (
    TEST_KEY,
    Receiver,
    Relay,
    RelayFactory,
    free_port,
    parse_sse,
    start_relay,
    until,
    wait_healthy,
    wait_hits,
)

KEY_A = "relay-key-alpha-0001"
KEY_B = "relay-key-bravo-0002"
SLOW = "echo:pace=0.03"  # one word per chunk


def sdk(relay: Relay, key: str = "unused-in-open-mode") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=relay.url + "/v1", api_key=key, max_retries=0,
                              default_headers={"X-OpenAI-API-Key": TEST_KEY})  # fmt: skip


@pytest.fixture
async def client(relay: Relay) -> AsyncIterator[openai.AsyncOpenAI]:
    c = sdk(relay)
    yield c
    await c.close()


@pytest.fixture
async def keyed(make_relay: RelayFactory) -> Relay:
    return await make_relay(auth_api_keys=[{"key": KEY_A, "name": "alpha"}, {"key": KEY_B, "name": "bravo"}])


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


async def test_background_stream_dropped_then_resumed_joins_with_nothing_lost_or_doubled(
    relay: Relay, client: openai.AsyncOpenAI
) -> None:
    stream = await client.responses.create(model=SLOW, input=words(60), background=True, stream=True)
    got, seqs, response_id = [], [], None
    async for event in stream:
        seqs.append(event.sequence_number)
        if event.type == "response.created":
            response_id = event.response.id
            assert event.response.status == "queued" and event.response.background is True
        if event.type == "response.output_text.delta":
            got.append(event.delta)
            if len(got) == 7:
                break  # the connection goes away mid-stream
    await stream.close()
    assert response_id is not None and seqs == list(range(len(seqs)))
    resumed = await client.responses.retrieve(response_id, stream=True, starting_after=seqs[-1])
    after, types, final = [], [], None
    async for event in resumed:
        seqs.append(event.sequence_number)
        types.append(event.type)
        if event.type == "response.output_text.delta":
            after.append(event.delta)
        if event.type == "response.completed":
            final = event.response
    assert seqs == list(range(len(seqs))), "the resumed stream starts right after the last event seen"
    text = "".join(got + after)
    assert text == words(60) and final is not None and final.output_text == text
    assert types[-4:] == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"
    ]  # fmt: skip
    polled = await client.responses.retrieve(response_id)
    assert polled.status == "completed" and polled.output_text == text
    assert polled.usage is not None and polled.usage.output_tokens == 60 and polled.usage.total_tokens > 60
    # a resume from any point replays exactly what followed, and past the end there is nothing
    for n in (0, 5, *range(len(seqs) - 6, len(seqs))):  # (the last four are the closing events)
        again = await client.responses.retrieve(response_id, stream=True, starting_after=n)
        assert [e.sequence_number async for e in again] == list(range(n + 1, len(seqs)))
    past = await client.responses.retrieve(response_id, stream=True, starting_after=len(seqs) + 5)
    assert [e async for e in past] == []


async def test_stream_helper_by_response_id_and_polling_to_completed(relay: Relay, client: openai.AsyncOpenAI) -> None:
    created = await client.responses.create(model=SLOW, input=words(20), background=True)
    assert created.status in ("queued", "in_progress") and created.id.startswith("resp_")
    async with client.responses.stream(response_id=created.id) as stream:
        final = await stream.get_final_response()
    assert final.output_text == words(20) and final.status == "completed"
    async with client.responses.stream(response_id=created.id, starting_after=10) as stream:
        late = [e.sequence_number async for e in stream]
    assert late[0] == 11
    polled = await client.responses.retrieve(created.id)
    assert polled.status == "completed" and polled.output_text == words(20)
    assert polled.output[0].type == "message" and polled.output[0].id == final.output[0].id


async def test_a_plain_create_waits_for_the_answer(relay: Relay, client: openai.AsyncOpenAI) -> None:
    r = await client.responses.create(model="echo", input="plain and simple", instructions="be brief")
    assert r.status == "completed" and r.output_text == "plain and simple" and r.background is False
    assert relay.upstream.state.last_body["messages"] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "plain and simple"}]  # fmt: skip
    assert r.usage.input_tokens > 0 and "estimated" not in r.usage.model_dump()
    stream = await client.responses.create(model="echo", input="streamed not background", stream=True)
    events = [e async for e in stream]
    assert events[-1].type == "response.completed" and events[-1].response.output_text == "streamed not background"


async def test_cancel_mid_run_keeps_the_partial_text_and_an_estimated_usage(
    relay: Relay, client: openai.AsyncOpenAI
) -> None:
    created = await client.responses.create(model="echo:pace=0.05", input=words(400), background=True)
    while True:
        r = await client.responses.retrieve(created.id)
        if r.output_text.count(" ") >= 5:
            break
        await asyncio.sleep(0.05)
    cancelled = await client.responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    partial = cancelled.output_text
    assert words(400).startswith(partial) and 5 <= partial.count(" ") < 399
    assert cancelled.usage is not None and cancelled.usage.output_tokens > 0
    assert cancelled.usage.model_dump().get("estimated") is True  # the upstream reported none before the cut
    again = await client.responses.cancel(created.id)  # idempotent
    assert again.status == "cancelled" and again.output_text == partial
    events = [e async for e in await client.responses.retrieve(created.id, stream=True)]
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "cancelled"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == partial
    done = await client.responses.create(model="echo", input="finished already")
    with pytest.raises(openai.BadRequestError):
        await client.responses.cancel(done.id)


async def test_previous_response_id_chains_without_the_old_instructions(
    relay: Relay, client: openai.AsyncOpenAI
) -> None:
    first = await client.responses.create(model="echo", input="first question", instructions="old rules")
    second = await client.responses.create(model="echo", input="second question", previous_response_id=first.id)
    assert second.previous_response_id == first.id and second.output_text == "second question"
    assert relay.upstream.state.last_body["messages"] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first question"},
        {"role": "user", "content": "second question"},
    ]
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model="echo", input="x", previous_response_id="resp_nothing_here")


async def test_a_function_tool_round_trip(relay: Relay, client: openai.AsyncOpenAI) -> None:
    tools = [{"type": "function", "name": "get_weather", "description": "weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]  # fmt: skip
    stream = await client.responses.create(model="echo", input="Paris", tools=tools, stream=True)
    events = [e async for e in stream]
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    first = events[-1].response
    call = first.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert orjson.loads(call.arguments)["city"] == "Paris"
    sent = relay.upstream.state.last_body
    assert sent["tools"] == [{"type": "function", "function": {"name": "get_weather", "description": "weather of "
                              "a city", "parameters": tools[0]["parameters"]}}]  # fmt: skip
    second = await client.responses.create(model="echo", previous_response_id=first.id, tools=tools,
                                           input=[{"type": "function_call_output", "call_id": call.call_id,
                                                   "output": "22 degrees"}])  # fmt: skip
    assert second.output_text == "the tool said: 22 degrees"
    messages = relay.upstream.state.last_body["messages"]
    assert messages[-2]["tool_calls"][0]["id"] == call.call_id
    assert messages[-1] == {"role": "tool", "tool_call_id": call.call_id, "content": "22 degrees"}


class City(BaseModel):
    city: str
    population: int


async def test_text_format_json_schema_is_passed_through(relay: Relay, client: openai.AsyncOpenAI) -> None:
    parsed = await client.responses.parse(model="echo", input='{"city": "Lyon", "population": 522000}',
                                          text_format=City)  # fmt: skip
    assert parsed.output_parsed == City(city="Lyon", population=522000)
    fmt = relay.upstream.state.last_body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "City"
    assert set(fmt["json_schema"]["schema"]["properties"]) == {"city", "population"}
    assert parsed.text.format.type == "json_schema"


async def test_unsupported_features_are_refused_by_name(relay: Relay, client: openai.AsyncOpenAI) -> None:
    cases = [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[0].type"),
        ({"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, "input[0].type"),
        ({"reasoning": {"effort": "low", "summary": "auto"}}, "reasoning"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"extra_body": {"conversation": "conv_1"}}, "conversation"),
        ({"extra_body": {"made_up_field": 1}}, "made_up_field"),
        ({"background": True, "store": False}, "store"),
    ]
    for extra, param in cases:
        kwargs: dict[str, Any] = {"model": "echo", "input": "x", **extra}
        with pytest.raises(openai.BadRequestError) as caught:
            await client.responses.create(**kwargs)
        assert caught.value.body["param"] == param, (extra, caught.value.body)
        assert param.split("[")[0].split(".")[0] in caught.value.body["message"]
    assert relay.upstream.state.total == 0  # nothing reached the upstream


async def test_errors_raise_the_sdk_classes_and_objects_belong_to_their_key(keyed: Relay) -> None:
    a, b, nobody = sdk(keyed, KEY_A), sdk(keyed, KEY_B), sdk(keyed, "not-a-relay-key")
    try:
        with pytest.raises(openai.AuthenticationError):
            await nobody.responses.create(model="echo", input="x")
        with pytest.raises(openai.AuthenticationError):
            await nobody.models.list()
        with pytest.raises(openai.NotFoundError):
            await a.responses.retrieve("resp_does_not_exist")
        mine = await a.responses.create(model=SLOW, input=words(60), background=True)
        for call in (b.responses.retrieve(mine.id), b.responses.cancel(mine.id), b.responses.delete(mine.id),
                     b.responses.input_items.list(mine.id), b.responses.retrieve(mine.id, stream=True)):  # fmt: skip
            with pytest.raises(openai.NotFoundError):
                await call
        with pytest.raises(openai.NotFoundError):  # chaining from another key's response
            await b.responses.create(model="echo", input="x", previous_response_id=mine.id)
        assert (await a.responses.cancel(mine.id)).status == "cancelled"
        assert (await a.responses.retrieve(mine.id)).status == "cancelled"  # its answer is now kept ...
        with pytest.raises(openai.NotFoundError):
            await b.responses.retrieve(mine.id)  # ... for its owner only
        stored = await a.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}], store=True)
        assert (await a.chat.completions.retrieve(stored.id)).id == stored.id
        with pytest.raises(openai.NotFoundError):
            await b.chat.completions.retrieve(stored.id)
        assert [c.id async for c in b.chat.completions.list()] == []
        assert [c.id async for c in a.chat.completions.list()] == [stored.id]
    finally:
        for c in (a, b, nobody):
            await c.close()


async def test_input_items_and_delete(relay: Relay, client: openai.AsyncOpenAI) -> None:
    r = await client.responses.create(model="echo", input=[
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": [{"type": "input_text", "text": "three"}]},
    ])  # fmt: skip
    items = [i async for i in client.responses.input_items.list(r.id, order="asc")]
    assert [i.content[0].text for i in items] == ["one", "two", "three"]
    newest = await client.responses.input_items.list(r.id, limit=1)  # newest first by default, as OpenAI
    assert newest.data[0].content[0].text == "three" and newest.has_more
    rp = parse_id(RESPONSE, r.id)
    assert rp is not None and rp.file(relay.data_dir, "json").exists()
    deleted = await client.responses.delete(r.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    assert not rp.file(relay.data_dir, "json").exists() and not rp.file(relay.data_dir, "txt").exists()
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(r.id)


async def test_store_false_leaves_no_files(relay: Relay, client: openai.AsyncOpenAI) -> None:
    r = await client.responses.create(model="echo", input="forget me", store=False)
    assert r.output_text == "forget me" and r.store is False
    await until(lambda: not list(relay.data_dir.glob("1/r/**/*.json")), what="the files are removed")
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(r.id)


async def test_stored_chat_completions(relay: Relay, client: openai.AsyncOpenAI) -> None:
    def ask(text: str, **kw: Any) -> Any:
        return client.chat.completions.create(model="echo", messages=[{"role": "user", "content": text}], **kw)

    x = await ask("about x", store=True, metadata={"topic": "x"})
    y = await ask("about y", store=True, metadata={"topic": "y"})
    streamed = await ask("streamed and kept", store=True, stream=True, metadata={"topic": "x"})
    chunks = [c async for c in streamed]
    sid = chunks[0].id
    assert all(c.id == sid for c in chunks) and sid.startswith("chatcmpl-")
    assert all(c.choices and c.usage is None for c in chunks)  # no usage chunk: the client did not ask for it
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "streamed and kept"
    counted = [c async for c in await ask("counted", store=True, stream=True, stream_options={"include_usage": True})]
    assert not counted[-1].choices and counted[-1].usage is not None and counted[-1].usage.completion_tokens == 1
    assert all(c.choices for c in counted[:-1])
    assert (await client.chat.completions.retrieve(sid)).usage.completion_tokens == 3  # kept all the same
    plain = await ask("not kept")
    assert plain.choices[0].message.content == "not kept"
    assert x.choices[0].message.content == "about x" and x.id.startswith("chatcmpl-")
    got = await client.chat.completions.retrieve(x.id)
    assert got.choices[0].message.content == "about x" and got.metadata == {"topic": "x"}
    listed = [c.id async for c in client.chat.completions.list(metadata={"topic": "x"})]
    assert listed == [x.id, sid]
    assert [c.id async for c in client.chat.completions.list(order="desc", limit=1)][0] == counted[0].id
    assert [c.id async for c in client.chat.completions.list(model="other")] == []
    messages = [m async for m in client.chat.completions.messages.list(y.id)]
    assert [(m.role, m.content) for m in messages] == [("user", "about y")]
    assert (await client.chat.completions.retrieve(y.id)).metadata == {"topic": "y"}
    updated = await client.chat.completions.update(y.id, metadata={"topic": "x", "reviewed": "yes"})
    assert updated.metadata == {"topic": "x", "reviewed": "yes"}
    assert (await client.chat.completions.retrieve(y.id)).metadata == {"topic": "x", "reviewed": "yes"}
    assert [c.id async for c in client.chat.completions.list(metadata={"reviewed": "yes"})] == [y.id]
    deleted = await client.chat.completions.delete(x.id)
    assert deleted.deleted is True and deleted.id == x.id
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.retrieve(x.id)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.retrieve(plain.id)  # never stored
    assert [c.id async for c in client.chat.completions.list()] == [y.id, sid, counted[0].id]


async def test_the_chat_index_is_read_back_at_start(make_relay: RelayFactory, tmp_path: Path) -> None:
    data = tmp_path / "shared"
    first = await make_relay(data_dir=data)
    c1 = sdk(first)
    kept = await c1.chat.completions.create(model="echo", messages=[{"role": "user", "content": "kept"}],
                                            store=True, metadata={"k": "v"})  # fmt: skip
    gone = await c1.chat.completions.create(model="echo", messages=[{"role": "user", "content": "gone"}], store=True)
    await c1.chat.completions.update(kept.id, metadata={"k": "w"})
    await c1.chat.completions.delete(gone.id)
    await c1.close()
    await first.runner.cleanup()
    second = await make_relay(data_dir=data)
    c2 = sdk(second)
    try:
        assert [(c.id, c.metadata) async for c in c2.chat.completions.list()] == [(kept.id, {"k": "w"})]
    finally:
        await c2.close()


async def test_models_come_from_the_upstream(relay: Relay, client: openai.AsyncOpenAI) -> None:
    models = [m.id async for m in client.models.list()]
    assert models == ["echo"]


async def test_upstream_errors_keep_their_status(relay: Relay, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="echo:fail=429", messages=[{"role": "user", "content": "x"}])
    failed = await client.responses.create(model="echo:fail=500", input="x")
    assert failed.status == "failed" and "500" in failed.error.message


async def test_browsers_get_the_relays_own_urls(relay: Relay, client: openai.AsyncOpenAI) -> None:
    raw = await client.responses.with_raw_response.create(model="echo", input="for the browser", background=True)
    response = raw.parse()
    stream_url = raw.headers["X-Relay-Stream-Url"]
    assert "stream_token=" in stream_url and response.model_extra["relay"]["stream_url"] == stream_url
    async with aiohttp.ClientSession() as s:
        async with s.get(stream_url) as r:  # no key: the stream token in the URL opens it, read-only
            events = parse_sse((await r.read()).decode())
        async with s.get(raw.headers["X-Relay-Status-Url"]) as r:
            assert r.status == 401  # private
        headers = {"Authorization": "Bearer " + raw.headers["X-Relay-Bearer-Token"]}
        async with s.get(raw.headers["X-Relay-Status-Url"], headers=headers) as r:
            doc = await r.json()
    kinds = [orjson.loads(e.data)["type"] for e in events if e.data != "[DONE]"]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert doc["status"] == "done" and doc["openai"]["id"] == response.id


WHSEC = "whsec_" + base64.b64encode(b"a-webhook-key-of-32-bytes-length").decode()


async def test_webhooks_verify_with_the_sdk(make_relay: RelayFactory, receiver: Receiver) -> None:
    relay = await make_relay(webhooks_secret=WHSEC, webhooks_allow_private_addresses=True,
                             webhooks_openai_url=receiver.url + "/openai")  # fmt: skip
    client = sdk(relay)
    try:
        done = await client.responses.create(model="echo", input="hooked", background=True)
        slow = await client.responses.create(model=SLOW, input=words(60), background=True)
        await client.responses.cancel(slow.id)
        await wait_hits(receiver, "openai", 2)
        events = {}
        for headers, body in receiver.hits["openai"]:
            event = client.webhooks.unwrap(body, headers, secret=WHSEC)
            events[event.data.id] = event.type
        assert events == {done.id: "response.completed", slow.id: "response.cancelled"}
        with pytest.raises(openai.InvalidWebhookSignatureError):
            client.webhooks.unwrap(body + b" ", headers, secret=WHSEC)
        # the OffloadGPT webhooks carry the same three headers, beside X-Relay-Signature
        await relay.start({"messages": [{"role": "user", "content": "x"}], "webhook_url": receiver.url + "/native"})
        await wait_hits(receiver, "native", 1)
        headers, body = receiver.hits["native"][0]
        client.webhooks.verify_signature(body, headers, secret=WHSEC)
        assert headers["X-Relay-Signature"].startswith("sha256=")
    finally:
        await client.close()


async def test_a_response_cut_by_a_crash_is_repaired_as_failed_with_its_text(
    tmp_path: Path, upstream: Any, receiver: Receiver
) -> None:
    port, data = free_port(), tmp_path / "data"
    hooks = f'[webhooks]\nopenai_url = "{receiver.url}/crash"\nallow_private_addresses = true\nsecret = "{WHSEC}"\n'
    proc = start_relay(port, data, upstream, toml=hooks)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url, proc)
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                                    default_headers={"X-OpenAI-API-Key": TEST_KEY})  # fmt: skip
        stream = await client.responses.create(model="echo:pace=0.05", input=words(200), background=True, stream=True)
        text, rid = [], ""
        async for event in stream:
            if event.type == "response.created":
                rid = event.response.id
            if event.type == "response.output_text.delta":
                text.append(event.delta)
                if len(text) == 10:
                    break
        proc.kill()  # kill -9 mid-answer
        proc.wait()
        proc = start_relay(port, data, upstream, toml=hooks)
        await wait_healthy(url, proc)
        await wait_hits(receiver, "crash", 1)  # reported once the restart has finished it
        headers, body = receiver.hits["crash"][0]
        event = client.webhooks.unwrap(body, headers, secret=WHSEC)
        assert event.type == "response.failed" and event.data.id == rid
        repaired = await client.responses.retrieve(rid)
        assert repaired.status == "failed" and "interrupted" in repaired.error.message
        assert repaired.output_text.startswith("".join(text)) and repaired.usage.model_dump()["estimated"] is True
        events = [e async for e in await client.responses.retrieve(rid, stream=True)]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert events[-1].type == "response.failed" and events[-2].type == "response.output_item.done"
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == repaired.output_text
        await client.close()
    finally:
        proc.kill()
        proc.wait()


def ledger_lines(relay: Relay) -> list[dict[str, Any]]:
    return [orjson.loads(line) for f in sorted((relay.data_dir / "usage").glob("*.jsonl"))
            for line in f.read_bytes().splitlines()]  # fmt: skip


async def test_passed_through_completions_are_in_the_usage_ledger(relay: Relay, client: openai.AsyncOpenAI) -> None:
    ask = [{"role": "user", "content": "one two three four five"}]
    plain = await client.chat.completions.create(model="echo", messages=ask)
    streamed = [c async for c in await client.chat.completions.create(model="echo", messages=ask, stream=True)]
    with_usage = {"include_usage": True}
    counted = [
        c async for c in await client.chat.completions.create(model="echo", messages=ask, stream=True,
                                                              stream_options=with_usage)
    ]  # fmt: skip
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="echo:fail=429", messages=ask)
    await until(lambda: len(ledger_lines(relay)) == 4, what="four ledger lines")
    lines = ledger_lines(relay)
    assert all(line["endpoint"] == "/v1/chat/completions" and line["key"] == "open" for line in lines)
    assert plain.usage is not None and counted[-1].usage is not None and not counted[-1].choices
    # the relay asked for usage on the stream whose client did not: that client does not get the usage chunk
    assert all(c.choices and c.usage is None for c in streamed)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == "one two three four five"
    reported = [line for line in lines if line["outcome"] == "done" and not line["estimated"]]
    assert [line["completion_tokens"] for line in reported] == [5, 5, 5]  # the upstream's own usage, all three
    assert reported[0]["total_tokens"] == plain.usage.total_tokens
    estimated = [line for line in lines if line["estimated"]]
    assert len(estimated) == 1 and estimated[0]["outcome"] == "error" and estimated[0]["code"] == "upstream_error"
    assert not list(relay.data_dir.glob("1/r/**/*.json"))  # still nothing else written
