"""The OpenAI-compatible face, either tier: once a stored response or chat completion is archived (a real
SeaweedFS, tests/objectstore.py) and its local files removed, the official Python SDK gets from it what
it got before (retrieve, stream resume, input items, stored completions listed and retrieved, chaining),
byte for byte where the relay sends stored bytes; another key still gets 404; a DELETE removes its
objects from the bucket too; a store that is away answers 503 in OpenAI's error shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from relay import tiers
from relay.facade.chat_index import INDEX
from relay.facade.common import ANSWERS, CHAT, RESPONSE, parse_id
from relay.keys import ARCHIVE

from .conftest import Relay, RelayFactory, parse_sse, until
from .objectstore import SeaweedS3
from .test_archive_serving import archive_settings
from .test_openai import KEY_A, KEY_B, sdk

KEYS = [{"key": KEY_A, "name": "alpha"}, {"key": KEY_B, "name": "bravo"}]


def local_files(relay: Relay, object_id: str) -> list[Path]:
    rp = parse_id(RESPONSE if object_id.startswith(RESPONSE) else CHAT, object_id)
    assert rp is not None
    return [rp.file(relay.data_dir, ext) for ext in ("json", "txt", "raw")]


def objects_of(s3: SeaweedS3, object_id: str) -> list[str]:
    rp = parse_id(RESPONSE if object_id.startswith(RESPONSE) else CHAT, object_id)
    assert rp is not None
    return [key for key in s3.keys("serving/") if key.startswith(f"serving/{rp.base}.")]


async def archived(relay: Relay, s3: SeaweedS3, ids: list[str]) -> None:
    """Wait until each object is in the bucket (its manifest written last) and its local files are gone;
    and forget the relay's kept answers, so that what follows is read from the archive."""
    files = [f for i in ids for f in local_files(relay, i)]
    await until(lambda: not any(f.exists() for f in files), timeout=30, what="the local copies removed")
    for i in ids:
        assert any(key.endswith(".manifest.json") for key in objects_of(s3, i)), i
        relay.app[ANSWERS].drop(i)


