"""Speed features that change behaviour: batched status refreshes, the event loop choice, the upstream call
made with aiohttp from the SDK's URL and headers, and several nodes started by one command (`relay.py nodes`)."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import aiohttp.web
import openai
import orjson
import pytest

from relay.keys import MANAGER

from .conftest import (
    ROOT,
    TEST_KEY,
    RelayFactory,
    Upstream,
    free_port,
    free_port_pair,
    msg,
    read_stream,
    until,
    wait_healthy,
)


async def test_status_refreshes_of_many_streams_share_one_pass_a_second(make_relay: RelayFactory) -> None:
    """30 streams for ~2.5 s: every status file shows `streaming` soon after its start and its text grows
    while it runs, but the refreshes are written in a handful of passes, not one per request per second."""
    relay = await make_relay()
    manager = relay.app[MANAGER]
    words = " ".join(f"w{i}" for i in range(25))
    docs = await asyncio.gather(*(relay.start(msg(words, model="echo:pace=0.1")) for _ in range(30)))
    files = [relay.data_dir / d["endpoints"]["status_url"][len(relay.url) + 1 :] for d in docs]

    def states() -> list[str]:
        return [orjson.loads(f.read_bytes())["status"] for f in files]

    await until(lambda: states() == ["streaming"] * 30, timeout=2, what="every status says streaming")
    passes_before = manager.statuses.passes
    await asyncio.sleep(1.3)
    texts = [orjson.loads(f.read_bytes())["response"]["body"]["choices"][0]["message"]["content"] for f in files]
    assert all(t.startswith("w0 w1") for t in texts), texts  # refreshed within a second, all of them
    await until(lambda: manager.running() == 0, timeout=10, what="all streams ended")
    assert states() == ["done"] * 30
    refreshes = manager.statuses.passes - passes_before
    assert 1 <= refreshes <= 6  # ~1 a second for all 30 requests (30+ writes a second if done one by one)


async def test_upstream_call_carries_the_sdks_url_and_headers(make_relay: RelayFactory) -> None:
    """The upstream call is one aiohttp request, built from what the `openai` SDK says an OpenAI call is:
    its URL under the base URL and its identification headers, plus the key and the organization."""
    relay = await make_relay()
    assert relay.upstream is not None
    doc = await relay.start(msg("hello"), headers={"X-OpenAI-Organization": "org-42"})
    _, _, text = await read_stream(relay.session, doc["endpoints"]["stream_events_url"])
    assert "data: [DONE]" in text
    seen = relay.upstream.state.last_headers
    sdk = openai.AsyncOpenAI(api_key="unused", base_url=relay.upstream.url)
    for name, value in sdk.default_headers.items():
        if isinstance(value, str) and name != "Content-Type":
            assert seen.get(name) == value, name
    assert seen.get("Content-Type") == "application/json"
    assert seen.get("OpenAI-Organization") == "org-42"
    assert seen.get("Accept-Encoding") == "identity"
    assert relay.upstream.state.total >= 1


def serve(tmp_path: Path, upstream: Upstream, loop: str, block_uvloop: bool = False) -> subprocess.Popen[str]:
    port = free_port()
    code = "import sys\n"
    if block_uvloop:
        code += "sys.modules['uvloop'] = None  # as if it were not installed\n"
    code += "from relay.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.Popen(
        [sys.executable, "-c", code, "serve", "--port", str(port), "--data-dir", str(tmp_path / "data"),
         "--upstream-base-url", upstream.url, "--public-url", f"http://127.0.0.1:{port}", "--event-loop", loop],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    "loop,block,expect",
    [("auto", False, "uvloop"), ("asyncio", False, "asyncio"), ("auto", True, "asyncio"), ("uvloop", False, "uvloop")],
)
async def test_event_loop_choice(tmp_path: Path, upstream: Upstream, loop: str, block: bool, expect: str) -> None:
    proc = serve(tmp_path, upstream, loop, block)
    try:
        port = int(proc.args[proc.args.index("--port") + 1])  # type: ignore[union-attr]
        await wait_healthy(f"http://127.0.0.1:{port}", proc)  # type: ignore[arg-type]
        async with aiohttp.ClientSession() as s:
            async with s.post(
                f"http://127.0.0.1:{port}/v1/stream-chatgpt",
                json=msg("on any loop"),
                headers={"X-OpenAI-API-Key": TEST_KEY},
            ) as r:
                doc = await r.json()
            _, _, text = await read_stream(s, doc["endpoints"]["stream_events_url"])
        assert "data: [DONE]" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert f"{expect} event loop" in err


async def _chunked_body(reader: asyncio.StreamReader) -> bytes:
    """A response's chunked body, its framing checked to the byte."""
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in head.lower(), head
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        if size == 0:
            assert await reader.readexactly(2) == b"\r\n"
            return bytes(body)
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_a_large_replay_is_the_file_on_either_loop_and_to_a_slow_reader(
    tmp_path: Path, upstream: Upstream, loop: str
) -> None:
    """On either event loop, a finished log of many read blocks (sent with sendfile when the socket has
    nothing queued, what it does not take queued behind it) reaches keep-alive readers byte for byte, and
    a reader that takes nothing for a while (the socket's buffers fill, the blocks then go out in part
    through sendfile and in part queued) too."""
    proc = serve(tmp_path, upstream, loop)
    try:
        port = int(proc.args[proc.args.index("--port") + 1])  # type: ignore[union-attr]
        await wait_healthy(f"http://127.0.0.1:{port}", proc)  # type: ignore[arg-type]
        async with aiohttp.ClientSession() as s:
            body = msg("replay", model="echo:chunks=24000")
            url = f"http://127.0.0.1:{port}/v1/stream-chatgpt"
            async with s.post(url, json=body, headers={"X-OpenAI-API-Key": TEST_KEY}) as r:
                doc = await r.json()
            await read_stream(s, doc["endpoints"]["stream_events_url"])  # (until the end)
        path = doc["endpoints"]["stream_events_url"].split(str(port), 1)[1]
        on_disk = (tmp_path / "data" / path.lstrip("/")).read_bytes()
        assert len(on_disk) > 5_000_000 and on_disk.endswith(b"data: [DONE]\n\n")  # more than socket buffers hold
        request = f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(3):  # one keep-alive connection: each answer ends exactly where it should
            writer.write(request)
            assert await _chunked_body(reader) == b": connected\n\n" + on_disk
        writer.close()
        small = socket.socket()
        small.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        small.connect(("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=small)
        writer.write(request)
        await asyncio.sleep(1.0)  # takes nothing for a second
        assert await _chunked_body(reader) == b": connected\n\n" + on_disk
        writer.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert f"{loop} event loop" in err


def test_uvloop_asked_for_but_missing_is_a_clear_exit_2(tmp_path: Path, upstream: Upstream) -> None:
    proc = serve(tmp_path, upstream, "uvloop", block_uvloop=True)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert 'event_loop = "uvloop", but uvloop is not installed' in err


async def test_nodes_command_runs_one_relay_per_node(tmp_path: Path, upstream: Upstream) -> None:
    """`relay.py nodes --count 2`: nodes 1 and 2 on consecutive ports, each with its own data directory and
    node id in its URLs; the nginx upstream block is printed; SIGTERM stops both, exit 0."""
    base = free_port_pair()
    data = tmp_path / "nodes"
    proc = subprocess.Popen(
        [sys.executable, "relay.py", "nodes", "--count", "2", "--base-port", str(base), "--data-dir", str(data),
         "--upstream-base-url", upstream.url, "--public-url", "http://relay.example.test"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for port in (base, base + 1):
            await wait_healthy(f"http://127.0.0.1:{port}", proc)  # type: ignore[arg-type]
        async with aiohttp.ClientSession() as s:
            for node, port in ((1, base), (2, base + 1)):
                async with s.post(
                    f"http://127.0.0.1:{port}/v1/async-chatgpt",
                    json=msg(f"node {node}"),
                    headers={"X-OpenAI-API-Key": TEST_KEY},
                ) as r:
                    assert r.status == 200
                    doc = await r.json()
                status_url = doc["endpoints"]["status_url"]
                assert status_url.startswith(f"http://relay.example.test/{node}/r/")
                path = data / f"node{node}" / status_url.split("/", 3)[3]
                await until(lambda p=path: orjson.loads(p.read_bytes())["status"] == "done", what=f"node {node} done")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"upstream relay_all {{ server 127.0.0.1:{base}; server 127.0.0.1:{base + 1}; keepalive 64; }}" in out
    assert f"upstream relay_node2 {{ server 127.0.0.1:{base + 1}; keepalive 64; }}" in out
    assert sorted(p.name for p in data.iterdir()) == ["node1", "node2"]


def test_nodes_command_stops_all_when_one_cannot_start(tmp_path: Path, upstream: Upstream) -> None:
    """Node 2's port is taken: it exits 1, node 1 is stopped too, and `nodes` exits with that code."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port2 = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "relay.py", "nodes", "--count", "2", "--base-port", str(port2 - 1), "--data-dir",
             str(tmp_path / "n"), "--upstream-base-url", upstream.url],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "cannot listen" in proc.stderr


async def test_a_finished_pass_does_not_forget_what_the_next_pass_writes(tmp_path: Path) -> None:
    """The race behind a status left at `streaming`: pass 1 is done, its callback not yet run, and pass 2
    starts. Pass 1's callback must not clear pass 2's set, or an ending would not wait for pass 2 and
    pass 2's older snapshot could land over the terminal status."""
    from relay.refresh import StatusWriter

    class Item:
        def __init__(self, name: str) -> None:
            self.status_path = tmp_path / f"{name}.json"
            self.data = b'{"status": "streaming"}'

        def status_snapshot(self) -> bytes:
            return self.data

        def describe(self) -> str:
            return "item"

    writer = StatusWriter(interval=0.01)
    a, b = Item("a"), Item("b")
    writer.changed(a)
    await until(lambda: writer._pass is not None and writer._pass.done(), what="pass 1 written")
    first = writer._pass
    await asyncio.sleep(0.02)
    writer.changed(b)
    writer._run()  # pass 2 starts now, whatever pass 1's callback has done
    second = writer._pass
    assert second is not first
    writer._written(first)  # pass 1's callback, late
    assert b in writer._writing
    await writer.leave(b)  # waits for pass 2
    assert second.done() and b.status_path.read_bytes() == b.data


async def test_upstream_calls_honour_https_proxy_from_the_environment(
    make_relay: RelayFactory, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the SDK's client did: with HTTP_PROXY set, the upstream call goes through the proxy (here a
    tiny forwarding proxy that counts requests), and NO_PROXY exempts a host."""
    seen: list[str] = []

    async def forward(request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        seen.append(str(request.url))
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with aiohttp.ClientSession() as s:
            async with s.request(request.method, str(request.url), data=await request.read(), headers=headers) as r:
                resp = aiohttp.web.StreamResponse(status=r.status, headers={"Content-Type": r.headers["Content-Type"]})
                await resp.prepare(request)
                async for block in r.content.iter_any():
                    await resp.write(block)
                await resp.write_eof()
                return resp

    app = aiohttp.web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await aiohttp.web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        relay = await make_relay()
        doc = await relay.start(msg("through the proxy"))
        _, _, text = await read_stream(relay.session, doc["endpoints"]["stream_events_url"])
        assert "data: [DONE]" in text and seen == [upstream.url + "/chat/completions"]
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        relay = await make_relay()
        doc = await relay.start(msg("around the proxy"))
        _, _, text = await read_stream(relay.session, doc["endpoints"]["stream_events_url"])
        assert "data: [DONE]" in text and len(seen) == 1
    finally:
        await runner.cleanup()
