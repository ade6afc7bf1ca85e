"""Chained turns with `from_status_url`: history, inheritance, tokens, refusals, branching, long chains."""

from __future__ import annotations

from .conftest import Relay, RelayFactory, msg, unknown_request


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def test_second_turn_carries_the_conversation(relay: Relay) -> None:
    first = await relay.start({"model": "echo", "messages": [{"role": "system", "content": "sys"}, *user("turn one")],
                               "conversation_id": "conv-1"})  # fmt: skip
    parent = await relay.wait_status(first["endpoints"]["status_url"])
    second = await relay.start({"messages": user("turn two"), "from_status_url": first["endpoints"]["status_url"]})
    assert second["conversation_id"] == "conv-1"
    child = await relay.wait_status(second["endpoints"]["status_url"])
    assert child["parameters"]["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "turn one"},
        {"role": "assistant", "content": "turn one"},
        {"role": "user", "content": "turn two"},
    ]
    assert child["parameters"]["model"] == "echo"  # inherited
    assert child["endpoints"]["from_status_url"] == first["endpoints"]["status_url"]
    assert child["response"]["body"]["choices"][0]["message"]["content"] == "turn two"
    assert second["endpoints"]["status_url"] != parent["endpoints"]["status_url"]  # a new id every turn
    assert "from_status_url" not in parent["endpoints"]


async def test_child_may_override_model_and_conversation(relay: Relay) -> None:
    first = await relay.start(msg("one"))
    await relay.wait_status(first["endpoints"]["status_url"])
    second = await relay.start({"messages": user("two"), "model": "echo:pace=0.01", "conversation_id": "other",
                                "from_status_url": first["endpoints"]["status_url"]})  # fmt: skip
    child = await relay.wait_status(second["endpoints"]["status_url"])
    assert child["parameters"]["model"] == "echo:pace=0.01" and child["conversation_id"] == "other"


async def test_private_parent_needs_its_token_and_is_inherited(relay: Relay) -> None:
    first = await relay.start(msg("private one", access="private"))
    token = first["authorization"]["bearer_token"]
    await relay.wait_status(first["endpoints"]["status_url"], headers={"Authorization": f"Bearer {token}"})
    url = first["endpoints"]["status_url"]
    status, _, doc = await relay.post({"messages": user("two"), "from_status_url": url})
    assert status == 403 and doc["error"]["code"] == "forbidden"
    status, _, doc = await relay.post(
        {"messages": user("two"), "from_status_url": url, "from_bearer_token": "nope-nope"}
    )
    assert status == 403
    stream_token = first["authorization"]["stream_url_arg"].split("=", 1)[1]
    status, _, doc = await relay.post(
        {"messages": user("two"), "from_status_url": url, "from_bearer_token": stream_token}
    )
    assert status == 403  # the read token does not open the parent
    second = await relay.start({"messages": user("two"), "from_status_url": url, "from_bearer_token": token})
    assert second["authorization"]["access"] == "private" and "/1/r/prv/" in second["endpoints"]["status_url"]
    child_token = second["authorization"]["bearer_token"]
    assert child_token != token
    child = await relay.wait_status(
        second["endpoints"]["status_url"], headers={"Authorization": f"Bearer {child_token}"}
    )
    assert [m["content"] for m in child["parameters"]["messages"]] == ["private one", "private one", "two"]


async def test_running_and_failed_parents_are_409(relay: Relay) -> None:
    running = await relay.start(msg("slow", model="echo:delay=30"))
    status, _, doc = await relay.post({"messages": user("x"), "from_status_url": running["endpoints"]["status_url"]})
    assert status == 409 and doc["error"]["code"] == "parent_running"
    async with relay.session.post(running["endpoints"]["stop_url"]):
        pass
    # a stopped parent is a fine parent: its partial text (none here) is kept
    status, _, doc = await relay.post({"messages": user("x"), "from_status_url": running["endpoints"]["status_url"]})
    assert status == 200, doc
    failed = await relay.start(msg("x", model="echo:fail=500"))
    await relay.wait_status(failed["endpoints"]["status_url"])
    status, _, doc = await relay.post({"messages": user("x"), "from_status_url": failed["endpoints"]["status_url"]})
    assert status == 409 and doc["error"]["code"] == "parent_failed"


