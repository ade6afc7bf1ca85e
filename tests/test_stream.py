"""Serving: status/raw files, and the event stream (replay, live follow, resume, heartbeat, fan-out)."""

from __future__ import annotations

import asyncio
import logging
import random
import time

import aiohttp
import orjson
import pytest
from yarl import URL

from .conftest import Event, Relay, RelayFactory, event_arrivals, msg, parse_sse, read_stream, text_of, until


async def test_status_and_raw_are_served_with_the_right_headers(relay: Relay) -> None:
    doc = await relay.start(msg("served"))
    ep = doc["endpoints"]
    async with relay.session.get(ep["status_url"]) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("application/json")
        assert r.headers["Cache-Control"] == "no-store"
        assert r.headers["Access-Control-Allow-Origin"] == "*"
    final = await relay.wait_status(ep["status_url"])
    async with relay.session.get(final["endpoints"]["response_raw_url"]) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        assert r.headers["Cache-Control"] == "no-store"
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert b"data: [DONE]" in await r.read()
    a = await relay.start(msg("async raw"), endpoint="/v1/async-chatgpt")
    final = await relay.wait_status(a["endpoints"]["status_url"])
    async with relay.session.get(final["endpoints"]["response_raw_url"]) as r:
        assert r.headers["Content-Type"].startswith("application/json")
        assert (await r.json())["choices"][0]["message"]["content"] == "async raw"
    async with relay.session.get(a["endpoints"]["status_url"][: -len(".json")] + ".txt") as r:
        assert r.status == 404  # async requests have no event stream


async def test_raw_before_the_end_is_a_clear_404(relay: Relay) -> None:
    doc = await relay.start(msg("x", model="echo:delay=3"))
    async with relay.session.get(doc["endpoints"]["status_url"][: -len(".json")] + ".raw") as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_ready"
    async with relay.session.get(doc["endpoints"]["stop_url"]):
        pass


async def test_event_stream_headers_and_immediate_comment(relay: Relay) -> None:
    doc = await relay.start(msg("x", model="echo:delay=2"))
    t0 = time.monotonic()
    async with relay.session.get(doc["endpoints"]["stream_events_url"]) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert r.headers["Cache-Control"] == "no-cache, no-transform"
        assert r.headers["X-Accel-Buffering"] == "no"
        assert "Content-Length" not in r.headers
        first = await r.content.readuntil(b"\n\n")
        assert first.startswith(b":")
        assert time.monotonic() - t0 < 1.5  # long before the first chunk
        rest = (await r.read()).decode()
    assert text_of(parse_sse(rest)) == "x"


async def test_heartbeat_while_waiting(make_relay: RelayFactory) -> None:
    relay = await make_relay(server_heartbeat_seconds=0.3)
    doc = await relay.start(msg("late", model="echo:delay=1.5"))
    _, _, body = await read_stream(relay.session, doc["endpoints"]["stream_events_url"])
    comments = [line for line in body.split("\n") if line.startswith(":")]
    assert len(comments) >= 4  # one at once, then one every 0.3 s while the upstream was silent
    assert text_of(parse_sse(body)) == "late"
    stored = relay.data_dir.joinpath(doc["endpoints"]["stream_events_url"][len(relay.url) + 1 :]).read_bytes()
    assert not [line for line in stored.split(b"\n") if line.startswith(b":")]  # comments never hit the file


async def test_live_follow_delivers_events_as_they_arrive(relay: Relay) -> None:
    doc = await relay.start(msg("a b c d e f", model="echo:pace=0.25"))
    async with relay.session.get(doc["endpoints"]["stream_events_url"]) as r:
        arrivals = await event_arrivals(r)
    # 8 chunks + usage + [DONE], spread over >1 s: not one burst at the end
    assert len(arrivals) >= 9
    assert arrivals[-1] - arrivals[0] > 1.0


async def test_resume_by_header_and_query(relay: Relay) -> None:
    doc = await relay.start(msg("one two three four five"))
    url = doc["endpoints"]["stream_events_url"]
    _, _, body = await read_stream(relay.session, url)
    events = parse_sse(body)
    assert events[-1].data == "[DONE]"
    for k in range(len(events) - 1):
        _, _, rest = await read_stream(relay.session, url, {"Last-Event-ID": events[k].id})
        assert parse_sse(rest) == events[k + 1 :]
        _, _, rest_q = await read_stream(relay.session, f"{url}?last_event_id={events[k].id}")
        assert parse_sse(rest_q) == events[k + 1 :]
    # reconnecting with the final id of a finished stream: 204, so the browser stops
    async with relay.session.get(url, headers={"Last-Event-ID": events[-1].id}) as r:
        assert r.status == 204
    for bad in ("12345678", "abc", "1", "-5", events[1].id + "0", "01"):
        async with relay.session.get(url, headers={"Last-Event-ID": bad}) as r:
            assert r.status == 400, bad
            assert (await r.json())["error"]["code"] == "unknown_event_id"


