"""The provider conformance corpus through a real relay, on both faces.

Each fixture in `relay/quirks/` is a streamed answer with one provider's documented shape (OpenAI, Azure,
Gemini, Anthropic, Ollama, vLLM, DeepSeek, llama.cpp, OpenRouter, Groq, Mistral, and odd framings); the dev
upstream replays it for the model `quirks:<name>`. Its expectation in `tests/corpus/<name>.json` was
worked out by hand from the rules in docs/api.md ("Providers"). For each fixture:
- OffloadGPT face: the terminal status and error code; the status document's content, refusal, reasoning,
  tool calls and finish reason; its usage; one ledger line with that usage (counted once); the event log
  holds the upstream's events unchanged (a choice without `delta` gets an empty one, as documented);
- Responses (streamed): the text, reasoning and function-call items of the events and of the Response
  object, and its final status;
- stored chat completion: what its client is streamed, and the stored object;
- passed-through chat completion: the client gets the upstream's bytes unchanged, and the ledger its usage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from .conftest import OPENAI_HEADERS, Relay, msg, parse_sse, read_stream, until

ROOT = Path(__file__).resolve().parent.parent
CORPUS = sorted(p.stem for p in (ROOT / "tests" / "corpus").glob("*.json"))


def expected(name: str) -> dict[str, Any]:
    return orjson.loads((ROOT / "tests" / "corpus" / f"{name}.json").read_bytes())


def upstream_events(name: str) -> list[str]:
    """The data of each event of a fixture, by the WHATWG rules (any line end, `data:` with or without a
    space), read here independently of the relay's parser."""
    text = (ROOT / "relay" / "quirks" / f"{name}.sse").read_bytes().decode()
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    out, data = [], []
    for line in [*text.split("\n"), ""]:
        if line == "":
            if data:
                out.append("\n".join(data))
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    return out


def ledger(relay: Relay) -> list[dict[str, Any]]:
    return [orjson.loads(x) for f in sorted((relay.data_dir / "usage").glob("*.jsonl"))
            for x in f.read_bytes().splitlines() if x.strip()]  # fmt: skip


def check_usage(line: dict[str, Any], usage: dict[str, int] | None) -> None:
    if usage is None:
        assert line["estimated"] is True, line
        return
    assert line["estimated"] is False, line
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert line[key] == usage[key], (key, line)


def streamed_text(chunks: list[dict[str, Any]]) -> str:
    """The string content deltas of the first choice of chat completion chunks."""
    out = []
    for c in chunks:
        choices = c.get("choices") or [{}]
        content = (choices[0].get("delta") or {}).get("content")
        if isinstance(content, str):
            out.append(content)
    return "".join(out)


