"""The shipped nginx configs, run by a real nginx on loopback in front of real relays."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from yarl import URL

from .conftest import (
    TEST_KEY,
    Relay,
    RelayFactory,
    event_arrivals,
    free_port,
    msg,
    parse_sse,
    read_stream,
    text_of,
    unknown_request,
)
from .nginx import Nginx


@pytest.fixture
async def front(make_relay: RelayFactory, tmp_path: Path) -> AsyncIterator[tuple[Nginx, Relay]]:
    port = free_port()
    relay = await make_relay(server_public_url=f"http://127.0.0.1:{port}")
    nginx = Nginx(
        tmp_path / "nginx",
        "relay.conf",
        {
            "/var/lib/relay/data": str(relay.data_dir.resolve()),
            "127.0.0.1:8080": f"127.0.0.1:{relay.config.server_port}",
        },
        port,
    )
    nginx.start()
    yield nginx, relay
    nginx.stop()


def relay_saw(caplog: pytest.LogCaptureFixture, path: str) -> bool:
    return any(path in r.getMessage() for r in caplog.records if r.name == "aiohttp.access")


async def test_public_files_are_served_by_nginx_with_the_right_headers(
    front: tuple[Nginx, Relay], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    nginx, relay = front
    s = relay.session
    doc = await relay.start(msg("through nginx"), headers={"Origin": "https://app.example"})
    assert doc["endpoints"]["status_url"].startswith(nginx.url + "/1/r/pub/")
    status_url = doc["endpoints"]["status_url"]
    final = await relay.wait_status(status_url)
    caplog.clear()
    async with s.get(status_url, headers={"Origin": "https://app.example"}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/json"
        assert r.headers["Cache-Control"] == "no-store"
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert orjson.loads(await r.read()) == final
    raw_url = final["endpoints"]["response_raw_url"]
    async with s.get(raw_url) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert r.headers["Access-Control-Allow-Origin"] == "*" and r.headers["Cache-Control"] == "no-store"
        assert b"data: [DONE]" in await r.read()
    path = status_url[len(nginx.url) :]
    assert not relay_saw(caplog, path) and not relay_saw(caplog, path[:-5] + ".raw")  # nginx served them
    async with s.options(
        status_url, headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"}
    ) as r:
        assert r.status == 204
        assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
        assert "Last-Event-ID" in r.headers["Access-Control-Allow-Headers"]
        assert r.headers["Access-Control-Allow-Methods"] == "GET, POST, OPTIONS"

    # an async request's raw body is JSON
    a = await relay.start(msg("async raw"), endpoint="/v1/async-chatgpt")
    done = await relay.wait_status(a["endpoints"]["status_url"])
    async with s.get(done["endpoints"]["response_raw_url"]) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "application/json"
        assert (await r.json())["choices"][0]["message"]["content"] == "async raw"
    # files that are not on disk: the relay's JSON errors, through nginx
    slow = await relay.start(msg("x", model="echo:delay=30"))
    async with s.get(slow["endpoints"]["status_url"][:-5] + ".raw") as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_ready"
    async with s.get(nginx.url + unknown_request()) as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
    async with s.post(slow["endpoints"]["stop_url"]) as r:
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "*"


async def test_api_errors_stay_json_through_nginx(front: tuple[Nginx, Relay]) -> None:
    nginx, relay = front
    headers = {"X-OpenAI-API-Key": TEST_KEY, "Content-Type": "application/json"}
    big = orjson.dumps(msg("x" * (4 * 1024 * 1024 + 10)))  # over the relay's limit, under nginx's
    async with relay.session.post(nginx.url + "/v1/stream-chatgpt", data=big, headers=headers) as r:
        assert r.status == 413 and (await r.json())["error"]["code"] == "body_too_large"
    async with relay.session.post(nginx.url + "/v1/stream-chatgpt", data=b"{", headers=headers) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"


async def test_live_stream_arrives_event_by_event_through_nginx(front: tuple[Nginx, Relay]) -> None:
    nginx, relay = front
    doc = await relay.start(msg("a b c d e f g h", model="echo:pace=0.2"))
    url = doc["endpoints"]["stream_events_url"]
    assert url.startswith(nginx.url)
    async with relay.session.get(url) as r:
        assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert "Content-Length" not in r.headers
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        t0 = time.monotonic()
        first = await r.content.readuntil(b"\n\n")
        assert first.startswith(b":") and time.monotonic() - t0 < 1  # the comment is not held back
        arrivals = await event_arrivals(r)
    assert len(arrivals) >= 10
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert arrivals[-1] - arrivals[0] > 1.2  # spread over the stream, not one burst at the end
    assert sum(1 for g in gaps if g > 0.1) >= 6  # most events arrived on their own


async def test_resume_through_nginx(front: tuple[Nginx, Relay]) -> None:
    nginx, relay = front
    doc = await relay.start(msg("one two three four"))
    url = doc["endpoints"]["stream_events_url"]
    _, _, body = await read_stream(relay.session, url)
    events = parse_sse(body)
    _, _, rest = await read_stream(relay.session, url, {"Last-Event-ID": events[1].id})
    assert parse_sse(rest) == events[2:]
    _, _, rest = await read_stream(relay.session, f"{url}?last_event_id={events[2].id}")
    assert parse_sse(rest) == events[3:]
    async with relay.session.get(url, headers={"Last-Event-ID": events[-1].id}) as r:
        assert r.status == 204


async def test_no_private_file_through_nginx_without_a_token(front: tuple[Nginx, Relay]) -> None:
    nginx, relay = front
    doc = await relay.start(msg("private through nginx", access="private"))
    token = doc["authorization"]["bearer_token"]
    status_url = doc["endpoints"]["status_url"]
    await relay.wait_status(status_url, headers={"Authorization": f"Bearer {token}"})
    path = status_url[len(nginx.url) :]
    spellings = [
        path, path[:-5] + ".raw", path[:-5] + ".txt",
        path.replace("/prv/", "/pub/"),
        path.replace("/prv/", "/pub/../prv/"),
        path.replace("/prv/", "/pub/%2e%2e/prv/"),
        path.replace("/prv/", "/pub%2F..%2Fprv/"),
        path.replace("/prv/", "/prv//"),
        path.replace("/prv/", "/PRV/"),
        "/" + path[1:].replace("/", "%2F"),
        path.replace(".json", ".JSON"),
        path + "%00",
        "/__relay_async_raw" + path,
        "/__relay_async_raw/" + path[:-5] + ".raw",
        path[:-5] + ".raw?x=.json",
    ]  # fmt: skip
    for spelling in spellings:
        async with relay.session.get(URL(nginx.url + spelling, encoded=True)) as r:
            body = await r.read()
            assert r.status in (400, 401, 404), (spelling, r.status)
            assert b"private through nginx" not in body, spelling
    async with relay.session.get(status_url, headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200 and (await r.json())["status"] == "done"
    stream = doc["endpoints"]["stream_events_url"] + "?" + doc["authorization"]["stream_url_arg"]
    _, _, body = await read_stream(relay.session, stream)
    assert text_of(parse_sse(body)) == "private through nginx"
    log = nginx.access_log()
    assert path[:-5] + ".txt" in log  # the stream request was logged...
    assert doc["authorization"]["stream_url_arg"].split("=", 1)[1] not in log and token not in log  # ...not its token


async def test_two_nodes_behind_one_nginx(upstream: object, make_relay: RelayFactory, tmp_path: Path) -> None:
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    relays_dir = tmp_path / "relays"
    n1 = await make_relay(server_public_url=public, server_node_id=1, data_dir=relays_dir / "node1")
    n2 = await make_relay(server_public_url=public, server_node_id=2, data_dir=relays_dir / "node2")
    nginx = Nginx(
        tmp_path / "nginx-multi",
        "relay-multinode.conf",
        {
            "/var/lib/relay/": f"{relays_dir.resolve()}/",
            "127.0.0.1:8081": f"127.0.0.1:{n1.config.server_port}",
            "127.0.0.1:8082": f"127.0.0.1:{n2.config.server_port}",
        },
        port,
    )
    nginx.start()
    try:
        async with aiohttp.ClientSession() as s:
            headers = {"X-OpenAI-API-Key": TEST_KEY}
            docs = []
            for i in range(6):
                async with s.post(public + "/v1/stream-chatgpt", json=msg(f"turn {i}"), headers=headers) as r:
                    assert r.status == 200
                    docs.append(await r.json())
            nodes = {d["endpoints"]["status_url"][len(public) + 1] for d in docs}
            assert nodes == {"1", "2"}  # spread over both
            for i, d in enumerate(docs):
                async with s.get(d["endpoints"]["stream_events_url"]) as r:
                    assert text_of(parse_sse((await r.read()).decode())) == f"turn {i}"
                async with s.get(d["endpoints"]["status_url"]) as r:
                    assert (await r.json())["status"] == "done"  # from the owner's data directory
            # one async request on each node: its raw JSON comes from the right directory
            for node in ("1", "2"):
                async with s.post(f"{public}/{node}/v1/async-chatgpt", json=msg("raw " + node), headers=headers) as r:
                    a = await r.json()
                assert a["endpoints"]["status_url"].startswith(f"{public}/{node}/r/")
                for _ in range(100):
                    async with s.get(a["endpoints"]["status_url"]) as r:
                        st = await r.json()
                    if st["status"] == "done":
                        break
                    await asyncio.sleep(0.05)
                async with s.get(st["endpoints"]["response_raw_url"]) as r:
                    assert r.headers["Content-Type"] == "application/json"
                    assert (await r.json())["choices"][0]["message"]["content"] == "raw " + node
            # chaining across nodes: a clear error that names the owner; posting to the owner works
            parent = next(d for d in docs if d["endpoints"]["status_url"][len(public) + 1] == "1")
            body = {
                "messages": [{"role": "user", "content": "next"}],
                "from_status_url": parent["endpoints"]["status_url"],
            }
            async with s.post(public + "/2/v1/stream-chatgpt", json=body, headers=headers) as r:
                err = await r.json()
                assert r.status == 400 and err["error"]["code"] == "wrong_node" and "node 1" in err["error"]["message"]
            async with s.post(public + "/1/v1/stream-chatgpt", json=body, headers=headers) as r:
                child = await r.json()
                assert r.status == 200 and child["endpoints"]["status_url"].startswith(public + "/1/r/")
            # a stop URL reaches its owner
            async with s.post(
                public + "/2/v1/stream-chatgpt", json=msg("x", model="echo:delay=30"), headers=headers
            ) as r:
                slow = await r.json()
            async with s.post(slow["endpoints"]["stop_url"]) as r:
                assert (await r.json()) == {"status": "success"}
            async with s.get(slow["endpoints"]["status_url"]) as r:
                assert (await r.json())["status"] == "stop"
    finally:
        nginx.stop()
