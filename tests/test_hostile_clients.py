"""Hostile clients against a real relay over sockets: crafted bodies, slow and malformed connections,
too many at once, readers that never read. Each attack runs under a loop-latency probe, and what the
relay holds (descriptors, markers, slots, jobs) is counted before and after."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from relay.fanout import PUSH_BUFFER_LIMIT

from .conftest import (
    TEST_KEY,
    LoopProbe,
    Relay,
    RelayFactory,
    held,
    msg,
    open_fds,
    parse_sse,
    read_stream,
    readers,
    until,
)

LOOP_BOUND = 0.25  # seconds; the target is ~50 ms, the bound is generous for a shared, noisy machine


def nested(depth: int) -> str:
    """JSON text of `depth` nested arrays (built as text: orjson itself refuses to write 255+ levels)."""
    return "[" * depth + "1" + "]" * depth


def with_field(raw_json: str) -> bytes:
    """A valid request body with one more field `x` holding `raw_json`."""
    return orjson.dumps(msg("x"))[:-1] + b',"x":' + raw_json.encode() + b"}"


async def raw_request(relay: Relay, data: bytes, read: bool = True) -> bytes:
    """Send bytes on a fresh connection; the answer up to the relay closing it."""
    port = relay.config.server_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10) if read else b""
    finally:
        writer.close()


# (what, body, expected status, expected code)
BODIES: list[tuple[str, Any, int, str]] = [
    ("100,000 messages", {"messages": [{"role": "user", "content": "x"}] * 100_000}, 400, "body_too_complex"),
    ("10,001 messages", {"messages": [{"role": "user", "content": "x"}] * 10_001}, 400, "invalid_field"),
    ("a forwarded field nested 300 deep", with_field(nested(300)), 400, "body_too_complex"),
    ("a forwarded field nested 33 deep", with_field(nested(33)), 400, "body_too_complex"),
    ("1.3 million empty arrays", with_field("[" + ",".join(["[]"] * 1_300_000) + "]"), 400, "body_too_complex"),
    ("messages as a string nested 300 deep", {"messages": nested(300)}, 400, "body_too_complex"),
    ("conversation id with a line break", {**msg("x"), "conversation_id": "abc\n"}, 400, "invalid_field"),
    ("model with CRLF", {**msg("x"), "model": "echo\r\n2026 INFO forged line"}, 400, "invalid_field"),
    ("model with an escape sequence", {**msg("x"), "model": "echo\x1b[2J"}, 400, "invalid_field"),
    ("webhook to ::7f00:1", {**msg("x"), "webhook_url": "http://[::7f00:1]/"}, 400, "invalid_field"),
    ("webhook to ::ffff:0:7f00:1", {**msg("x"), "webhook_url": "http://[::ffff:0:7f00:1]/"}, 400, "invalid_field"),
    ("webhook to 64:ff9b:1::7f00:1", {**msg("x"), "webhook_url": "http://[64:ff9b:1::7f00:1]/"}, 400,
     "invalid_field"),
    ("webhook to fec0::1", {**msg("x"), "webhook_url": "http://[fec0::1]/"}, 400, "invalid_field"),
]  # fmt: skip


async def test_crafted_bodies_are_refused_quickly_and_leave_nothing_behind(relay: Relay) -> None:
    assert relay.upstream is not None
    for _ in range(3):  # warm up connections and lazy imports before counting descriptors
        await relay.post(msg("warm"), endpoint="/v1/async-chatgpt")
    await until(lambda: held(relay)["jobs"] == 0, what="warm-up requests finished")
    before_fds, before, calls = open_fds(), held(relay), relay.upstream.state.total
    headers = {"Content-Type": "application/json", "X-OpenAI-API-Key": TEST_KEY}
    # a client of its own, one connection per POST: the test's idle keep-alive connections are not counted
    async with LoopProbe(relay) as probe, aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as c:
        for what, body, status, code in BODIES:
            data = body if isinstance(body, (bytes, str)) else orjson.dumps(body)
            async with c.post(relay.url + "/v1/stream-chatgpt", data=data, headers=headers) as r:
                got, doc = r.status, await r.json()
            assert (got, doc["error"]["code"]) == (status, code), (what, got, doc)
            assert doc["error"]["message"], what
    assert probe.worst < LOOP_BOUND, f"loop held {probe.worst:.3f}s"
    assert held(relay) == before
    assert relay.upstream.state.total == calls  # no refused request reached the upstream
    await until(lambda: open_fds() <= before_fds, what="descriptors given back")


async def test_300_deeply_nested_posts_leak_no_descriptor_and_no_marker(relay: Relay) -> None:
    """The break reported: each such POST left the `.txt` open and a running marker behind."""
    await relay.post(msg("warm"), endpoint="/v1/async-chatgpt")
    await until(lambda: held(relay)["jobs"] == 0)
    before_fds, before = open_fds(), held(relay)
    body = with_field(nested(300))
    headers = {"X-OpenAI-API-Key": TEST_KEY, "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as attacker:

        async def post() -> int:
            async with attacker.post(relay.url + "/v1/stream-chatgpt", data=body, headers=headers) as r:
                return r.status

        statuses = await asyncio.gather(*(post() for _ in range(300)))
    assert set(statuses) == {400}
    assert held(relay) == before
    await until(lambda: open_fds() <= before_fds, what="descriptors given back")


async def test_10000_messages_are_accepted_without_holding_the_loop(relay: Relay) -> None:
    """The largest conversation allowed by default goes upstream as bytes (no per-message SDK work)."""
    body = {"model": "echo", "messages": [{"role": "user", "content": f"m{i}"} for i in range(10_000)]}
    async with LoopProbe(relay) as probe:
        doc = await relay.start(body)
        final = await relay.wait_status(doc["endpoints"]["status_url"])
    assert final["status"] == "done" and final["response"]["body"]["choices"][0]["message"]["content"] == "m9999"
    assert len(final["parameters"]["messages"]) == 10_000
    assert probe.worst < LOOP_BOUND, f"loop held {probe.worst:.3f}s"


async def test_an_upstream_key_that_is_not_printable_ascii_is_refused(relay: Relay) -> None:
    for key in ("sk-tëst-key", "sk test key"):
        status, _, doc = await relay.post(msg("x"), key=None, headers={"X-OpenAI-API-Key": key})
        assert (status, doc["error"]["code"]) == (400, "invalid_header"), (key, doc)
        assert "X-OpenAI-API-Key" in doc["error"]["message"] and key not in doc["error"]["message"]


async def test_control_bytes_in_the_request_line_or_headers_are_never_logged_or_echoed(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token, key = "SECRETSTREAMTOKEN123", "sk-SECRETUPSTREAMKEY456"
    attacks = [
        f"GET /1/r/pub/x.txt?stream_token={token}\x7f HTTP/1.1\r\nHost: relay\r\n\r\n".encode(),
        f"POST /v1/stream-chatgpt HTTP/1.1\r\nHost: relay\r\nX-OpenAI-API-Key: {key}\x01\r\n"
        "Content-Length: 2\r\n\r\n{}".encode(),
        f"GET /healthz HTTP/1.1\r\nHost: relay\r\nX-Evil: {key}\r\n\x00\r\n\r\n".encode(),
    ]
    for data in attacks:
        answer = await raw_request(relay, data)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.") and b" 400 " in head.split(b"\r\n")[0], answer[:200]
        doc = orjson.loads(body)
        assert doc["error"]["code"] == "bad_request"
        assert token.encode() not in answer and key.encode() not in answer
    logged = "\n".join(r.getMessage() + (str(r.exc_info) if r.exc_info else "") for r in caplog.records)
    assert token not in logged and key not in logged
    assert "rejected a malformed HTTP request" in logged


async def test_an_event_id_of_5000_digits_is_refused(relay: Relay) -> None:
    doc = await relay.start(msg("hello"))
    await relay.wait_status(doc["endpoints"]["status_url"])
    url = doc["endpoints"]["stream_events_url"]
    async with relay.session.get(url, headers={"Last-Event-ID": "9" * 5000}) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "unknown_event_id"


async def test_chaining_from_an_expired_parent_is_refused(make_relay: RelayFactory) -> None:
    relay = await make_relay(retention_max_age_days=1.5 / 86400, retention_janitor_interval_seconds=3600)
    parent = await relay.start(msg("parent"))
    await relay.wait_status(parent["endpoints"]["status_url"])
    await asyncio.sleep(2.0)
    status, _, doc = await relay.post({**msg("child"), "from_status_url": parent["endpoints"]["status_url"]})
    assert (status, doc["error"]["code"]) == (404, "parent_not_found"), doc


async def test_the_concurrency_limit_holds_when_posts_arrive_at_once(make_relay: RelayFactory) -> None:
    relay = await make_relay(server_max_concurrent_jobs=20)
    body = orjson.dumps(msg("hang", model="echo:hang=1"))
    results = await asyncio.gather(*(relay.post(body) for _ in range(80)))
    accepted = [doc for status, _, doc in results if status == 200]
    refused = [doc for status, _, doc in results if status != 200]
    assert len(accepted) == 20, len(accepted)
    assert all(doc["error"]["code"] == "busy" for doc in refused)
    assert held(relay)["jobs"] == 20 and held(relay)["slots"] == 20
    for doc in accepted:
        async with relay.session.post(doc["endpoints"]["stop_url"]) as r:
            assert r.status == 200
    await until(lambda: held(relay) == {"jobs": 0, "slots": 0, "markers": 0, "retries": 0}, what="all given back")
    status, _, _ = await relay.post(msg("after"))
    assert status == 200


async def test_slow_headers_and_slow_bodies_are_cut_off(make_relay: RelayFactory) -> None:
    relay = await make_relay(server_header_timeout_seconds=1, server_body_timeout_seconds=1)
    port = relay.config.server_port

    async def dribble_headers() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        try:
            for _ in range(40):
                await asyncio.sleep(0.25)
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
                if reader.at_eof():
                    break
            await asyncio.wait_for(reader.read(), 5)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
        return time.monotonic() - started

    async def dribble_body() -> tuple[float, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        writer.write(
            b"POST /v1/stream-chatgpt HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
            b"X-OpenAI-API-Key: " + TEST_KEY.encode() + b"\r\nContent-Length: 4000000\r\n\r\n{"
        )
        answer = b""
        try:
            for _ in range(40):
                await writer.drain()
                await asyncio.sleep(0.25)
                if reader.at_eof() or reader._buffer:  # type: ignore[attr-defined]
                    break
                writer.write(b" ")
            answer = await asyncio.wait_for(reader.read(), 5)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
        return time.monotonic() - started, answer

    headers_took, (body_took, answer) = await asyncio.gather(dribble_headers(), dribble_body())
    assert headers_took < 4, headers_took
    assert body_took < 4, body_took
    assert b" 408 " in answer.split(b"\r\n")[0] and b"body_timeout" in answer, answer[:300]


async def test_connections_over_the_cap_are_closed_and_the_relay_keeps_serving(make_relay: RelayFactory) -> None:
    relay = await make_relay(server_max_connections=20, server_header_timeout_seconds=30)
    port = relay.config.server_port
    socks = []
    for _ in range(60):
        s = socket.create_connection(("127.0.0.1", port))
        s.setblocking(False)
        socks.append(s)
    await asyncio.sleep(0.3)

    def closed_by_relay(s: socket.socket) -> bool:
        try:
            return s.recv(1) == b""
        except BlockingIOError:
            return False
        except ConnectionError:
            return True

    open_now = sum(not closed_by_relay(s) for s in socks)
    assert open_now <= 20, open_now
    for s in socks:
        s.close()
    await until(lambda: len(relay.runner.server.connections) <= 1, what="connections closed")  # type: ignore[union-attr]
    async with relay.session.get(relay.url + "/healthz") as r:
        assert r.status == 200


async def test_readers_that_never_read_hold_a_bounded_buffer_and_are_dropped(make_relay: RelayFactory) -> None:
    # a reader whose socket stops taking bytes is dropped after the send timeout; one whose whole answer
    # fitted in the kernel's buffers ends normally and, idle, is closed by the header (keep-alive) timeout
    relay = await make_relay(server_send_timeout_seconds=3, server_header_timeout_seconds=3)
    text = " ".join(f"word{i:05d}" * 20 for i in range(3000))  # ~600 KB of answer
    doc = await relay.start(msg(text, model="echo:pace=0.0005"))
    path = doc["endpoints"]["stream_events_url"][len(relay.url) :]
    readers = []
    for _ in range(30):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little: the relay must
        s.connect(("127.0.0.1", relay.config.server_port))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        readers.append(s)  # and never read
    worst = 0
    server = relay.runner.server
    assert server is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        buffers = [t.get_write_buffer_size() for t in server._connections.values()]  # type: ignore[attr-defined]
        worst = max([worst, *buffers])
        final = await relay.get_json(doc["endpoints"]["status_url"])
        if final[1]["status"] == "done":
            break
        await asyncio.sleep(0.05)
    assert final[1]["status"] == "done"
    # a reader's socket buffer stays near the push limit (one event or one 256 KiB read more at most)
    assert worst <= PUSH_BUFFER_LIMIT + 256 * 1024 + 64 * 1024, worst
    await until(lambda: len(server.connections) <= 1, timeout=20, what="stalled readers dropped")
    for s in readers:
        s.close()
    status, _, body = await read_stream(relay.session, doc["endpoints"]["stream_events_url"])
    assert status == 200 and parse_sse(body)[-1].data == "[DONE]"


async def test_symlinks_in_the_data_directory_are_never_followed(relay: Relay) -> None:
    public = await relay.start(msg("public"))
    private = await relay.start({**msg("private"), "access": "private"})
    for d in (public, private):
        await relay.wait_status(d["endpoints"]["status_url"], headers=_bearer(d))
    pub_url = public["endpoints"]["status_url"]
    pub_file = relay.data_dir / pub_url[len(relay.url) + 1 :]
    # a status link to /etc/passwd, beside a real request
    fake_id = "0f0f0f0f-0f0f-4f0f-8f0f-0f0f0f0f0f0f"
    (pub_file.parent / f"{fake_id}.json").symlink_to("/etc/passwd")
    (pub_file.parent / f"{fake_id}.txt").symlink_to("/etc/passwd")
    link_url = pub_url.rsplit("/", 1)[0] + f"/{fake_id}.json"
    for url in (link_url, link_url[:-5] + ".txt", link_url[:-5] + ".raw", link_url[:-5] + "/stop"):
        async with relay.session.get(url) as r:
            assert r.status == 404, (url, r.status)
            assert b"root:" not in await r.read()
    # a pub/ directory link into the private request's directory
    prv_url = private["endpoints"]["status_url"]
    prv_dir = (relay.data_dir / prv_url[len(relay.url) + 1 :]).parent
    pub_twin = Path(str(prv_dir).replace("/prv/", "/pub/"))
    pub_twin.parent.mkdir(parents=True, exist_ok=True)
    if pub_twin.exists():  # the public request was created in the same second: link one level up
        pub_twin = pub_twin.parent
        prv_dir = prv_dir.parent
        pub_twin.rename(pub_twin.with_name(pub_twin.name + "-moved"))
    pub_twin.symlink_to(prv_dir, target_is_directory=True)
    twin_url = prv_url.replace("/prv/", "/pub/")
    async with relay.session.get(twin_url) as r:
        body = await r.read()
        assert r.status == 404 and b"bearer_token_sha256" not in body, (r.status, body[:200])


def _bearer(doc: dict[str, Any]) -> dict[str, str]:
    token = doc["authorization"].get("bearer_token")
    return {"Authorization": f"Bearer {token}"} if token else {}


def test_the_connection_cap_stays_below_the_descriptor_limit() -> None:
    import resource

    from relay.server import SPARE_DESCRIPTORS, connection_cap

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        assert connection_cap(4096) == 1024 - SPARE_DESCRIPTORS
        assert connection_cap(100) == 100
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_parent_whose_history_is_a_million_tiny_arrays_is_refused_without_parsing_it(
    make_relay: RelayFactory,
) -> None:
    """A long chain can grow a parent status of tiny arrays within the byte limit; parsing 1,000,000
    empty arrays holds the loop ~0.45 s (in a thread too: orjson holds the GIL). It is counted first and
    refused with 413, and a parent under both limits still chains."""
    relay = await make_relay(server_max_conversation_bytes=8 * 1024 * 1024)
    first = await relay.start(msg("turn one"))
    status_url = first["endpoints"]["status_url"]
    await relay.wait_status(status_url)
    path = relay.data_dir / status_url[len(relay.url) + 1 :]
    doc = orjson.loads(path.read_bytes())
    doc["parameters"]["messages"][0]["content"] = [[] for _ in range(1_000_000)]  # 2.9 MB, under 8 MiB
    path.write_bytes(orjson.dumps(doc))
    async with LoopProbe(relay) as probe:
        status, _, answer = await relay.post(
            {"messages": [{"role": "user", "content": "two"}], "from_status_url": status_url}
        )
    assert (status, answer["error"]["code"]) == (413, "conversation_too_large")
    assert "max_conversation_containers" in answer["error"]["message"]
    assert probe.worst < LOOP_BOUND, f"loop held {probe.worst:.3f}s"
    doc["parameters"]["messages"][0]["content"] = "x" * (9 * 1024 * 1024)  # over the byte limit
    path.write_bytes(orjson.dumps(doc))
    status, _, answer = await relay.post(
        {"messages": [{"role": "user", "content": "two"}], "from_status_url": status_url}
    )
    assert (status, answer["error"]["code"]) == (413, "conversation_too_large")
    assert "max_conversation_bytes" in answer["error"]["message"]
    doc["parameters"]["messages"][0]["content"] = "turn one"
    path.write_bytes(orjson.dumps(doc))
    second = await relay.start({"messages": [{"role": "user", "content": "two"}], "from_status_url": status_url})
    child = await relay.wait_status(second["endpoints"]["status_url"])
    assert child["status"] == "done" and len(child["parameters"]["messages"]) == 3


async def test_many_readers_of_a_large_private_status_do_not_hold_the_loop(make_relay: RelayFactory) -> None:
    """A private status document holds the whole answer (here 15 MiB). Checking a token reads only the
    document's first bytes, and serving it sends the file's bytes with the authorization object replaced:
    nothing parses or encodes the answer per reader (20 readers at once held the loop 0.5-1.2 s when each
    did), and no reader holds a copy of it."""
    relay = await make_relay(upstream_max_response_bytes=20 * 1024 * 1024)
    doc = await relay.start(msg("x" * 1024, model="echo:chunks=15000", access="private"))
    auth = f"Bearer {doc['authorization']['bearer_token']}"
    status_url = doc["endpoints"]["status_url"]
    await relay.wait_status(status_url, timeout=60, headers={"Authorization": auth})
    async with LoopProbe(relay) as probe:
        await readers(status_url, f"Authorization: {auth}", 20)
    assert probe.worst < LOOP_BOUND, f"loop held {probe.worst:.3f}s"
    async with relay.session.get(status_url, headers={"Authorization": auth}) as r:
        served = await r.read()
    on_disk = orjson.loads((relay.data_dir / status_url[len(relay.url) + 1 :]).read_bytes())
    assert orjson.loads(served) == {**on_disk, "authorization": {"access": "private"}}
    assert len(on_disk["response"]["body"]["choices"][0]["message"]["content"]) == 15_000 * 1024


async def test_clients_that_leave_before_or_while_their_answer_starts_are_no_errors(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """The class: a client gone before its answer starts (pipelined requests behind one it drops, a
    connection reset right after the request). Whatever answer was on its way (a finished stream, a live
    one, a large status sent in blocks, a small one), the relay logs no error and no traceback for it,
    leaks no descriptor, and goes on serving."""
    import random
    import struct

    caplog.set_level(logging.INFO)
    finished = await relay.start(msg("done", model="echo:chunks=20000"))
    await relay.wait_status(finished["endpoints"]["status_url"])
    live = await relay.start(msg("live", model="echo:chunks=3000,pace=0.003"))
    paths = [
        finished["endpoints"]["stream_events_url"][len(relay.url) :],
        live["endpoints"]["stream_events_url"][len(relay.url) :],
        finished["endpoints"]["status_url"][len(relay.url) :],  # (a large status: sent in blocks)
        "/healthz",
    ]
    before = open_fds()
    rng = random.Random(21)
    port = relay.config.server_port

    async def leave() -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rng.choice([2048, 8192, 65536]))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        requests = b""
        for _ in range(rng.randint(1, 4)):  # pipelined, HEADs and GETs mixed
            path = rng.choice(paths)
            method = rng.choice(["GET", "GET", "HEAD"])
            requests += f"{method} {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode()
        await asyncio.get_running_loop().sock_sendall(sock, requests)
        await asyncio.sleep(rng.choice([0, 0, 0.001, 0.01]))
        if rng.random() < 0.5:
            try:
                sock.recv(rng.choice([1, 100, 4096]))
            except BlockingIOError:
                pass
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset, not a close
        sock.close()

    for _ in range(10):
        await asyncio.gather(*(leave() for _ in range(30)))
    await until(lambda: open_fds() <= before + 2, timeout=20, what="every descriptor given back")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors][:3]
    assert not [r for r in caplog.records if r.name == "aiohttp.access" and '" 500 ' in r.getMessage()]
    status, _, body = await read_stream(relay.session, paths[0].join([relay.url, ""]))
    assert status == 200 and parse_sse(body)[-1].data == "[DONE]"
