"""Webhooks are fair between tenants: one destination's slow receiver cannot delay another's webhooks,
a delivery's time limit does not run while it waits for a slot, and what waits is bounded. Also: a
`webhook_url` whose host is not a valid IDNA name is a 400, not a 500 (Hypothesis over generated hosts)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.webhooks import PER_DESTINATION, WebhookSender

from .conftest import RelayFactory, all_files, held, msg, until

SLOW_KEY = "relay-key-slow-tenant-01"
FAST_KEY = "relay-key-fast-tenant-02"
KEYS = [{"key": SLOW_KEY, "name": "slow"}, {"key": FAST_KEY, "name": "fast"}]
# The documented bound (docs/security.md, "Webhooks"): a webhook to a receiver that answers at once
# arrives within this long of its request's end, however slow another destination's receiver is.
FAST_BOUND = 1.5


@dataclass
class TimedReceiver:
    """A webhook receiver on its own loopback port (its own destination) that answers after `delay`."""

    delay: float = 0.0
    url: str = ""
    arrivals: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, webhook-id)
    in_flight: int = 0
    most_in_flight: int = 0
    answered: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.arrivals.append((time.monotonic(), request.headers.get("webhook-id", "")))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        self.answered += 1
        return web.Response(text="ok")


async def serve_receiver(rec: TimedReceiver) -> web.AppRunner:
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"  # type: ignore[union-attr]
    return runner


@pytest.fixture
async def receivers() -> AsyncIterator[tuple[TimedReceiver, TimedReceiver]]:
    slow, fast = TimedReceiver(delay=8.0), TimedReceiver()
    runners = [await serve_receiver(slow), await serve_receiver(fast)]
    yield slow, fast
    for runner in runners:
        await runner.cleanup()


async def test_a_slow_receiver_does_not_delay_another_tenants_webhooks(
    receivers: tuple[TimedReceiver, TimedReceiver], make_relay: RelayFactory
) -> None:
    """One key's 110 requests whose receiver takes 8 s to answer; then another key's 10 requests whose
    receiver answers at once. Each of the fast receiver's webhooks arrives within FAST_BOUND of its
    request's POST (before: ~7 s, waiting behind the slow ones in a shared pool of 100 connections),
    while the slow receiver is saturated: never more than PER_DESTINATION of its webhooks at once."""
    slow, fast = receivers
    relay = await make_relay(auth_api_keys=KEYS, webhooks_allow_private_addresses=True, webhooks_secret="s" * 16)

    for _ in range(11):
        await asyncio.gather(*(relay.start(msg("x", webhook_url=slow.url), endpoint="/v1/async-chatgpt",
                                           headers={"X-RapidAPI-Key": SLOW_KEY}) for _ in range(10)))  # fmt: skip
    await until(lambda: held(relay)["jobs"] == 0, timeout=30, what="the slow tenant's requests ended")
    await until(lambda: slow.in_flight >= min(PER_DESTINATION, 110), what="the slow receiver is saturated")

    sent: dict[str, float] = {}
    for _ in range(10):
        started = time.monotonic()
        doc = await relay.start(msg("y", webhook_url=fast.url), endpoint="/v1/async-chatgpt",
                                headers={"X-RapidAPI-Key": FAST_KEY})  # fmt: skip
        request_id = doc["endpoints"]["status_url"].rsplit("/", 1)[1].removesuffix(".json")
        sent["msg_" + request_id] = started
    await until(lambda: len(fast.arrivals) >= 10, timeout=15, what="the fast receiver got its 10 webhooks")
    delays = {hook_id: arrived - sent[hook_id] for arrived, hook_id in fast.arrivals}
    print(f"fast receiver: worst delay {max(delays.values()):.3f}s")  # (seen with -s)
    assert set(delays) == set(sent)
    assert max(delays.values()) < FAST_BOUND, sorted(delays.values())
    assert slow.answered == 0 and slow.in_flight == slow.most_in_flight == PER_DESTINATION  # still saturated
    assert len(slow.arrivals) == PER_DESTINATION  # the others wait for their destination's slots


async def test_a_delivery_waiting_for_a_slot_is_not_timed_out(receivers: tuple[TimedReceiver, TimedReceiver]) -> None:
    """Three rounds of deliveries to a receiver that answers in 0.6 s, with a 1 s time limit per attempt:
    the last round waits 1.2 s for its slots, yet each webhook arrives once (its limit starts when its
    attempt holds its slots; a limit that ran while it waited would time it out and retry it)."""
    _, rec = receivers
    rec.delay = 0.6
    results: list[str] = []
    sender = WebhookSender(secret="s", allow_private=True, timeout=1.0, attempts=3, backoff=0.05,
                           on_result=results.append)  # fmt: skip
    try:
        for i in range(3 * PER_DESTINATION):
            sender.post_later(rec.url, b"{}", "application/json", f"r{i}", f"msg_{i}")
        await until(lambda: len(results) == 3 * PER_DESTINATION, timeout=15, what="every delivery ended")
    finally:
        await sender.close()
    assert results == ["delivered"] * (3 * PER_DESTINATION)
    assert sorted(hook_id for _, hook_id in rec.arrivals) == sorted(f"msg_{i}" for i in range(3 * PER_DESTINATION))
    assert rec.most_in_flight == PER_DESTINATION


async def test_what_waits_for_one_destination_is_bounded(receivers: tuple[TimedReceiver, TimedReceiver]) -> None:
    """A destination with `max_pending_per_destination` deliveries not yet ended gets no more: the next
    is dropped at once (counted `dropped`); another destination is not affected, and once the backlog
    has drained the first takes deliveries again."""
    slow, fast = receivers
    slow.delay = 0.5
    results: list[str] = []
    sender = WebhookSender(secret="", allow_private=True, timeout=5, per_destination=2,
                           max_pending_per_destination=5, on_result=results.append)  # fmt: skip
    try:
        for i in range(8):
            sender.post_later(slow.url, b"{}", "application/json", f"s{i}", f"msg_s{i}")
        assert results == ["dropped"] * 3 and sender.pending(slow.url) == 5
        sender.post_later(fast.url, b"{}", "application/json", "f", "msg_f")
        await until(lambda: len(fast.arrivals) == 1, timeout=2, what="the other destination's webhook")
        await until(lambda: sender.pending(slow.url) == 0, timeout=10, what="the backlog drained")
        assert sender._destinations == {}  # (nothing is kept of a destination with nothing pending)
        sender.post_later(slow.url, b"{}", "application/json", "again", "msg_again")
        await until(lambda: len(slow.arrivals) == 6, timeout=5, what="a delivery after the backlog")
    finally:
        await sender.close()
    assert sorted(results) == ["delivered"] * 7 + ["dropped"] * 3
    assert slow.most_in_flight == 2


# ----- webhook URLs whose host is not a valid IDNA name: 400, not 500 --------------------------------

LABEL = st.text(alphabet=st.sampled_from("abcxyz019-é中"), min_size=1, max_size=20)


@st.composite
def bad_hosts(draw: st.DrawFn) -> str:
    """A host name with at least one label IDNA refuses: empty (`a..b`, `.a`) or over 63 characters."""
    labels = draw(st.lists(LABEL, min_size=1, max_size=4))
    bad = draw(st.one_of(st.just(""), st.text(alphabet=st.sampled_from("abz09-é"), min_size=64, max_size=90)))
    labels.insert(draw(st.integers(0, len(labels) - 1)), bad)  # (never last: `a.` is a valid absolute name)
    return draw(st.sampled_from([".", "。"])).join(labels)


@pytest.mark.parametrize("allow_private", [False, True], ids=["guarded", "allow_private"])
async def test_webhook_hosts_that_are_not_valid_names_are_refused(
    make_relay: RelayFactory, allow_private: bool
) -> None:
    relay = await make_relay(webhooks_allow_private_addresses=allow_private)
    loop = asyncio.get_running_loop()
    tried: list[str] = []

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(host=bad_hosts(), port=st.sampled_from(["", ":8080"]), scheme=st.sampled_from(["http", "https"]))
    def check(host: str, port: str, scheme: str) -> None:
        url = f"{scheme}://{host}{port}/hook"
        tried.append(url)
        status, _, doc = asyncio.run_coroutine_threadsafe(relay.post(msg("x", webhook_url=url)), loop).result(30)
        assert status == 400, (url, status, doc)
        assert doc["error"]["code"] == "invalid_field" and "`webhook_url`" in doc["error"]["message"], doc

    await asyncio.to_thread(check)  # (the relay runs on this loop: Hypothesis drives it from a thread)
    assert any(".." in u for u in tried) and any(len(part) > 63 for u in tried for part in u.split("."))
    assert relay.upstream is not None and relay.upstream.state.total == 0
    assert all_files(relay.data_dir) == []


async def test_a_webhook_to_an_invalid_host_is_not_attempted(receivers: tuple[TimedReceiver, TimedReceiver]) -> None:
    """A URL that never passed the check (a running marker written before it existed) fails as a
    delivery (counted, logged), without raising in its task."""
    results: list[str] = []
    sender = WebhookSender(secret="", allow_private=True, on_result=results.append)
    try:
        sender.post_later("http://a..b/hook", b"{}", "application/json", "r", "msg_r")
        await until(lambda: results == ["failed"], timeout=5, what="the delivery failed")
        assert all(task.done() for task in sender.tasks)
    finally:
        await sender.close()
