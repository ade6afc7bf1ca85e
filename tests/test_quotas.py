"""Per relay key quotas: per minute and per month, 429 with Retry-After, durable across restarts."""

from __future__ import annotations

from pathlib import Path

import orjson

from relay.config import load
from relay.keys import MANAGER

from .conftest import TEST_KEY, RelayFactory, msg, until

KEY_A_OPENAI = {"X-OpenAI-API-Key": TEST_KEY, "Content-Type": "application/json",
                "Authorization": "Bearer unlimited-key-03"}  # fmt: skip
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "x"}]}

KEYS = [
    {"key": "team-a-key-0001", "name": "team-a", "requests_per_minute": 2},
    {"key": "team-b-key-0002", "name": "team-b", "requests_per_month": 3},
    "unlimited-key-03",
]


def key(k: str) -> dict[str, str]:
    return {"X-RapidAPI-Key": k}


async def test_rate_per_minute(make_relay: RelayFactory) -> None:
    relay = await make_relay(auth_api_keys=KEYS)
    for _ in range(2):
        status, _, _ = await relay.post(msg("x"), headers=key("team-a-key-0001"))
        assert status == 200
    status, headers, doc = await relay.post(msg("x"), headers=key("team-a-key-0001"))
    assert status == 429 and doc["error"]["code"] == "quota_exceeded"
    assert "per minute" in doc["error"]["message"]
    assert 1 <= int(headers["Retry-After"]) <= 61
    for _ in range(5):  # other keys are not affected
        status, _, _ = await relay.post(msg("x"), headers=key("unlimited-key-03"))
        assert status == 200


async def test_monthly_quota_survives_a_restart(make_relay: RelayFactory, tmp_path: Path) -> None:
    data = tmp_path / "shared-data"
    relay = await make_relay(auth_api_keys=KEYS, data_dir=data)
    for _ in range(3):
        status, _, _ = await relay.post(msg("x"), headers=key("team-b-key-0002"))
        assert status == 200
    status, headers, doc = await relay.post(msg("x"), headers=key("team-b-key-0002"))
    assert status == 429 and "monthly quota" in doc["error"]["message"]
    assert int(headers["Retry-After"]) > 0
    await relay.runner.cleanup()
    again = await make_relay(auth_api_keys=KEYS, data_dir=data)
    status, _, doc = await again.post(msg("x"), headers=key("team-b-key-0002"))
    assert status == 429, doc
    quota_files = list((data / "quota").glob("*.json"))
    assert len(quota_files) == 1
    counts = orjson.loads(quota_files[0].read_bytes())
    assert counts == {"team-b": 3}
    assert b"team-b-key-0002" not in quota_files[0].read_bytes()


async def test_refused_requests_do_not_count(make_relay: RelayFactory) -> None:
    relay = await make_relay(auth_api_keys=KEYS)
    for _ in range(5):
        status, _, _ = await relay.post({"messages": []}, headers=key("team-b-key-0002"))
        assert status == 400
    for _ in range(3):
        status, _, _ = await relay.post(msg("x"), headers=key("team-b-key-0002"))
        assert status == 200


async def test_default_limits_apply_to_an_open_relay(make_relay: RelayFactory) -> None:
    relay = await make_relay(quotas_requests_per_minute=1)
    assert (await relay.post(msg("x")))[0] == 200
    assert (await relay.post(msg("x")))[0] == 429


def test_keys_as_tables_in_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[auth]\napi_keys = ["plain-key-123", {key = "table-key-123", name = "t", requests_per_month = 5}]\n'
        "[quotas]\nrequests_per_minute = 60\n"
    )
    config = load(cfg, env={})
    plain, table = config.auth_api_keys
    assert plain.key == "plain-key-123" and plain.requests_per_month is None
    assert table.name == "t" and table.requests_per_month == 5
    assert "table-key-123" not in repr(config)


async def test_one_keys_slow_upstream_leaves_the_others_their_share(make_relay: RelayFactory) -> None:
    """Fairness between tenants: a key whose upstream hangs (or that bursts) holds at most three quarters
    of the running slots (the default with several keys), on every path of both faces; another key's
    requests still start and end at once; the share is given back on every ending, refusal and pass-through."""
    relay = await make_relay(auth_api_keys=KEYS, server_max_concurrent_jobs=8)
    manager = relay.app[MANAGER]
    a, b = key("unlimited-key-03"), key("team-a-key-0001")
    stops = []
    for _ in range(6):  # 3/4 of 8
        status, _, doc = await relay.post(msg("x", model="echo:hang=1"), headers=a)
        assert status == 200
        stops.append(doc["endpoints"]["stop_url"])
    status, headers, doc = await relay.post(msg("x", model="echo:hang=1"), headers=a)
    assert status == 429 and doc["error"]["code"] == "too_many_running" and headers["Retry-After"] == "1"
    for path, body in (("/v1/responses", {"model": "echo", "input": "x"}), ("/v1/chat/completions", CHAT)):
        async with relay.session.post(relay.url + path, data=orjson.dumps(body), headers=KEY_A_OPENAI) as r:
            assert r.status == 429 and (await r.json())["error"]["code"] == "too_many_running"
    status, _, doc = await relay.post(msg("quick"), headers=b)  # the other key: not delayed
    assert status == 200
    assert (await relay.wait_status(doc["endpoints"]["status_url"], timeout=5))["status"] == "done"
    for url in stops:
        async with relay.session.post(url) as r:
            assert r.status == 200
    await until(lambda: manager.per_key == {}, what="every share given back")
    for store in (False, True):  # a passed-through and a stored chat completion give theirs back too
        body = {**CHAT, "store": store}
        async with relay.session.post(relay.url + "/v1/chat/completions", data=orjson.dumps(body),
                                      headers=KEY_A_OPENAI) as r:  # fmt: skip
            assert r.status == 200
    await until(lambda: manager.per_key == {}, what="every share given back")
    status, _, _ = await relay.post(msg("x"), headers=a)
    assert status == 200
