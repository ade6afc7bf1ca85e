"""Operators: the usage ledger (every ending, crash recovery once, expiry), `relay.py usage`, token
metrics, and the operator API (/v1/admin/…) with its keys."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from relay import ledger
from relay.config import ApiKey
from relay.keys import MANAGER

from .conftest import (
    ROOT,
    TEST_KEY,
    Relay,
    RelayFactory,
    Upstream,
    free_port,
    msg,
    read_stream,
    start_relay,
    until,
    wait_healthy,
)

ADMIN = "admin-key-0123456789abcdef"
ALICE = ApiKey(key="alice-access-key-1", name="alice")
BOB = ApiKey(key="bob-access-key-22")


def lines(data_dir: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted((data_dir / "usage").glob("*.jsonl")):
        out += [orjson.loads(raw) for raw in path.read_bytes().splitlines()]
    return out


def by_id(data_dir: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for line in lines(data_dir):
        out.setdefault(line["id"], []).append(line)
    return out


def rid(doc: dict[str, Any]) -> str:
    return doc["endpoints"]["status_url"].rsplit("/", 1)[1][:-5]


async def wait_idle(relay: Relay) -> None:
    await until(lambda: relay.app[MANAGER].running() == 0 and not relay.app[MANAGER].retries, what="idle")


async def test_every_ending_gets_one_ledger_line(make_relay: RelayFactory) -> None:
    relay = await make_relay(auth_api_keys=[{"key": ALICE.key, "name": "alice"}, BOB.key])
    alice = {"X-RapidAPI-Key": ALICE.key}
    done = await relay.start(msg("one two three"), headers=alice)
    asynced = await relay.start(msg("four five"), endpoint="/v1/async-chatgpt", headers={"X-RapidAPI-Key": BOB.key})
    failed = await relay.start(msg("x", model="echo:fail=500"), headers=alice)
    stopped = await relay.start(msg(" ".join(f"w{i}" for i in range(200)), model="echo:pace=0.05"), headers=alice)
    await asyncio.sleep(0.5)
    async with relay.session.get(stopped["endpoints"]["stop_url"]) as r:
        assert r.status == 200
    await wait_idle(relay)
    seen = by_id(relay.data_dir)
    assert all(len(v) == 1 for v in seen.values()), seen
    d, a, f, s = (seen[rid(x)][0] for x in (done, asynced, failed, stopped))
    assert (d["outcome"], d["code"], d["key"], d["model"], d["estimated"]) == ("done", None, "alice", "echo", False)
    assert d["completion_tokens"] > 0 and d["total_tokens"] == d["prompt_tokens"] + d["completion_tokens"]
    assert d["ttft"] is not None and d["duration"] >= 0 and d["endpoint"] == "/v1/stream-chatgpt"
    assert d["path"] == done["endpoints"]["status_url"][len(relay.url) + 1 : -5]
    assert a["key"].startswith("key-") and a["endpoint"] == "/v1/async-chatgpt" and a["outcome"] == "done"
    assert (f["outcome"], f["code"]) == ("error", "upstream_error")
    assert s["outcome"] == "stop" and s["estimated"] is True and s["completion_tokens"] > 0  # cut off: estimated
    raw = b"".join(p.read_bytes() for p in (relay.data_dir / "usage").glob("*.jsonl"))
    for secret in (ALICE.key, BOB.key, TEST_KEY, b"one two three"):
        assert (secret if isinstance(secret, bytes) else secret.encode()) not in raw


async def test_interrupted_by_shutdown_is_in_the_ledger(make_relay: RelayFactory) -> None:
    relay = await make_relay(server_shutdown_grace_seconds=0.1)
    doc = await relay.start(msg("x", model="echo:delay=30"))
    await asyncio.sleep(0.3)
    await relay.runner.cleanup()
    (line,) = by_id(relay.data_dir)[rid(doc)]
    assert (line["outcome"], line["code"], line["key"]) == ("interrupted", "interrupted", "open")


async def test_kill_9_recovery_writes_the_line_once(tmp_path: Path, upstream: Upstream) -> None:
    port = free_port()
    data = tmp_path / "data"
    url = f"http://127.0.0.1:{port}"
    proc = start_relay(port, data, upstream)
    await wait_healthy(url, proc)
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/stream-chatgpt", json=msg("a b c d e f g h", model="echo:pace=0.2"),
                          headers={"X-OpenAI-API-Key": TEST_KEY}) as r:  # fmt: skip
            doc = await r.json()
        await asyncio.sleep(0.7)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert rid(doc) not in by_id(data)
    for _ in range(2):  # the first start repairs it and writes its line; the second finds nothing to do
        proc = start_relay(port, data, upstream)
        try:
            await wait_healthy(url, proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
        (line,) = by_id(data)[rid(doc)]
        assert (line["outcome"], line["code"], line["estimated"], line["ttft"]) == (
            "interrupted",
            "interrupted",
            True,
            None,
        )
        assert line["completion_tokens"] > 0  # the text logged before the crash


def test_recovery_does_not_write_a_second_line_when_the_crash_came_after_it(tmp_path: Path) -> None:
    """A crash between the ledger append and the marker's removal: the next start finds the line."""
    from relay import recovery
    from relay.paths import RequestPath

    data = tmp_path / "data"
    rp = RequestPath.new(1, False, int(time.time()))
    rp.directory(data).mkdir(parents=True)
    doc = {"status": "done", "request": {"finished_at": int(time.time()), "endpoint": "/v1/async-chatgpt"},
           "parameters": {"model": "echo", "messages": []}, "response": {}}  # fmt: skip
    rp.file(data, "json").write_bytes(orjson.dumps(doc))
    recovery.write_marker(data, rp, None, "alice")
    line = ledger.entry(doc, request_id=rp.request_id, node=1, key="alice", path=rp.base, ttft=None, now=time.time())
    ledger.append(data, line, durable=False)
    recovery.repair(data, 1, "http://127.0.0.1:1")
    assert len(by_id(data)[rp.request_id]) == 1
    assert not list((data / "running").glob("*.json"))