async def test_readers_before_during_and_after(relay: Relay) -> None:
    doc = await relay.start(msg("a b c d e f g h", model="echo:delay=0.5,pace=0.1"))
    url = doc["endpoints"]["stream_events_url"]
    early = [asyncio.create_task(read_stream(relay.session, url)) for _ in range(5)]
    await asyncio.sleep(0.9)
    middle = [asyncio.create_task(read_stream(relay.session, url)) for _ in range(5)]
    results = await asyncio.gather(*early, *middle)
    _, _, after = await read_stream(relay.session, url)
    expected = parse_sse(after)
    assert text_of(expected) == "a b c d e f g h"
    for _, _, body in results:
        assert parse_sse(body) == expected


async def _resuming_reader(session: aiohttp.ClientSession, url: str, cut_after: int) -> list[Event]:
    """Read `cut_after` events, drop the connection, reconnect with the last id, read the rest."""
    got: list[Event] = []
    async with session.get(url) as r:
        buf = ""
        async for block in r.content.iter_any():
            buf += block.decode()
            parts = buf.split("\n\n")
            buf = parts.pop()
            for part in parts:
                got += parse_sse(part + "\n\n")
            if len(got) >= cut_after:
                break
    if got and got[-1].data == "[DONE]":
        return got
    headers = {"Last-Event-ID": got[-1].id} if got else {}
    async with session.get(url, headers=headers) as r:
        if r.status == 204:
            return got
        got += parse_sse((await r.read()).decode())
    return got


async def test_fifty_requests_three_readers_each(relay: Relay) -> None:
    rng = random.Random(7)
    texts = [" ".join(f"r{i}w{j}" for j in range(rng.randint(5, 15))) for i in range(50)]
    docs = await asyncio.gather(*(relay.start(msg(t, model="echo:pace=0.02")) for t in texts))

    async def late(url: str) -> list[Event]:
        await asyncio.sleep(rng.uniform(0.1, 0.5))
        _, _, body = await read_stream(relay.session, url)
        return parse_sse(body)

    async def live(url: str) -> list[Event]:
        _, _, body = await read_stream(relay.session, url)
        return parse_sse(body)

    tasks = []
    for doc in docs:
        url = doc["endpoints"]["stream_events_url"]
        tasks.append(asyncio.gather(live(url), late(url), _resuming_reader(relay.session, url, rng.randint(2, 5))))
    results = await asyncio.gather(*tasks)
    for text, doc, readers in zip(texts, docs, results, strict=True):
        for events in readers:
            assert text_of(events) == text
            ids = [int(e.id) for e in events]
            assert ids == sorted(set(ids))  # every event exactly once, in order
            assert events[-1].data == "[DONE]"
        final = await relay.wait_status(doc["endpoints"]["status_url"])
        assert final["response"]["body"]["choices"][0]["message"]["content"] == text


async def test_unknown_and_malformed_urls_are_404_json(relay: Relay) -> None:
    doc = await relay.start(msg("x"))
    good = doc["endpoints"]["status_url"]
    await relay.wait_status(good)
    path = good[len(relay.url) :]
    bad_paths = [
        path.replace("/1/r/", "/2/r/"),
        path.replace(".json", ".JSON"),
        path.replace("/pub/", "/prv/"),
        path.replace("/pub/", "/pub//"),
        path.upper(),
        path[:-5] + "0.json",
        "/1/r/pub/../../etc/passwd",
        "/1/r/pub/2026/11/27/10/05/09/%2e%2e.json",
        "/" + path[1:].replace("/", "%2F", 2),
        path.replace("/pub/", "/pub/./"),
        "/1/r/pub/2026/13/45/10/05/09/" + path.rsplit("/", 1)[1],
    ]
    for p in bad_paths:
        async with relay.session.get(URL(relay.url + p, encoded=True)) as r:
            assert r.status in (404,), (p, r.status)
            if r.headers.get("Content-Type", "").startswith("application/json"):
                assert (await r.json())["status"] == "error"


