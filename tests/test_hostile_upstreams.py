"""Hostile upstreams and webhook receivers against a real relay: the dev upstream's hostile modes
(a huge event, an endless line, deep nesting, a burst of tiny events, half an event and silence, a
huge error body) and a receiver that answers without end. Each request must end (`error` with a code,
or `done`), with `[DONE]` once, the loop free, and everything given back."""

from __future__ import annotations

import resource
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from relay.keys import MANAGER as MANAGER_KEY

from .conftest import LoopProbe, Relay, RelayFactory, held, msg, open_fds, parse_sse, read_stream, until

LOOP_BOUND = 0.25  # seconds (target ~50 ms; generous for a shared machine)
MiB = 1024 * 1024

# (what, model options, endpoint, expected status, expected error code or None)
ATTACKS: list[tuple[str, str, str, str, str | None]] = [
    ("one 24 MiB event", "huge_event=25165824", "stream", "error", "upstream_event_too_large"),
    ("an endless line of 64 MiB", "endless_line=67108864", "stream", "error", "upstream_event_too_large"),
    ("usage nested 300 deep", "deep=300", "stream", "error", "upstream_invalid_response"),
    ("usage nested 40 deep", "deep=40", "stream", "error", "upstream_invalid_response"),
    ("logprobs nested 300 deep", "deep_logprobs=300", "stream", "error", "upstream_invalid_response"),
    ("an answer nested 300 deep", "deep=300", "async", "error", "upstream_invalid_response"),
    ("a burst of 50,000 tiny events", "burst=50000", "stream", "done", None),
    ("an event that is not JSON", "malformed_after=2", "stream", "error", "upstream_invalid_response"),
    ("a 64 MiB error body", "fail=500,fail_bytes=67108864", "stream", "error", "upstream_error"),
]


@pytest.mark.parametrize("what,options,endpoint,status,code", ATTACKS, ids=[a[0] for a in ATTACKS])
async def test_a_hostile_upstream_ends_the_request_cleanly(
    relay: Relay, what: str, options: str, endpoint: str, status: str, code: str | None
) -> None:
    await relay.post(msg("warm"), endpoint="/v1/async-chatgpt")
    await until(lambda: held(relay)["jobs"] == 0)
    before_fds, before = open_fds(), held(relay)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with LoopProbe(relay) as probe:
        body = msg("one two three four five", model=f"echo:{options}")
        doc = await relay.start(body, endpoint=f"/v1/{endpoint}-chatgpt")
        final = await relay.wait_status(doc["endpoints"]["status_url"], timeout=60)
    assert probe.worst < LOOP_BOUND, f"loop held {probe.worst:.3f}s"
    assert final["status"] == status, final.get("error")
    if code:
        assert final["error"]["code"] == code, final["error"]
        assert final["error"]["message"]
    if endpoint == "stream":
        got, _, body = await read_stream(relay.session, doc["endpoints"]["stream_events_url"])
        events = parse_sse(body)
        assert got == 200 and events[-1].data == "[DONE]"
        assert [e.data for e in events].count("[DONE]") == 1
        if code:
            assert events[-2].event == "error" and orjson.loads(events[-2].data)["error"]["code"] == code
        if "burst" in options:
            assert len([e for e in events if e.event is None]) == 50_000 + 2
    # a 64 MiB body kept whole would show here; the relay keeps at most its limits
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200 * 1024  # KiB
    await until(lambda: held(relay) == before, what="jobs, slots and markers given back")
    await until(lambda: open_fds() <= before_fds + 2, what="descriptors given back")  # +2: pooled connections


async def test_a_chunk_that_never_finishes_ends_at_the_timeout(relay: Relay) -> None:
    doc = await relay.start({**msg("x", model="echo:never_finish=1"), "timeout": 2})
    final = await relay.wait_status(doc["endpoints"]["status_url"], timeout=15)
    assert final["status"] == "error" and final["error"]["code"] == "timeout"
    assert final["response"]["body"]["choices"][0]["message"]["content"] == "started"
    _, _, body = await read_stream(relay.session, doc["endpoints"]["stream_events_url"])
    assert parse_sse(body)[-1].data == "[DONE]"


async def test_an_upstream_response_over_the_limit_ends_as_error(make_relay: RelayFactory) -> None:
    relay = await make_relay(upstream_max_response_bytes=MiB)
    text = " ".join(f"w{i}" for i in range(100_000))  # ~700 KB of words, ~19 MB of chunks
    doc = await relay.start(msg(text))
    final = await relay.wait_status(doc["endpoints"]["status_url"], timeout=60)
    assert final["status"] == "error" and final["error"]["code"] == "upstream_response_too_large"
    assert "max_response_bytes" in final["error"]["message"]
    async with relay.session.get(final["endpoints"]["response_raw_url"]) as r:
        assert r.status == 200 and len(await r.read()) <= MiB


async def test_an_error_body_is_kept_only_up_to_64_KiB(relay: Relay) -> None:
    doc = await relay.start(msg("x", model="echo:fail=503,fail_bytes=10000000"), endpoint="/v1/async-chatgpt")
    final = await relay.wait_status(doc["endpoints"]["status_url"])
    assert final["status"] == "error" and final["response"]["status_code"] == 503
    async with relay.session.get(final["endpoints"]["response_raw_url"]) as r:
        assert len(await r.read()) <= 64 * 1024


@pytest.fixture
async def endless_receiver() -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """A webhook receiver that answers 200 with `Content-Length: 2000000000` and then streams zeros."""
    seen: dict[str, Any] = {"calls": 0, "sent": 0}

    async def handler(request: web.Request) -> web.StreamResponse:
        seen["calls"] += 1
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = 2_000_000_000
        await resp.prepare(request)
        block = b"\0" * 65536
        try:
            for _ in range(30_000):
                await resp.write(block)
                seen["sent"] += len(block)
        except (ConnectionError, RuntimeError):
            pass
        return resp

    app = web.Application()
    app.router.add_post("/hook", handler)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/hook", seen
    await runner.cleanup()


async def test_a_webhook_receiver_that_answers_without_end_costs_64_KiB(
    make_relay: RelayFactory, endless_receiver: tuple[str, dict[str, Any]]
) -> None:
    url, seen = endless_receiver
    relay = await make_relay(webhooks_allow_private_addresses=True, webhooks_timeout_seconds=30)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with LoopProbe(relay) as probe:
        docs = [await relay.start({**msg(f"hook {i}"), "webhook_url": url}) for i in range(5)]
        for doc in docs:
            await relay.wait_status(doc["endpoints"]["status_url"])
        webhooks = relay.app[MANAGER_KEY].webhooks
        await until(lambda: seen["calls"] == 5 and not webhooks.tasks, timeout=20, what="webhooks delivered")
    assert probe.worst < LOOP_BOUND
    assert seen["sent"] < 5 * 16 * MiB, seen  # the relay stopped reading; the receiver could not push on
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100 * 1024  # KiB
    assert 'relay_webhook_deliveries_total{result="delivered"} 5.0' in await _metrics(relay)


async def _metrics(relay: Relay) -> str:
    async with relay.session.get(relay.url + "/metrics") as r:
        return await r.text()