async def test_bad_parent_urls(make_relay: RelayFactory) -> None:
    relay = await make_relay()
    first = await relay.start(msg("one"))
    await relay.wait_status(first["endpoints"]["status_url"])
    good = first["endpoints"]["status_url"]
    path = good[len(relay.url) :]
    cases = {
        "https://evil.example" + path: 400,
        "http://127.0.0.2:1" + path: 400,
        good.replace("/1/r/", "/2/r/"): 400,
        good[: -len(".json")] + ".txt": 400,
        good + "?x=1": 400,
        good + "#frag": 400,
        good.replace("/pub/", "/pub/../pub/"): 400,
        good.replace("/pub/", "/pub/%2e%2e/"): 400,
        good.replace(".json", ".JSON"): 400,
        relay.url + "/etc/passwd": 400,
        "file:///etc/passwd": 400,
        "not a url": 400,
        relay.url + unknown_request(): 404,
        good.replace("/pub/", "/prv/"): 404,
    }
    for url, expected in cases.items():
        status, _, doc = await relay.post({"messages": user("x"), "from_status_url": url})
        assert status == expected, (url, status, doc)
        assert doc["status"] == "error"
    status, _, doc = await relay.post({"messages": user("x"), "from_status_url": good.replace("/1/r/", "/2/r/")})
    assert doc["error"]["code"] == "wrong_node" and "node 2" in doc["error"]["message"]


async def test_branching_from_one_parent(relay: Relay) -> None:
    first = await relay.start(msg("root"))
    await relay.wait_status(first["endpoints"]["status_url"])
    url = first["endpoints"]["status_url"]
    a, b = [await relay.start({"messages": user(t), "from_status_url": url}) for t in ("left", "right")]
    left = await relay.wait_status(a["endpoints"]["status_url"])
    right = await relay.wait_status(b["endpoints"]["status_url"])
    assert [m["content"] for m in left["parameters"]["messages"]] == ["root", "root", "left"]
    assert [m["content"] for m in right["parameters"]["messages"]] == ["root", "root", "right"]
    assert left["conversation_id"] == right["conversation_id"] == first["conversation_id"]


async def test_fifty_turn_chain_keeps_the_whole_history(relay: Relay) -> None:
    doc = await relay.start(msg("turn 0"))
    for i in range(1, 50):
        await relay.wait_status(doc["endpoints"]["status_url"])
        doc = await relay.start({"messages": user(f"turn {i}"), "from_status_url": doc["endpoints"]["status_url"]})
    final = await relay.wait_status(doc["endpoints"]["status_url"])
    messages = final["parameters"]["messages"]
    assert len(messages) == 99
    expected = []
    for i in range(50):
        expected.append({"role": "user", "content": f"turn {i}"})
        if i < 49:
            expected.append({"role": "assistant", "content": f"turn {i}"})
    assert messages == expected
    assert final["response"]["body"]["choices"][0]["message"]["content"] == "turn 49"


async def test_tool_call_parent_passes_its_calls_on(relay: Relay) -> None:
    first = await relay.start(msg("Oslo", model="echo:tool_call"))
    await relay.wait_status(first["endpoints"]["status_url"])
    tool_reply = {"role": "tool", "tool_call_id": "call_dev_0", "content": "5 degrees"}
    second = await relay.start(
        {"messages": [tool_reply], "model": "echo", "from_status_url": first["endpoints"]["status_url"]}
    )
    child = await relay.wait_status(second["endpoints"]["status_url"])
    assistant = child["parameters"]["messages"][1]
    assert assistant["role"] == "assistant" and assistant["content"] is None
    assert assistant["tool_calls"][0]["function"]["name"] == "get_weather"
    assert child["parameters"]["messages"][2] == tool_reply
