"""Running it: `python relay.py …` as a real process, config errors, logs, signals, the demo mode."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from .conftest import TEST_KEY, Upstream, free_port, msg, parse_sse, text_of, wait_healthy

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "relay.py", *args], cwd=cwd, capture_output=True, text=True, timeout=30, env=env
    )


def test_help_lists_every_command() -> None:
    out = run("--help")
    assert out.returncode == 0
    assert "serve" in out.stdout and "dev-upstream" in out.stdout and "nodes" in out.stdout
    serve = run("serve", "--help").stdout
    for flag in ("--config", "--host", "--port", "--data-dir", "--public-url", "--upstream-base-url", "--demo",
                 "--node-id", "--event-loop"):  # fmt: skip
        assert flag in serve
    nodes = run("nodes", "--help").stdout
    for flag in ("--count", "--base-port", "--config", "--data-dir", "--public-url", "--upstream-base-url", "--demo"):
        assert flag in nodes


@pytest.mark.parametrize(
    "toml,needle",
    [
        ('[server]\nport = "eighty"\n', "[server] port must be an integer"),
        ("[server]\nport = 70000\n", "[server] port must be between"),
        ('[server]\npublic_url = "nope"\n', "[server] public_url must be empty or an absolute http(s) URL"),
        ("[upstream]\nmax_timeout = -1\n", "[upstream] max_timeout must be greater than 0"),
        ("[storage]\nbogus = 1\n", "unknown key [storage] bogus"),
        ("[nonsense]\n", "unknown section [nonsense]"),
        ("[server\n", "not valid TOML"),
        ('[server]\nhost = "0.0.0.0"\n', "[auth] api_keys is empty"),
        ('[auth]\napi_keys = ["short"]\n', "[auth] api_keys must be a list of keys: strings of at least 8"),
    ],
)
def test_bad_config_is_one_clear_line_and_exit_2(tmp_path: Path, toml: str, needle: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    out = run("serve", "--config", str(cfg))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert needle in lines[0] and str(cfg) in lines[0], lines[0]


def test_missing_config_file_is_exit_2(tmp_path: Path) -> None:
    out = run("serve", "--config", str(tmp_path / "missing.toml"))
    assert out.returncode == 2 and "not found" in out.stderr


def test_shipped_config_is_valid_and_matches_the_defaults() -> None:
    from relay.config import Config, load

    assert load(ROOT / "config.toml", env={}) == Config()


def test_shipped_config_and_the_deploy_guide_list_every_setting() -> None:
    import tomllib

    from relay.config import SCHEMA

    shipped = tomllib.loads((ROOT / "config.toml").read_text())
    readme = (ROOT / "docs" / "deploy.md").read_text()
    for section, key, *_ in SCHEMA:
        assert key in shipped.get(section, {}), f"config.toml lacks [{section}] {key}"
        assert f"`[{section}] {key}`" in readme, f"docs/deploy.md lacks [{section}] {key}"


async def test_serve_process_end_to_end_with_flags_logs_and_sigterm(tmp_path: Path, upstream: Upstream) -> None:
    port = free_port()
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[server]\nshutdown_grace_seconds = 2\nlog_level = "debug"\n[upstream]\ndefault_model = "echo"\n')
    data = tmp_path / "store"
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable, "relay.py", "serve", "--config", str(cfg), "--port", str(port),
            "--data-dir", str(data), "--public-url", url, "--upstream-base-url", upstream.url,
        ],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OPENAI_LOG": "debug"},
    )  # fmt: skip
    try:
        await wait_healthy(url, proc)
        async with aiohttp.ClientSession() as s:
            headers = {"X-OpenAI-API-Key": TEST_KEY}
            async with s.post(url + "/v1/stream-chatgpt", json=msg("hello process"), headers=headers) as r:
                doc = await r.json()
            assert doc["endpoints"]["status_url"].startswith(url + "/1/r/pub/")
            async with s.get(doc["endpoints"]["stream_events_url"]) as r:
                assert text_of(parse_sse((await r.read()).decode())) == "hello process"
            async with s.post(url + "/v1/stream-chatgpt", json=msg("x", model="echo:fail=500"), headers=headers) as r:
                failed = await r.json()
            async with s.post(url + "/v1/stream-chatgpt", json=msg("y", model="echo:delay=30"), headers=headers) as r:
                slow = await r.json()
            await asyncio.sleep(0.5)
        assert (data / doc["endpoints"]["status_url"][len(url) + 1 :]).is_file()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
        assert rc == 0
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stderr.read().decode() if proc.stderr else ""
    request_id = doc["endpoints"]["status_url"].rsplit("/", 1)[1][:-5]
    assert f"request {request_id} accepted" in log
    assert f"request {request_id} stream status=done" in log
    failed_id = failed["endpoints"]["status_url"].rsplit("/", 1)[1][:-5]
    assert f"request {failed_id} stream status=error code=upstream_error" in log
    assert "stopped after" in log
    assert "UPSTREAMKEY" not in log  # never, not even at debug level with OPENAI_LOG=debug
    slow_doc = orjson.loads((data / slow["endpoints"]["status_url"][len(url) + 1 :]).read_bytes())
    assert slow_doc["status"] == "error" and slow_doc["error"]["code"] == "interrupted"
    for p in data.rglob("*"):
        if p.is_file():
            assert b"UPSTREAMKEY" not in p.read_bytes()


def start_demo(data: Path, output: int = subprocess.PIPE, *extra: str) -> tuple[subprocess.Popen[bytes], int, str]:
    """`serve --demo` as `make start` runs it (the shipped config.toml, no upstream key anywhere), on a free
    port: the URLs it makes follow the port."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "RELAY_UPSTREAM_API_KEY"}
    proc = subprocess.Popen(
        [sys.executable, "relay.py", "serve", "--demo", "--port", str(port), "--data-dir", str(data), *extra],
        cwd=ROOT, stdout=output, stderr=output, env=env,
    )  # fmt: skip
    return proc, port, url


