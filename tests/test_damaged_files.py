"""Every file the relay reads back at start may be damaged: a start never fails because of one, and what it
serves afterwards never answers 500.

A relay makes one request of each kind (a stream, an async request, a stored chat completion, a Response)
plus an interrupted one (a running marker left behind, as after kill -9), and stops. Then one of its files
(the running marker, the day's usage ledger, the chat index, a status document, an event log) is damaged
in one of many ways: emptied, filled with NUL bytes, bytes that are not UTF-8, lone surrogates, numbers out
of range, JSON of the wrong type or with members of the wrong types, a directory or a FIFO in its place. A
new relay starts on that data directory, and every URL of every request, the OpenAI face's objects and
lists, the operator API, `/metrics` and `relay.py usage` answer without a 5xx.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from relay.keys import MANAGER

from .conftest import OPENAI_HEADERS, ROOT, Relay, RelayFactory, msg

ADMIN = "admin-key-for-damaged-files-0001"
WRONG_JSON = [
    b"[]",
    b'"s"',
    b"null",
    b'{"status": []}',
    b'{"status": "streaming", "parameters": [1], "response": 5, "endpoints": []}',
    b'{"status": "done", "request": [], "authorization": 5, "openai": {"object": "chat.completion", "id": []}}',
    b'{"status": "streaming", "openai": {"object": "response", "id": "resp_1", "echo": 3}, "parameters": {}}',
    b'{"op": "add", "id": 5, "created": "x", "owner": [], "metadata": 7}',
    b'{"t": "x", "id": [], "key": {}, "model": 1, "prompt_tokens": "x", "outcome": null}',
]


def _replace(data: bytes, path: Path) -> None:
    path.write_bytes(data + b"\n")


def _append(data: bytes, path: Path) -> None:
    path.write_bytes(path.read_bytes() + data + b"\n")


DAMAGE: dict[str, Callable[[Path], Any]] = {
    "empty": lambda p: p.write_bytes(b""),
    "nul": lambda p: p.write_bytes(b"\0" * 5000),
    "not utf-8": lambda p: p.write_bytes(p.read_bytes() + b'{"id": "\xff\xfe", "model": "\xc3"}\n'),
    "lone surrogates": lambda p: p.write_bytes(p.read_bytes() + b'{"id": "\\ud800", "key": "\\udfff"}\n'),
    "numbers out of range": lambda p: p.write_bytes(
        p.read_bytes() + b'{"t": 1e999, "created": 1e400}\n{"t": 123456789012345678901234567890}\n'
    ),  # fmt: skip
    **{f"wrong json {i}": functools.partial(_replace, data) for i, data in enumerate(WRONG_JSON)},
    **{f"appended wrong json {i}": functools.partial(_append, data) for i, data in enumerate(WRONG_JSON)},
    "a directory": lambda p: (p.unlink(), p.mkdir()),
    "a fifo": lambda p: (p.unlink(), os.mkfifo(p)),
}
TARGETS = ["marker", "ledger", "chat index", "status of a stream", "status of a response", "status of a chat",
           "log of a stream", "log of the interrupted one"]  # fmt: skip


async def _populate(relay: Relay) -> dict[str, Any]:
    made: dict[str, Any] = {}
    made["stream"] = (await relay.start(msg("one two")))["endpoints"]
    made["async"] = (await relay.start(msg("three"), endpoint="/v1/async-chatgpt"))["endpoints"]
    for name in ("stream", "async"):
        await relay.wait_status(made[name]["status_url"])
    chat = {"model": "echo", "messages": [{"role": "user", "content": "x"}], "store": True}
    async with relay.session.post(relay.url + "/v1/chat/completions", data=orjson.dumps(chat),
                                  headers=OPENAI_HEADERS) as r:  # fmt: skip
        made["chat"] = (await r.json())["id"]
    async with relay.session.post(relay.url + "/v1/responses", data=orjson.dumps({"model": "echo", "input": "x"}),
                                  headers=OPENAI_HEADERS) as r:  # fmt: skip
        made["response"] = (await r.json())["id"]
    made["interrupted"] = (await relay.start(msg("slow", model="echo:pace=5")))["endpoints"]
    return made


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A data directory as a relay leaves it, with an interrupted request; made once (by a relay process
    killed with -9 while that request runs)."""
    import asyncio

    import aiohttp

    from relay import devupstream

    from .conftest import TEST_KEY, Upstream, free_port, start_relay, wait_healthy

    base = tmp_path_factory.mktemp("damaged") / "base"

    async def make() -> dict[str, Any]:
        runner, state, port = await devupstream.start("127.0.0.1", 0, required_key=TEST_KEY)
        up = Upstream(url=f"http://127.0.0.1:{port}/v1", state=state, port=port)
        relay_port = free_port()
        proc = start_relay(relay_port, base, up, toml=f'[auth]\nadmin_keys = ["{ADMIN}"]\n')
        try:
            url = f"http://127.0.0.1:{relay_port}"
            await wait_healthy(url, proc)
            async with aiohttp.ClientSession() as session:
                relay = Relay(url, None, None, None, session, base)  # type: ignore[arg-type]
                made = await _populate(relay)
            await asyncio.sleep(0.3)
        finally:
            proc.kill()
            proc.wait(10)
            await runner.cleanup()
        return made

    return base, asyncio.run(make())


