"""A table of hostile inputs: each gets its documented status and a JSON error, creates no file and
makes no upstream call."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from yarl import URL

from .conftest import TEST_KEY, Relay, RelayFactory, msg

RELAY_KEY = "hostile-relay-key-1"


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
async def setup(make_relay: RelayFactory) -> tuple[Relay, dict, dict]:
    relay = await make_relay(auth_api_keys=[RELAY_KEY], server_max_body_bytes=10_000)
    headers = {"X-RapidAPI-Key": RELAY_KEY}
    private = await relay.start(msg("private parent", access="private"), headers=headers)
    token = private["authorization"]["bearer_token"]
    await relay.wait_status(private["endpoints"]["status_url"], headers={"Authorization": f"Bearer {token}"})
    public = await relay.start(msg("public parent"), headers=headers)
    await relay.wait_status(public["endpoints"]["status_url"])
    return relay, private, public


async def test_hostile_inputs(setup: tuple[Relay, dict, dict]) -> None:
    relay, private, public = setup
    assert relay.upstream is not None
    ok_headers = {"X-RapidAPI-Key": RELAY_KEY}
    prv = private["endpoints"]["status_url"]
    prv_path = prv[len(relay.url) :]
    pub = public["endpoints"]["status_url"]
    stream_token = private["authorization"]["stream_url_arg"].split("=", 1)[1]
    base = msg("x")

    # (what, method, path or body, headers, expected status, expected code)
    posts: list[tuple[str, object, dict[str, str], int, str]] = [
        ("no relay key", base, {}, 401, "unauthorized"),
        ("wrong relay key", base, {"X-RapidAPI-Key": "guess-guess-guess"}, 401, "unauthorized"),
        ("relay key as wrong bearer", base, {"Authorization": "Bearer guess-guess"}, 401, "unauthorized"),
        ("relay key with extra char", base, {"X-RapidAPI-Key": RELAY_KEY + "x"}, 401, "unauthorized"),
        ("relay key prefix", base, {"X-RapidAPI-Key": RELAY_KEY[:-1]}, 401, "unauthorized"),
        ("oversized body", msg("x" * 20_000), ok_headers, 413, "body_too_large"),
        ("malformed JSON", b'{"messages": [', ok_headers, 400, "invalid_json"),
        ("JSON null", b"null", ok_headers, 400, "invalid_json"),
        ("deeply nested messages", {"messages": "[" * 5000}, ok_headers, 400, "invalid_field"),
        ("messages object", {"messages": {"role": "user"}}, ok_headers, 400, "invalid_field"),
        ("role number", {"messages": [{"role": 1}]}, ok_headers, 400, "invalid_field"),
        ("timeout NaN", b'{"messages":[{"role":"user","content":"x"}],"timeout":NaN}', ok_headers, 400, "invalid_json"),
        ("timeout huge", {**base, "timeout": 1e308}, ok_headers, 400, "invalid_field"),
        ("access admin", {**base, "access": "admin"}, ok_headers, 400, "invalid_field"),
        ("conversation id traversal", {**base, "conversation_id": "../../etc"}, ok_headers, 400, "invalid_field"),
        ("webhook loopback", {**base, "webhook_url": "http://127.0.0.1:22/"}, ok_headers, 400, "invalid_field"),
        ("webhook metadata", {**base, "webhook_url": "http://169.254.169.254/"}, ok_headers, 400, "invalid_field"),
        ("webhook decimal ip", {**base, "webhook_url": "http://2130706433/"}, ok_headers, 400, "invalid_field"),
        ("webhook mapped v6", {**base, "webhook_url": "http://[::ffff:127.0.0.1]/"}, ok_headers, 400, "invalid_field"),
        ("webhook javascript", {**base, "webhook_url": "javascript:alert(1)"}, ok_headers, 400, "invalid_field"),
        ("parent other host", {**base, "from_status_url": "https://evil.example" + prv_path}, ok_headers, 400,
         "invalid_from_status_url"),
        ("parent traversal", {**base, "from_status_url": relay.url + "/1/r/pub/../prv/x.json"}, ok_headers, 400,
         "invalid_from_status_url"),
        ("parent encoded traversal", {**base, "from_status_url": pub.replace("/pub/", "/pub/%2e%2e/")}, ok_headers,
         400, "invalid_from_status_url"),
        ("parent other node", {**base, "from_status_url": pub.replace("/1/r/", "/7/r/")}, ok_headers, 400,
         "wrong_node"),
        ("parent file URL", {**base, "from_status_url": "file:///etc/passwd"}, ok_headers, 400,
         "invalid_from_status_url"),
        ("private parent without token", {**base, "from_status_url": prv}, ok_headers, 403, "forbidden"),
        ("private parent wrong token", {**base, "from_status_url": prv, "from_bearer_token": "x" * 32}, ok_headers,
         403, "forbidden"),
        ("private parent with read token", {**base, "from_status_url": prv, "from_bearer_token": stream_token},
         ok_headers, 403, "forbidden"),
        ("private parent via pub path", {**base, "from_status_url": prv.replace("/prv/", "/pub/")}, ok_headers, 404,
         "parent_not_found"),
    ]  # fmt: skip
    gets: list[tuple[str, str, dict[str, str], int, str]] = [
        ("private status no token", prv_path, {}, 401, "unauthorized"),
        ("private status wrong token", prv_path, {"Authorization": "Bearer " + "A" * 32}, 403, "forbidden"),
        ("private status read token", prv_path, {"Authorization": f"Bearer {stream_token}"}, 403, "forbidden"),
        ("private status token in query", prv_path + "?stream_token=" + stream_token, {}, 401, "unauthorized"),
        ("private raw no token", prv_path[:-5] + ".raw", {}, 401, "unauthorized"),
        ("private stream no token", prv_path[:-5] + ".txt", {}, 401, "unauthorized"),
        ("private stop read token", prv_path[:-5] + "/stop", {"Authorization": f"Bearer {stream_token}"}, 403,
         "forbidden"),
        ("private via pub path", prv_path.replace("/prv/", "/pub/"), {}, 404, "not_found"),
        ("private upper case", prv_path.upper(), {}, 404, "not_found"),
        ("encoded slash", "/" + prv_path[1:].replace("/", "%2F"), {}, 404, "not_found"),
        ("dot segments", prv_path.replace("/prv/", "/pub/../prv/"), {}, 404, "not_found"),
        ("double slash", prv_path.replace("/prv/", "/prv//"), {}, 404, "not_found"),
        ("other node", prv_path.replace("/1/r/", "/2/r/"), {}, 404, "not_found"),
        ("leading zero node", prv_path.replace("/1/r/", "/01/r/"), {}, 404, "not_found"),
        ("bad event id", pub[len(relay.url) : -5] + ".txt?last_event_id=7", {}, 400, "unknown_event_id"),
        ("event id overflow", pub[len(relay.url) : -5] + ".txt?last_event_id=" + "9" * 40, {}, 400,
         "unknown_event_id"),
    ]  # fmt: skip
    assert len(posts) + len(gets) >= 30

    before_files = snapshot(relay.data_dir)
    before_calls = relay.upstream.state.total
    for what, body, headers, status, code in posts:
        h = {"X-OpenAI-API-Key": TEST_KEY, "Content-Type": "application/json", **headers}
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        async with relay.session.post(relay.url + "/v1/stream-chatgpt", data=data, headers=h) as r:
            assert r.status == status, (what, r.status, await r.text())
            assert r.headers["Content-Type"].startswith("application/json"), what
            doc = await r.json()
            assert doc["status"] == "error" and doc["error"]["code"] == code, (what, doc)
            assert doc["error"]["message"], what
            if status == 401:
                assert r.headers["WWW-Authenticate"].startswith("Bearer"), what
    for what, path, headers, status, code in gets:
        async with relay.session.get(URL(relay.url + path, encoded=True), headers=headers) as r:
            assert r.status == status, (what, r.status, await r.text())
            doc = await r.json()
            assert doc["status"] == "error" and doc["error"]["code"] == code, (what, doc)
            assert b"private parent" not in orjson.dumps(doc), what
    assert snapshot(relay.data_dir) == before_files  # nothing created, nothing changed
    assert relay.upstream.state.total == before_calls  # the upstream was never called
