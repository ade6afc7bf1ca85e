"""Several hosts sharing one bucket: two relays on different loopback addresses (127.0.0.2, 127.0.0.3), their
own data directories, one SeaweedFS bucket (tests/objectstore.py), the shipped deploy/nginx/relay-hosts.conf
in front with its opt-in turned on (public status documents read by nginx from the bucket, which lets
anyone read `<prefix>*/r/pub/*` and nothing else). Host B is killed with SIGKILL and its data directory
deleted: every request it had finished and uploaded is still served through nginx, the same bytes, and a
conversation goes on from one of them on host A; what B was still running is gone."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from relay.paths import parse_request_path

from .conftest import (
    TEST_KEY,
    RelayFactory,
    Upstream,
    free_port,
    msg,
    parse_sse,
    unknown_request,
    until,
    wait_healthy,
)
from .nginx import Nginx
from .objectstore import SeaweedS3

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "hosts/"
HOSTS = {1: "127.0.0.2", 2: "127.0.0.3"}


class PublicPrefixS3(SeaweedS3):
    """The test store, plus an identity without credentials that may read `<prefix>*/r/pub/*` only: the
    opt-in of docs/deploy.md ("Several hosts")."""

    def start(self, timeout: float = 30) -> None:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        relay = {
            "name": "relay-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Read", "Write", "List", "Tagging", "Admin"],
        }
        anonymous = {"name": "anonymous", "actions": [f"Read:{self.bucket}/{PREFIX}*/r/pub/*"]}
        (self.root / "s3.json").write_bytes(orjson.dumps({"identities": [relay, anonymous]}))
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 (the child writes to it)
        self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_ready(timeout)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PublicPrefixS3]:
    store = PublicPrefixS3(tmp_path_factory.mktemp("seaweedfs-hosts"))
    store.start()
    try:
        yield store
    finally:
        store.stop()


def start_host(node: int, port: int, data: Path, public_url: str, upstream: Upstream, s3: SeaweedS3) -> Any:
    cfg = data.parent / f"relay-node{node}.toml"
    cfg.write_text(
        f'[server]\nhost = "{HOSTS[node]}"\nnode_id = {node}\nshutdown_grace_seconds = 1\n'
        '[upstream]\ndefault_model = "echo"\n[storage]\nreserve_bytes = 8388608\n'
        f'[archive]\nenabled = true\nendpoint_url = "{s3.endpoint}"\nbucket = "{s3.bucket}"\n'
        f'prefix = "{PREFIX}"\nkeep_local_hours = 0\nretry_min_seconds = 0.1\nretry_max_seconds = 0.5\n'
        "request_timeout_seconds = 2.0\n"
    )
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **s3.env()}
    return subprocess.Popen(
        [sys.executable, "relay.py", "serve", "--config", str(cfg), "--port", str(port), "--data-dir", str(data),
         "--public-url", public_url, "--upstream-base-url", upstream.url],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip


@pytest.fixture
async def hosts(upstream: Upstream, bucket: PublicPrefixS3, tmp_path: Path) -> AsyncIterator[tuple[Any, ...]]:
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    ports = {1: free_port(), 2: free_port()}
    data = {n: tmp_path / f"host{n}" / "data" for n in HOSTS}
    procs = {}
    for n in HOSTS:
        data[n].parent.mkdir(parents=True)
        procs[n] = start_host(n, ports[n], data[n], public, upstream, bucket)
    nginx = Nginx(
        tmp_path / "nginx-hosts",
        "relay-hosts.conf",
        {
            "10.0.0.11:8081": f"{HOSTS[1]}:{ports[1]}",
            "10.0.0.12:8082": f"{HOSTS[2]}:{ports[2]}",
            "10.0.0.20:8333": f"127.0.0.1:{bucket.port}",
            "/relay-archive/relay$uri": f"/{bucket.bucket}/{PREFIX.rstrip('/')}$uri",
            # the opt-in turned on: public status documents from the bucket, by nginx
            "error_page 502 504 = @relay_any;\n        # error_page 502 504 = @relay_bucket;": (
                "error_page 502 504 = @relay_bucket;"
            ),
        },
        port,
    )
    try:
        for n in HOSTS:
            await wait_healthy(f"http://{HOSTS[n]}:{ports[n]}", procs[n])
        nginx.start()
        yield public, procs, data, nginx, ports
    finally:
        nginx.stop()
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


async def post(s: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with s.post(url, json=body, headers={"X-OpenAI-API-Key": TEST_KEY}) as r:
        return r.status, await r.json()


async def wait_done(s: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> Any:
    for _ in range(400):
        async with s.get(url, headers=headers) as r:
            assert r.status == 200, await r.text()
            doc = await r.json()
        if doc["status"] in ("done", "error", "stop"):
            return doc
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} did not end")


async def fetch(s: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str] | None) -> Any:
    async with s.request(method, url, headers=headers) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.read()


def anonymous_get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.timeout(180)
async def test_a_lost_host_loses_only_what_it_was_running(hosts: tuple[Any, ...], bucket: PublicPrefixS3) -> None:
    public, procs, data, nginx, ports = hosts
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        # finished requests on both hosts, through nginx
        _, on_a = await post(s, public + "/1/v1/stream-chatgpt", msg("host a speaks"))
        _, pub = await post(s, public + "/2/v1/stream-chatgpt", msg("one two three four five six"))
        _, prv = await post(s, public + "/2/v1/stream-chatgpt", msg("a private one on b", access="private"))
        _, later = await post(s, public + "/2/v1/async-chatgpt", msg("answered at once on b"))
        assert on_a["endpoints"]["status_url"].startswith(public + "/1/r/pub/")
        assert all(d["endpoints"]["status_url"].startswith(public + "/2/r/") for d in (pub, prv, later))
        auth = {"Authorization": "Bearer " + prv["authorization"]["bearer_token"]}
        for doc in (on_a, pub, prv, later):
            await wait_done(s, doc["endpoints"]["status_url"], auth if doc is prv else None)
        _, running = await post(s, public + "/2/v1/stream-chatgpt", msg("x", model="echo:delay=60"))

        # a running request of B still belongs to B: A does not chain from it
        code, err = await post(
            s, public + "/1/v1/stream-chatgpt", {**msg("next"), "from_status_url": running["endpoints"]["status_url"]}
        )
        assert code == 400 and err["error"]["code"] == "wrong_node"

        # every URL of B's finished requests, through nginx, while B is up
        _, _, body = await fetch(s, "GET", pub["endpoints"]["stream_events_url"], None)
        events = [e for e in parse_sse(body.decode()) if e.id is not None]
        middle = events[len(events) // 2].id
        stream_token = prv["authorization"]["stream_url_arg"]
        urls: list[tuple[str, str, dict[str, str] | None]] = [
            ("GET", pub["endpoints"]["status_url"], None),
            ("HEAD", pub["endpoints"]["status_url"], None),
            ("GET", pub["endpoints"]["stream_events_url"], None),
            ("GET", pub["endpoints"]["stream_events_url"], {"Last-Event-ID": middle}),
            ("GET", pub["endpoints"]["status_url"][:-5] + ".raw", None),
            ("GET", prv["endpoints"]["status_url"], auth),
            ("GET", prv["endpoints"]["status_url"], None),  # 401
            ("GET", prv["endpoints"]["stream_events_url"] + "?" + stream_token, None),
            ("GET", prv["endpoints"]["status_url"][:-5] + ".raw", auth),
            ("GET", later["endpoints"]["status_url"], None),
            ("GET", later["endpoints"]["status_url"][:-5] + ".raw", None),
            ("GET", pub["endpoints"]["stop_url"], None),
        ]
        before = [await fetch(s, *u) for u in urls]
        assert [b[0] for b in before] == [200, 200, 200, 200, 200, 200, 401, 200, 200, 200, 200, 200]

        # uploaded (the manifest is written last), then host B is lost with its disk
        keys = lambda: bucket.keys(PREFIX)  # noqa: E731
        bases = [PREFIX + d["endpoints"]["status_url"][len(public) + 1 : -5] for d in (pub, prv, later)]
        await until(lambda: all(b + ".manifest.json" in keys() for b in bases), timeout=30, what="B's uploads")
        procs[2].send_signal(signal.SIGKILL)
        procs[2].wait()
        shutil.rmtree(data[2])

        after = [await fetch(s, *u) for u in urls]
        for (method, url, headers), b, a in zip(urls, before, after, strict=True):
            assert a == b, f"{method} {url} {headers}: {b[:2]} with B up, {a[:2]} with B gone"

        # the public status document came from the bucket, by nginx: a Range is passed through (the relay
        # answers whole files), with the relay's headers
        async with s.get(pub["endpoints"]["status_url"], headers={"Range": "bytes=0-9"}) as r:
            assert r.status == 206 and await r.read() == before[0][2][:10]
            assert r.headers["Content-Type"] == "application/json" and r.headers["Cache-Control"] == "no-store"
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert not any(h.lower().startswith("x-amz-") for h in r.headers)
        async with s.post(pub["endpoints"]["status_url"], data=b"{}") as r:  # (not to the bucket: A's 405)
            assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"
        # the bucket lets anyone read public objects, never private ones
        direct = f"{bucket.endpoint}/{bucket.bucket}/{PREFIX.rstrip('/')}"
        assert anonymous_get(direct + pub["endpoints"]["status_url"][len(public) :]) == 200
        assert anonymous_get(direct + prv["endpoints"]["status_url"][len(public) :]) == 403
        async with s.get(prv["endpoints"]["status_url"]) as r:
            assert r.status == 401 and b"a private one on b" not in await r.read()

        # the shipped default (no opt-in): another node serves B's public status documents from the bucket
        default = Nginx(nginx.workdir.parent / "nginx-default", "relay-hosts.conf", {
            "10.0.0.11:8081": f"{HOSTS[1]}:{ports[1]}", "10.0.0.12:8082": f"{HOSTS[2]}:{ports[2]}",
        }, free_port())  # fmt: skip
        default.start()
        try:
            for i in (0, 1):
                assert await fetch(s, *urls[i]) == before[i]
                url = default.url + urls[i][1][len(public) :]
                assert await fetch(s, urls[i][0], url, None) == before[i]
            async with s.get(default.url + urls[0][1][len(public) :], headers={"Range": "bytes=0-9"}) as r:
                assert r.status == 200 and await r.read() == before[0][2]  # (the relay answers whole files)
        finally:
            default.stop()

        # what B was running is gone with it
        async with s.get(running["endpoints"]["status_url"]) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"

        # a conversation goes on from B's requests on host A, through B's own API path or any
        for url, parent, extra in (
            (public + "/2/v1/stream-chatgpt", pub, {}),
            (public + "/v1/stream-chatgpt", prv, {"from_bearer_token": prv["authorization"]["bearer_token"]}),
        ):
            code, child = await post(
                s, url, {**msg("and then?"), "from_status_url": parent["endpoints"]["status_url"], **extra}
            )
            assert code == 200, child
            access = "prv" if parent is prv else "pub"  # (a private parent's child is private)
            assert child["endpoints"]["status_url"].startswith(f"{public}/1/r/{access}/")
            token = {"Authorization": "Bearer " + child["authorization"]["bearer_token"]} if parent is prv else None
            final = await wait_done(s, child["endpoints"]["status_url"], token)
            sent = [m["content"] for m in final["parameters"]["messages"]]
            assert final["status"] == "done" and sent[-1] == "and then?" and len(sent) >= 3, sent
        # host A's own requests are untouched
        assert (await wait_done(s, on_a["endpoints"]["status_url"]))["status"] == "done"


@pytest.mark.timeout(120)
async def test_one_host_nginx_reads_public_status_documents_from_the_bucket(
    make_relay: RelayFactory, bucket: PublicPrefixS3, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """relay.conf with its opt-in: the local file, else the bucket, else the relay."""
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    port = free_port()
    relay = await make_relay(
        server_public_url=f"http://127.0.0.1:{port}",
        archive_enabled=True, archive_endpoint_url=bucket.endpoint, archive_bucket=bucket.bucket,
        archive_prefix=PREFIX, archive_keep_local_hours=0, archive_retry_min_seconds=0.1,
        archive_retry_max_seconds=0.5, archive_request_timeout_seconds=2.0,
        secrets={"archive_access_key_id": bucket.access_key, "archive_secret_access_key": bucket.secret_key},
    )  # fmt: skip
    nginx = Nginx(tmp_path / "nginx-one", "relay.conf", {
        "/var/lib/relay/data": str(relay.data_dir.resolve()),
        "127.0.0.1:8080": f"127.0.0.1:{relay.config.server_port}",
        "127.0.0.1:8333": f"127.0.0.1:{bucket.port}",
        "/relay-archive/relay$uri": f"/{bucket.bucket}/{PREFIX.rstrip('/')}$uri",
        "try_files $uri @relay_node1;\n        # try_files $uri @relay_bucket;": "try_files $uri @relay_bucket;",
    }, port)  # fmt: skip
    nginx.start()
    try:
        s = relay.session
        doc = await relay.start(msg("one host, one bucket"))
        status_url = doc["endpoints"]["status_url"]
        await relay.wait_status(status_url)
        raw_url = status_url[:-5] + ".raw"
        before = [await fetch(s, "GET", url, None) for url in (status_url, raw_url)]
        rp = parse_request_path(status_url[len(nginx.url) :])
        assert rp is not None
        files = [rp[0].file(relay.data_dir, ext) for ext in ("json", "txt", "raw")]
        await until(lambda: not any(f.exists() for f in files), timeout=30, what="the local copies removed")
        caplog.clear()
        assert [await fetch(s, "GET", url, None) for url in (status_url, raw_url)] == before
        async with s.get(status_url, headers={"Range": "bytes=5-14"}) as r:
            assert r.status == 206 and await r.read() == before[0][2][5:15]
            assert r.headers["Content-Type"] == "application/json" and r.headers["Cache-Control"] == "no-store"
        path = status_url[len(nginx.url) :]

        def seen(p: str) -> bool:
            return any(p in r.getMessage() for r in caplog.records if r.name == "aiohttp.access")

        await until(lambda: seen(path[:-5] + ".raw"), what="the raw file served by the relay (logged once sent)")
        assert not seen(path)  # the status document came from the bucket, by nginx
        # not in the bucket either: the relay's JSON error
        for ext in ("json", "raw"):  # (a .raw with no .txt on disk once went to nginx's own 404 page)
            async with s.get(nginx.url + unknown_request(ext)) as r:
                assert r.status == 404 and (await r.json())["error"]["code"] == "not_found", ext
    finally:
        nginx.stop()
