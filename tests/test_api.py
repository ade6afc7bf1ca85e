"""The two POST endpoints: answers, relay keys, validation, forwarding, limits."""

from __future__ import annotations

import re
from datetime import datetime, timezone

import orjson
import pytest

from relay.config import ApiKey, Config, ConfigError, check_startup

from .conftest import TEST_KEY, Relay, RelayFactory, all_files, held, msg, parse_sse, read_stream, text_of, until

URL_RE = r"/1/r/pub/(\d{4})/(\d\d)/(\d\d)/(\d\d)/(\d\d)/(\d\d)/([0-9a-f-]{36})"


async def test_stream_answer_has_contract_shape(relay: Relay) -> None:
    doc = await relay.start(msg("hello world"))
    assert doc["status"] == "success"
    assert isinstance(doc["created_at"], int)
    assert doc["README"].startswith("The `stream_events_url` endpoint below streams")
    assert doc["authorization"] == {"access": "public"}
    ep = doc["endpoints"]
    assert set(ep) == {"status_url", "stream_events_url", "stop_url"}
    m = re.fullmatch(re.escape(relay.url) + URL_RE + r"\.json", ep["status_url"])
    assert m, ep["status_url"]
    created = datetime.fromtimestamp(doc["created_at"], tz=timezone.utc)
    assert tuple(int(x) for x in m.groups()[:6]) == (
        created.year,
        created.month,
        created.day,
        created.hour,
        created.minute,
        created.second,
    )
    request_id = m.group(7)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", request_id)
    assert doc["conversation_id"] == request_id
    base = ep["status_url"][: -len(".json")]
    assert ep["stream_events_url"] == base + ".txt" and "?" not in ep["stream_events_url"]
    assert ep["stop_url"] == base + "/stop"
    # the status file exists the moment the answer arrives
    rel = ep["status_url"][len(relay.url) + 1 :]
    assert (relay.data_dir / rel).is_file()
    await relay.wait_status(ep["status_url"])


async def test_every_request_gets_a_new_id(relay: Relay) -> None:
    ids = set()
    for _ in range(5):
        doc = await relay.start(msg("x"))
        ids.add(doc["endpoints"]["status_url"])
    assert len(ids) == 5


async def test_async_answer_has_no_stream_url(relay: Relay) -> None:
    doc = await relay.start(msg("hello async"), endpoint="/v1/async-chatgpt")
    assert set(doc["endpoints"]) == {"status_url", "stop_url"}
    assert "status_url" in doc["README"]
    final = await relay.wait_status(doc["endpoints"]["status_url"])
    assert final["status"] == "done"
    assert final["response"]["body"]["choices"][0]["message"]["content"] == "hello async"
    assert final["request"]["endpoint"] == "/v1/async-chatgpt"


async def test_messages_may_be_a_json_string(relay: Relay) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "string form"}]
    doc = await relay.start({"messages": orjson.dumps(messages).decode()})
    final = await relay.wait_status(doc["endpoints"]["status_url"])
    assert final["parameters"]["messages"] == messages
    assert final["parameters"]["model"] == "echo"  # the configured default model
    assert final["response"]["body"]["choices"][0]["message"]["content"] == "string form"


async def test_unknown_fields_are_forwarded_and_stream_is_set_by_relay(relay: Relay) -> None:
    assert relay.upstream is not None
    extra = {
        "temperature": 0.3,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["\n\n"],
        "response_format": {"type": "text"},
        "user": "u-1",
        "some_future_field": {"nested": [1, 2]},
        "stream": False,
        "stream_options": {"include_usage": False},
    }
    doc = await relay.start(msg("fwd", **extra), headers={"X-OpenAI-Organization": "org-123"})
    await relay.wait_status(doc["endpoints"]["status_url"])
    sent = relay.upstream.state.last_body
    assert sent is not None
    for k in ("temperature", "top_p", "seed", "stop", "response_format", "user", "some_future_field"):
        assert sent[k] == extra[k], k
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert relay.upstream.state.last_headers.get("OpenAI-Organization") == "org-123"


