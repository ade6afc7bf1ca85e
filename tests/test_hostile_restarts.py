"""Restarts after damage: poisoned markers and status files, a crash followed by a full disk, a data
directory that turns read-only mid-stream and comes back. A restart always succeeds, a terminal status
is final on disk once the disk takes it, and `[DONE]` is written exactly once."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import time
import uuid
from pathlib import Path

import aiohttp
import orjson
import pytest

from relay.paths import RequestPath

from .conftest import (
    TEST_KEY,
    RelayFactory,
    Upstream,
    fill,
    free_port,
    held,
    msg,
    parse_sse,
    read_stream,
    read_until_cut,
    start_relay,
    until,
    wait_healthy,
)


def _request(data: Path, status: dict[str, object] | bytes | None) -> RequestPath:
    """A request's files as a crash could leave them, with its running marker."""
    rp = RequestPath.new(1, False, int(time.time()) - 60)  # recent: the janitor leaves it alone
    rp = RequestPath(rp.node_id, rp.access, rp.created, str(uuid.uuid4()))
    rp.directory(data).mkdir(parents=True, exist_ok=True)
    if status is not None:
        rp.file(data, "json").write_bytes(status if isinstance(status, bytes) else orjson.dumps(status))
    (data / "running").mkdir(parents=True, exist_ok=True)
    (data / "running" / (rp.base.replace("/", "_") + ".json")).write_bytes(b'{"webhook_url": null}')
    return rp


