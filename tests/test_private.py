"""Private requests: tokens, where they open, what is stored, and every URL spelling that must not open."""

from __future__ import annotations

import logging

import orjson
import pytest
from yarl import URL

from .conftest import Relay, msg, parse_sse, read_stream, text_of


def all_bytes(relay: Relay) -> bytes:
    return b"".join(p.read_bytes() for p in relay.data_dir.rglob("*") if p.is_file())


async def start_private(relay: Relay, text: str = "secret words", **extra: object) -> dict:
    doc = await relay.start(msg(text, access="private", **extra))
    return doc


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_private_answer_and_storage(relay: Relay, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    doc = await start_private(relay)
    auth = doc["authorization"]
    assert auth["access"] == "private"
    token = auth["bearer_token"]
    assert auth["stream_url_arg"].startswith("stream_token=")
    stream_token = auth["stream_url_arg"].split("=", 1)[1]
    assert doc["endpoints"]["bearer_token"] == token
    assert token != stream_token
    assert len(token) >= 22 and len(stream_token) >= 22  # >= 128 random bits, URL-safe base64
    for url in (doc["endpoints"]["status_url"], doc["endpoints"]["stream_events_url"], doc["endpoints"]["stop_url"]):
        assert "/1/r/prv/" in url and "?" not in url
    final = await relay.wait_status(doc["endpoints"]["status_url"], headers=bearer(token))
    assert final["status"] == "done"
    assert final["authorization"] == {"access": "private"}  # no hashes, no tokens
    # read the stream the way a browser does, then check nothing stored or logged holds a token
    code, _, body = await read_stream(
        relay.session, doc["endpoints"]["stream_events_url"] + "?" + auth["stream_url_arg"]
    )
    assert code == 200 and text_of(parse_sse(body)) == "secret words"
    stored = all_bytes(relay)
    assert token.encode() not in stored and stream_token.encode() not in stored
    assert b"bearer_token_sha256" in stored  # only the hash is kept, to check tokens against
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert token not in logged and stream_token not in logged
    assert "/1/r/prv/" in logged  # the access log did record the stream request, without its query


async def test_private_tokens_open_what_they_should(relay: Relay) -> None:
    doc = await start_private(relay, "a b c d e f", model="echo:pace=0.05")
    ep = doc["endpoints"]
    token = doc["authorization"]["bearer_token"]
    stream_token = doc["authorization"]["stream_url_arg"].split("=", 1)[1]
    status_url, stream_url = ep["status_url"], ep["stream_events_url"]
    raw_url = status_url[: -len(".json")] + ".raw"
    await relay.wait_status(status_url, headers=bearer(token))

    async def status_of(url: str, headers: dict[str, str] | None = None) -> int:
        async with relay.session.get(url, headers=headers) as r:
            if r.status >= 400:
                body = await r.json()
                assert body["status"] == "error"
                if r.status == 401:
                    assert r.headers["WWW-Authenticate"].startswith("Bearer")
            return r.status

    assert await status_of(status_url) == 401
    assert await status_of(status_url, bearer("wrong-token-value-xxxxxxxx")) == 403
    assert await status_of(status_url, bearer(stream_token)) == 403  # the read token is only for the stream
    assert await status_of(status_url, bearer(token)) == 200
    assert await status_of(status_url + "?stream_token=" + stream_token) == 401
    assert await status_of(raw_url) == 401
    assert await status_of(raw_url, bearer(stream_token)) == 403
    assert await status_of(raw_url, bearer(token)) == 200
    assert await status_of(stream_url) == 401
    assert await status_of(stream_url + "?stream_token=nope-nope-nope") == 403
    assert await status_of(stream_url + "?stream_token=" + stream_token) == 200
    assert await status_of(stream_url, bearer(stream_token)) == 200
    assert await status_of(stream_url, bearer(token)) == 200
    # resume with the read token
    _, _, body = await read_stream(relay.session, stream_url + "?stream_token=" + stream_token)
    events = parse_sse(body)
    _, _, rest = await read_stream(
        relay.session, f"{stream_url}?stream_token={stream_token}&last_event_id={events[2].id}"
    )
    assert parse_sse(rest) == events[3:]
    # the stop URL: only the bearer token
    async with relay.session.post(ep["stop_url"]) as r:
        assert r.status == 401
    async with relay.session.post(ep["stop_url"], headers=bearer(stream_token)) as r:
        assert r.status == 403
    async with relay.session.post(ep["stop_url"], headers=bearer(token)) as r:
        assert r.status == 200 and (await r.json()) == {"status": "success"}


async def test_stop_a_private_request_with_its_token(relay: Relay) -> None:
    doc = await start_private(relay, "x", model="echo:delay=30")
    token = doc["authorization"]["bearer_token"]
    async with relay.session.get(
        doc["endpoints"]["stop_url"], headers={"Authorization": "Bearer bad-bad-bad-bad"}
    ) as r:
        assert r.status == 403
    _, still = await relay.get_json(doc["endpoints"]["status_url"], bearer(token))
    assert still["status"] in ("queued", "streaming")  # still running: the wrong token stopped nothing
    async with relay.session.get(doc["endpoints"]["stop_url"], headers=bearer(token)) as r:
        assert r.status == 200
    _, final = await relay.get_json(doc["endpoints"]["status_url"], bearer(token))
    assert final["status"] == "stop"


async def test_async_private_has_no_stream_token(relay: Relay) -> None:
    doc = await relay.start(msg("x", access="private"), endpoint="/v1/async-chatgpt")
    assert "stream_url_arg" not in doc["authorization"]
    token = doc["authorization"]["bearer_token"]
    final = await relay.wait_status(doc["endpoints"]["status_url"], headers=bearer(token))
    assert final["status"] == "done"


async def test_private_files_never_open_without_a_token_whatever_the_spelling(relay: Relay) -> None:
    doc = await start_private(relay)
    token = doc["authorization"]["bearer_token"]
    status_url = doc["endpoints"]["status_url"]
    await relay.wait_status(status_url, headers=bearer(token))
    path = status_url[len(relay.url) :]
    id_ = path.rsplit("/", 1)[1][: -len(".json")]
    spellings = [
        path,
        path.replace("/prv/", "/pub/"),  # the public tree does not hold it
        path.replace("/prv/", "/PRV/"),
        path.replace("/prv/", "/%70rv/"),
        path.replace("/prv/", "/prv//"),
        path.replace("/prv/", "/pub/../prv/"),
        path.replace("/prv/", "/pub/%2e%2e/prv/"),
        path.replace("/prv/", "/pub%2F..%2Fprv/"),
        "/" + path[1:].replace("/", "%2F"),
        path.replace(id_, id_.upper()),
        path.replace(".json", ".JSON"),
        path.replace(".json", ".json%00"),
        path.replace(".json", ".json/"),
        path + "?x=1",
        path.replace(".json", ".raw"),
        path.replace(".json", ".txt"),
        path.replace(".json", ".txt") + "?stream_token=",
        path.replace(".json", ".txt") + "?last_event_id=0",
        "/1/r/prv/" + "/".join(path.split("/")[4:]),
        "//1/r/prv/" + "/".join(path.split("/")[4:]),
    ]
    for spelling in spellings:
        async with relay.session.get(URL(relay.url + spelling, encoded=True)) as r:
            body = await r.read()
            assert r.status in (401, 404), (spelling, r.status)
            assert b"secret words" not in body and b"chat.completion" not in body, spelling
            if r.status == 401:
                assert r.headers["WWW-Authenticate"].startswith("Bearer")


async def test_cors_preflight_and_headers_on_every_generated_url(relay: Relay) -> None:
    doc = await start_private(relay)
    token = doc["authorization"]["bearer_token"]
    ep = doc["endpoints"]
    await relay.wait_status(ep["status_url"], headers=bearer(token))
    raw = ep["status_url"][: -len(".json")] + ".raw"
    origin = {"Origin": "https://frontend.example"}
    for url in (ep["status_url"], ep["stream_events_url"], raw, ep["stop_url"], relay.url + "/v1/async-chatgpt"):
        preflight = {**origin, "Access-Control-Request-Method": "GET",
                     "Access-Control-Request-Headers": "authorization,last-event-id"}  # fmt: skip
        async with relay.session.options(url, headers=preflight) as r:
            assert r.status == 204, url
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            allowed = r.headers["Access-Control-Allow-Headers"].lower()
            assert "authorization" in allowed and "last-event-id" in allowed and "content-type" in allowed
            assert r.headers["Access-Control-Allow-Methods"] == "GET, POST, OPTIONS"
    for url in (ep["status_url"], raw):
        async with relay.session.get(url, headers={**origin, **bearer(token)}) as r:
            assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
    async with relay.session.get(ep["status_url"], headers=origin) as r:
        assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == "*"  # errors are readable too
    stream = ep["stream_events_url"] + "?" + doc["authorization"]["stream_url_arg"]
    async with relay.session.get(stream, headers=origin) as r:
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
        await r.read()


async def test_a_private_status_is_served_as_the_file_without_its_hashes(relay: Relay) -> None:
    """The served status document is the file's, with the token hashes taken out and nothing else changed,
    whatever the conversation holds (text that looks like the authorization key, nested objects named so)."""
    tricky = 'x "authorization":{"bearer_token_sha256":"00"} } { ['
    doc = await start_private(relay, tricky, conversation_id="conv-1", metadata={"authorization": {"a": "}"}})
    token = doc["authorization"]["bearer_token"]
    final = await relay.wait_status(doc["endpoints"]["status_url"], headers=bearer(token))
    on_disk = orjson.loads((relay.data_dir / doc["endpoints"]["status_url"][len(relay.url) + 1 :]).read_bytes())
    assert on_disk["authorization"]["bearer_token_sha256"]  # the hashes are in the file ...
    assert final == {**on_disk, "authorization": {"access": "private"}}  # ... and only they are left out
    assert final["parameters"]["messages"][0]["content"] == tricky
    async with relay.session.get(doc["endpoints"]["status_url"], headers=bearer(token)) as r:
        served = await r.read()
    assert r.status == 200 and on_disk["authorization"]["bearer_token_sha256"].encode() not in served


def test_the_authorization_object_is_found_only_where_it_is_safe_to_cut() -> None:
    from relay.status import authorization_span, public_bytes, public_view

    auth = {"access": "private", "bearer_token_sha256": "ab" * 32}
    plain = {"status": "done", "created_at": 1, "conversation_id": "c", "README": "r", "authorization": auth,
             "parameters": {"authorization": {"x": 1}}}  # fmt: skip
    data = orjson.dumps(plain)
    span = authorization_span(data)
    assert span is not None and span[2] == auth
    assert orjson.loads(public_bytes(data)) == public_view(plain)
    moved = {"parameters": {"authorization": {"x": "}"}}, "authorization": auth}  # an object before it
    assert authorization_span(orjson.dumps(moved)) is None
    assert orjson.loads(public_bytes(orjson.dumps(moved))) == public_view(moved)  # parsed whole instead
    assert authorization_span(orjson.dumps({"a": [1], "authorization": auth})) is None
    assert authorization_span(orjson.dumps({"authorization": "text"})) is None
    assert public_bytes(orjson.dumps({"authorization": {"access": "public"}, "x": 1})) == orjson.dumps(
        {"authorization": {"access": "public"}, "x": 1}
    )
