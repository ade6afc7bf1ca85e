"""Hypothesis strategies for upstream streams: the grammar of the provider corpus, then broken.

`streams()` draws a whole upstream answer as the scripted upstream sends it (`tests/scripted.py`): chunks
shaped like the providers' (content, reasoning, refusals, tool calls by index or by id, usage, logprobs,
provider extras), each possibly mutated (any JSON path given a wrong type: null, string, number,
negative, float, huge, list, object; fields dropped or duplicated), framed with any line end, with or
without the space after `data:`, with comments and blank lines, with or without `[DONE]`, cut off
anywhere, split into blocks at any points, sent chunked or not, compressed or not, ending cleanly,
reset, stalled or with garbled chunked framing.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

from hypothesis import strategies as st

from .scripted import Script

WRONG = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=6),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.just([]),
    st.just({}),
    st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.sampled_from(["index", "id", "type", "x"]), st.one_of(st.none(), st.integers()), max_size=2),
)
WORDS = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
INDEX = st.one_of(st.integers(min_value=0, max_value=2), st.none(), st.just(-1), st.just(2**40), st.just(1.5))
CALL_ID = st.sampled_from(["call_a", "call_b", "call_c", "", None])


@st.composite
def tool_call(draw: st.DrawFn) -> dict[str, Any]:
    call: dict[str, Any] = {}
    if draw(st.booleans()):
        call["index"] = draw(INDEX)
    if draw(st.booleans()):
        call["id"] = draw(CALL_ID)
    if draw(st.booleans()):
        call["type"] = "function"
    fn: dict[str, Any] = {}
    if draw(st.booleans()):
        fn["name"] = draw(st.sampled_from(["get_weather", "lookup", ""]))
    fn["arguments"] = draw(st.sampled_from(['{"city": ', '"Paris"}', "{}", "", '{"q": 1}']))
    call["function"] = fn
    if draw(st.integers(0, 9)) == 0:
        call["extra_content"] = {"google": {"thought_signature": "c2ln"}}
    return call


@st.composite
def delta(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (
        ("role", st.just("assistant")),
        ("content", st.one_of(WORDS, st.none())),
        ("reasoning", WORDS),
        ("reasoning_content", st.one_of(WORDS, st.none())),
        ("refusal", WORDS),
        ("tool_calls", st.lists(tool_call(), min_size=1, max_size=3)),
        ("reasoning_details", st.just([{"type": "reasoning.text", "text": "t"}])),
    ):
        if draw(st.integers(0, 3)) == 0:
            out[key] = draw(value)
    if draw(st.integers(0, 9)) == 0:  # Mistral's typed parts
        out["content"] = [{"type": "thinking", "thinking": [{"type": "text", "text": draw(WORDS)}]},
                          {"type": "text", "text": draw(WORDS)}]  # fmt: skip
    return out


USAGE = st.fixed_dictionaries(
    {"prompt_tokens": st.integers(0, 500), "completion_tokens": st.integers(0, 500)},
    optional={"total_tokens": st.integers(0, 1000), "completion_tokens_details": st.just({"reasoning_tokens": 3})},
)


@st.composite
def chunk(draw: st.DrawFn) -> dict[str, Any]:
    c: dict[str, Any] = {"id": "chatcmpl-fz", "object": "chat.completion.chunk", "created": 1767225600, "model": "m"}
    shape = draw(st.sampled_from(["delta", "delta", "delta", "finish", "usage", "filter", "extras"]))
    if shape == "usage":
        c["choices"] = []
        c["usage"] = draw(USAGE)
    elif shape == "filter":  # Azure: prompt filter results, or an asynchronous-filter chunk without delta
        c["choices"] = draw(st.sampled_from([[], [{"index": 0, "finish_reason": None, "content_filter_offsets": {}}]]))
        c["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": {}}]
    else:
        choice: dict[str, Any] = {"index": draw(st.sampled_from([0, 0, 0, 1])), "delta": draw(delta())}
        choice["finish_reason"] = (
            draw(st.sampled_from(["stop", "length", "tool_calls", "content_filter", "error"]))
            if shape == "finish"
            else None
        )
        if draw(st.integers(0, 5)) == 0:
            choice["logprobs"] = {"content": [{"token": "a", "logprob": -0.1, "top_logprobs": []}]}
        c["choices"] = [choice]
        if shape == "extras":
            c[draw(st.sampled_from(["x_groq", "timings", "obfuscation", "usage"]))] = draw(
                st.one_of(st.just({"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}), WRONG)
            )
    return c


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _set(value: Any, path: tuple[Any, ...], new: Any, drop: bool) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        copy = dict(value)
        if drop and not rest:
            copy.pop(head, None)
        else:
            copy[head] = _set(copy[head], rest, new, drop)
        return copy
    copy_list = list(value)
    if drop and not rest:
        del copy_list[head]
    else:
        copy_list[head] = _set(copy_list[head], rest, new, drop)
    return copy_list


@st.composite
def broken_chunk(draw: st.DrawFn) -> str:
    """One chunk's JSON text, with up to three of its paths given a wrong value or dropped, and maybe a
    member duplicated (the first copy wrong: JSON parsers keep the last, or the last wrong)."""
    value: Any = draw(chunk())
    for _ in range(draw(st.integers(0, 3))):
        paths = _paths(value)
        path = draw(st.sampled_from(paths[1:])) if len(paths) > 1 else ()
        value = _set(value, path, draw(WRONG), drop=bool(path) and draw(st.integers(0, 3)) == 0)
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    if isinstance(value, dict) and value and draw(st.integers(0, 5)) == 0:
        key = draw(st.sampled_from(sorted(value)))
        extra = f"{json.dumps(key)}: {json.dumps(draw(WRONG))}"
        text = "{" + extra + ", " + text[1:] if draw(st.booleans()) else text[:-1] + ", " + extra + "}"
    return text


@st.composite
def body(draw: st.DrawFn) -> bytes:
    """The bytes of an SSE body: events, comments, blank lines, any line end, maybe [DONE], maybe cut."""
    end = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    events: list[str] = []
    if draw(st.integers(0, 4)) == 0:
        events.append(": OPENROUTER PROCESSING")
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.integers(0, 6)) == 0:
            events.append(draw(st.sampled_from([": keep-alive", "event: message", "id: 7", "retry: 100", ""])))
        prefix = "data:" if draw(st.integers(0, 4)) == 0 else "data: "
        events.append(prefix + draw(broken_chunk()))
    if draw(st.integers(0, 3)):
        events.append("data: [DONE]")
    data = "".join(e + end + end for e in events).encode()
    if draw(st.integers(0, 9)) == 0 and data:
        data = data[: draw(st.integers(0, len(data) - 1))]  # cut off anywhere
    if draw(st.integers(0, 19)) == 0:
        data = draw(st.binary(max_size=64)) + data  # bytes that are not UTF-8 or not SSE before it
    return data


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return [b for b in out if b]


@st.composite
def streams(draw: st.DrawFn, ends: tuple[str, ...] = ("close", "close", "close", "abort", "hang", "garbled")) -> Script:
    data = draw(body())
    headers = [("Content-Type", "text/event-stream")]
    if draw(st.integers(0, 14)) == 0:
        headers = [("Content-Type", "text/event-stream"), ("Content-Encoding", "gzip")]
        data = gzip.compress(data)
    elif draw(st.integers(0, 19)) == 0:
        headers = [("Content-Type", draw(st.sampled_from(["application/json", "text/plain", ""])))]
    blocks = _split(data, draw(st.lists(st.integers(0, max(len(data), 1)), max_size=6)))
    end = draw(st.sampled_from(ends))
    if end in ("hang", "garbled") and not blocks:
        blocks = [b": first bytes\n\n"]  # a stall is noticed after the first bytes (before them: the timeout)
    return Script(blocks=blocks, headers=headers, chunked=draw(st.booleans()) or end == "garbled", end=end)
