"""Webhooks: delivery on every terminal state, signature, retries, no redirects, and SSRF refusals."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
import sys
from pathlib import Path

import orjson
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from relay.webhooks import address_allowed

from .conftest import Receiver, Relay, RelayFactory, all_files, msg, wait_hits

SECRET = "webhook-secret-for-tests"


@pytest.fixture
async def hook_relay(make_relay: RelayFactory) -> Relay:
    return await make_relay(
        webhooks_allow_private_addresses=True, webhooks_secret=SECRET, webhooks_backoff_seconds=0.1,
        webhooks_timeout_seconds=1,
    )  # fmt: skip


async def test_done_error_and_stop_each_post_the_final_status(hook_relay: Relay, receiver: Receiver) -> None:
    relay = hook_relay
    done = await relay.start(msg("hooked", webhook_url=receiver.url + "/done"))
    final = await relay.wait_status(done["endpoints"]["status_url"])
    await wait_hits(receiver, "done", 1)
    headers, body = receiver.hits["done"][0]
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    expected_sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Relay-Signature"] == expected_sig
    assert receiver.payload("done") == final
    assert "webhook" not in orjson.dumps(final).decode()  # the URL is not published in the status

    failed = await relay.start(msg("x", model="echo:fail=500", webhook_url=receiver.url + "/error"))
    await wait_hits(receiver, "error", 1)
    assert receiver.payload("error")["status"] == "error"
    assert receiver.payload("error")["endpoints"]["status_url"] == failed["endpoints"]["status_url"]

    slow = await relay.start(msg("x", model="echo:delay=30", webhook_url=receiver.url + "/stop"))
    async with relay.session.post(slow["endpoints"]["stop_url"]):
        pass
    await wait_hits(receiver, "stop", 1)
    assert receiver.payload("stop")["status"] == "stop"


async def test_private_webhook_payload_has_no_token_hashes(hook_relay: Relay, receiver: Receiver) -> None:
    doc = await hook_relay.start(msg("p", access="private", webhook_url=receiver.url + "/private"))
    await wait_hits(receiver, "private", 1)
    payload = receiver.payload("private")
    assert payload["authorization"] == {"access": "private"}
    assert doc["authorization"]["bearer_token"] not in receiver.hits["private"][0][1].decode()


async def test_retries_on_5xx_then_delivers(hook_relay: Relay, receiver: Receiver) -> None:
    doc = await hook_relay.start(msg("retry", webhook_url=receiver.url + "/fail-twice"))
    await wait_hits(receiver, "fail-twice", 3)
    await asyncio.sleep(0.5)
    assert len(receiver.hits["fail-twice"]) == 3
    final = await hook_relay.wait_status(doc["endpoints"]["status_url"])
    assert final["status"] == "done"  # a webhook never changes the stored result


async def test_bounded_attempts_no_retry_on_4xx_no_redirects(hook_relay: Relay, receiver: Receiver) -> None:
    for name in ("always-500", "bad", "redirect", "hang"):
        await hook_relay.start(msg("x", webhook_url=f"{receiver.url}/{name}"))
    await wait_hits(receiver, "always-500", 3)
    await wait_hits(receiver, "hang", 3)  # each attempt timed out after 1 s
    await asyncio.sleep(1.0)
    assert len(receiver.hits["always-500"]) == 3
    assert len(receiver.hits["bad"]) == 1
    assert len(receiver.hits["redirect"]) == 1
    assert receiver.hits["target"] == []  # the redirect was not followed
    assert len(receiver.hits["hang"]) == 3


@pytest.mark.parametrize(
    "address,allowed",
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.5.4", False),
        ("192.168.0.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("64:ff9b::7f00:1", False),
        ("2002:7f00:1::", False),
    ],
)
def test_address_rules(address: str, allowed: bool) -> None:
    assert address_allowed(address) is allowed


SSRF_URLS = [
    "http://127.0.0.1/hook",
    "http://127.1/hook",
    "http://localhost:8080/hook",
    "http://LOCALHOST/hook",
    "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://[::ffff:7f00:1]/hook",
    "http://0.0.0.0/hook",
    "http://0/hook",
    "http://2130706433/hook",
    "http://0177.0.0.1/hook",
    "http://0x7f.0.0.1/hook",
    "http://0x7f000001/hook",
    "http://10.0.0.1/hook",
    "http://192.168.1.1/hook",
    "http://172.16.0.1/hook",
    "http://169.254.169.254/latest/meta-data",
    "http://[fe80::1]/hook",
    "http://[fc00::1]/hook",
    "http://224.0.0.1/hook",
    "http://user:pass@8.8.8.8/hook",
    "http://no-such-host.invalid/hook",
    "gopher://8.8.8.8/",
    "http://8.8.8.8:99999/",
]


@pytest.mark.parametrize("url", SSRF_URLS)
async def test_webhook_urls_to_internal_addresses_are_refused(relay: Relay, url: str) -> None:
    assert relay.upstream is not None
    before = relay.upstream.state.total
    status, _, doc = await relay.post(msg("x", webhook_url=url))
    assert status == 400, (url, doc)
    assert doc["error"]["code"] == "invalid_field" and "`webhook_url`" in doc["error"]["message"]
    assert relay.upstream.state.total == before
    assert all_files(relay.data_dir) == []


class FlipResolver(AbstractResolver):
    """A DNS that answers a public address the first time and loopback afterwards (DNS rebinding)."""

    def __init__(self, port: int) -> None:
        self.calls = 0
        self.port = port

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls += 1
        address = "93.184.216.34" if self.calls == 1 else "127.0.0.1"
        return [
            {"hostname": host, "host": address, "port": self.port, "family": socket.AF_INET, "proto": 0, "flags": 0}
        ]

    async def close(self) -> None:
        pass


async def test_dns_rebinding_is_caught_at_connect_time(make_relay: RelayFactory, receiver: Receiver) -> None:
    port = int(receiver.url.rsplit(":", 1)[1])
    resolver = FlipResolver(port)
    relay = await make_relay(resolver=resolver, webhooks_backoff_seconds=0.05)
    doc = await relay.start(msg("rebind", webhook_url=f"http://hooks.example.com:{port}/rebind"))
    await relay.wait_status(doc["endpoints"]["status_url"])
    for _ in range(40):
        if resolver.calls >= 2:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    assert resolver.calls >= 2  # it was looked up again when delivering...
    assert receiver.hits["rebind"] == []  # ...and the loopback answer was not connected to


RECEIVER_SCRIPT = """
import asyncio, json, sys
from aiohttp import web

