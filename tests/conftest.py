"""Test harness: a real relay and a real dev upstream, each on its own loopback socket.

Nothing of the relay is mocked: tests talk HTTP to the relay, and the relay talks HTTP (through the
openai SDK) to the dev upstream, exactly as in production.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import gc
import os
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import orjson
import pytest
from aiohttp import web
from hypothesis import settings

from relay import devupstream
from relay.app import AccessLogger, make_app
from relay.config import Config
from relay.keys import MANAGER
from relay.server import RelayRunner

from .scripted import ScriptedUpstream

TEST_KEY = "sk-test-UPSTREAMKEY-9f8e7d6c5b4a"

# Generated tests (Hypothesis): `make test` runs a bounded, reproducible slice; `make fuzz` the long, random run.
settings.register_profile("test", max_examples=40, derandomize=True, print_blob=True)
settings.register_profile("fuzz", max_examples=2000, derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "test"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A port p such that p and p + 1 are both free now (for `relay.py nodes --count 2`): a free port's
    neighbour is often some connection's ephemeral port, and a node that cannot listen exits 1."""
    while True:
        base = free_port()
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", base))
                b.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue


@dataclass
class Upstream:
    url: str
    state: devupstream.DevUpstream
    port: int

    async def stats(self) -> dict[str, int]:
        return {"open": self.state.open, "total": self.state.total}


