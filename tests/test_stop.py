"""The stop URL, in every phase of a request, and shutdown of a running relay."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from .conftest import Relay, RelayFactory, msg, parse_sse, read_stream, text_of, unknown_request, until


def connections_to(port: int, exclude_local: set[int]) -> int:
    """Sockets of this machine connecting or connected to 127.0.0.1:`port` (from /proc/net/tcp)."""
    count = 0
    with open("/proc/net/tcp") as fh:
        for line in fh.readlines()[1:]:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if int(remote.split(":")[1], 16) == port and state in ("01", "02"):
                if int(local.split(":")[1], 16) not in exclude_local:
                    count += 1
    return count


async def stop(relay: Relay, url: str, method: str = "POST") -> dict:
    async with relay.session.request(method, url) as r:
        assert r.status == 200
        return await r.json()


async def until_status(relay: Relay, doc: dict[str, Any], status: str, timeout: float = 2) -> None:
    """Until the status document says `status` (a new state reaches the disk in a batched pass)."""
    deadline = time.monotonic() + timeout
    while (await relay.get_json(doc["endpoints"]["status_url"]))[1]["status"] != status:
        assert time.monotonic() < deadline, f"the status did not become {status}"
        await asyncio.sleep(0.01)


async def wait_open(relay: Relay, count: int, timeout: float = 5) -> None:
    assert relay.upstream is not None
    deadline = time.monotonic() + timeout
    while relay.upstream.state.open != count:
        assert time.monotonic() < deadline, f"upstream still has {relay.upstream.state.open} open requests"
        await asyncio.sleep(0.02)


async def test_stop_while_streaming_keeps_partial_text(relay: Relay) -> None:
    words = " ".join(f"w{i}" for i in range(40))
    doc = await relay.start(msg(words, model="echo:pace=0.05"))
    ep = doc["endpoints"]
    reader = asyncio.create_task(read_stream(relay.session, ep["stream_events_url"]))
    await asyncio.sleep(0.6)
    t0 = time.monotonic()
    assert await stop(relay, ep["stop_url"]) == {"status": "success"}
    assert time.monotonic() - t0 < 1
    # the answer comes after the terminal status is on disk
    _, final = await relay.get_json(ep["status_url"])
    assert final["status"] == "stop"
    assert "stop_url" not in final["endpoints"]
    partial = final["response"]["body"]["choices"][0]["message"]["content"]
    assert words.startswith(partial) and 0 < len(partial) < len(words)
    _, _, body = await reader
    events = parse_sse(body)
    assert events[-1].data == "[DONE]"
    assert events[-2].event == "stop"
    assert text_of(events) == partial
    await wait_open(relay, 0)
    # idempotent, GET too, nothing changes
    assert await stop(relay, ep["stop_url"], "GET") == {"status": "success"}
    _, again = await relay.get_json(ep["status_url"])
    assert again == final


async def test_stop_while_waiting_for_first_byte(relay: Relay) -> None:
    doc = await relay.start(msg("x", model="echo:header_delay=30"))
    await wait_open(relay, 1)
    assert await stop(relay, doc["endpoints"]["stop_url"]) == {"status": "success"}
    _, final = await relay.get_json(doc["endpoints"]["status_url"])
    assert final["status"] == "stop"
    await wait_open(relay, 0)  # the upstream saw the connection go away


async def test_stop_while_waiting_for_first_chunk(relay: Relay) -> None:
    doc = await relay.start(msg("x", model="echo:delay=30"))
    await wait_open(relay, 1)
    await stop(relay, doc["endpoints"]["stop_url"])
    await wait_open(relay, 0)
    _, _, body = await read_stream(relay.session, doc["endpoints"]["stream_events_url"])
    assert parse_sse(body)[-1].data == "[DONE]"


async def test_stop_while_connecting(make_relay: RelayFactory, blackhole: tuple[int, set[int]]) -> None:
    port, fillers_ports = blackhole
    relay = await make_relay(upstream_url=f"http://127.0.0.1:{port}/v1")
    doc = await relay.start(msg("x", connect_timeout=10))
    await asyncio.sleep(0.5)
    assert connections_to(port, fillers_ports) == 1  # the relay is connecting right now
    await until_status(relay, doc, "streaming")
    t0 = time.monotonic()
    await stop(relay, doc["endpoints"]["stop_url"])
    assert time.monotonic() - t0 < 1
    _, final = await relay.get_json(doc["endpoints"]["status_url"])
    assert final["status"] == "stop"
    await asyncio.sleep(0.2)
    assert connections_to(port, fillers_ports) == 0  # no connection attempt is left behind


async def test_stop_async_request(relay: Relay) -> None:
    doc = await relay.start(msg("x", model="echo:delay=30"), endpoint="/v1/async-chatgpt")
    await wait_open(relay, 1)
    await until_status(relay, doc, "processing")  # written in the next batched pass (~20 ms)
    await stop(relay, doc["endpoints"]["stop_url"], "GET")
    _, final = await relay.get_json(doc["endpoints"]["status_url"])
    assert final["status"] == "stop"
    await wait_open(relay, 0)


async def test_stop_after_done_changes_nothing(relay: Relay) -> None:
    doc = await relay.start(msg("finished"))
    final = await relay.wait_status(doc["endpoints"]["status_url"])
    assert await stop(relay, doc["endpoints"]["stop_url"]) == {"status": "success"}
    _, again = await relay.get_json(doc["endpoints"]["status_url"])
    assert again == final and again["status"] == "done"


async def test_stop_unknown_is_404(relay: Relay) -> None:
    url = relay.url + unknown_request("stop")
    async with relay.session.post(url) as r:
        assert r.status == 404 and (await r.json())["status"] == "error"


async def test_reader_leaving_does_not_stop_the_request(relay: Relay) -> None:
    doc = await relay.start(msg("a b c d e f", model="echo:pace=0.1"))
    async with relay.session.get(doc["endpoints"]["stream_events_url"]) as r:
        await r.content.readuntil(b"data: ")
    final = await relay.wait_status(doc["endpoints"]["status_url"])
    assert final["status"] == "done"
    assert final["response"]["body"]["choices"][0]["message"]["content"] == "a b c d e f"


async def test_shutdown_interrupts_running_requests_after_grace(make_relay: RelayFactory) -> None:
    relay = await make_relay(server_shutdown_grace_seconds=0.5)
    quick = await relay.start(msg("a b c", model="echo:pace=0.05"))
    slow = await relay.start(msg("x", model="echo:delay=30"))
    reader = asyncio.create_task(read_stream(relay.session, slow["endpoints"]["stream_events_url"]))
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    await relay.runner.cleanup()
    assert time.monotonic() - t0 < 5
    _, _, body = await reader
    assert parse_sse(body)[-1].data == "[DONE]"
    slow_doc = orjson.loads((relay.data_dir / slow["endpoints"]["status_url"][len(relay.url) + 1 :]).read_bytes())
    assert slow_doc["status"] == "error" and slow_doc["error"]["code"] == "interrupted"
    quick_doc = orjson.loads((relay.data_dir / quick["endpoints"]["status_url"][len(relay.url) + 1 :]).read_bytes())
    assert quick_doc["status"] == "done"  # it finished within the grace period


async def test_stop_racing_the_end_always_leaves_a_whole_request(relay: Relay) -> None:
    """A stop that arrives while the request is already finishing must not cut its ending short."""
    docs = [await relay.start(msg("a b c d e", model="echo:pace=0.02")) for _ in range(20)]
    await asyncio.sleep(0.05)

    async def stop_soon(i: int, doc: dict) -> None:
        await asyncio.sleep(0.005 * i)  # spread the stops over the requests' last chunks and endings
        await stop(relay, doc["endpoints"]["stop_url"])

    await asyncio.gather(*(stop_soon(i, d) for i, d in enumerate(docs)))
    for doc in docs:
        final = await relay.wait_status(doc["endpoints"]["status_url"])
        assert final["status"] in ("done", "stop")
        _, _, body = await read_stream(relay.session, doc["endpoints"]["stream_events_url"])
        events = parse_sse(body)
        assert events[-1].data == "[DONE]"
        assert final["response"]["body"]["choices"][0]["message"]["content"] == text_of(events)
    assert not list((relay.data_dir / "running").glob("*.json"))


async def test_stop_answer_comes_after_the_status_is_on_disk_and_before_the_stream_ends(relay: Relay) -> None:
    doc = await relay.start(msg(" ".join(f"w{i}" for i in range(200)), model="echo:pace=0.02"))
    status_file = relay.data_dir / doc["endpoints"]["status_url"][len(relay.url) + 1 :]
    arrivals: list[tuple[float, bytes]] = []

    async def read() -> None:
        async with relay.session.get(doc["endpoints"]["stream_events_url"]) as r:
            async for line in r.content:
                arrivals.append((time.monotonic(), line))

    reader = asyncio.create_task(read())
    await until(lambda: len(arrivals) > 10, what="the stream started")
    async with relay.session.post(doc["endpoints"]["stop_url"]) as r:
        assert (await r.json()) == {"status": "success"}
        answered = time.monotonic()
        on_disk = orjson.loads(status_file.read_bytes())["status"]
    await reader
    assert on_disk == "stop"  # final on disk when the answer arrived
    ends = [t for t, line in arrivals if line.startswith((b"event: stop", b"data: [DONE]"))]
    assert len(ends) == 2 and min(ends) > answered  # and the readers saw the end only after it