async def test_expired_requests_are_404(make_relay: RelayFactory) -> None:
    relay = await make_relay(retention_max_age_days=0.00002)  # about 1.7 s
    doc = await relay.start(msg("x"))
    await relay.wait_status(doc["endpoints"]["status_url"])
    await asyncio.sleep(2.5)
    async with relay.session.get(doc["endpoints"]["status_url"]) as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"


async def test_status_json_is_valid_for_polling_clients(relay: Relay) -> None:
    doc = await relay.start(msg("poll"), endpoint="/v1/async-chatgpt")
    async with relay.session.get(doc["endpoints"]["status_url"]) as r:
        first = orjson.loads(await r.read())
    assert first["status"] in ("queued", "processing", "done")
    assert first["authorization"] == {"access": "public"}
    assert first["parameters"]["messages"] == [{"role": "user", "content": "poll"}]


async def test_head_on_a_stream_sends_headers_only(relay: Relay) -> None:
    doc = await relay.start(msg("a b c", model="echo:pace=0.05"))
    async with relay.session.head(doc["endpoints"]["stream_events_url"]) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert await r.read() == b""
    _, _, body = await read_stream(relay.session, doc["endpoints"]["stream_events_url"])
    assert text_of(parse_sse(body)) == "a b c"


async def test_the_access_log_counts_the_bytes_pushed_to_a_live_reader(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """Live events are written below aiohttp's response (see relay/fanout.py); the access line still
    reports every byte the reader got."""
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    doc = await relay.start(msg(" ".join(f"w{i}" for i in range(40)), model="echo:pace=0.02"))
    status, _, body = await read_stream(relay.session, doc["endpoints"]["stream_events_url"])
    assert status == 200 and parse_sse(body)[-1].data == "[DONE]"
    path = doc["endpoints"]["stream_events_url"][len(relay.url) :]
    await until(lambda: any(path in r.getMessage() for r in caplog.records), what="the access line")
    line = next(r.getMessage() for r in caplog.records if path in r.getMessage())
    logged = int(line.split('" 200 ')[1].split()[0])
    assert logged >= len(body.encode()), (logged, len(body.encode()))  # chunk framing adds a little


async def _strict_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, extra: str = "") -> bytes:
    """GET over an open connection; the body, its HTTP/1.1 chunked framing checked to the byte (every size
    line and every chunk ends with CRLF, the last chunk is `0` then CRLF CRLF)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: relay\r\n{extra}\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in head.lower(), head
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line[:-2], 16)  # (a bare LF or anything else after the hex digits fails here)
        if size == 0:
            assert await reader.readexactly(2) == b"\r\n"
            return bytes(body)
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"


async def test_a_replay_of_many_blocks_is_the_file_byte_for_byte_and_keeps_the_connection(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """A finished log larger than several read blocks goes out in blocks written beside their chunk
    framing (relay/serve.py, `_send_chunk`): the reader gets exactly the file, from the start and from an
    event in the middle, in framing a strict parser accepts, the connection stays usable for the next
    request, and the access line counts every byte."""
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    doc = await relay.start(msg("replay", model="echo:chunks=6000"))
    url = doc["endpoints"]["stream_events_url"]
    await relay.wait_status(doc["endpoints"]["status_url"])
    path = URL(url).path
    on_disk = (relay.data_dir / path.lstrip("/")).read_bytes()
    assert len(on_disk) > 3 * 256 * 1024  # several of the relay's read blocks
    events = parse_sse(on_disk.decode())
    middle = events[len(events) // 2]
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.config.server_port)
    try:
        for _ in range(2):
            assert await _strict_get(reader, writer, path) == b": connected\n\n" + on_disk
        rest = await _strict_get(reader, writer, path, f"Last-Event-ID: {middle.id}\r\n")
        assert parse_sse(rest.decode()) == events[len(events) // 2 + 1 :]
        assert on_disk.endswith(rest[len(b": connected\n\n") :])
    finally:
        writer.close()
    async with relay.session.get(url) as r:  # and through an ordinary client
        assert r.status == 200 and "Content-Length" not in r.headers
        assert await r.read() == b": connected\n\n" + on_disk
    await until(lambda: sum(path in r.getMessage() for r in caplog.records) >= 4, what="the access lines")
    logged = [int(r.getMessage().split('" 200 ')[1].split()[0]) for r in caplog.records if path in r.getMessage()]
    assert all(n >= len(on_disk) // 2 for n in logged) and max(logged) >= len(on_disk), logged