def check_message(choice: dict[str, Any], want: dict[str, Any]) -> None:
    message = choice["message"]
    assert message["content"] == want["content"]
    for key in ("refusal", "reasoning", "reasoning_content"):
        assert message.get(key) == want[key], key
    calls = [{"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
             for c in message.get("tool_calls") or []]  # fmt: skip
    assert calls == want["tool_calls"]
    assert choice["finish_reason"] == want["finish_reason"]


@pytest.mark.parametrize("name", CORPUS)
async def test_offloadgpt_face(relay: Relay, name: str) -> None:
    want = expected(name)
    doc = await relay.start(msg("hello", model=f"quirks:{name}"))
    code, _, text = await read_stream(relay.session, doc["endpoints"]["stream_events_url"])
    assert code == 200
    final = await relay.wait_status(doc["endpoints"]["status_url"])
    assert final["status"] == want["outcome"]["status"], final.get("error")
    if want["outcome"]["status"] == "error":
        assert final["error"]["code"] == want["outcome"]["code"]
    body = final["response"]["body"]
    choices = {c["index"]: c for c in body["choices"]}
    for w in want["choices"]:
        check_message(choices[w["index"]], w)
    usage = body.get("usage")
    if want["usage"] is None:
        assert usage is None
    else:
        assert {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == want["usage"]
    # the log: the upstream's chunks as they came (an Anthropic-style error line is the relay's error event)
    logged = [e.data for e in parse_sse(text) if e.event is None and e.data != "[DONE]"]
    sent = [d for d in upstream_events(name) if d != "[DONE]"]
    sent = [d for d in sent if not ("error" in orjson.loads(d) and not orjson.loads(d).get("choices"))]
    assert len(logged) == len(sent)
    for got, raw in zip(logged, sent, strict=True):
        original = orjson.loads(raw)
        for c in original.get("choices") or []:
            c.setdefault("delta", {})
        assert orjson.loads(got) == original
        if "\n" not in raw and all("delta" in c for c in orjson.loads(raw).get("choices") or []):
            assert got == raw  # byte for byte
    request_id = doc["endpoints"]["status_url"].rsplit("/", 1)[1].removesuffix(".json")
    await until(lambda: any(line["id"] == request_id for line in ledger(relay)), what="its ledger line")
    (line,) = [line for line in ledger(relay) if line["id"] == request_id]
    check_usage(line, want["usage"])


@pytest.mark.parametrize("name", CORPUS)
async def test_responses_face(relay: Relay, name: str) -> None:
    want = expected(name)
    w = want["choices"][0]
    payload = {"model": f"quirks:{name}", "input": "hello", "stream": True}
    async with relay.session.post(relay.url + "/v1/responses", data=orjson.dumps(payload), headers=OPENAI_HEADERS) as r:
        assert r.status == 200
        events = [orjson.loads(e.data) for e in parse_sse((await r.read()).decode()) if e.data != "[DONE]"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == (w["content"] or "")
    thought = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert thought == (w["reasoning"] or w["reasoning_content"] or "")
    final = events[-1]
    status = {"done": "completed", "error": "failed"}[want["outcome"]["status"]]
    if status == "completed" and w["finish_reason"] in ("length", "content_filter"):
        status = "incomplete"
    assert final["type"] == f"response.{status}" and final["response"]["status"] == status
    async with relay.session.get(f"{relay.url}/v1/responses/{final['response']['id']}", headers=OPENAI_HEADERS) as r:
        assert r.status == 200
        obj = await r.json()
    for output in (final["response"]["output"], obj["output"]):
        calls = [{"id": i["call_id"], "name": i["name"], "arguments": i["arguments"]}
                 for i in output if i["type"] == "function_call"]  # fmt: skip
        assert calls == w["tool_calls"]
        reasoning = [i for i in output if i["type"] == "reasoning"]
        if w["reasoning"] or w["reasoning_content"]:
            assert reasoning[0]["content"] == [
                {"type": "reasoning_text", "text": w["reasoning"] or w["reasoning_content"]}
            ]
        else:
            assert reasoning == []
    if want["usage"] is not None and want["outcome"]["status"] == "done":
        assert obj["usage"]["input_tokens"] == want["usage"]["prompt_tokens"]
        assert obj["usage"]["output_tokens"] == want["usage"]["completion_tokens"]


@pytest.mark.parametrize("name", CORPUS)
async def test_chat_completions_face(relay: Relay, name: str) -> None:
    want = expected(name)
    w = want["choices"][0]
    base = {"model": f"quirks:{name}", "messages": [{"role": "user", "content": "hello"}], "stream": True}
    # stored: what its client is streamed, and the stored object
    async with relay.session.post(relay.url + "/v1/chat/completions", data=orjson.dumps({**base, "store": True}),
                                  headers=OPENAI_HEADERS) as r:  # fmt: skip
        assert r.status == 200
        chunks = [orjson.loads(e.data) for e in parse_sse((await r.read()).decode())
                  if e.event is None and e.data != "[DONE]"]  # fmt: skip
    sent = [orjson.loads(x) for x in upstream_events(name) if x != "[DONE]"]
    assert streamed_text(chunks) == streamed_text([c for c in sent if "error" not in c])
    if want["outcome"]["status"] == "done":  # (only completions that end well are stored)
        (stored,) = await _stored(relay)  # this relay's only one
        async with relay.session.get(f"{relay.url}/v1/chat/completions/{stored['id']}", headers=OPENAI_HEADERS) as r:
            assert r.status == 200
            obj = await r.json()
        check_message(obj["choices"][0], w)
    # passed through (not stored), usage asked for: the upstream's bytes unchanged, its usage in the ledger
    before = len(ledger(relay))
    passed = {**base, "store": False, "stream_options": {"include_usage": True}}
    async with relay.session.post(relay.url + "/v1/chat/completions", data=orjson.dumps(passed),
                                  headers=OPENAI_HEADERS) as r:  # fmt: skip
        assert r.status == 200
        got = await r.read()
    assert got == (ROOT / "relay" / "quirks" / f"{name}.sse").read_bytes()
    await until(lambda: len(ledger(relay)) > before, what="the pass-through's ledger line")
    line = ledger(relay)[-1]
    if want["outcome"]["status"] == "done" and name != "groq-x-groq":  # (Groq's usage is inside x_groq)
        check_usage(line, want["usage"])


async def _stored(relay: Relay) -> list[dict[str, Any]]:
    async with relay.session.get(relay.url + "/v1/chat/completions", headers=OPENAI_HEADERS) as r:
        assert r.status == 200
        return (await r.json())["data"]