async def hook(request):
    body = await request.read()
    with open(sys.argv[1] + ".tmp", "wb") as f:
        f.write(json.dumps(dict(request.headers)).encode() + b"\\n" + body)
    import os
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    return web.Response(text="ok")

async def main():
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/big", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


async def test_the_webhook_of_a_large_answer_is_made_and_signed_off_the_loop(
    make_relay: RelayFactory, tmp_path: Path
) -> None:
    """A request's webhook carries its whole status document, form-encoded: for a 15 MiB answer that is
    ~1 s of pure Python (it held the loop that long) and HMACs over 15 MiB; they now run in worker
    threads. The receiver (another process) gets the document and a valid signature."""
    from urllib.parse import parse_qs

    from .conftest import LoopProbe

    received = tmp_path / "received"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", RECEIVER_SCRIPT, str(received),
                                                stdout=asyncio.subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stdout is not None
        port = int(await asyncio.wait_for(proc.stdout.readline(), 30))
        relay = await make_relay(webhooks_allow_private_addresses=True, webhooks_secret=SECRET,
                                 upstream_max_response_bytes=20 * 1024 * 1024)  # fmt: skip
        hook = f"http://127.0.0.1:{port}/big"
        async with LoopProbe(relay) as probe:
            doc = await relay.start(msg("x" * 1024, model="echo:chunks=15000", webhook_url=hook))
            final = await relay.wait_status(doc["endpoints"]["status_url"], timeout=60)
            for _ in range(600):
                if received.exists():
                    break
                await asyncio.sleep(0.05)
        assert probe.worst < 0.25, f"loop held {probe.worst:.3f}s"
        head, body = received.read_bytes().split(b"\n", 1)
        headers = orjson.loads(head)
        assert headers["X-Relay-Signature"] == "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert orjson.loads(parse_qs(body.decode())["response"][0]) == final
        assert len(final["response"]["body"]["choices"][0]["message"]["content"]) == 15_000 * 1024
    finally:
        proc.kill()
        await proc.wait()


def test_the_form_body_is_what_urlencode_makes() -> None:
    """The webhook's body, made a slice at a time, is byte for byte `urlencode`'s (what receivers of the
    original service parse), for any text: spaces, `+`, `&`, `%`, non-ASCII, line breaks."""
    import random
    from urllib.parse import urlencode

    from relay.webhooks import FORM_SLICE, form_body

    rng = random.Random(1)
    for n in (0, 10, 1000, FORM_SLICE - 7, FORM_SLICE * 2 + 3):
        text = "".join(rng.choice('ab c+&=%é€😀"\\/\n\t{}') for _ in range(n))
        doc = {"t": text, "n": [1, 2, {"x": text[:50]}]}
        assert form_body(doc) == urlencode({"response": orjson.dumps(doc).decode()}).encode(), n