async def test_relay_keys(make_relay: RelayFactory) -> None:
    relay = await make_relay(auth_api_keys=["relay-key-one", "relay-key-two"])
    status, headers, doc = await relay.post(msg("x"))
    assert status == 401 and doc["error"]["code"] == "unauthorized"
    assert headers["WWW-Authenticate"].startswith("Bearer")
    status, _, doc = await relay.post(msg("x"), headers={"X-RapidAPI-Key": "wrong-key-123"})
    assert status == 401 and doc["status"] == "error"
    status, _, doc = await relay.post(msg("x"), headers={"X-RapidAPI-Key": "relay-key-one", "X-RapidAPI-Host": "h"})
    assert status == 200, doc
    status, _, doc = await relay.post(msg("x"), headers={"Authorization": "Bearer relay-key-two"})
    assert status == 200, doc
    await until(lambda: held(relay)["jobs"] == 0 and held(relay)["markers"] == 0, what="both requests ended")
    assert not any("relay-key" in p.read_text() for p in all_files(relay.data_dir))


def test_open_relay_refused_on_public_host() -> None:
    with pytest.raises(ConfigError, match=r"\[auth\] api_keys"):
        check_startup(Config(server_host="0.0.0.0"))
    check_startup(Config(server_host="0.0.0.0", auth_api_keys=(ApiKey("k" * 16),)))
    check_startup(Config(server_host="127.0.0.1"))
    check_startup(Config(server_host="::1"))


BAD_BODIES = [
    (b"not json", "invalid_json", None),
    (b"", "invalid_json", None),
    (b"[1,2]", "invalid_json", None),
    ({"model": "echo"}, "invalid_field", "messages"),
    ({"messages": []}, "invalid_field", "messages"),
    ({"messages": "not a json array"}, "invalid_field", "messages"),
    ({"messages": '{"role": "user"}'}, "invalid_field", "messages"),
    ({"messages": [{"content": "no role"}]}, "invalid_field", "messages[0].role"),
    ({"messages": ["just a string"]}, "invalid_field", "messages[0]"),
    ({"messages": [{"role": "user", "content": "x"}], "model": 42}, "invalid_field", "model"),
    ({"messages": [{"role": "user", "content": "x"}], "model": ""}, "invalid_field", "model"),
    ({"messages": [{"role": "user", "content": "x"}], "access": "secret"}, "invalid_field", "access"),
    ({"messages": [{"role": "user", "content": "x"}], "timeout": 0}, "invalid_field", "timeout"),
    ({"messages": [{"role": "user", "content": "x"}], "timeout": 601}, "invalid_field", "timeout"),
    ({"messages": [{"role": "user", "content": "x"}], "timeout": "90"}, "invalid_field", "timeout"),
    ({"messages": [{"role": "user", "content": "x"}], "timeout": True}, "invalid_field", "timeout"),
    ({"messages": [{"role": "user", "content": "x"}], "connect_timeout": 0.5}, "invalid_field", "connect_timeout"),
    ({"messages": [{"role": "user", "content": "x"}], "connect_timeout": 11}, "invalid_field", "connect_timeout"),
    ({"messages": [{"role": "user", "content": "x"}], "conversation_id": "a b"}, "invalid_field", "conversation_id"),
    ({"messages": [{"role": "user", "content": "x"}], "conversation_id": "x" * 65}, "invalid_field", "conversation_id"),
    ({"messages": [{"role": "user", "content": "x"}], "webhook_url": "ftp://x"}, "invalid_field", "webhook_url"),
    ({"messages": [{"role": "user", "content": "x"}], "from_status_url": 5}, "invalid_field", "from_status_url"),
]


@pytest.mark.parametrize("body,code,field", BAD_BODIES)
async def test_bad_bodies_are_refused_before_anything_happens(
    relay: Relay, body: object, code: str, field: str | None
) -> None:
    assert relay.upstream is not None
    before = relay.upstream.state.total
    status, headers, doc = await relay.post(body)
    assert status == 400, doc
    assert headers["Content-Type"].startswith("application/json")
    assert doc["status"] == "error" and doc["error"]["code"] == code
    if field:
        assert f"`{field}`" in doc["error"]["message"]
    assert relay.upstream.state.total == before
    assert all_files(relay.data_dir) == []


async def test_missing_upstream_key_is_400(relay: Relay) -> None:
    status, _, doc = await relay.post(msg("x"), key=None)
    assert status == 400 and doc["error"]["code"] == "missing_api_key"
    assert "X-OpenAI-API-Key" in doc["error"]["message"]