def _target(data: Path, made: dict[str, Any], name: str) -> Path:
    def by_url(url: str) -> Path:
        return data / url.split("/", 3)[3]

    if name == "marker":
        return next((data / "running").glob("*.json"))
    if name == "ledger":
        return next((data / "usage").glob("*.jsonl"))
    if name == "chat index":
        return data / "openai" / "chat-completions.jsonl"
    if name == "status of a stream":
        return by_url(made["stream"]["status_url"])
    if name == "log of a stream":
        return by_url(made["stream"]["stream_events_url"])
    if name == "log of the interrupted one":
        return by_url(made["interrupted"]["stream_events_url"])
    kind = "response" if name.endswith("response") else "chat"
    ident = made[kind]
    found = [p for p in data.rglob("*.json") if "running" not in p.parts and ident.encode() in p.read_bytes()[:4096]]
    return found[0]


async def _probe(relay: Relay, made: dict[str, Any]) -> list[str]:
    bad = []
    urls = [u for e in (made["stream"], made["async"], made["interrupted"]) for k, u in e.items() if k != "stop_url"]
    urls = [u.replace(u.split("/1/r/")[0], relay.url) for u in urls]
    urls += [f"{relay.url}/v1/responses/{made['response']}", f"{relay.url}/v1/responses/{made['response']}/input_items",
             f"{relay.url}/v1/chat/completions/{made['chat']}", f"{relay.url}/v1/chat/completions",
             f"{relay.url}/v1/chat/completions/{made['chat']}/messages", f"{relay.url}/metrics",
             f"{relay.url}/v1/admin/running", f"{relay.url}/v1/admin/finished",
             f"{relay.url}/v1/admin/stats"]  # fmt: skip
    for url in urls:
        headers = {**OPENAI_HEADERS, "Authorization": f"Bearer {ADMIN}"} if "/admin/" in url else OPENAI_HEADERS
        async with relay.session.get(url, headers=headers) as r:
            await r.read()
            if r.status >= 500:
                bad.append(f"{r.status} {url}")
    return bad


# every damage once, on targets in rotation (every target several times); the whole matrix takes ten minutes
CASES = sorted(
    set(
        [(TARGETS[k % len(TARGETS)], damage) for k, damage in enumerate(sorted(DAMAGE))]
        + [(target, damage) for target in ("ledger", "chat index", "marker") for damage in ("a directory", "a fifo")]
    )
)  # (a FIFO in the ledger's place blocked the start for good, found here)


@pytest.mark.parametrize(("target", "damage"), CASES)
async def test_a_damaged_file_never_stops_a_start_nor_makes_a_500(
    make_relay: RelayFactory, populated: tuple[Path, dict[str, Any]], tmp_path: Path, target: str, damage: str
) -> None:
    base, made = populated
    data = tmp_path / "data"
    shutil.copytree(base, data, symlinks=True)
    DAMAGE[damage](_target(data, made, target))
    relay = await make_relay(data_dir=data, auth_admin_keys=[ADMIN])  # the start: recovery, ledger, index
    assert relay.app[MANAGER] is not None
    assert await _probe(relay, made) == []
    status, _, doc = await relay.post(msg("after"))
    assert status == 200 and (await relay.wait_status(doc["endpoints"]["status_url"]))["status"] == "done"
    if target != "ledger":
        return
    usage = subprocess.run([sys.executable, "relay.py", "usage", "--data-dir", str(data), "--since", "30d"],
                           cwd=ROOT, capture_output=True, timeout=30)  # fmt: skip
    assert usage.returncode == 0, usage.stderr[-2000:]