async def test_restart_survives_any_damaged_marker_or_status(
    make_relay: RelayFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    data = tmp_path / "damaged"
    deep = b'{"status": "streaming", "response": {"usage": ' + b"[" * 300 + b"1" + b"]" * 300 + b"}}"
    cases = {
        "status nested 300 deep": _request(data, deep),
        "status not JSON": _request(data, b"{torn"),
        "status a JSON list": _request(data, b"[1, 2]"),
        "no status at all": _request(data, None),
    }
    linked = _request(data, None)
    linked.file(data, "json").symlink_to("/etc/passwd")  # a status that is a symlink
    (data / "running" / "garbage-name.json").write_bytes(b"\xff\xfe")
    (data / "running" / "1_r_pub_9999_99_99_99_99_99_not-a-uuid.json").write_bytes(b"{}")

    relay = await make_relay(data_dir=data)  # the restart: recovery runs before the relay listens
    async with relay.session.get(relay.url + "/healthz") as r:
        assert r.status == 200
    assert held(relay)["markers"] == 0
    quarantined = {p.name for p in (data / "running" / "quarantine").iterdir() if p.is_file()}
    assert len(quarantined) == 6, quarantined  # every damaged one but the one with no status at all
    for name in ("status nested 300 deep", "status not JSON", "status a JSON list"):
        rp = cases[name]  # ended all the same (no request stays streaming after a start), originals kept aside
        code, doc = await relay.get_json(rp.url(relay.url, "json"))
        assert code == 200 and doc["status"] == "error" and doc["error"]["code"] == "interrupted", (name, doc)
        assert (data / "running" / "quarantine" / "files" / f"{rp.request_id}.json").is_file()
    lines = [r.getMessage() for r in caplog.records if "quarantined" in r.getMessage()]
    assert len(lines) == 6
    assert all("\n" not in line for line in lines)
    assert linked.file(data, "json").is_symlink()  # left alone, never written through
    assert Path("/etc/passwd").read_bytes().startswith(b"root:")
    status, _, doc = await relay.post(msg("after"))
    assert status == 200 and (await relay.wait_status(doc["endpoints"]["status_url"]))["status"] == "done"
    assert cases  # (names kept for the reader)


async def test_crash_then_restart_on_a_full_disk(tmp_path: Path, upstream: Upstream, small_disk: Path) -> None:  # noqa: F811
    port = free_port()
    data = small_disk / "data"
    url = f"http://127.0.0.1:{port}"
    proc = start_relay(port, data, upstream, reserve=256 * 1024)
    try:
        await wait_healthy(url, proc)
        async with aiohttp.ClientSession() as s:
            body = msg(" ".join(f"w{i}" for i in range(400)), model="echo:pace=0.01")
            async with s.post(url + "/v1/stream-chatgpt", json=body, headers={"X-OpenAI-API-Key": TEST_KEY}) as r:
                doc = await r.json()
            reader = asyncio.create_task(read_until_cut(s, doc["endpoints"]["stream_events_url"]))
            await asyncio.sleep(1.0)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            await reader
    finally:
        if proc.poll() is None:
            proc.kill()
    filler = fill(small_disk)  # the reserve file is still there: the repair may use its room
    proc = start_relay(port, data, upstream, reserve=256 * 1024)
    try:
        await wait_healthy(url, proc)  # it starts (it used to exit 1 with "cannot listen")
        async with aiohttp.ClientSession() as s:
            async with s.get(doc["endpoints"]["status_url"]) as r:
                status = orjson.loads(await r.read())
            assert status["status"] == "error" and status["error"]["code"] == "interrupted"
            async with s.get(status["endpoints"]["response_raw_url"]) as r:
                raw = await r.read()
            assert r.status == 200 and raw.startswith(b"data: ")  # never an empty file served as the answer
            _, _, text = await read_stream(s, doc["endpoints"]["stream_events_url"])
            assert [e.data for e in parse_sse(text)].count("[DONE]") == 1
            async with s.post(
                url + "/v1/stream-chatgpt", json=msg("full"), headers={"X-OpenAI-API-Key": TEST_KEY}
            ) as r:
                assert r.status == 507  # the disk is still full: new requests are refused, clearly
        assert list((data / "running").glob("*.json")) == []
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        filler.unlink()


async def test_read_only_mid_stream_then_writable_again(
    make_relay: RelayFactory,
    upstream: Upstream,
    small_disk: Path,  # noqa: F811
) -> None:
    """The data directory turns read-only (a read-only bind mount over it) while a stream runs: the open
    event log still takes appends, new files do not. Once it is writable again, the terminal status
    reaches the disk by itself, and a restart adds nothing: `[DONE]` stays the last event, once."""
    data = small_disk / "data"
    relay = await make_relay(data_dir=data, storage_reserve_bytes=64 * 1024)
    doc = await relay.start(msg(" ".join(f"w{i}" for i in range(40)), model="echo:pace=0.05"))
    status_file = data / doc["endpoints"]["status_url"][len(relay.url) + 1 :]
    await until(
        lambda: orjson.loads(status_file.read_bytes())["status"] == "streaming", timeout=5, what="streaming on disk"
    )
    subprocess.run(["mount", "--bind", str(data), str(data)], check=True)
    subprocess.run(["mount", "-o", "remount,ro,bind", str(data)], check=True)
    try:
        await until(lambda: held(relay)["jobs"] == 0, timeout=20, what="the stream ended")
        assert orjson.loads(status_file.read_bytes())["status"] == "streaming"  # not writable yet
        assert held(relay)["markers"] == 1 and held(relay)["retries"] == 1
    finally:
        subprocess.run(["umount", str(data)], check=True)
    await until(lambda: held(relay)["retries"] == 0, timeout=20, what="the ending written")
    final = orjson.loads(status_file.read_bytes())
    assert final["status"] == "done" and final["response"]["body"]["choices"][0]["message"]["content"].startswith("w0")
    assert held(relay)["markers"] == 0
    _, _, body = await read_stream(relay.session, doc["endpoints"]["stream_events_url"])
    before = [e.data for e in parse_sse(body)]
    assert before[-1] == "[DONE]" and before.count("[DONE]") == 1
    await relay.runner.cleanup()
    again = await make_relay(data_dir=data)  # restart on the same directory
    async with again.session.get(doc["endpoints"]["stream_events_url"].replace(relay.url, again.url)) as r:
        after = [e.data for e in parse_sse((await r.read()).decode())]
    assert after == before
    assert orjson.loads(status_file.read_bytes()) == final