async def test_server_side_key_is_used_when_client_sends_none(make_relay: RelayFactory) -> None:
    relay = await make_relay(upstream_api_key=TEST_KEY)
    doc = await relay.start(msg("server key"), key=None)
    final = await relay.wait_status(doc["endpoints"]["status_url"])
    assert final["status"] == "done", final


async def test_body_limit_is_413(make_relay: RelayFactory) -> None:
    relay = await make_relay(server_max_body_bytes=2000)
    status, _, doc = await relay.post(msg("x" * 3000))
    assert status == 413 and doc["error"]["code"] == "body_too_large"

    async def chunks():  # no Content-Length: the limit still holds
        for _ in range(10):
            yield b" " * 500

    async with relay.session.post(
        relay.url + "/v1/stream-chatgpt", data=chunks(), headers={"X-OpenAI-API-Key": TEST_KEY}
    ) as r:
        assert r.status == 413
        assert (await r.json())["error"]["code"] == "body_too_large"
    assert all_files(relay.data_dir) == []


async def test_timeouts_are_recorded(relay: Relay) -> None:
    doc = await relay.start(msg("t", timeout=30, connect_timeout=2))
    final = await relay.wait_status(doc["endpoints"]["status_url"])
    assert final["options"] == {"timeout": 30, "connect_timeout": 2}


async def test_unknown_route_and_method_are_json(relay: Relay) -> None:
    async with relay.session.get(relay.url + "/nope") as r:
        doc = await r.json()
        assert r.status == 404 and doc["status"] == "error"
        assert "POST /v1/stream-chatgpt" in doc["error"]["message"]  # it says where the API is
    async with relay.session.get(relay.url + "/v1/stream-chatgpt") as r:
        doc = await r.json()
        assert r.status == 405 and doc["error"]["code"] == "method_not_allowed"
        assert r.headers["Allow"] == "POST" and "POST" in doc["error"]["message"]


async def test_cors_on_post_and_preflight(relay: Relay) -> None:
    async with relay.session.options(
        relay.url + "/v1/stream-chatgpt",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    ) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        allowed = {h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "content-type", "last-event-id", "x-openai-api-key"} <= allowed
        assert r.headers["Access-Control-Allow-Methods"] == "GET, POST, OPTIONS"
    async with relay.session.options(  # the OpenAI-compatible paths have DELETE too
        relay.url + "/v1/responses/resp_x",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "DELETE"},
    ) as r:
        assert r.status == 204 and r.headers["Access-Control-Allow-Methods"] == "GET, POST, DELETE, OPTIONS"
    status, headers, doc = await relay.post(msg("cors"), headers={"Origin": "https://app.example"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
    status, headers, body = await read_stream(relay.session, doc["endpoints"]["stream_events_url"])
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert text_of(parse_sse(body)) == "cors"


async def test_cors_origin_list(make_relay: RelayFactory) -> None:
    relay = await make_relay(server_cors_origins=["https://good.example"])
    _, headers, _ = await relay.post(msg("x"), headers={"Origin": "https://good.example"})
    assert headers["Access-Control-Allow-Origin"] == "https://good.example"
    _, headers, _ = await relay.post(msg("x"), headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in headers


async def test_concurrency_limit_is_503(make_relay: RelayFactory) -> None:
    relay = await make_relay(server_max_concurrent_jobs=2)
    slow = msg("slow", model="echo:delay=5")
    a = await relay.start(slow)
    b = await relay.start(slow)
    status, headers, doc = await relay.post(slow)
    assert status == 503 and doc["error"]["code"] == "busy" and headers["Retry-After"]
    for d in (a, b):
        async with relay.session.post(d["endpoints"]["stop_url"]) as r:
            assert r.status == 200
    status, _, _ = await relay.post(msg("now fine"))
    assert status == 200


async def test_bare_http_client_without_user_agent_or_accept(relay: Relay) -> None:
    """A client that sends only what HTTP/1.1 requires (no User-Agent, no Accept) is normal."""
    import asyncio

    body = orjson.dumps(msg("bare client"))
    host, port = "127.0.0.1", relay.config.server_port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"POST /v1/stream-chatgpt HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
        b"X-OpenAI-API-Key: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (host.encode(), port, TEST_KEY.encode(), len(body), body)
    )
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    doc = orjson.loads(payload)
    final = await relay.wait_status(doc["endpoints"]["status_url"])
    assert final["response"]["body"]["choices"][0]["message"]["content"] == "bare client"