async def test_demo_mode_answers_with_the_echo_upstream(tmp_path: Path) -> None:
    proc, _port, url = start_demo(tmp_path / "d")
    try:
        await wait_healthy(url, proc)
        async with aiohttp.ClientSession() as s:
            # a newcomer's curl: no keys at all, default model
            async with s.post(
                url + "/v1/stream-chatgpt", json={"messages": [{"role": "user", "content": "hi demo"}]}
            ) as r:
                assert r.status == 200
                doc = await r.json()
            assert doc["endpoints"]["stream_events_url"].startswith(url + "/1/r/pub/")
            async with s.get(doc["endpoints"]["stream_events_url"]) as r:
                assert text_of(parse_sse((await r.read()).decode())) == "hi demo"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "built-in echo upstream" in (proc.stderr.read().decode() if proc.stderr else "")


def test_json_logs(tmp_path: Path) -> None:
    import logging

    from relay.cli import JsonFormatter

    record = logging.LogRecord("relay.jobs", logging.INFO, __file__, 1, "request %s status=%s", ("abc", "done"), None)
    line = JsonFormatter().format(record)
    doc = orjson.loads(line)
    assert doc["msg"] == "request abc status=done" and doc["level"] == "info" and doc["logger"] == "relay.jobs"


def _codes_in_code() -> set[str]:
    """Every error code the relay can answer or end a request with, read from its source."""
    codes: set[str] = set()
    for path in (ROOT / "relay").rglob("*.py"):
        if path.name == "devupstream.py":
            continue
        text = path.read_text()
        codes |= set(re.findall(r'HTTPError\(\s*\d{3},\s*"([a-z_]+)"', text))
        codes |= set(re.findall(r'(?<![A-Za-z_])(?:error|answer)\(\s*[^,()]+,\s*"([a-z_]+)"', text))
        codes |= set(re.findall(r'UpstreamError\(\s*"([a-z_]+)"', text))
        codes |= set(re.findall(r'\(?\s*"error",\s*\(\s*"([a-z_]+)"', text))
        codes |= set(re.findall(r'^INTERRUPTED = \("([a-z_]+)"', text, re.M))
    return codes


def test_the_documented_error_codes_are_exactly_the_ones_the_relay_uses() -> None:
    codes = _codes_in_code()
    assert {"body_too_complex", "upstream_event_too_large", "internal_error", "interrupted", "timeout"} <= codes
    documented = _codes_in_tables((ROOT / "docs" / "api.md").read_text())
    missing = codes - documented
    assert not missing, f"error codes used by the relay but not in the docs/api.md tables: {sorted(missing)}"
    stale = documented - codes
    assert not stale, f"error codes in the docs/api.md error tables that the relay never uses: {sorted(stale)}"


def _codes_in_tables(doc: str) -> set[str]:
    """Backticked codes in the error tables: those headed `| status | code | when |` (the second column)
    and `| code | cause |` (the first)."""
    found: set[str] = set()
    column = None
    for line in doc.splitlines():
        if not line.startswith("|"):
            column = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if set(cells[0]) <= {"-", ":"}:
            continue  # the separator row
        if cells[:2] == ["status", "code"]:
            column = 1
        elif cells[:2] == ["code", "cause"]:
            column = 0
        elif column is not None:
            found |= set(re.findall(r"`([a-z][a-z_]*)`", cells[column]))
    return found


async def test_the_readme_try_it_line_streams_live_against_the_demo(tmp_path: Path) -> None:
    """The README's first command after `make start`, run as written (only the port changed): it must
    show a live stream, event by event over more than a second, ending with [DONE]."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Try it", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    assert "http://127.0.0.1:8080/v1/stream-chatgpt" in block and "| xargs curl -N" in block
    proc, port, url = start_demo(tmp_path / "d", subprocess.DEVNULL)
    try:
        await wait_healthy(url, proc)
        shell = await asyncio.create_subprocess_exec(
            "bash", "-c", block.replace("127.0.0.1:8080", f"127.0.0.1:{port}"), stdout=subprocess.PIPE
        )
        assert shell.stdout is not None
        arrivals: list[float] = []
        output = b""
        async for line in shell.stdout:
            output += line
            if line.startswith(b"data: "):
                arrivals.append(time.monotonic())
        assert await shell.wait() == 0
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    events = parse_sse(output.decode())
    assert events[-1].data == "[DONE]" and len(events) > 30
    assert "The relay answers at once" in text_of(events)
    assert arrivals[-1] - arrivals[0] > 1.0  # live: the words arrived over time, not as one replay
