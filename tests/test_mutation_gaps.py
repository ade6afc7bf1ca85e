"""Tests that notice plausible bugs the rest of the suite let through (found by a mutation run; each test
here failed with its bug planted, see docs/development.md, "Mutation testing"):

- another key reaching a stored Response or chat completion **after it has ended** (ownership was only
  tested while a response ran);
- a job slot leaked when a create is refused by the OpenAI face (OpenAIError) rather than natively;
- prompt and completion token counts swapped in `/metrics`;
- webhook addresses in IPv4-compatible, IPv4-mapped private and site-local IPv6 ranges;
- a secret compared with `==` instead of a constant-time compare (a test over the source).
"""

from __future__ import annotations

import ast
import asyncio
import re
import socket
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from relay.facade.common import CHAT, RESPONSE, parse_id
from relay.webhooks import GuardedResolver, NonPublicAddress, WebhookRefused, WebhookSender, address_allowed, check_url

from .conftest import ROOT, TEST_KEY, Receiver, Relay, RelayFactory, held, msg, parse_sse, until

KEY_A = "relay-key-alpha-0001"
KEY_B = "relay-key-bravo-0002"


def headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "X-OpenAI-API-Key": TEST_KEY, "Content-Type": "application/json"}


async def call(relay: Relay, method: str, path: str, key: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else orjson.dumps(body)
    async with relay.session.request(method, relay.url + path, data=data, headers=headers(key)) as r:
        raw = await r.read()
        ctype = r.headers.get("Content-Type", "")
        return r.status, orjson.loads(raw) if ctype.startswith("application/json") else raw


@pytest.fixture
async def keyed(make_relay: RelayFactory) -> Relay:
    return await make_relay(auth_api_keys=[{"key": KEY_A, "name": "alpha"}, {"key": KEY_B, "name": "bravo"}])


# ----- ownership of ended objects ---------------------------------------------------------------------


def assert_not_found(status: int, doc: Any, what: str, kind: str, object_id: str) -> None:
    """OpenAI's 404 for an object that is not the caller's (or not at all), naming what was asked for."""
    assert status == 404, (what, status, doc)
    assert doc["error"] == {"message": f"No {kind} found with id '{object_id[:80]}'.", "type": "invalid_request_error",
                            "param": "id", "code": "not_found"}, (what, doc)  # fmt: skip


async def test_an_ended_response_answers_only_its_owner(keyed: Relay) -> None:
    """A's response has ended (its answer is on disk, no job): B gets 404 on every path, both before
    A's GET (read from disk) and after it (kept in memory, `Answers`); nothing of it changes."""
    relay = keyed
    status, created = await call(relay, "POST", "/v1/responses", KEY_A, {"model": "echo", "input": "only mine"})
    assert status == 200 and created["status"] == "completed", created
    rid = created["id"]
    rp = parse_id(RESPONSE, rid)
    assert rp is not None
    await until(lambda: held(relay)["jobs"] == 0, what="the response's job ended")

    async def refused_to_b() -> None:
        for method, path in [
            ("GET", f"/v1/responses/{rid}"),
            ("GET", f"/v1/responses/{rid}/input_items"),
            ("GET", f"/v1/responses/{rid}?stream=true"),
            ("GET", f"/v1/responses/{rid}?stream=true&starting_after=1"),
            ("POST", f"/v1/responses/{rid}/cancel"),
            ("DELETE", f"/v1/responses/{rid}"),
        ]:
            status, doc = await call(relay, method, path, KEY_B)
            assert_not_found(status, doc, f"{method} {path}", "response", rid)
        status, doc = await call(relay, "POST", "/v1/responses", KEY_B,
                                 {"model": "echo", "input": "x", "previous_response_id": rid})  # fmt: skip
        assert status == 404 and doc["error"]["code"] == "previous_response_not_found", doc

    await refused_to_b()  # (nothing of it in memory yet: read from its files)
    status, mine = await call(relay, "GET", f"/v1/responses/{rid}", KEY_A)
    assert status == 200 and mine["output"][0]["content"][0]["text"] == "only mine"
    await refused_to_b()  # (its answer is now kept in memory for its owner)
    assert rp.file(relay.data_dir, "json").exists() and rp.file(relay.data_dir, "txt").exists()  # not deleted
    status, items = await call(relay, "GET", f"/v1/responses/{rid}/input_items", KEY_A)
    assert status == 200 and items["data"][0]["content"][0]["text"] == "only mine"
    status, events = await call(relay, "GET", f"/v1/responses/{rid}?stream=true&starting_after=1", KEY_A)
    assert status == 200 and "response.completed" in [e.event for e in parse_sse(events.decode())]
    status, again = await call(relay, "GET", f"/v1/responses/{rid}", KEY_A)
    assert status == 200 and again["status"] == "completed"  # (B's cancel changed nothing)


async def test_an_ended_stored_chat_completion_answers_only_its_owner(keyed: Relay) -> None:
    relay = keyed
    body = {"model": "echo", "messages": [{"role": "user", "content": "kept for alpha"}], "store": True,
            "metadata": {"topic": "a"}}  # fmt: skip
    status, created = await call(relay, "POST", "/v1/chat/completions", KEY_A, body)
    assert status == 200, created
    cid = created["id"]
    rp = parse_id(CHAT, cid)
    assert rp is not None
    await until(lambda: held(relay)["jobs"] == 0, what="the completion's job ended")

    async def refused_to_b() -> None:
        for method, path, payload in [
            ("GET", f"/v1/chat/completions/{cid}", None),
            ("GET", f"/v1/chat/completions/{cid}/messages", None),
            ("POST", f"/v1/chat/completions/{cid}", {"metadata": {"topic": "b"}}),
            ("DELETE", f"/v1/chat/completions/{cid}", None),
        ]:
            status, doc = await call(relay, method, path, KEY_B, payload)
            assert_not_found(status, doc, f"{method} {path}", "chat completion", cid)
        status, page = await call(relay, "GET", "/v1/chat/completions", KEY_B)
        assert status == 200 and page["data"] == []
        status, page = await call(relay, "GET", f"/v1/chat/completions?after={cid}", KEY_B)
        assert status == 200 and page["data"] == []

    await refused_to_b()
    status, mine = await call(relay, "GET", f"/v1/chat/completions/{cid}", KEY_A)
    assert status == 200 and mine["choices"][0]["message"]["content"] == "kept for alpha"
    await refused_to_b()
    body_b = {"model": "echo", "messages": [{"role": "user", "content": "bravo's own"}], "store": True}
    status, theirs = await call(relay, "POST", "/v1/chat/completions", KEY_B, body_b)
    assert status == 200, theirs
    status, page = await call(relay, "GET", "/v1/chat/completions", KEY_B)
    assert [c["id"] for c in page["data"]] == [theirs["id"]]
    status, page = await call(relay, "GET", f"/v1/chat/completions?after={cid}", KEY_B)
    assert status == 200 and page["data"] == []  # (`after` another key's id: nothing, not B's own after it)
    assert rp.file(relay.data_dir, "json").exists()
    status, mine = await call(relay, "GET", f"/v1/chat/completions/{cid}", KEY_A)
    assert status == 200 and mine["metadata"] == {"topic": "a"}  # (B's update changed nothing)
    status, page = await call(relay, "GET", "/v1/chat/completions", KEY_A)
    assert [c["id"] for c in page["data"]] == [cid]


async def test_a_get_made_while_the_owners_is_being_made_is_not_given_the_owners(keyed: Relay) -> None:
    """GETs of one object that arrive together share the answer being made (`Answers`): another key's
    GET arriving while the owner's is made must not be given it, nor the owner's a refusal made for
    another key. Each round is a new, ended response (not yet kept), fetched by both keys at once."""
    relay = keyed
    for round_ in range(6):
        status, created = await call(relay, "POST", "/v1/responses", KEY_A, {"model": "echo", "input": f"r{round_}"})
        assert status == 200 and created["status"] == "completed"
        path = f"/v1/responses/{created['id']}"
        order = [KEY_A, KEY_B, KEY_A] if round_ % 2 == 0 else [KEY_B, KEY_A, KEY_B]
        answers = await asyncio.gather(*(call(relay, "GET", path, key) for key in order))
        for key, (status, doc) in zip(order, answers, strict=True):
            if key == KEY_A:
                assert status == 200 and doc["id"] == created["id"], (round_, doc)
            else:
                assert_not_found(status, doc, f"round {round_}: B's GET", "response", created["id"])


# ----- job slots and OpenAI-face refusals -----------------------------------------------------------


async def test_refusals_of_the_openai_face_give_their_job_slot_back(make_relay: RelayFactory) -> None:
    """Refusals raised as OpenAIError (the face's own) and as HTTPError (the relay's shared checks), at
    every point of admission: none keeps its slot, and `max_concurrent_jobs` requests still start."""
    relay = await make_relay(server_max_concurrent_jobs=2)
    refused = [
        ("/v1/responses", {"model": "echo", "input": "x", "reasoning": {"effort": "low", "summary": "auto"}}, 400),
        ("/v1/responses", {"model": "echo", "input": "x", "background": True, "store": False}, 400),
        ("/v1/responses", {"model": "echo", "input": "x", "previous_response_id": "resp_nope"}, 404),
        ("/v1/responses", {"model": "echo", "input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, 400),
        ("/v1/chat/completions", {"model": "echo", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400),
        ("/v1/chat/completions", {"model": "echo", "messages": "x"}, 400),
        (
            "/v1/chat/completions",
            {"model": "echo", "messages": [{"role": "user", "content": "x"}], "store": True, "metadata": {"k": 1}},
            400,
        ),  # fmt: skip
        ("/v1/responses", [1, 2], 400),  # (native: not an object)
    ]
    for _ in range(3):
        for path, body, expected in refused:
            status, doc = await call(relay, "POST", path, "unused", body)
            assert status == expected, (path, body, status, doc)
            assert set(doc) == {"error"}, doc
    assert held(relay)["slots"] == 0
    slow = {"model": "echo:delay=30", "input": "x", "background": True}
    for _ in range(2):
        status, doc = await call(relay, "POST", "/v1/responses", "unused", slow)
        assert status == 200, doc
    status, doc = await call(relay, "POST", "/v1/responses", "unused", slow)
    assert status == 503 and doc["error"]["code"] == "busy", doc  # (the limit itself still holds)


# ----- token counts in /metrics -----------------------------------------------------------------------


def sample(text: str, name: str, labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{labels}}} not in /metrics")


def ledger_lines(data_dir: Path) -> list[dict[str, Any]]:
    return [
        orjson.loads(line) for f in sorted((data_dir / "usage").glob("*.jsonl")) for line in f.read_bytes().splitlines()
    ]


@pytest.mark.parametrize("include_usage", [True, False], ids=["upstream_usage", "estimated"])
async def test_prompt_and_completion_tokens_are_counted_as_what_they_are(
    make_relay: RelayFactory, include_usage: bool
) -> None:
    """Six prompt words, a two-word answer (`max_tokens`): the upstream's usage says 6 and 2 (or, without
    it, the estimate from the text is larger for the prompt), and `/metrics` shows each under its kind."""
    relay = await make_relay(auth_api_keys=[{"key": KEY_A, "name": "alpha"}], upstream_include_usage=include_usage)
    doc = await relay.start(msg("one two three four five six", max_tokens=2), headers={"X-RapidAPI-Key": KEY_A})
    final = await relay.wait_status(doc["endpoints"]["status_url"])
    assert final["status"] == "done"
    await until(lambda: held(relay)["jobs"] == 0 and bool(ledger_lines(relay.data_dir)), what="the ledger line")
    (line,) = ledger_lines(relay.data_dir)
    assert line["estimated"] is not include_usage
    if include_usage:
        assert (line["prompt_tokens"], line["completion_tokens"]) == (6, 2)
    assert line["prompt_tokens"] > line["completion_tokens"] > 0
    async with relay.session.get(relay.url + "/metrics") as r:
        text = await r.text()
    prompt = sample(text, "relay_tokens_total", 'key="alpha",kind="prompt",model="echo"')
    completion = sample(text, "relay_tokens_total", 'key="alpha",kind="completion",model="echo"')
    assert (prompt, completion) == (line["prompt_tokens"], line["completion_tokens"])


# ----- webhook addresses in the IPv6 ranges that embed or stand for local ones ------------------------

LOCAL_V6 = [
    "::7f00:1",  # IPv4-compatible 127.0.0.1 (deprecated, RFC 4291 2.5.5.1)
    "::127.0.0.1",
    "::a00:1",  # IPv4-compatible 10.0.0.1
    "::8.8.8.8",  # IPv4-compatible, even of a public address: not global unicast
    "::ffff:10.0.0.1",  # IPv4-mapped private
    "::ffff:127.0.0.1",
    "::ffff:7f00:1",
    "::ffff:169.254.169.254",
    "::ffff:0:7f00:1",  # IPv4-translated
    "fec0::1",  # site-local (fec0::/10, deprecated)
    "fec0::7f00:1",
    "feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",  # the top of fec0::/10
    "fed0::1",
    "64:ff9b:1::1",  # local-use NAT64
    "64:ff9b::a00:1",  # well-known NAT64 of 10.0.0.1
    "2002:a00:1::",  # 6to4 of 10.0.0.1
]


LOCAL_V6 += [
    "2001:db8::1",  # documentation: inside 2000::/3, yet not global
    "2001:2::1",  # benchmarking
    "2001::1",  # Teredo of a non-global address
]


@pytest.mark.parametrize("address", LOCAL_V6)
def test_local_ipv6_ranges_are_not_webhook_addresses(address: str) -> None:
    assert address_allowed(address) is False


PUBLIC = [
    "8.8.8.8",
    "2606:4700::1111",
    "2001:4860:4860::8888",
    "2606:4700::1111%eth0",  # (a zone does not change the range)
    "64:ff9b::808:808",  # well-known NAT64 of 8.8.8.8
    "2002:808:808::1",  # 6to4 of 8.8.8.8
]


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_webhook_addresses(address: str) -> None:
    assert address_allowed(address) is True


@pytest.mark.parametrize("address", ["fe80::1%eth0", "fe80::1%2", "::1%lo", "8.8.8.8%eth0", "", "x", "1.2.3"])
def test_zones_and_non_addresses(address: str) -> None:
    assert address_allowed(address) is False


class FixedResolver(AbstractResolver):
    """A DNS that answers every name with one address."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        return [{"hostname": host, "host": self.address, "port": port, "family": family, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("address", LOCAL_V6[:10])
async def test_webhook_urls_in_local_ipv6_ranges_are_refused(relay: Relay, address: str) -> None:
    """As a literal in the URL (400 at the POST), and as the answer of the DNS for a name (400 at the
    POST; and at delivery, where the HTTP client's own resolver drops it)."""
    status, _, doc = await relay.post(msg("x", webhook_url=f"http://[{address}]/hook"))
    assert status == 400 and "`webhook_url`" in doc["error"]["message"], doc
    guarded = GuardedResolver(FixedResolver(address))
    with pytest.raises(WebhookRefused):
        await check_url("http://hooks.example.com/hook", guarded)
    results: list[str] = []
    sender = WebhookSender(secret="", allow_private=False, base_resolver=FixedResolver(address),
                           on_result=results.append, backoff=0)  # fmt: skip
    try:
        sender.post_later("http://hooks.example.com:9/hook", b"{}", "application/json", "r", "msg_r")
        sender.post_later(f"http://[{address}]:9/hook", b"{}", "application/json", "r", "msg_r")
        await until(lambda: len(results) == 2, what="both deliveries ended")
    finally:
        await sender.close()
    assert results == ["failed", "failed"]


async def test_a_webhook_to_a_public_literal_is_attempted(receiver: Receiver) -> None:
    """(The counterpart of the refusals above: the guard refuses by address, not every delivery.)"""
    results: list[str] = []
    sender = WebhookSender(secret="", allow_private=True, on_result=results.append)
    try:
        sender.post_later(receiver.url + "/fine", b"{}", "application/json", "r", "msg_r")
        await until(lambda: results == ["delivered"], what="the delivery")
    finally:
        await sender.close()


# ----- secrets are compared in constant time -----------------------------------------------------------

SECRET_NAME = re.compile(r"(^|_)(key|keys|token|tokens|secret|signature|sig|mac|digest|password|bearer)(_|$)"
                         r"|(token|secret|signature|digest|hash|sha256|bearer)", re.I)  # fmt: skip

# The mutants that mutmut writes beside each function (`make mutate` runs this test on them too)
MUTANT = re.compile(r"__mutmut_[0-9]+$")

# Comparisons whose operands are named like secrets but hold none, each with the reason.
NOT_SECRETS = {
    ("relay/assemble.py", "key in self.meta"): "a JSON field name",
    ("relay/assemble.py", "key not in self.meta"): "a JSON field name",
    ("relay/config.py", "(s, k) == (section, key)"): "a config section and key name",
    ("relay/config.py", "(s, k) != (section, key)"): "a config section and key name",
    ("relay/facade/translate.py", "key not in ('format', 'verbosity')"): "a JSON field name",
    ("relay/facade/translate.py", "key in WHY_REFUSED"): "a JSON field name",
    ("relay/facade/translate.py", "key in TAKEN"): "a JSON field name",
    ("relay/facade/chat_index.py", "keys[i] == key"): "an index entry: (created, object id)",
    (
        "relay/archive/archiver.py",
        "await self.bucket.get_bytes(s.key(rp.rel('manifest.json')), MAX_MANIFEST_BYTES) != encoded",
    ): "a manifest read back from the bucket (sizes and hashes of a request's files): integrity, not a secret",
    (
        "relay/archive/archiver.py",
        "(size, sha) != (fs.size, fs.sha256)",
    ): "the SHA-256 of an uploaded file's bytes read back: integrity, not a secret",
    (
        "relay/archive/manifest.py",
        "hashlib.sha256(piece).hexdigest() != fs.blocks[index]",
    ): "the SHA-256 of a block read from the bucket: integrity, not a secret",
    (
        "relay/devupstream.py",
        "key in ('const', 'default')",
    ): "a JSON Schema keyword (the dev upstream's tool arguments)",
    ("relay/devupstream.py", "key in schema"): "a JSON Schema keyword (the dev upstream's tool arguments)",
    ("relay/usage.py", "line.get('key') != key"): "a key's name in the operator's own ledger (the `usage` CLI)",
}


def comparisons(path: Path) -> list[tuple[str, int]]:
    """`==`, `!=`, `in`, `not in` comparisons in `path` with an operand named like a secret, unless the
    other side is a literal (`x == ""`, `x is None`): (source, line)."""
    found = []
    tree = ast.parse(path.read_text())
    mutants = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
               and MUTANT.search(f.name) for n in ast.walk(f)}  # fmt: skip
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare) or id(node) in mutants:
            continue
        if not any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops):
            continue
        operands = [node.left, *node.comparators]
        if any(isinstance(o, ast.Constant) for o in operands):
            continue
        names = []
        for o in operands:
            for n in ast.walk(o):
                if isinstance(n, ast.Name):
                    names.append(n.id)
                elif isinstance(n, ast.Attribute):
                    names.append(n.attr)
                elif isinstance(n, ast.Constant) and isinstance(n.value, str):
                    names.append(n.value)  # (a subscript: doc["bearer_token_sha256"])
        if any(SECRET_NAME.search(name) for name in names):
            found.append((ast.unparse(node), node.lineno))
    return found


def test_secrets_are_compared_in_constant_time() -> None:
    """Every comparison in relay/ whose operand is a key, a token, a signature or the hash of a secret
    goes through `hmac.compare_digest` / `secrets.compare_digest`: `==` leaks, by its time, how much of a
    guess is right. (A stored object's `owner` is not a secret: it is a hash of a key's *name*, which
    grants nothing; it is compared only after the caller's key was found in constant time.)"""
    offending = []
    for path in sorted((ROOT / "relay").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for source, line in comparisons(path):
            if (rel, source) not in NOT_SECRETS:
                offending.append(f"{rel}:{line}: {source}")
    assert offending == [], "compare these with hmac.compare_digest (or list why they hold no secret):\n" + "\n".join(
        offending
    )


def test_the_constant_time_check_sees_a_plain_comparison(tmp_path: Path) -> None:
    """(The check above is not blind: each of these would be reported.)"""
    planted = tmp_path / "planted.py"
    planted.write_text(
        "def a(token, expected_hash):\n    return hash_token(token) == expected_hash\n"
        "def b(candidate, k):\n    return candidate == k.key.encode()\n"
        "def c(sig, body):\n    return sig != sign(body)\n"
        "def d(request, required_key):\n    return request.headers.get('Authorization') != f'Bearer {required_key}'\n"
        "def e(auth, token):\n    return hash_token(token) == auth['bearer_token_sha256']\n"
        "def f(given, admin_keys):\n    return given in admin_keys\n"
    )
    assert len(comparisons(planted)) == 6
    assert comparisons(ROOT / "relay" / "security.py") == []


def test_find_key_and_token_matches_answer_exactly() -> None:
    """The constant-time helpers themselves: equal is found, anything else is not (a prefix, a longer
    string, another key, nothing)."""
    from relay.config import ApiKey
    from relay.security import find_key, hash_token, token_matches

    keys = (ApiKey("first-key-123"), ApiKey("second-key-45", name="second"))
    assert find_key("second-key-45", keys) is keys[1]
    assert find_key("first-key-123", keys) is keys[0]
    for other in ("second-key-4", "second-key-456", "SECOND-KEY-45", "", None, "x"):
        assert find_key(other, keys) is None, other
    assert find_key("first-key-123", ()) is None
    digest = hash_token("tok")
    assert token_matches("tok", digest)
    for token, expected in (("tok2", digest), ("to", digest), ("", digest), (None, digest), ("tok", None),
                            ("tok", ""), ("tok", digest.upper())):  # fmt: skip
        assert not token_matches(token, expected), (token, expected)


# ----- what `make mutate` found in the webhook address rules and relay keys -----------------------------


class RecordingResolver(AbstractResolver):
    """A DNS that records what it is asked and answers one public address, or fails (`error`)."""

    def __init__(self, address: str = "93.184.216.34", error: OSError | None = None) -> None:
        self.address = address
        self.error = error
        self.asked: list[tuple[str, int, int]] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append((host, port, family))
        if self.error is not None:
            raise self.error
        return [{"hostname": host, "host": self.address, "port": port, "family": socket.AF_INET, "proto": 0,
                 "flags": 0}]  # fmt: skip

    async def close(self) -> None:
        pass


async def test_the_check_asks_the_dns_for_the_urls_host_and_port_in_every_family() -> None:
    base = RecordingResolver()
    guarded = GuardedResolver(base)
    await check_url("https://hooks.example.com:8443/x", guarded)
    await check_url("http://other.example.com/x", guarded)
    assert base.asked == [("hooks.example.com", 8443, socket.AF_UNSPEC), ("other.example.com", 0, socket.AF_UNSPEC)]
    await check_url("http://8.8.8.8/x", guarded)  # a public literal passes, without a lookup
    await check_url("http://[2606:4700::1111]:81/x", guarded)
    assert len(base.asked) == 2


async def test_the_resolver_passes_what_it_is_asked_and_says_which_host_it_refuses() -> None:
    base = RecordingResolver("10.0.0.7")
    guarded = GuardedResolver(base)
    with pytest.raises(NonPublicAddress, match=r"^hooks\.example\.com resolves only to addresses webhooks may not"):
        await guarded.resolve("hooks.example.com", 443, socket.AF_INET6)
    assert base.asked == [("hooks.example.com", 443, socket.AF_INET6)]
    assert await GuardedResolver(base, allow_private=True).resolve("h.example", 80, socket.AF_INET) == [
        {"hostname": "h.example", "host": "10.0.0.7", "port": 80, "family": socket.AF_INET, "proto": 0, "flags": 0}
    ]


LONG = "h" * 60 + "." + "i" * 60 + ".example.com"  # (over 100 characters, each label under 64)


@pytest.mark.parametrize(
    "url,reason",
    [
        ("ftp://8.8.8.8/x", "must be an absolute http(s) URL"),
        ("http://user@8.8.8.8/x", "must not contain credentials"),
        ("http://:secret@8.8.8.8/x", "must not contain credentials"),
        ("http://user:pw@8.8.8.8/x", "must not contain credentials"),
        ("http://8.8.8.8:70000/x", "has an invalid port"),
        ("http://a..b/x", "has an invalid host name (an empty label, or a label over 63 characters)"),
        ("http://127.0.0.1/x", "points at a loopback, private, link-local, multicast or reserved address"),
        ("http://[::ffff:10.0.0.1]/x", "points at a loopback, private, link-local, multicast or reserved address"),
        ("http://hooks.example.com/x", "resolves to a loopback, private, link-local, multicast or reserved address"),
    ],
)
async def test_each_refusal_says_why(url: str, reason: str) -> None:
    with pytest.raises(WebhookRefused) as refused:
        await check_url(url, GuardedResolver(RecordingResolver("127.0.0.1")))
    assert str(refused.value) == reason


async def test_a_host_that_does_not_resolve_is_named_up_to_100_characters() -> None:
    with pytest.raises(WebhookRefused) as refused:
        await check_url(f"http://{LONG}/x", GuardedResolver(RecordingResolver(error=OSError("no such host"))))
    assert str(refused.value) == f"host {LONG[:100]!r} does not resolve"


def test_a_host_name_may_have_253_characters_not_254() -> None:
    from relay.webhooks import host_problem

    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(name) == 253 and host_problem(name) is None and host_problem(name + ".") is None
    assert host_problem(name + "e") == "has a host name over 253 characters"


async def test_a_webhook_to_a_loopback_literal_is_not_delivered(receiver: Receiver) -> None:
    """A URL whose host is a loopback IP literal (which the HTTP client connects to without asking the
    resolver): refused at delivery when private addresses are not allowed, delivered when they are."""
    results: list[str] = []
    guarded = WebhookSender(secret="", allow_private=False, on_result=results.append, backoff=0)
    allowed = WebhookSender(secret="", allow_private=True, on_result=results.append, backoff=0)
    try:
        guarded.post_later(receiver.url + "/literal", b"{}", "application/json", "r", "msg_r")
        await until(lambda: results == ["failed"], what="the guarded delivery ended")
        assert receiver.hits["literal"] == []
        allowed.post_later(receiver.url + "/literal", b"{}", "application/json", "r", "msg_r")
        await until(lambda: len(results) == 2, what="the allowed delivery ended")
    finally:
        await guarded.close()
        await allowed.close()
    assert results == ["failed", "delivered"] and len(receiver.hits["literal"]) == 1


def test_a_new_token_is_192_random_bits() -> None:
    import base64

    from relay.security import new_token

    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50
    for token in tokens:
        assert len(token) == 32 and len(base64.urlsafe_b64decode(token)) == 24


async def test_bearer_tokens_are_read_leniently_but_only_as_bearer(relay: Relay) -> None:
    """`Authorization: Bearer <token>` opens a private request whatever the scheme's case and however
    many spaces come before or after the token; another scheme, or more than one word, does not."""
    doc = await relay.start(msg("private words", access="private"))
    token = doc["authorization"]["bearer_token"]
    status_url = doc["endpoints"]["status_url"]
    await relay.wait_status(status_url, headers={"Authorization": f"Bearer {token}"})
    for value in (f"Bearer {token}", f"bearer {token}", f"BEARER  {token}", f"Bearer {token}  "):
        async with relay.session.get(status_url, headers={"Authorization": value}) as r:
            assert r.status == 200, value
    for value in (f"Basic {token}", f"Bearer{token}", f"Bearer {token} extra", f"Token {token}", "Bearer "):
        async with relay.session.get(status_url, headers={"Authorization": value}) as r:
            assert r.status in (401, 403), value


# ----- private access: what a refused reader is told ---------------------------------------------------


async def test_a_private_requests_refusals_say_what_opens_it(relay: Relay) -> None:
    """No token: 401 `unauthorized` naming what to send (the stream token only where it opens, the
    `.txt`), with `WWW-Authenticate: Bearer`; a wrong token, or the stream token on the status: 403
    `forbidden`."""
    doc = await relay.start(msg("private words", access="private"))
    token = doc["authorization"]["bearer_token"]
    stream_token = doc["authorization"]["stream_url_arg"].split("=", 1)[1]
    status_url, stream_url = doc["endpoints"]["status_url"], doc["endpoints"]["stream_events_url"]
    await relay.wait_status(status_url, headers={"Authorization": f"Bearer {token}"})
    for url, hint in ((status_url, ""), (stream_url, " or ?stream_token=<token>")):
        async with relay.session.get(url) as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"] == 'Bearer realm="relay"'
            error = orjson.loads(await r.read())["error"]
        wanted = "this request is private: send Authorization: Bearer <bearer_token>" + hint
        assert error == {"code": "unauthorized", "message": wanted}
    for url, headers in ((status_url, {"Authorization": "Bearer not-the-token"}),
                         (status_url, {"Authorization": f"Bearer {stream_token}"}),
                         (stream_url + "?stream_token=not-the-token", {})):  # fmt: skip
        async with relay.session.get(url, headers=headers) as r:
            assert r.status == 403, url
            error = orjson.loads(await r.read())["error"]
        assert error == {"code": "forbidden", "message": "the token does not open this URL"}
    async with relay.session.get(stream_url + f"?stream_token={stream_token}") as r:
        assert r.status == 200


async def test_a_parent_url_that_is_not_this_relays_is_refused_naming_the_relay(relay: Relay) -> None:
    for url in ("https://elsewhere.example/1/r/pub/x.json", relay.url + "/1/r/pub/2026/01/01/00/00/00/x.txt"):
        status, _, doc = await relay.post(msg("x", from_status_url=url))
        assert status == 400 and doc["error"] == {
            "code": "invalid_from_status_url",
            "message": "`from_status_url` must be a status_url (…/<id>.json) generated by this relay at " + relay.url,
        }, doc


# ----- the OpenAI face's ownership: what `make mutate` found ---------------------------------------------


async def test_ids_of_the_other_kind_and_unknown_ids_are_not_found_by_name(keyed: Relay) -> None:
    """An object's id names its kind: the owner's own response asked for as a chat completion (and the
    reverse) is 404, as are another node's ids, deleted objects and damaged documents, each naming the id."""
    relay = keyed
    status, resp = await call(relay, "POST", "/v1/responses", KEY_A, {"model": "echo", "input": "a response"})
    assert status == 200
    body = {"model": "echo", "messages": [{"role": "user", "content": "c"}], "store": True}
    status, chat = await call(relay, "POST", "/v1/chat/completions", KEY_A, body)
    assert status == 200
    await until(lambda: held(relay)["jobs"] == 0, what="both ended")
    as_chat = CHAT + resp["id"].removeprefix(RESPONSE)
    as_resp = RESPONSE + chat["id"].removeprefix(CHAT)
    for method, path, kind, oid in [
        ("GET", f"/v1/chat/completions/{as_chat}", "chat completion", as_chat),
        ("GET", f"/v1/chat/completions/{as_chat}/messages", "chat completion", as_chat),
        ("GET", f"/v1/responses/{as_resp}", "response", as_resp),
        ("GET", f"/v1/responses/{as_resp}?stream=true", "response", as_resp),
        ("DELETE", f"/v1/responses/{as_resp}", "response", as_resp),
        ("GET", f"/v1/responses/{as_resp}/input_items", "response", as_resp),
        ("GET", f"/v1/responses/resp_2{resp['id'][6:]}", "response", f"resp_2{resp['id'][6:]}"),  # another node
        ("GET", f"/v1/responses/resp_{'x' * 100}", "response", f"resp_{'x' * 100}"),
    ]:
        status, doc = await call(relay, method, path, KEY_A)
        assert_not_found(status, doc, f"{method} {path}", kind, oid)
    status, doc = await call(relay, "GET", f"/v1/chat/completions/{chat['id']}", KEY_A)
    assert status == 200  # (both are still there)

    rp = parse_id(RESPONSE, resp["id"])
    assert rp is not None
    rp.file(relay.data_dir, "json").write_bytes(b"[1, 2]")  # a damaged document (not an object)
    for path in (f"/v1/responses/{resp['id']}", f"/v1/responses/{resp['id']}?stream=true"):
        status, doc = await call(relay, "GET", path, KEY_A)
        assert_not_found(status, doc, path, "response", resp["id"])
    status, doc = await call(relay, "DELETE", f"/v1/chat/completions/{chat['id']}", KEY_A)
    assert status == 200
    for path in (f"/v1/chat/completions/{chat['id']}", f"/v1/chat/completions/{chat['id']}/messages"):
        status, doc = await call(relay, "GET", path, KEY_A)
        assert_not_found(status, doc, path, "chat completion", chat["id"])


async def test_objects_are_owned_by_a_hash_of_the_keys_name_on_disk(keyed: Relay) -> None:
    """What a stored object keeps of its owner is part of the files' format: a sha256 of `owner:` and the
    key's name, 32 hex digits. Objects written before a change of it would belong to no one after."""
    import hashlib

    status, resp = await call(keyed, "POST", "/v1/responses", KEY_A, {"model": "echo", "input": "x"})
    assert status == 200
    await until(lambda: held(keyed)["jobs"] == 0, what="it ended")
    rp = parse_id(RESPONSE, resp["id"])
    assert rp is not None
    doc = orjson.loads(rp.file(keyed.data_dir, "json").read_bytes())
    owner = hashlib.sha256(b"owner:alpha").hexdigest()[:32]
    assert doc["openai"]["owner"] == owner
    assert doc["authorization"]["owner"] == owner and doc["authorization"]["openai"] == "response"


async def test_the_openai_face_refuses_a_missing_key_as_openai_does(keyed: Relay) -> None:
    for key in ("", "not-a-relay-key"):
        async with keyed.session.post(keyed.url + "/v1/responses", data=b'{"model": "echo", "input": "x"}',
                                      headers={"Authorization": f"Bearer {key}"} if key else {}) as r:  # fmt: skip
            assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer"), key
            assert orjson.loads(await r.read())["error"] == {
                "message": "Incorrect or missing relay access key: send one of the relay's [auth] api_keys as the "
                "SDK's api_key (Authorization: Bearer).", "type": "authentication_error", "param": None,
                "code": "invalid_api_key"}  # fmt: skip


async def test_a_keys_own_quota_holds_on_the_openai_face(make_relay: RelayFactory) -> None:
    relay = await make_relay(auth_api_keys=[{"key": KEY_A, "name": "alpha", "requests_per_minute": 2}, KEY_B])
    body = {"model": "echo", "input": "x"}
    for _ in range(2):
        assert (await call(relay, "POST", "/v1/responses", KEY_A, body))[0] == 200
    status, doc = await call(relay, "POST", "/v1/responses", KEY_A, body)
    assert status == 429 and doc["error"]["code"] == "quota_exceeded", doc
    assert (await call(relay, "POST", "/v1/responses", KEY_B, body))[0] == 200  # (another key's is its own)


async def test_a_large_stored_answer_is_sent_whole_to_its_owner(keyed: Relay) -> None:
    """An answer larger than one block (256 KiB) is sent in blocks: whole to its owner, to no one else."""
    status, resp = await call(keyed, "POST", "/v1/responses", KEY_A, {"model": "echo:chunks=20", "input": "y" * 20_000})
    assert status == 200
    text = resp["output"][0]["content"][0]["text"]
    assert len(text) == 400_000
    await until(lambda: held(keyed)["jobs"] == 0, what="it ended")
    for _ in range(2):  # (made, then kept)
        status, doc = await call(keyed, "GET", f"/v1/responses/{resp['id']}", KEY_A)
        assert status == 200 and doc["output"][0]["content"][0]["text"] == text
        status, doc = await call(keyed, "GET", f"/v1/responses/{resp['id']}", KEY_B)
        assert_not_found(status, doc, "B's GET", "response", resp["id"])


async def test_what_has_expired_is_not_found_even_when_kept_and_what_runs_is_served(make_relay: RelayFactory) -> None:
    """With a retention of 2 s: a request older than that answers 404 (its files still there, the janitor
    not yet run), a response's answer kept in memory included; a request still running past it does not."""
    relay = await make_relay(retention_max_age_days=2 / 86400)
    status, resp = await call(relay, "POST", "/v1/responses", "unused", {"model": "echo", "input": "x"})
    assert status == 200
    assert (await call(relay, "GET", f"/v1/responses/{resp['id']}", "unused"))[0] == 200  # (now kept)
    done = await relay.start(msg("x"))
    await relay.wait_status(done["endpoints"]["status_url"])
    running = await relay.start(msg("x", model="echo:delay=30"))
    await asyncio.sleep(3.2)
    status, doc = await call(relay, "GET", f"/v1/responses/{resp['id']}", "unused")
    assert_not_found(status, doc, "an expired, kept response", "response", resp["id"])
    async with relay.session.get(done["endpoints"]["status_url"]) as r:
        assert r.status == 404
    async with relay.session.get(running["endpoints"]["status_url"]) as r:
        assert r.status == 200 and (await r.json())["status"] in ("queued", "streaming")
    async with relay.session.post(running["endpoints"]["stop_url"]):
        pass


# ----- Answers: GETs of one object share one answer, and keep it once it has ended ----------------------


async def test_answers_are_kept_for_their_owner_and_shared_while_made() -> None:
    from relay.facade.common import Answers

    answers = Answers()
    calls: list[str] = []

    def maker(data: bytes, ended: bool, delay: float = 0.0) -> Any:
        async def make() -> tuple[bytes, bool]:
            calls.append(data.decode())
            await asyncio.sleep(delay)
            return data, ended

        return make

    assert await answers.answer("o1", "alice", maker(b"one", True)) == b"one"
    assert await answers.answer("o1", "alice", maker(b"other", True)) == b"one"  # kept: not made again
    assert await answers.answer("o1", "bob", maker(b"bob's", True)) is None  # kept for alice only
    assert calls == ["one"] and answers.size == 3
    assert await answers.answer("o2", "alice", maker(b"running", False)) == b"running"
    assert await answers.answer("o2", "alice", maker(b"later", False)) == b"later"  # not ended: not kept
    # made once for GETs that arrive together; another owner's GET meanwhile gets None (finds its own)
    got = await asyncio.gather(answers.answer("o3", "alice", maker(b"three", True, 0.05)),
                               answers.answer("o3", "alice", maker(b"again", True)),
                               answers.answer("o3", "bob", maker(b"bob", True)))  # fmt: skip
    assert got == [b"three", b"three", None] and calls[-1] == "three"
    assert answers._making == {}

    async def failing() -> tuple[bytes, bool]:
        await asyncio.sleep(0.05)
        raise OSError("gone")

    first = asyncio.ensure_future(answers.answer("o4", "alice", failing))
    await asyncio.sleep(0.01)
    waiter = await answers.answer("o4", "alice", maker(b"own", True))  # the one it waited for failed
    with pytest.raises(OSError):
        await first
    assert waiter == b"own" and answers._making == {}
    answers.drop("o1")
    assert await answers.answer("o1", "alice", maker(b"new", True)) == b"new"


# ----- the ledger: tokens counted from usage, or estimated from the text -------------------------------


def test_token_counts_from_usage_take_only_counts() -> None:
    from relay.ledger import MAX_TOKENS, tokens

    def usage(**counts: Any) -> dict[str, Any]:
        return {"response": {"body": {"usage": {"total_tokens": 1, **counts}}}}

    line = tokens(usage(prompt_tokens=0, completion_tokens=MAX_TOKENS), None)
    assert (line["prompt_tokens"], line["completion_tokens"], line["estimated"]) == (0, MAX_TOKENS, False)
    for total, expected in ((9, 9), (None, 7), ("7", 7), (-1, 7)):  # a total that is not a count: the sum
        line = tokens({"response": {"body": {"usage": {"prompt_tokens": 3, "completion_tokens": 4,
                                                       "total_tokens": total}}}}, None)  # fmt: skip
        assert line["total_tokens"] == expected, total
    details = {"prompt_tokens_details": {"cached_tokens": 2}, "completion_tokens_details": {"reasoning_tokens": 1}}
    line = tokens(usage(prompt_tokens=3, completion_tokens=4, **details), None)
    assert (line["cached_tokens"], line["reasoning_tokens"]) == (2, 1)
    line = tokens(usage(prompt_tokens=3, completion_tokens=4, prompt_tokens_details=[2],
                        completion_tokens_details="1"), None)  # fmt: skip
    assert (line["cached_tokens"], line["reasoning_tokens"]) == (None, None)
    for bad in (-1, MAX_TOKENS + 1, True, "5", 2.0, None):  # not a count: estimated instead
        line = tokens(usage(prompt_tokens=bad, completion_tokens=5), None)
        assert line["estimated"] is True and (line["prompt_tokens"], line["completion_tokens"]) == (0, 0), bad
        line = tokens(usage(prompt_tokens=5, completion_tokens=bad), None)
        assert line["estimated"] is True, bad


def test_estimated_tokens_count_every_kind_of_text() -> None:
    """Without usage: a quarter of the characters of every text the messages hold (strings, `text` parts,
    tool call arguments, refusals), rounded up; names and roles are not text."""
    from relay.ledger import _text_chars, tokens

    messages = [
        {"role": "system", "content": "s" * 8},
        {"role": "user", "content": [{"type": "text", "text": "t" * 12}, {"type": "image_url", "image_url": "u"}]},
        {"role": "assistant", "content": None, "refusal": "r" * 4,
         "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "nnnn", "arguments": "a" * 16}}]},
    ]  # fmt: skip
    answer = {"choices": [{"message": {"role": "assistant", "content": [{"type": "text", "text": "x" * 19}]}}]}
    line = tokens({"response": {"body": answer}}, messages)
    assert (line["prompt_tokens"], line["completion_tokens"], line["total_tokens"]) == (10, 5, 15)  # 40/4, 19/4
    assert line["estimated"] is True and line["cached_tokens"] is None and line["reasoning_tokens"] is None
    for body in ({}, {"choices": "not a list"}, None):
        line = tokens({"response": {"body": body}}, messages)
        assert (line["prompt_tokens"], line["completion_tokens"], line["total_tokens"]) == (10, 0, 10), body
    assert _text_chars(["ab", "cd", "ef"], budget=4) == 4  # stops once the budget is reached
    assert _text_chars(["ab", "cd", "ef"]) == 6


def test_a_ledger_line_reads_the_documents_own_parameters_and_string_codes() -> None:
    from relay.ledger import entry

    doc = {"status": "error", "error": {"code": 5}, "request": {"endpoint": "/v1/stream-chatgpt"},
           "parameters": {"model": "m1", "messages": [{"role": "user", "content": "abcdefgh"}]}}  # fmt: skip
    line = entry(doc, request_id="r", node=1, key="k", path="p", ttft=None, now=0.0)
    assert (line["model"], line["code"], line["prompt_tokens"]) == ("m1", None, 2)
    doc["error"] = {"code": "interrupted"}
    assert entry(doc, request_id="r", node=1, key="k", path="p", ttft=None, now=0.0)["outcome"] == "interrupted"
    doc["parameters"] = "not an object"
    assert entry(doc, request_id="r", node=1, key="k", path="p", ttft=None, now=0.0)["model"] == ""


def test_a_ledger_line_is_exactly_its_fields() -> None:
    """Every field of a line, as `relay.py usage`, the operator page and the token metrics read them."""
    from relay.ledger import entry

    private = {"status": "done", "authorization": {"access": "private", "bearer_token_sha256": "x"},
               "request": {"endpoint": "/v1/async-chatgpt", "total_time": 1.25},
               "parameters": {"model": "echo", "messages": [{"role": "user", "content": "abcd"}]},
               "response": {"body": {"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                                               "prompt_tokens_details": {"cached_tokens": 1}}}}}  # fmt: skip
    line = entry(private, request_id="rid", node=7, key="alpha", path="7/r/prv/x", ttft=0.12345, now=1700000000.123456)
    assert line == {
        "t": 1700000000.123, "id": "rid", "node": 7, "key": "alpha", "model": "echo",
        "endpoint": "/v1/async-chatgpt", "access": "private", "outcome": "done", "code": None,
        "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7, "cached_tokens": 1, "reasoning_tokens": None,
        "estimated": False, "ttft": 0.123, "duration": 1.25, "path": "7/r/prv/x",
    }  # fmt: skip
    bare = entry({"status": "error", "parameters": {"model": 5}}, request_id="r", node=1, key="k", path="p",
                 ttft=None, now=2.0)  # fmt: skip
    assert (bare["t"], bare["model"], bare["endpoint"], bare["access"], bare["duration"]) == (
        2.0,
        "",
        "",
        "public",
        None,
    )
    assert isinstance(bare["t"], float)


# ----- private access: a parent's token, and documents whose authorization is not at their head ----------


async def test_chaining_from_a_private_parent_says_what_is_missing(relay: Relay) -> None:
    parent = await relay.start(msg("private parent", access="private"))
    token = parent["authorization"]["bearer_token"]
    await relay.wait_status(parent["endpoints"]["status_url"], headers={"Authorization": f"Bearer {token}"})
    url = parent["endpoints"]["status_url"]
    for extra, message in [
        ({}, "`from_status_url` is private: send its bearer_token as `from_bearer_token`"),
        ({"from_bearer_token": "wrong"}, "`from_bearer_token` does not match `from_status_url`"),
    ]:
        status, _, doc = await relay.post(msg("child", from_status_url=url, **extra))
        assert status == 403 and doc["error"] == {"code": "forbidden", "message": message}, doc
    assert (await relay.post(msg("child", from_status_url=url, from_bearer_token=token)))[0] == 200


def test_read_auth_parses_a_document_whose_authorization_is_not_at_its_head(tmp_path: Path) -> None:
    """A document the quick read cannot use (something bracketed before `authorization`, as in documents of
    other writers) is parsed whole; one that is not an object is refused."""
    from relay.serve import read_auth

    auth = {"access": "private", "bearer_token_sha256": "ab" * 32}
    (tmp_path / "late.json").write_bytes(orjson.dumps({"status": "done", "tags": ["x"], "authorization": auth}))
    (tmp_path / "head.json").write_bytes(orjson.dumps({"status": "done", "authorization": auth, "more": [1]}))
    (tmp_path / "odd.json").write_bytes(orjson.dumps({"status": "done", "tags": [1], "authorization": "x"}))
    (tmp_path / "list.json").write_bytes(b"[1, 2]")
    assert read_auth(tmp_path, "late.json") == auth
    assert read_auth(tmp_path, "head.json") == auth
    assert read_auth(tmp_path, "odd.json") == {}
    with pytest.raises(ValueError, match="^not a status document$"):
        read_auth(tmp_path, "list.json")


def test_token_metrics_label_at_most_100_models_and_count_nothing_for_no_count() -> None:
    from relay.metrics import MAX_MODELS, Metrics

    m = Metrics()

    def value(name: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(name, labels)

    for i in range(MAX_MODELS):
        m.count_tokens({"key": "alpha", "model": f"m{i}", "prompt_tokens": 2, "completion_tokens": 1})
    m.count_tokens({"key": "alpha", "model": "m0", "prompt_tokens": 2, "completion_tokens": 1})  # (seen: its own)
    m.count_tokens({"key": "alpha", "model": "one-too-many", "prompt_tokens": 5, "completion_tokens": 3})
    m.count_tokens({"key": "alpha", "model": "another", "prompt_tokens": 1, "completion_tokens": 1})
    assert value("relay_tokens_total", key="alpha", model="m0", kind="prompt") == 4
    assert value("relay_tokens_total", key="alpha", model=f"m{MAX_MODELS - 1}", kind="completion") == 1
    assert value("relay_tokens_total", key="alpha", model="other", kind="prompt") == 6
    assert value("relay_tokens_total", key="alpha", model="one-too-many", kind="prompt") is None
    m.count_tokens({"prompt_tokens": None, "completion_tokens": None, "estimated": True})  # no key, no model
    assert value("relay_tokens_total", key="", model="other", kind="prompt") == 0
    assert value("relay_tokens_estimated_requests_total", key="") == 1
    assert value("relay_tokens_estimated_requests_total", key="alpha") is None

    fresh = Metrics()
    fresh.count_tokens({"key": "k", "prompt_tokens": 1, "completion_tokens": 0})
    assert fresh.registry.get_sample_value("relay_tokens_total", {"key": "k", "model": "", "kind": "prompt"}) == 1


async def test_the_chat_index_forgets_an_entry_a_second_past_the_retention(tmp_path: Path) -> None:
    import time

    from relay.facade.chat_index import ChatIndex

    index = ChatIndex(tmp_path)
    now = time.time()
    for name, age in (("just-expired", 30 * 86400 + 10), ("just-kept", 30 * 86400 - 10)):
        index.record({"op": "add", "id": name, "created": now - age, "model": "m", "owner": "o", "metadata": {}})
    assert await index.listed("o", model=None, metadata={}, max_age_days=30, after=None, limit=10,
                              descending=False) == (["just-kept"], False)  # fmt: skip
    await asyncio.sleep(0.05)  # (the index's lines are written in the background)


async def test_a_native_request_without_a_relay_key_is_told_how_to_send_one(keyed: Relay) -> None:
    for headers in ({}, {"X-RapidAPI-Key": "not-a-key-123"}, {"Authorization": "Bearer not-a-key-123"}):
        status, got, doc = await keyed.post(msg("x"), headers=headers)
        assert status == 401 and got["WWW-Authenticate"] == 'Bearer realm="relay"', headers
        assert doc["error"] == {"code": "unauthorized",
                                "message": "send a valid relay access key as X-RapidAPI-Key or Authorization: "
                                "Bearer <key>"}  # fmt: skip


def test_a_key_without_a_name_goes_by_8_hex_digits_of_its_hash() -> None:
    """(As docs/security.md says: the ledger and the token metrics name such a key `key-` and 8 hex digits.)"""
    import hashlib

    from relay.config import ApiKey
    from relay.ledger import OPEN, key_label

    assert key_label(ApiKey("unnamed-key-123")) == "key-" + hashlib.sha256(b"unnamed-key-123").hexdigest()[:8]
    assert key_label(ApiKey("named-key-1234", name="alpha")) == "alpha"
    assert key_label(None) == OPEN


# ----- the OpenAI face reads little of what it stores (the second round of `make mutate`) ---------------


async def test_a_finished_answer_is_kept_for_its_owner_once_asked_for(keyed: Relay) -> None:
    """(docs/security.md: a Response object is made once and kept once it has ended.)"""
    from relay.facade.common import ANSWERS

    status, resp = await call(keyed, "POST", "/v1/responses", KEY_A, {"model": "echo", "input": "x"})
    assert status == 200
    await until(lambda: held(keyed)["jobs"] == 0, what="it ended")
    answers = keyed.app[ANSWERS]
    assert resp["id"] not in answers._kept
    assert (await call(keyed, "GET", f"/v1/responses/{resp['id']}", KEY_A))[0] == 200
    assert resp["id"] in answers._kept
    assert_not_found(*(await call(keyed, "GET", f"/v1/responses/{resp['id']}", KEY_B)), "B", "response", resp["id"])


async def test_ownership_is_read_from_the_head_of_the_document_or_else_from_all_of_it(keyed: Relay) -> None:
    """A response's stream and DELETE check the owner from the authorization object at the document's
    head, never parsing the answer after it (here: a document torn after its head still resumes); a
    document whose authorization does not name its owner (an older one) is read whole, and still opens
    to its owner only."""
    relay = keyed
    ids = []
    for text in ("torn", "older"):
        status, resp = await call(relay, "POST", "/v1/responses", KEY_A, {"model": "echo", "input": text})
        assert status == 200
        ids.append(resp["id"])
    await until(lambda: held(relay)["jobs"] == 0, what="both ended")
    torn, older = (parse_id(RESPONSE, i) for i in ids)
    assert torn is not None and older is not None
    path = torn.file(relay.data_dir, "json")
    raw = path.read_bytes()
    path.write_bytes(raw[: raw.index(b'"endpoints"') + 20])  # the head, then nothing whole
    path = older.file(relay.data_dir, "json")
    doc = orjson.loads(path.read_bytes())
    del doc["authorization"]["owner"], doc["authorization"]["openai"]
    path.write_bytes(orjson.dumps(doc))
    for rid in ids:
        status, events = await call(relay, "GET", f"/v1/responses/{rid}?stream=true&starting_after=2", KEY_A)
        assert status == 200 and "response.completed" in [e.event for e in parse_sse(events.decode())], rid
        for method in ("GET", "DELETE"):
            url = f"/v1/responses/{rid}" + ("?stream=true" if method == "GET" else "")
            assert_not_found(*(await call(relay, method, url, KEY_B)), f"B {method} {rid}", "response", rid)
    status, _ = await call(relay, "DELETE", f"/v1/responses/{ids[1]}", KEY_A)
    assert status == 200 and not older.file(relay.data_dir, "json").exists()


def test_read_auth_reads_only_the_head_when_it_can(tmp_path: Path) -> None:
    from relay.serve import read_auth

    auth = {"access": "private", "bearer_token_sha256": "cd" * 32}
    whole = orjson.dumps({"status": "done", "created_at": 1, "authorization": auth, "response": {"body": "x" * 100}})
    (tmp_path / "torn.json").write_bytes(whole[:-40])  # the rest is not JSON: it is never parsed
    assert read_auth(tmp_path, "torn.json") == auth


async def test_a_waiting_get_makes_its_own_answer_when_the_one_it_waited_for_is_cancelled() -> None:
    from relay.facade.common import Answers

    answers = Answers()

    async def slow() -> tuple[bytes, bool]:
        await asyncio.sleep(10)
        return b"never", True

    async def quick() -> tuple[bytes, bool]:
        return b"own", True

    first = asyncio.ensure_future(answers.answer("o", "alice", slow))
    await asyncio.sleep(0.01)
    waiter = asyncio.ensure_future(answers.answer("o", "alice", quick))
    await asyncio.sleep(0.01)
    first.cancel()  # (its client left)
    assert await waiter == b"own"
    with pytest.raises(asyncio.CancelledError):
        await first


def test_a_ledger_lines_duration_is_a_number_or_none() -> None:
    from relay.ledger import entry

    for total, expected in ((2, 2), (0.5, 0.5), ("2", None), (None, None), ([1], None)):
        doc = {"status": "done", "request": {"total_time": total}}
        assert entry(doc, request_id="r", node=1, key="k", path="p", ttft=None, now=0.0)["duration"] == expected
