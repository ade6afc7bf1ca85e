"""Same URLs, either tier: once a request's files are archived (a real SeaweedFS, tests/objectstore.py) and
the local copies removed, every URL of it answers exactly the bytes it answered from the local disk;
a store that is away answers 503 (never a wrong byte), and the backlog shows on /metrics."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from relay.paths import parse_request_path

from .conftest import (
    TEST_KEY,
    Relay,
    RelayFactory,
    Upstream,
    free_port,
    msg,
    parse_sse,
    start_relay,
    until,
    wait_healthy,
)
from .objectstore import SeaweedS3

ROOT = Path(__file__).resolve().parent.parent


def archive_settings(s3: SeaweedS3, **more: Any) -> dict[str, Any]:
    return dict(
        archive_enabled=True,
        archive_endpoint_url=s3.endpoint,
        archive_bucket=s3.bucket,
        archive_prefix="serving/",
        archive_keep_local_hours=0,
        archive_retry_min_seconds=0.1,
        archive_retry_max_seconds=0.5,
        archive_request_timeout_seconds=2.0,
        secrets={"archive_access_key_id": s3.access_key, "archive_secret_access_key": s3.secret_key},
        **more,
    )


def files_of(relay: Relay, url: str) -> list[Path]:
    parsed = parse_request_path("/" + url.split("/", 3)[3])
    assert parsed is not None
    rp = parsed[0]
    return [rp.file(relay.data_dir, ext) for ext in ("json", "txt", "raw")]


async def fetch(
    relay: Relay, url: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, str, bytes]:
    async with relay.session.request(method, url, headers=headers) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.read()


async def answers(relay: Relay, urls: list[tuple[str, str, dict[str, str] | None]]) -> list[tuple[int, str, bytes]]:
    return [await fetch(relay, url, headers, method) for method, url, headers in urls]


async def finished_requests(relay: Relay) -> tuple[list[tuple[str, str, dict[str, str] | None]], list[str]]:
    """A public stream, a private stream and an async request, ended; the URLs to compare, and the status
    URLs whose files must leave the disk."""
    public = await relay.start(msg("one two three four five six seven"))
    private = await relay.start(msg("a private conversation here", access="private"))
    later = await relay.start(msg("answered at once"), endpoint="/v1/async-chatgpt")
    docs = [public, private, later]
    token = private["authorization"]["bearer_token"]
    stream_token = private["authorization"]["stream_url_arg"].split("=", 1)[1]
    auth = {"Authorization": f"Bearer {token}"}
    for doc in docs:
        await relay.wait_status(doc["endpoints"]["status_url"], headers=auth if doc is private else None)
    pub_txt = public["endpoints"]["stream_events_url"]
    status, _, body = await fetch(relay, pub_txt)
    events = [e for e in parse_sse(body.decode()) if e.id is not None]
    assert status == 200 and len(events) > 4
    middle = events[len(events) // 2].id
    prv = private["endpoints"]
    urls: list[tuple[str, str, dict[str, str] | None]] = [
        ("GET", public["endpoints"]["status_url"], None),
        ("GET", pub_txt, None),
        ("GET", pub_txt, {"Last-Event-ID": middle}),
        ("GET", pub_txt, {"Last-Event-ID": events[-1].id}),  # nothing after the last: 204
        ("GET", pub_txt, {"Last-Event-ID": str(int(middle) + 1)}),  # not an event's start: 400
        ("HEAD", pub_txt, None),
        ("GET", public["endpoints"]["status_url"][: -len(".json")] + ".raw", None),
        ("GET", prv["status_url"], auth),
        ("GET", prv["status_url"], None),  # 401
        ("GET", prv["status_url"], {"Authorization": "Bearer not-the-token-at-all"}),  # 403
        ("GET", prv["stream_events_url"] + "?stream_token=" + stream_token, None),
        ("GET", prv["status_url"][: -len(".json")] + ".raw", auth),
        ("GET", later["endpoints"]["status_url"], None),
        ("GET", later["endpoints"]["status_url"][: -len(".json")] + ".raw", None),
        ("GET", public["endpoints"]["stop_url"], None),
    ]
    return urls, [d["endpoints"]["status_url"] for d in docs]


def assert_same(before: list[tuple[int, str, bytes]], after: list[tuple[int, str, bytes]], urls: list[Any]) -> None:
    for (method, url, headers), b, a in zip(urls, before, after, strict=True):
        assert a == b, f"{method} {url} {headers}: {b[:2]} from disk, {a[:2]} from the archive"


@pytest.mark.timeout(120)
async def test_every_url_answers_the_same_bytes_once_archived(make_relay: RelayFactory, s3: SeaweedS3) -> None:
    relay = await make_relay(**archive_settings(s3))
    urls, status_urls = await finished_requests(relay)
    before = await answers(relay, urls)
    assert [s for s, _, _ in before] == [200, 200, 200, 204, 400, 200, 200, 200, 401, 403, 200, 200, 200, 200, 200]
    files = [f for url in status_urls for f in files_of(relay, url)]
    await until(lambda: not any(f.exists() for f in files), timeout=30, what="the local copies removed")
    stored = s3.keys("serving/")
    for url in status_urls:
        base = url.split("/", 3)[3][: -len(".json")]
        assert f"serving/{base}.json" in stored and f"serving/{base}.manifest.json" in stored
    after = await answers(relay, urls)
    assert_same(before, after, urls)
    async with relay.session.get(relay.url + "/metrics") as r:
        text = await r.text()
    assert "relay_archive_pending_requests 0.0" in text
    assert "relay_archive_archived_requests 3.0" in text and "relay_archive_local_removed_requests 3.0" in text
    # a conversation goes on from an archived request as from a local one
    chained = await relay.start(msg("and then?", from_status_url=status_urls[0]))
    final = await relay.wait_status(chained["endpoints"]["status_url"])
    sent = [m["content"] for m in final["parameters"]["messages"]]
    assert final["status"] == "done" and sent[0] == "one two three four five six seven" and sent[-1] == "and then?"


@pytest.mark.timeout(120)
async def test_an_archive_that_is_away_answers_503_and_nothing_else(make_relay: RelayFactory, s3: SeaweedS3) -> None:
    relay = await make_relay(**archive_settings(s3))
    doc = await relay.start(msg("kept in the bucket"))
    status_url = doc["endpoints"]["status_url"]
    await relay.wait_status(status_url)
    first = await fetch(relay, doc["endpoints"]["stream_events_url"])
    await until(lambda: not any(f.exists() for f in files_of(relay, status_url)), timeout=30, what="archived")
    await s3.astop()
    try:
        for url in (status_url, doc["endpoints"]["stream_events_url"]):
            status, content_type, body = await fetch(relay, url)
            assert status == 503 and b"archive_unavailable" in body, (url, status, body[:200])
    finally:
        await s3.astart()
    assert await fetch(relay, doc["endpoints"]["stream_events_url"]) == first


def test_an_archive_enabled_without_its_settings_refuses_to_start(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[archive]\nenabled = true\nendpoint_url = "http://127.0.0.1:9"\nbucket = "relay-archive"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.run([sys.executable, str(ROOT / "relay.py"), "serve", "--config", str(cfg), "--port", "0"],
                          capture_output=True, text=True, timeout=30, env=env)  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "AWS_ACCESS_KEY_ID" in lines[0], proc.stderr


ADMIN = "admin-key-for-the-archive-tests-0123"


async def metric(relay: Relay, name: str) -> float:
    async with relay.session.get(relay.url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} on /metrics")


@pytest.mark.timeout(180)
async def test_a_store_away_under_load_fails_no_request_and_loses_nothing(
    make_relay: RelayFactory, s3: SeaweedS3
) -> None:
    relay = await make_relay(auth_admin_keys=[ADMIN], **archive_settings(s3))
    await s3.astop()
    try:
        docs = await asyncio.gather(*(relay.start(msg(f"request number {i} of a burst")) for i in range(24)))
        for doc in docs:
            assert (await relay.wait_status(doc["endpoints"]["status_url"]))["status"] == "done"
        urls = [u for d in docs for u in (d["endpoints"]["status_url"], d["endpoints"]["stream_events_url"])]
        before = [await fetch(relay, url) for url in urls]
        assert all(status == 200 for status, _, _ in before)
        await asyncio.sleep(1.0)  # (uploads are tried, and fail, meanwhile)
        files = [f for d in docs for f in files_of(relay, d["endpoints"]["status_url"])]
        assert all(f.exists() for f in files)  # nothing removed while nothing is verified
        assert await metric(relay, "relay_archive_pending_requests") == 24
        assert await metric(relay, "relay_archive_failures") >= 1
        code, stats = await relay.get_json(relay.url + "/v1/admin/stats", {"Authorization": f"Bearer {ADMIN}"})
        assert code == 200 and stats["archive"]["pending"] == 24 and stats["archive"]["failing"] >= 1
        assert stats["archive"]["last_error"] and s3.secret_key not in stats["archive"]["last_error"]
    finally:
        await s3.astart()
    await until(lambda: not any(f.exists() for f in files), timeout=90, what="the backlog drained")
    for _ in range(200):  # (the last local removal may come a moment before its pending entry is dropped)
        if await metric(relay, "relay_archive_pending_requests") == 0:
            break
        await asyncio.sleep(0.05)
    assert await metric(relay, "relay_archive_pending_requests") == 0
    assert await metric(relay, "relay_archive_archived_requests") == 24
    assert [await fetch(relay, url) for url in urls] == before


@pytest.mark.timeout(120)
async def test_the_janitor_expires_archived_requests_from_the_bucket(make_relay: RelayFactory, s3: SeaweedS3) -> None:
    relay = await make_relay(
        retention_max_age_days=8 / 86400, retention_janitor_interval_seconds=0.5, **archive_settings(s3)
    )
    doc = await relay.start(msg("gone in eight seconds"))
    status_url = doc["endpoints"]["status_url"]
    await relay.wait_status(status_url)
    base = "serving/" + status_url.split("/", 3)[3][: -len(".json")]
    await until(lambda: f"{base}.manifest.json" in s3.keys("serving/"), timeout=30, what="archived")
    assert (await fetch(relay, status_url))[0] == 200
    await until(lambda: not any(k.startswith(base) for k in s3.keys("serving/")), timeout=60, what="expired")
    assert not any(f.exists() for f in files_of(relay, status_url))
    assert (await fetch(relay, status_url))[0] == 404


@pytest.mark.timeout(180)
@pytest.mark.parametrize("delay", [0.02, 0.1, 0.25, 0.5])
async def test_a_relay_killed_during_its_endings_still_archives_every_request(
    tmp_path: Path, s3: SeaweedS3, upstream: Upstream, monkeypatch: pytest.MonkeyPatch, delay: float
) -> None:
    """kill -9 at any moment while a burst of requests ends (a pending upload is written before a request's
    running marker goes, and recovery hands over what it ends): after a restart, every one is archived."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    prefix = f"kill-{secrets.token_hex(4)}/"
    toml = (f'[archive]\nenabled = true\nendpoint_url = "{s3.endpoint}"\nbucket = "{s3.bucket}"\n'
            f'prefix = "{prefix}"\nretry_min_seconds = 0.1\nretry_max_seconds = 0.5\n')  # fmt: skip
    data, port = tmp_path / "data", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_relay(port, data, upstream, toml=toml)
    try:
        await wait_healthy(url, proc)
        async with aiohttp.ClientSession() as s:

            async def post(i: int) -> str:
                body = orjson.dumps(msg(f"request {i} of a burst cut short"))
                endpoint = "/v1/stream-chatgpt" if i % 2 else "/v1/async-chatgpt"
                async with s.post(url + endpoint, data=body, headers={"X-OpenAI-API-Key": TEST_KEY}) as r:
                    assert r.status == 200
                    return (await r.json())["endpoints"]["status_url"]

            status_urls = await asyncio.gather(*(post(i) for i in range(30)))
        await asyncio.sleep(delay)
        proc.kill()
        proc.wait(10)
        proc = start_relay(port, data, upstream, toml=toml)
        await wait_healthy(url, proc)
        bases = [prefix + u.split("/", 3)[3][: -len(".json")] for u in status_urls]
        await until(lambda: all(f"{b}.manifest.json" in s3.keys(prefix) for b in bases), timeout=90,
                    what="every request archived")  # fmt: skip
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
