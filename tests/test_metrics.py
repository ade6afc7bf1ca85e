"""`/metrics` in Prometheus text format, and JSON log lines, with no key, token or content in either."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson

from .conftest import ROOT, TEST_KEY, Relay, Upstream, free_port, msg, read_stream, wait_healthy


def sample(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + (("{" + labels + "}") if labels else " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{labels}}} not in metrics")


async def metrics(relay: Relay) -> str:
    async with relay.session.get(relay.url + "/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        return await r.text()


async def test_metrics_count_what_happened(relay: Relay) -> None:
    ok = await relay.start(msg("secret content here", access="private"))
    await relay.wait_status(
        ok["endpoints"]["status_url"], headers={"Authorization": "Bearer " + ok["authorization"]["bearer_token"]}
    )
    failed = await relay.start(msg("x", model="echo:fail=500"), endpoint="/v1/async-chatgpt")
    await relay.wait_status(failed["endpoints"]["status_url"])
    assert (await relay.post({"messages": []}))[0] == 400
    slow = await relay.start(msg("x", model="echo:delay=30"))
    reader = asyncio.create_task(read_stream(relay.session, slow["endpoints"]["stream_events_url"]))
    await asyncio.sleep(0.3)
    text = await metrics(relay)
    assert sample(text, "relay_requests_total", 'endpoint="/v1/stream-chatgpt",outcome="done"') == 1
    assert sample(text, "relay_requests_total", 'endpoint="/v1/async-chatgpt",outcome="error"') == 1
    assert sample(text, "relay_requests_total", 'endpoint="/v1/stream-chatgpt",outcome="refused"') == 1
    assert sample(text, "relay_request_errors_total", 'code="upstream_error"') == 1
    assert sample(text, "relay_refusals_total", 'status="400"') == 1
    assert sample(text, "relay_running_jobs") == 1
    assert sample(text, "relay_open_readers") == 1
    assert sample(text, "relay_upstream_first_chunk_seconds_count") >= 1
    assert sample(text, "relay_bytes_written_total") > 0
    assert sample(text, "relay_janitor_removed_requests_total") == 0
    async with relay.session.post(slow["endpoints"]["stop_url"]):
        pass
    await reader
    text = await metrics(relay)
    assert sample(text, "relay_running_jobs") == 0 and sample(text, "relay_open_readers") == 0
    assert sample(text, "relay_requests_total", 'endpoint="/v1/stream-chatgpt",outcome="stop"') == 1
    for secret in (TEST_KEY, ok["authorization"]["bearer_token"], "secret content", ok["conversation_id"]):
        assert secret not in text


async def test_json_log_lines_from_a_real_process(tmp_path: Path, upstream: Upstream) -> None:
    port = free_port()
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nlog_format = "json"\n[upstream]\ndefault_model = "echo"\n')
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "relay.py", "serve", "--config", str(cfg), "--port", str(port), "--public-url", url,
         "--data-dir", str(tmp_path / "d"), "--upstream-base-url", upstream.url],
        cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await wait_healthy(url, proc)
        async with aiohttp.ClientSession() as s:
            body = msg("very private words", access="private")
            async with s.post(url + "/v1/stream-chatgpt", json=body, headers={"X-OpenAI-API-Key": TEST_KEY}) as r:
                doc = await r.json()
            token = doc["authorization"]["stream_url_arg"]
            async with s.get(doc["endpoints"]["stream_events_url"] + "?" + token) as r:
                await r.read()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = (proc.stderr.read() if proc.stderr else b"").decode().strip().splitlines()
    docs = [orjson.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= set(d) for d in docs)
    text = "\n".join(lines)
    assert "status=done" in text
    for secret in (TEST_KEY, doc["authorization"]["bearer_token"], token.split("=", 1)[1], "very private words"):
        assert secret not in text
