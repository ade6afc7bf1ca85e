"""`[server] public_url`: left unset (as the shipped config.toml leaves it), the URLs the relay makes follow
where it listens, `--port` included; set in a file to this machine's loopback with another port than the
one served, the relay refuses to start, in one line. A URL passed as `--public-url` and the nodes behind
their proxy are meant as they are. Real relay processes against the dev upstream."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from relay.config import listen_url

from .conftest import ROOT, TEST_KEY, Upstream, free_port, free_port_pair, msg, parse_sse, text_of, wait_healthy
from .test_first_run import read_log_until, stop

RELAY_KEY = "relay-access-key-0123"


def serve(*args: str, output: int = subprocess.PIPE) -> subprocess.Popen[bytes]:
    """`relay.py serve …` from the repository (so the shipped config.toml unless --config says otherwise)."""
    env = {k: v for k, v in os.environ.items() if k != "RELAY_UPSTREAM_API_KEY"}
    return subprocess.Popen([sys.executable, "relay.py", "serve", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=output, env=env)  # fmt: skip


async def links_of(url: str, headers: dict[str, str] | None = None) -> dict[str, str]:
    """Post a message; the URLs of the answer, after checking that its stream reads back where they say."""
    async with aiohttp.ClientSession() as s:
        headers = {"X-OpenAI-API-Key": TEST_KEY, **(headers or {})}
        async with s.post(url + "/v1/stream-chatgpt", json=msg("follow the port"), headers=headers) as r:
            assert r.status == 200
            links: dict[str, str] = (await r.json())["endpoints"]
        async with s.get(links["stream_events_url"], headers=headers) as r:
            assert text_of(parse_sse((await r.read()).decode())) == "follow the port"
    return links


async def test_the_shipped_config_with_another_port_makes_links_on_that_port(
    tmp_path: Path, upstream: Upstream
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve("--port", str(port), "--data-dir", str(tmp_path / "data"), "--upstream-base-url", upstream.url)
    try:
        found, _ = await read_log_until(proc, r"relay listening on \S+ \(public URL (\S+),")
        assert found.group(1) == url
        links = await links_of(url)
        assert links["status_url"].startswith(url + "/1/r/pub/")
        stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_port_0_and_a_wildcard_host_make_links_on_the_port_bound(tmp_path: Path, upstream: Upstream) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f'[server]\nhost = "0.0.0.0"\nport = 0\n[auth]\napi_keys = ["{RELAY_KEY}"]\n')
    proc = serve("--config", str(cfg), "--data-dir", str(tmp_path / "data"), "--upstream-base-url", upstream.url)
    try:
        found, head = await read_log_until(proc, r"relay listening on http://0\.0\.0\.0:(\d+) \(public URL (\S+),")
        port = int(found.group(1))
        assert port > 0 and found.group(2) == f"http://127.0.0.1:{port}"
        found, _ = await read_log_until(proc, r"WARNING.*public_url is not set: .* name (\S+), which only this")
        assert found.group(1) == f"http://127.0.0.1:{port}"
        links = await links_of(f"http://127.0.0.1:{port}", {"X-RapidAPI-Key": RELAY_KEY})
        assert links["status_url"].startswith(f"http://127.0.0.1:{port}/1/r/pub/")
        stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("public_url", ["http://127.0.0.1:8080", "http://localhost", "https://[::1]/relay"])
def test_a_loopback_public_url_on_another_port_refuses_to_start(tmp_path: Path, public_url: str) -> None:
    port = free_port()
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f'[server]\npublic_url = "{public_url}"\n')
    proc = serve("--config", str(cfg), "--port", str(port), "--data-dir", str(tmp_path / "data"))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"relay: config error: {cfg}: [server] public_url = '{public_url}' names port ")
    assert f"the relay listens on 127.0.0.1:{port}" in lines[0] and "remove public_url" in lines[0]
    assert not (tmp_path / "data").exists()  # refused before anything was made


@pytest.mark.parametrize(
    "where,public_url",
    [
        ("file", "https://relay.example.test"),  # not this machine: a proxy's name
        ("command line", "http://127.0.0.1:{proxy}"),  # a proxy on this machine, said on purpose
    ],
)
async def test_a_public_url_that_is_not_the_port_by_mistake_is_used_as_it_is(
    tmp_path: Path, upstream: Upstream, where: str, public_url: str
) -> None:
    port = free_port()
    public_url = public_url.format(proxy=free_port())
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f'[server]\npublic_url = "{public_url}"\n' if where == "file" else "")
    extra = ["--public-url", public_url] if where == "command line" else []
    proc = serve("--config", str(cfg), "--port", str(port), "--data-dir", str(tmp_path / "data"),
                 "--upstream-base-url", upstream.url, *extra, output=subprocess.DEVNULL)  # fmt: skip
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", proc)
        async with aiohttp.ClientSession() as s:
            headers = {"X-OpenAI-API-Key": TEST_KEY}
            async with s.post(f"http://127.0.0.1:{port}/v1/async-chatgpt", json=msg("x"), headers=headers) as r:
                assert (await r.json())["endpoints"]["status_url"].startswith(public_url + "/1/r/pub/")
        proc.send_signal(signal.SIGTERM)  # (waited for in a thread: the upstream answers in this loop)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_nodes_behind_a_proxy_on_loopback_start_with_its_url(tmp_path: Path, upstream: Upstream) -> None:
    """`relay.py nodes` with the proxy's URL in the shared config: a loopback URL whose port is no node's."""
    base, proxy = free_port_pair(), free_port()
    while proxy in (base, base + 1):
        proxy = free_port()
    public_url = f"http://127.0.0.1:{proxy}"
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f'[server]\npublic_url = "{public_url}"\n')
    proc = subprocess.Popen(
        [sys.executable, "relay.py", "nodes", "--count", "2", "--base-port", str(base), "--config", str(cfg),
         "--data-dir", str(tmp_path / "nodes"), "--upstream-base-url", upstream.url],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for node, port in ((1, base), (2, base + 1)):
            await wait_healthy(f"http://127.0.0.1:{port}", proc)
            async with aiohttp.ClientSession() as s:
                headers = {"X-OpenAI-API-Key": TEST_KEY}
                async with s.post(f"http://127.0.0.1:{port}/v1/async-chatgpt", json=msg("x"), headers=headers) as r:
                    assert (await r.json())["endpoints"]["status_url"].startswith(f"{public_url}/{node}/r/pub/")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_url_of_where_the_relay_listens() -> None:
    assert listen_url("127.0.0.1", 8090) == "http://127.0.0.1:8090"
    assert listen_url("0.0.0.0", 8090) == "http://127.0.0.1:8090"
    assert listen_url("::", 8090) == "http://[::1]:8090"
    assert listen_url("::1", 8090) == listen_url("[::1]", 8090) == "http://[::1]:8090"
    assert listen_url("relay.internal", 80) == "http://relay.internal:80"