def usage(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "relay.py", "usage", "--data-dir", str(data), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip


async def test_usage_command_totals_match_the_requests_made(make_relay: RelayFactory) -> None:
    relay = await make_relay(auth_api_keys=[{"key": ALICE.key, "name": "alice"}, {"key": BOB.key, "name": "bob"}])
    made: dict[str, int] = {"alice": 0, "bob": 0}
    for i in range(7):
        who, key = ("alice", ALICE.key) if i % 3 else ("bob", BOB.key)
        await relay.start(msg(f"request number {i}"), headers={"X-RapidAPI-Key": key})
        made[who] += 1
    await relay.start(msg("x", model="echo:fail=503"), headers={"X-RapidAPI-Key": BOB.key})
    made["bob"] += 1
    await wait_idle(relay)
    out = usage(relay.data_dir, "--by", "key", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    rows = {r["key"]: r for r in report["rows"]}
    assert {k: rows[k]["requests"] for k in rows} == made
    assert rows["bob"]["errors"] == 1 and rows["alice"]["errors"] == 0
    ledger_lines = lines(relay.data_dir)
    for who in made:
        mine = [x for x in ledger_lines if x["key"] == who]
        assert rows[who]["total_tokens"] == sum(x["total_tokens"] for x in mine) > 0
    assert report["total"]["requests"] == 8
    table = usage(relay.data_dir, "--by", "key,model,day").stdout
    assert "alice" in table and "bob" in table and "TOTAL" in table and ledger.day_of(time.time()) in table
    csv = usage(relay.data_dir, "--key", "alice", "--csv").stdout.splitlines()
    assert csv[0].startswith("key,model,requests,errors,prompt_tokens") and len(csv) == 2
    assert csv[1].startswith(f"alice,echo,{made['alice']},0,")
    empty = json.loads(usage(relay.data_dir, "--since", "2001-01-01", "--until", "2001-01-31", "--json").stdout)
    assert empty["rows"] == [] and empty["total"]["requests"] == 0
    bad = usage(relay.data_dir, "--since", "last tuesday")
    assert bad.returncode == 2 and "is not a day" in bad.stderr


def test_usage_reads_a_year_of_ledgers_quickly(tmp_path: Path) -> None:
    """365 daily files, 300,000 lines: one pass, a few seconds at most."""
    data = tmp_path / "data"
    (data / "usage").mkdir(parents=True)
    start = time.time() - 364 * 86400
    for day in range(365):
        t = start + day * 86400
        rows = b"".join(
            orjson.dumps({"t": t + i, "id": f"{day}-{i}", "key": "k" + str(i % 5), "model": "m", "outcome": "done",
                          "code": None, "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                          "estimated": False}) + b"\n"
            for i in range(820)
        )  # fmt: skip
        (data / "usage" / f"{ledger.day_of(t)}.jsonl").write_bytes(rows)
    t0 = time.monotonic()
    out = usage(data, "--since", "365d", "--by", "key", "--json")
    took = time.monotonic() - t0
    report = json.loads(out.stdout)
    assert report["total"]["requests"] == 365 * 820 and report["total"]["total_tokens"] == 365 * 820 * 7
    assert took < 20, took  # generous: a shared CI machine (about 2 s here)


def test_janitor_removes_ledgers_older_than_the_setting(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "usage").mkdir(parents=True)
    now = time.time()
    old = data / "usage" / f"{ledger.day_of(now - 400 * 86400)}.jsonl"
    recent = data / "usage" / f"{ledger.day_of(now - 300 * 86400)}.jsonl"
    for p in (old, recent):
        p.write_text("{}\n")
    out = subprocess.run([sys.executable, "relay.py", "janitor", "--data-dir", str(data)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "1 usage ledger file(s) older than 13 months" in out.stdout
    assert not old.exists() and recent.exists()


# ----- the operator API -----------------------------------------------------------------------------


async def admin_get(relay: Relay, path: str, key: str | None = ADMIN) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with relay.session.get(relay.url + path, headers=headers) as r:
        return r.status, await r.json()


@pytest.mark.parametrize("path", ["/v1/admin/running", "/v1/admin/finished", "/v1/admin/stats"])
async def test_admin_api_refuses_without_the_admin_key(make_relay: RelayFactory, path: str) -> None:
    relay = await make_relay(auth_api_keys=[ALICE.key], auth_admin_keys=[ADMIN])
    code, doc = await admin_get(relay, path, None)
    assert code == 401 and doc["error"]["code"] == "unauthorized"
    code, doc = await admin_get(relay, path, ALICE.key)  # an access key is not an admin key
    assert code == 403 and doc["error"]["code"] == "forbidden"
    code, doc = await admin_get(relay, path, ADMIN + "x")
    assert code == 403
    async with relay.session.post(
        relay.url + "/v1/admin/running/x/stop", headers={"Authorization": "Bearer nope"}
    ) as r:
        assert r.status == 403
    code, _ = await admin_get(relay, path)
    assert code == 200
    off = await make_relay()
    code, doc = await admin_get(off, path)
    assert code == 403 and doc["error"]["code"] == "admin_disabled" and "[auth] admin_keys" in doc["error"]["message"]


async def test_admin_api_running_stop_finished_stats(make_relay: RelayFactory) -> None:
    relay = await make_relay(auth_admin_keys=[ADMIN])
    public = await relay.start(msg(" ".join(f"w{i}" for i in range(300)), model="echo:pace=0.05"))
    private = await relay.start(msg(" ".join(["secret"] * 60), model="echo:pace=0.05", access="private"))
    await asyncio.sleep(0.6)
    code, doc = await admin_get(relay, "/v1/admin/running")
    assert code == 200 and doc["count"] == 2
    rows = {r["id"]: r for r in doc["running"]}
    pub, prv = rows[rid(public)], rows[[k for k in rows if k != rid(public)][0]]
    assert pub["status"] == "streaming" and pub["tokens_so_far"] > 0 and pub["elapsed"] > 0.3
    assert pub["status_url"] == public["endpoints"]["status_url"]
    assert prv["access"] == "private" and prv["status_url"] is None
    assert "secret" not in json.dumps(doc)
    async with relay.session.post(relay.url + f"/v1/admin/running/{pub['id']}/stop",
                                  headers={"Authorization": f"Bearer {ADMIN}"}) as r:  # fmt: skip
        assert r.status == 200
    async with relay.session.post(relay.url + "/v1/admin/running/nonexistent/stop",
                                  headers={"Authorization": f"Bearer {ADMIN}"}) as r:  # fmt: skip
        assert r.status == 404
    await until(lambda: rid(public) in by_id(relay.data_dir), what="the stopped request in the ledger")
    await relay.start(msg("x", model="echo:fail=500"))
    await wait_idle(relay)
    code, doc = await admin_get(relay, "/v1/admin/finished")
    ids = [f["id"] for f in doc["finished"]]
    assert rid(public) in ids and len(ids) == 3
    code, doc = await admin_get(relay, "/v1/admin/finished?outcome=stop")
    assert [f["id"] for f in doc["finished"]] == [rid(public)]
    code, doc = await admin_get(relay, "/v1/admin/finished?code=upstream_error")
    assert len(doc["finished"]) == 1 and doc["finished"][0]["outcome"] == "error"
    code, doc = await admin_get(relay, "/v1/admin/finished?limit=nope")
    assert code == 400
    code, stats = await admin_get(relay, "/v1/admin/stats")
    assert stats["hour"]["requests"] == 3 and stats["hour"]["errors"] == 1
    assert stats["hour"]["errors_by_code"] == {"upstream_error": 1}
    assert stats["hour"]["tokens"] > 0 and stats["hour"]["ttft_p50"] is not None
    assert sum(m["requests"] for m in stats["minutes"]) == 3
    assert "secret" not in json.dumps(stats) and private is not None


async def test_book_is_filled_from_the_ledger_after_a_restart(make_relay: RelayFactory, tmp_path: Path) -> None:
    data = tmp_path / "kept"
    first = await make_relay(data_dir=data, auth_admin_keys=[ADMIN])
    for i in range(3):
        await first.start(msg(f"turn {i}"))
    await wait_idle(first)
    await first.runner.cleanup()
    second = await make_relay(data_dir=data, auth_admin_keys=[ADMIN])
    code, doc = await admin_get(second, "/v1/admin/finished")
    assert code == 200 and doc["count"] == 3
    code, stats = await admin_get(second, "/v1/admin/stats")
    assert stats["day"]["requests"] == 3


async def test_token_metrics_by_key_and_model(make_relay: RelayFactory) -> None:
    relay = await make_relay(auth_api_keys=[{"key": ALICE.key, "name": "alice"}])
    doc = await relay.start(msg("count my tokens please"), headers={"X-RapidAPI-Key": ALICE.key})
    await read_stream(relay.session, doc["endpoints"]["stream_events_url"])
    await wait_idle(relay)
    (line,) = lines(relay.data_dir)
    async with relay.session.get(relay.url + "/metrics") as r:
        text = await r.text()
    assert (
        f'relay_tokens_total{{key="alice",kind="completion",model="echo"}} {float(line["completion_tokens"])}' in text
    )
    assert f'relay_tokens_total{{key="alice",kind="prompt",model="echo"}} {float(line["prompt_tokens"])}' in text
    assert ALICE.key not in text


def test_ledger_lines_are_whole_when_two_processes_append(tmp_path: Path) -> None:
    """Two nodes may share nothing, but a node's own threads append concurrently: O_APPEND keeps lines whole."""
    data = tmp_path / "d"
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[2]); from relay import ledger; from pathlib import Path\n"
        "for i in range(2000): ledger.append(Path(sys.argv[1]), {'t': time.time(), 'id': f'{sys.argv[3]}-{i}', "
        "'pad': 'x' * 900}, False)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(data), str(ROOT), str(n)]) for n in range(2)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    got = lines(data)
    assert len(got) == 4000 and len({x["id"] for x in got}) == 4000


def test_ledger_tokens_take_cached_and_reasoning_counts_when_reported() -> None:
    usage = {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150,
             "prompt_tokens_details": {"cached_tokens": 100},
             "completion_tokens_details": {"reasoning_tokens": 12}}  # fmt: skip
    doc = {"status": "done", "request": {"endpoint": "/v1/stream-chatgpt", "total_time": 1.5},
           "response": {"body": {"choices": [{"message": {"content": "hi"}}], "usage": usage}}}  # fmt: skip
    line = ledger.entry(doc, request_id="r", node=1, key="k", path="p", ttft=0.25, now=1.0,
                        params={"model": "m", "messages": [{"role": "user", "content": "x" * 400}]})  # fmt: skip
    assert (line["prompt_tokens"], line["completion_tokens"], line["total_tokens"]) == (120, 30, 150)
    assert (line["cached_tokens"], line["reasoning_tokens"], line["estimated"]) == (100, 12, False)
    del doc["response"]["body"]["usage"]  # no usage: estimated from the text, about 4 characters a token
    line = ledger.entry(doc, request_id="r", node=1, key="k", path="p", ttft=None, now=1.0,
                        params={"model": "m", "messages": [{"role": "user", "content": "x" * 400}]})  # fmt: skip
    assert (line["prompt_tokens"], line["completion_tokens"], line["estimated"]) == (100, 1, True)
    assert line["cached_tokens"] is None and line["reasoning_tokens"] is None
    doc["response"]["body"]["usage"] = ["not", "an", "object"]  # a hostile upstream's usage: estimated too
    assert ledger.entry(doc, request_id="r", node=1, key="k", path="p", ttft=None, now=1.0)["estimated"] is True