@dataclass
class Relay:
    url: str
    config: Config
    app: web.Application
    runner: web.AppRunner
    session: aiohttp.ClientSession
    data_dir: Path
    upstream: Upstream | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    async def post(
        self,
        body: Any,
        *,
        endpoint: str = "/v1/stream-chatgpt",
        headers: dict[str, str] | None = None,
        key: str | None = TEST_KEY,
    ) -> tuple[int, dict[str, Any], Any]:
        h = {"Content-Type": "application/json"}
        if key:
            h["X-OpenAI-API-Key"] = key
        h.update(headers or {})
        data = body if isinstance(body, (bytes, str)) else orjson.dumps(body)
        async with self.session.post(self.url + endpoint, data=data, headers=h) as r:
            raw = await r.read()
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError:
                doc = raw
            return r.status, dict(r.headers), doc

    async def start(self, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        status, _, doc = await self.post(body, **kw)
        assert status == 200, doc
        return doc

    async def get_json(self, url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.session.get(url, headers=headers) as r:
            return r.status, orjson.loads(await r.read())

    async def wait_status(self, status_url: str, timeout: float = 20, headers: dict[str, str] | None = None) -> Any:
        """Poll the status URL until it is terminal."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            code, doc = await self.get_json(status_url, headers)
            assert code == 200, doc
            if doc["status"] in ("done", "error", "stop"):
                return doc
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"still {doc['status']} after {timeout}s")
            await asyncio.sleep(0.05)


def unknown_request(ext: str = "json") -> str:
    """The URL path of a request that does not exist, dated now (a fixed date would, a month later, be
    refused as expired instead of as unknown)."""
    from relay.paths import RequestPath

    rp = RequestPath.new(1, False, int(time.time()))
    return "/" + (rp.base + "/stop" if ext == "stop" else rp.rel(ext))


def msg(text: str, model: str = "echo", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


@dataclass
class Event:
    id: str | None
    event: str | None
    data: str


def parse_sse(text: str) -> list[Event]:
    """Events of an SSE body (comments dropped), per the WHATWG rules the browser uses."""
    events: list[Event] = []
    eid = name = None
    data: list[str] = []
    for line in text.split("\n"):
        if line == "":
            if data:
                events.append(Event(eid, name, "\n".join(data)))
            eid, name, data = None, None, []
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "id":
            eid = value
        elif key == "event":
            name = value
        elif key == "data":
            data.append(value)
    return events


def text_of(events: list[Event], index: int = 0) -> str:
    """The assistant text that content deltas of choice `index` add up to."""
    out = []
    for e in events:
        if e.event is None and e.data != "[DONE]":
            chunk = orjson.loads(e.data)
            for c in chunk.get("choices") or []:
                if c.get("index", 0) == index:
                    out.append((c.get("delta") or {}).get("content") or "")
    return "".join(out)


async def read_stream(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], str]:
    async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as r:
        body = (await r.read()).decode()
        return r.status, dict(r.headers), body


async def event_arrivals(response: aiohttp.ClientResponse) -> list[float]:
    """The monotonic time at which each data event of a streaming response arrived."""
    arrivals: list[float] = []
    buf = b""
    async for block in response.content.iter_any():
        buf += block
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if b"data: " in event:
                arrivals.append(time.monotonic())
    return arrivals


class LoopProbe:
    """How long the event loop is held while an attack runs: GET /healthz on the relay every 10 ms
    (the relay runs in this process, so a held loop delays the probe by exactly as long).

    While it probes, what existed before is frozen out of the garbage collector, as `relay.py` freezes
    what exists once it has started: otherwise a full collection walks the whole test session's heap
    (pytest's, Hypothesis', every earlier test's leftovers), a pause of 100-300 ms that says nothing of
    the relay. Objects the attack makes are still collected, and their collections still count."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.worst = 0.0
        self.count = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            async with self.relay.session.get(self.relay.url + "/healthz") as r:
                assert r.status == 200
                await r.read()
            self.worst = max(self.worst, time.monotonic() - started)
            self.count += 1
            started = time.monotonic()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, time.monotonic() - started - 0.01)  # a hold between two probes

    async def __aenter__(self) -> LoopProbe:
        gc.collect()
        gc.freeze()
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        await asyncio.sleep(0.05)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        gc.unfreeze()
        assert self.count > 0
        print(f"loop probe: worst {self.worst * 1000:.0f} ms over {self.count} probes")  # (seen with -s)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def held(relay: Relay) -> dict[str, int]:
    """What a relay holds for its requests: running jobs, claimed slots, markers, the running gauge."""
    manager = relay.app[MANAGER]
    markers = relay.data_dir / "running"
    return {
        "jobs": manager.running(),
        "slots": manager._slots,
        "markers": len(list(markers.glob("*.json"))) if markers.is_dir() else 0,
        "retries": len(manager.retries),
    }


async def until(check: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    """Wait until `check()` holds (polling every 20 ms)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout}s")
        await asyncio.sleep(0.02)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    runner, state, port = await devupstream.start("127.0.0.1", 0, required_key=TEST_KEY)
    yield Upstream(url=f"http://127.0.0.1:{port}/v1", state=state, port=port)
    await runner.cleanup()


RelayFactory = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def make_relay(tmp_path: Path, upstream: Upstream) -> AsyncIterator[RelayFactory]:
    relays: list[Relay] = []

    async def factory(
        upstream_url: str | None = None,
        resolver: Any = None,
        data_dir: Path | None = None,
        secrets: dict[str, str] | None = None,
        **overrides: Any,
    ) -> Relay:
        port = free_port()
        data_dir = data_dir or tmp_path / f"data{len(relays)}"
        config = Config(
            server_port=port,
            server_public_url=f"http://127.0.0.1:{port}",
            storage_data_dir=str(data_dir),
            upstream_base_url=upstream_url or upstream.url,
            upstream_default_model="echo",
        )
        config = config.with_overrides(**overrides)
        if secrets:  # (what `load` reads from the environment, e.g. the archive's credentials)
            config = dataclasses.replace(config, **secrets)
        app = make_app(config, resolver)
        runner = RelayRunner(app, config, shutdown_timeout=5, access_log_class=AccessLogger)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        relay = Relay(f"http://127.0.0.1:{port}", config, app, runner, session, data_dir, upstream)
        relays.append(relay)
        return relay

    yield factory
    for relay in relays:
        await relay.session.close()
        await relay.runner.cleanup()


@pytest.fixture
def blackhole() -> Iterator[tuple[int, set[int]]]:
    """A port where TCP connects hang: a listening socket whose accept queue is full, so the kernel
    drops further SYNs. Yields the port and the local ports of the sockets that fill the queue."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    yield port, {f.getsockname()[1] for f in fillers}
    for s in fillers:
        s.close()
    listener.close()


@pytest.fixture
async def relay(make_relay: RelayFactory) -> Relay:
    return await make_relay()


# the OpenAI face, in open mode, with the test's upstream key
OPENAI_HEADERS = {"X-OpenAI-API-Key": TEST_KEY, "Authorization": "Bearer open-mode", "Content-Type": "application/json"}


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedUpstream]:
    """An upstream that sends exactly the bytes a test scripts (tests/scripted.py)."""
    up = ScriptedUpstream()
    await up.start()
    yield up
    await up.close()


@pytest.fixture
async def scripted_relay(make_relay: RelayFactory, scripted: ScriptedUpstream) -> Relay:
    """A relay in front of the scripted upstream, with an idle bound of one second."""
    return await make_relay(upstream_url=scripted.url, upstream_idle_timeout_seconds=1.0)


# ----- shared by several test modules ------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def all_files(root: Path) -> list[Path]:
    """Files a request leaves: everything under the data dir but the preallocated disk reserve."""
    return [p for p in root.rglob("*") if p.is_file() and p.name != "reserve.bin"] if root.exists() else []


async def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            assert proc.poll() is None, "relay exited early"
            try:
                async with s.get(url + "/healthz") as r:
                    if r.status == 200 and (await r.json()) == {"status": "ok"}:
                        return
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "relay did not become healthy"
            await asyncio.sleep(0.1)


def start_relay(
    port: int,
    data: Path,
    upstream: Upstream,
    *extra: str,
    grace: float = 1,
    reserve: int = 8 * 1024 * 1024,
    toml: str = "",
) -> subprocess.Popen[bytes]:
    cfg = data.parent / f"relay-{port}.toml"
    cfg.write_text(
        f'[server]\nshutdown_grace_seconds = {grace}\n[upstream]\ndefault_model = "echo"\n'
        f"[storage]\nreserve_bytes = {reserve}\n" + toml
    )
    return subprocess.Popen(
        [sys.executable, "relay.py", "serve", "--config", str(cfg), "--port", str(port), "--data-dir", str(data),
         "--public-url", f"http://127.0.0.1:{port}", "--upstream-base-url", upstream.url, *extra],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


async def read_until_cut(s: aiohttp.ClientSession, url: str) -> None:
    try:
        async with s.get(url) as r:
            async for _ in r.content.iter_any():
                pass
    except aiohttp.ClientError:
        pass


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write a filler file until the filesystem is full."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    block = b"\0" * 4096
    try:
        while True:
            os.write(fd, block)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


# ----- no silent skips: a test that needs a tool must run, so a skip fails the session ---------------

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and exitstatus == 0:
        print(f"\nerror: {len(_skipped)} test(s) skipped; every test must run: " + ", ".join(_skipped))
        session.exitstatus = 1


# ----- a webhook receiver ---------------------------------------------------------------------------


class Receiver:
    def __init__(self) -> None:
        self.hits: dict[str, list[tuple[dict[str, str], bytes]]] = defaultdict(list)
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await request.read()
        self.hits[name].append((dict(request.headers), body))
        n = len(self.hits[name])
        if name == "fail-twice" and n <= 2:
            return web.Response(status=503)
        if name == "always-500":
            return web.Response(status=500)
        if name == "bad":
            return web.Response(status=400)
        if name == "redirect":
            raise web.HTTPFound(self.url + "/target")
        if name == "hang":
            await asyncio.sleep(30)
        return web.Response(text="ok")

    def payload(self, name: str, i: int = 0) -> dict:
        _, body = self.hits[name][i]
        return orjson.loads(parse_qs(body.decode())["response"][0])


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/{name}", rec.handle)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rec.url = f"http://127.0.0.1:{port}"
    yield rec
    await runner.cleanup()


async def wait_hits(rec: Receiver, name: str, count: int, timeout: float = 10) -> None:
    for _ in range(int(timeout / 0.05)):
        if len(rec.hits[name]) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name}: {len(rec.hits[name])} hits, wanted {count}")


READERS_SCRIPT = """
import asyncio, sys
import aiohttp

async def main(url, header, n, limit):
    name, _, value = header.partition(": ")
    async with aiohttp.ClientSession() as s:
        async def one():
            async with s.get(url, headers={name: value}) as r:
                assert r.status == 200, r.status
                got = 0
                async for block in r.content.iter_chunked(1 << 16):
                    got += len(block)
                    if limit and got >= limit:
                        r.close()
                        break
        await asyncio.gather(*(one() for _ in range(n)))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""


async def readers(url: str, header: str, n: int, limit: int = 0) -> None:
    """`n` clients in another process read `url` at once, to the end (or their first `limit` bytes)."""
    args = (url, header, str(n), str(limit))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", READERS_SCRIPT, *args)
    assert await asyncio.wait_for(proc.wait(), 120) == 0


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real S3-compatible store (SeaweedFS `weed mini`, tests/objectstore.py) for a module's tests, with
    this run's own credentials and a bucket; `stop()` / `start()` it to take it away and bring it back."""
    from .objectstore import SeaweedS3

    store = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    store.start()
    try:
        yield store
    finally:
        store.stop()