async def raw(relay: Relay, path: str, key: str = KEY_A) -> tuple[int, bytes]:
    async with relay.session.get(relay.url + path, headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status, await r.read()


async def events(client: openai.AsyncOpenAI, rid: str, after: int | None) -> list[dict[str, Any]]:
    if after is None:
        stream = await client.responses.retrieve(rid, stream=True)
    else:
        stream = await client.responses.retrieve(rid, stream=True, starting_after=after)
    return [e.model_dump() async for e in stream]


async def response_views(relay: Relay, client: openai.AsyncOpenAI, rid: str, last: int) -> dict[str, Any]:
    """What a client can get of a stored response: through the SDK, and the bytes the relay sends."""
    views: dict[str, Any] = {
        "object": (await client.responses.retrieve(rid)).model_dump(),
        "bytes": await raw(relay, f"/v1/responses/{rid}"),
        "items": [i.model_dump() async for i in client.responses.input_items.list(rid, order="asc")],
        "newest": (await client.responses.input_items.list(rid, limit=1)).model_dump(),
    }
    for after in (None, 0, 1, last // 2, last - 1, last, last + 5):
        views[f"events after {after}"] = await events(client, rid, after)
        query = "" if after is None else f"&starting_after={after}"
        views[f"stream bytes after {after}"] = await raw(relay, f"/v1/responses/{rid}?stream=true{query}")
    return views


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for name in before:
        assert after[name] == before[name], f"{name}: differs once archived"


@pytest.mark.timeout(180)
async def test_responses_answer_the_same_once_archived(make_relay: RelayFactory, s3: SeaweedS3) -> None:
    relay = await make_relay(auth_api_keys=KEYS, **archive_settings(s3))
    a, b = sdk(relay, KEY_A), sdk(relay, KEY_B)
    try:
        first = await a.responses.create(model="echo", instructions="old rules", input=[
            {"role": "user", "content": "one two three four five six seven eight"},
            {"role": "assistant", "content": "nine"},
            {"role": "user", "content": [{"type": "input_text", "text": "ten eleven twelve"}]},
        ])  # fmt: skip
        streamed = [e async for e in await a.responses.create(model="echo", input=" ".join(["w"] * 40), stream=True)]
        second = streamed[-1].response
        assert second.status == "completed" and streamed[-1].sequence_number > 40
        ids = [first.id, second.id]
        lasts = {first.id: 0, second.id: streamed[-1].sequence_number}
        lasts[first.id] = (await events(a, first.id, None))[-1]["sequence_number"]
        chained = await a.responses.create(model="echo", input="and then?", previous_response_id=first.id)
        sent_before = relay.upstream.state.last_body["messages"]
        before = {rid: await response_views(relay, a, rid, lasts[rid]) for rid in ids}
        assert before[second.id]["events after None"] == [e.model_dump() for e in streamed]
        assert before[first.id]["bytes"][0] == 200 and before[first.id]["newest"]["has_more"] is True

        await archived(relay, s3, [*ids, chained.id])
        for rid in ids:
            assert_same(before[rid], await response_views(relay, a, rid, lasts[rid]))
        # chaining from the archived parent sends the same conversation upstream
        again = await a.responses.create(model="echo", input="and then?", previous_response_id=first.id)
        assert again.output_text == chained.output_text == "and then?"
        assert relay.upstream.state.last_body["messages"] == sent_before
        assert sent_before[0] == {"role": "user", "content": "one two three four five six seven eight"}
        # another key's: 404 from the archive as from the disk
        for call in (b.responses.retrieve(first.id), b.responses.input_items.list(first.id),
                     b.responses.retrieve(first.id, stream=True), b.responses.delete(first.id),
                     b.responses.create(model="echo", input="x", previous_response_id=first.id)):  # fmt: skip
            with pytest.raises(openai.NotFoundError):
                await call
        # a DELETE removes the archived objects: then 404, nothing left in the bucket
        await a.responses.delete(second.id)
        assert objects_of(s3, second.id) == [] and objects_of(s3, first.id) != []
        for call in (a.responses.retrieve(second.id), a.responses.input_items.list(second.id),
                     a.responses.retrieve(second.id, stream=True, starting_after=3),
                     a.responses.delete(second.id),
                     a.responses.create(model="echo", input="x", previous_response_id=second.id)):  # fmt: skip
            with pytest.raises(openai.NotFoundError):
                await call
        status, body = await raw(relay, f"/v1/responses/{second.id}")
        assert status == 404 and b'"error"' in body and b"not_found" in body
    finally:
        await a.close()
        await b.close()


async def chat_views(relay: Relay, client: openai.AsyncOpenAI, ids: list[str]) -> dict[str, Any]:
    views: dict[str, Any] = {
        "list": [c.model_dump() async for c in client.chat.completions.list()],
        "list desc": (await client.chat.completions.list(order="desc", limit=1)).model_dump(),
        "list by metadata": [c.id async for c in client.chat.completions.list(metadata={"topic": "x"})],
    }
    for cid in ids:
        views[cid] = (await client.chat.completions.retrieve(cid)).model_dump()
        views[f"{cid} bytes"] = await raw(relay, f"/v1/chat/completions/{cid}")
        views[f"{cid} messages"] = [m.model_dump() async for m in client.chat.completions.messages.list(cid)]
    return views


@pytest.mark.timeout(180)
async def test_stored_chat_completions_answer_the_same_once_archived(make_relay: RelayFactory, s3: SeaweedS3) -> None:
    relay = await make_relay(auth_api_keys=KEYS, **archive_settings(s3))
    a, b = sdk(relay, KEY_A), sdk(relay, KEY_B)
    try:
        x = await a.chat.completions.create(model="echo", store=True, metadata={"topic": "x"}, messages=[
            {"role": "system", "content": "be kind"}, {"role": "user", "content": "about x"}])  # fmt: skip
        chunks = [c async for c in await a.chat.completions.create(
            model="echo", store=True, stream=True, metadata={"topic": "y"},
            messages=[{"role": "user", "content": "streamed and kept"}])]  # fmt: skip
        ids = [x.id, chunks[0].id]
        await until(lambda: all(i in relay.app[INDEX].entries for i in ids), what="both indexed")
        before = await chat_views(relay, a, ids)
        assert [c["id"] for c in before["list"]] == ids and before["list by metadata"] == [x.id]

        await archived(relay, s3, ids)
        assert_same(before, await chat_views(relay, a, ids))
        assert [c.id async for c in b.chat.completions.list()] == []
        for call in (b.chat.completions.retrieve(x.id), b.chat.completions.delete(x.id),
                     b.chat.completions.update(x.id, metadata={"k": "v"})):  # fmt: skip
            with pytest.raises(openai.NotFoundError):
                await call
        with pytest.raises(openai.NotFoundError):
            [m async for m in b.chat.completions.messages.list(x.id)]
        updated = await a.chat.completions.update(ids[1], metadata={"topic": "x"})
        assert updated.model_dump() == {**before[ids[1]], "metadata": {"topic": "x"}}
        assert [c.id async for c in a.chat.completions.list(metadata={"topic": "x"})] == ids
        # a DELETE removes the archived objects
        deleted = await a.chat.completions.delete(x.id)
        assert deleted.deleted is True and objects_of(s3, x.id) == [] and objects_of(s3, ids[1]) != []
        with pytest.raises(openai.NotFoundError):
            await a.chat.completions.retrieve(x.id)
        assert [c.id async for c in a.chat.completions.list()] == [ids[1]]
    finally:
        await a.close()
        await b.close()


@pytest.mark.timeout(180)
async def test_store_false_leaves_nothing_in_the_bucket(make_relay: RelayFactory, s3: SeaweedS3) -> None:
    relay = await make_relay(auth_api_keys=KEYS, **archive_settings(s3))
    a = sdk(relay, KEY_A)
    try:
        gone = [(await a.responses.create(model="echo", input=f"forget me {i}", store=False)).id for i in range(4)]
        kept = await a.responses.create(model="echo", input="keep me")
        await archived(relay, s3, [kept.id])
        files = [f for i in gone for f in local_files(relay, i)]
        await until(lambda: not any(f.exists() for f in files), timeout=10, what="their files removed")
        await until(lambda: all(objects_of(s3, i) == [] for i in gone), timeout=10, what="no objects left")
        with pytest.raises(openai.NotFoundError):
            await a.responses.retrieve(gone[0])
    finally:
        await a.close()


@pytest.mark.timeout(180)
async def test_an_archive_that_is_away_answers_503_in_openai_shape(make_relay: RelayFactory, s3: SeaweedS3) -> None:
    relay = await make_relay(auth_api_keys=KEYS, **archive_settings(s3))
    a = sdk(relay, KEY_A)
    try:
        r = await a.responses.create(model="echo", input="kept in the bucket")
        first = await raw(relay, f"/v1/responses/{r.id}?stream=true&starting_after=2")
        await archived(relay, s3, [r.id])
        await s3.astop()
        try:
            for path in (f"/v1/responses/{r.id}", f"/v1/responses/{r.id}?stream=true&starting_after=2",
                         f"/v1/responses/{r.id}/input_items"):  # fmt: skip
                status, body = await raw(relay, path)
                assert status == 503 and b'"archive_unavailable"' in body and b'"error"' in body, (path, body)
            with pytest.raises(openai.InternalServerError):
                await a.responses.delete(r.id)
        finally:
            await s3.astart()
        assert await raw(relay, f"/v1/responses/{r.id}?stream=true&starting_after=2") == first
        await a.responses.delete(r.id)
        assert objects_of(s3, r.id) == []
    finally:
        await a.close()


@pytest.mark.timeout(180)
async def test_a_long_archived_log_resumes_anywhere(make_relay: RelayFactory, s3: SeaweedS3) -> None:
    """A log of several of the search's blocks: every resume lands where it did on the local log, with or
    without the closing events' places (`tiers.log_offset` against the ids the stream carried)."""
    relay = await make_relay(auth_api_keys=KEYS, **archive_settings(s3))
    a = sdk(relay, KEY_A)
    try:
        r = await a.responses.create(model="echo", input=" ".join(f"word{i}" for i in range(6000)))
        status, body = await raw(relay, f"/v1/responses/{r.id}?stream=true")
        assert status == 200 and len(body) > 3 * tiers.SEARCH_BLOCK
        starts = [(int(e.id), orjson.loads(e.data)["sequence_number"]) for e in parse_sse(body.decode())
                  if e.id is not None and e.data.startswith("{")]  # fmt: skip
        last = starts[-1][1]
        picks = sorted({0, 1, 2, 77, last // 3, last // 2, last - 3, last - 2, last - 1, last, last + 1})
        before = {
            after: await raw(relay, f"/v1/responses/{r.id}?stream=true&starting_after={after}") for after in picks
        }
        await archived(relay, s3, [r.id])
        rp = parse_id(RESPONSE, r.id)
        assert rp is not None
        size = len(body) - len(b": connected\n")
        for after in picks:
            assert await raw(relay, f"/v1/responses/{r.id}?stream=true&starting_after={after}") == before[after]
            want = next((offset for offset, seq in starts if seq > after), None)
            got = await tiers.log_offset(relay.app[ARCHIVE], rp, after, None)
            assert got == want or (want is None and got is not None and got >= starts[-1][0]), after
            assert got is not None and got <= size
    finally:
        await a.close()
