"""The operator page on the first run: `serve --demo` (what `make start` runs) turns it on with a random
admin key printed once in its start-up log, like a notebook server's token; a start without `--demo`
never does. Real relay processes, read as a newcomer reads them: the log, the page, the admin API."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Browser, async_playwright, expect

from .conftest import ROOT, free_port
from .test_cli import start_demo
from .test_console import CHROMIUM, FLAGS, open_console, shot

OPERATOR_LINE = r"operator page: (http://\S+/)#operator\?key=(\S+) \(an admin key for this start only\)$"


async def read_log_until(proc: subprocess.Popen[bytes], pattern: str, timeout: float = 20) -> tuple[re.Match[str], str]:
    """Read the process's stderr line by line until one matches `pattern`; the match and all read so far."""
    assert proc.stderr is not None
    seen = ""
    while True:
        line = (await asyncio.wait_for(asyncio.to_thread(proc.stderr.readline), timeout)).decode()
        assert line, f"the process ended before logging {pattern!r}:\n{seen}"
        seen += line
        found = re.search(pattern, line.rstrip("\n"))
        if found:
            return found, seen


def stop(proc: subprocess.Popen[bytes]) -> str:
    """SIGINT, a clean exit, and the rest of its log."""
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 0
    return proc.stderr.read().decode() if proc.stderr else ""


@pytest.fixture
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        await b.close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_demo_prints_the_operator_page_and_a_one_time_key_that_opens_it(tmp_path: Path) -> None:
    keys = []
    for run in range(2):
        data = tmp_path / f"data{run}"
        proc, _port, url = start_demo(data)
        try:
            found, head = await read_log_until(proc, OPERATOR_LINE)
            page, key = found.groups()
            assert page == url + "/"
            assert head.index("relay listening on") < head.index("operator page:")
            keys.append(key)
            async with aiohttp.ClientSession() as s:
                async with s.get(page) as r:
                    assert r.status == 200 and 'id="tab-operator"' in await r.text()
                async with s.get(url + "/v1/info") as r:
                    assert (await r.json())["operator_enabled"] is True
                async with s.get(url + "/v1/admin/stats") as r:
                    assert r.status == 401
                async with s.get(url + "/v1/admin/stats", headers=bearer("not-the-key-" + "x" * 20)) as r:
                    assert r.status == 403 and (await r.json())["error"]["code"] == "forbidden"
                async with s.get(url + "/v1/admin/running", headers=bearer(key)) as r:
                    assert r.status == 200 and (await r.json()) == {"running": [], "count": 0}
            log = head + stop(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert log.count(key) == 1, log  # printed once, in the start-up line
        assert all(key.encode() not in p.read_bytes() for p in data.rglob("*") if p.is_file())  # memory only
    assert keys[0] != keys[1] and min(map(len, keys)) >= 32  # random per start


async def test_the_key_from_the_log_opens_the_operator_page_in_a_browser(tmp_path: Path, chromium: Browser) -> None:
    proc, _port, url = start_demo(tmp_path / "data")
    try:
        found, _ = await read_log_until(proc, OPERATOR_LINE)
        page_url, key = found.groups()
        async with aiohttp.ClientSession() as s:
            body = {"messages": [{"role": "user", "content": "seen by the operator"}]}
            async with s.post(url + "/v1/async-chatgpt", json=body) as r:
                assert r.status == 200
        page = await open_console(chromium, page_url.rstrip("/"), "first-run-operator", openai_key=None)
        await page.goto("about:blank")
        await page.goto(f"{page_url}#operator?key={key}")  # the URL as printed opens the page live
        await expect(page.locator("#operator")).to_be_visible()
        await expect(page.locator("#op-disabled")).to_be_hidden()
        await expect(page.locator("#op-state")).to_contain_text("Live")
        assert "key=" not in page.url  # taken out of the address bar (and the history)
        assert await page.input_value("#op-key") == key
        await expect(page.locator("#op-finished tbody tr")).to_have_count(1)
        await shot(page, "live")
        assert page.problems == []  # type: ignore[attr-defined]
        stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_demo_leaves_a_configured_admin_key_alone(tmp_path: Path) -> None:
    admin = "configured-admin-key-0123456789"
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f'[auth]\nadmin_keys = ["{admin}"]\n')
    proc, _port, url = start_demo(tmp_path / "data", subprocess.PIPE, "--config", str(cfg))
    try:
        found, head = await read_log_until(proc, r"operator page: (\S+) \(the Operator tab\), (.*)$")
        assert found.group(1) == url + "/" and found.group(2) == "with a key of [auth] admin_keys"
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/v1/admin/stats", headers=bearer(admin)) as r:
                assert r.status == 200
        log = head + stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "admin key for this start only" not in log and admin not in log


async def test_a_start_without_demo_prints_no_key_and_the_operator_api_stays_off(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "RELAY_UPSTREAM_API_KEY"}
    proc = subprocess.Popen(
        [sys.executable, "relay.py", "serve", "--port", str(port), "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        _, head = await read_log_until(proc, r"relay listening on ")
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/v1/info") as r:
                assert (await r.json())["operator_enabled"] is False
            for key in ("", "any-key-at-all-0123456789"):
                async with s.get(url + "/v1/admin/stats", headers=bearer(key) if key else {}) as r:
                    assert r.status == 403 and (await r.json())["error"]["code"] == "admin_disabled"
        log = head + stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "operator page" not in log and "admin key" not in log
