"""Parsing the upstream's event stream and assembling chunks into one `chat.completion`.

Kept apart from the job so that the hot path (one call per network read) is easy to see and to time.
"""

from __future__ import annotations

from typing import Any


class EventTooLarge(Exception):
    """An event (or a line) of the upstream's stream is larger than the parser's limit."""


class SSEParser:
    """Incremental server-sent-events parser: feed bytes, get the `data` of each complete event.

    Linear in what is fed: each byte is scanned once, an unterminated line is kept in a bytearray that
    grows by appending, and no event may exceed `max_event_bytes` (EventTooLarge), so an upstream that
    never ends a line costs bounded memory and no rescans. Lines end with LF, CRLF or a lone CR (a CR at
    the end of a read waits for the next one, in case it is half a CRLF); a leading BOM is skipped.
    """

    def __init__(self, max_event_bytes: int = 16 * 1024 * 1024) -> None:
        self.max_event_bytes = max_event_bytes
        self._line = bytearray()  # the unterminated last line
        self._data: list[bytes] = []
        self._size = 0  # bytes of data lines in the current event
        self._cr = False  # the last read ended with a CR
        self._started = False

    def feed(self, block: bytes) -> list[bytes]:
        if not self._started and block:
            if len(block) < 3 and b"\xef\xbb\xbf".startswith(block) and not self._line:
                self._line += block  # too short to tell: wait for more
                return []
            self._started = True
            if self._line:
                block, self._line = bytes(self._line) + block, bytearray()
            if block.startswith(b"\xef\xbb\xbf"):
                block = block[3:]
        if self._cr:
            block = b"\r" + block
            self._cr = False
        if block.endswith(b"\r"):
            block = block[:-1]
            self._cr = True
        if b"\r" in block:
            block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        out: list[bytes] = []
        start = 0
        nl = block.find(b"\n")
        if nl >= 0 and self._line:
            self._line += block[:nl]
            line = bytes(self._line)
            self._line.clear()
            self._line_done(line, out)
            start = nl + 1
            nl = block.find(b"\n", start)
        while nl >= 0:
            self._line_done(block[start:nl], out)
            start = nl + 1
            nl = block.find(b"\n", start)
        if start < len(block):
            self._line += block[start:]
            if len(self._line) + self._size > self.max_event_bytes:
                raise EventTooLarge(len(self._line) + self._size)
        return out

    def _line_done(self, line: bytes, out: list[bytes]) -> None:
        if not line:
            if self._data:
                out.append(b"\n".join(self._data))
                self._data = []
                self._size = 0
            return
        if line.startswith(b"data:"):
            value = line[5:]
            if value.startswith(b" "):
                value = value[1:]
            self._size += len(value) + 1
            if self._size > self.max_event_bytes:
                raise EventTooLarge(self._size)
            self._data.append(value)
        # comments (":"), "event:", "id:" and "retry:" lines carry nothing the relay needs

    def flush(self) -> list[bytes]:
        """Data of a last event that the upstream did not terminate with a blank line."""
        out: list[bytes] = []
        self._cr = False
        if self._line:
            line = bytes(self._line)
            self._line.clear()
            self._line_done(line, out)
        if self._data:
            out.append(b"\n".join(self._data))
            self._data = []
            self._size = 0
        return out


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _index(value: Any) -> int | None:
    """A usable index: a non-negative integer (not a bool); anything else is no index at all."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


META_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "created": (int,),
    "model": (str,),
    "system_fingerprint": (str,),
    "service_tier": (str,),
}


class ChoiceState:
    """What the deltas of one choice add up to. Every field holds only values of the type the
    `chat.completion` document gives it, whatever the upstream sent, so the assembled answer can always be
    built and encoded (a wrong type is ignored, never stored)."""

    __slots__ = ("role", "content", "reasoning", "reasoning_content", "reasoning_details", "refusal", "calls",
                 "by_index", "by_id", "finish_reason", "logprobs")  # fmt: skip

    def __init__(self) -> None:
        self.role: str | None = None
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.reasoning_content: list[str] = []
        self.reasoning_details: list[Any] = []
        self.refusal: list[str] = []
        self.calls: list[dict[str, Any]] = []  # in the order first seen
        self.by_index: dict[int, int] = {}  # a call's `index` → its place in `calls`
        self.by_id: dict[str, int] = {}  # a call's id → its place in `calls`
        self.finish_reason: str | None = None
        self.logprobs: dict[str, list[Any]] | None = None

    def add_content(self, content: Any) -> str:
        """Append `delta.content`: a string, or (Mistral) a list of typed parts (text, and thinking that
        goes to `reasoning`). Returns the answer text added."""
        if isinstance(content, str):
            self.content.append(content)
            return content
        added = ""
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    continue
                kind = part.get("type")
                if kind == "text" and isinstance(part.get("text"), str):
                    self.content.append(part["text"])
                    added += part["text"]
                elif kind == "thinking":
                    inner = part.get("thinking")
                    for piece in inner if isinstance(inner, list) else [inner]:
                        if isinstance(piece, str):
                            self.reasoning.append(piece)
                        elif isinstance(piece, dict) and isinstance(piece.get("text"), str):
                            self.reasoning.append(piece["text"])
        return added

    def add_delta(self, delta: dict[str, Any]) -> tuple[str, str, list[tuple[int, str]]]:
        """Take one `delta`. Returns what it added: answer text, reasoning text (`reasoning`, else
        `reasoning_content`: a provider that sends both sends the same text twice), and for each tool call
        delta its place and the arguments it added."""
        if isinstance(delta.get("role"), str) and delta["role"]:
            self.role = delta["role"]
        thinking = len(self.reasoning)
        text = self.add_content(delta["content"]) if "content" in delta else ""
        said = "".join(self.reasoning[thinking:])
        for key in ("reasoning", "reasoning_content", "refusal"):
            if isinstance(delta.get(key), str):
                getattr(self, key).append(delta[key])
        if isinstance(delta.get("reasoning"), str):
            said += delta["reasoning"]
        elif isinstance(delta.get("reasoning_content"), str):
            said += delta["reasoning_content"]
        if isinstance(delta.get("reasoning_details"), list):
            self.reasoning_details.extend(delta["reasoning_details"])
        calls: list[tuple[int, str]] = []
        if isinstance(delta.get("tool_calls"), list):
            for call in delta["tool_calls"]:
                if isinstance(call, dict):
                    calls.append(self.add_call(call))
        return text, said, calls

    def add_call(self, call: dict[str, Any]) -> tuple[int, str]:
        """One delta of a tool call. With an `index` (OpenAI), the call of that index, unless the delta
        brings an id other than that call's (a new call); without one (Gemini, Mistral), a call is named by
        its id: a new id starts a call, a known id continues it, and a delta without an id continues the
        last call."""
        index = _index(call.get("index"))
        cid = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else None
        place: int | None
        if index is not None:  # (a new id at a known index is a new call: Ollama gives parallel calls index 0)
            place = self.by_index.get(index)
            if place is None or (cid is not None and self.calls[place]["id"] not in (None, cid)):
                place = self.by_index[index] = self._new_call()
        elif cid is not None:
            place = self.by_id.get(cid)
            if place is None:
                place = self._new_call()
        else:
            place = len(self.calls) - 1 if self.calls else self._new_call()
        slot = self.calls[place]
        if cid is not None and slot["id"] is None:
            slot["id"] = cid
            self.by_id.setdefault(cid, place)
        if isinstance(call.get("type"), str) and call["type"]:
            slot["type"] = call["type"]
        fn = call.get("function")
        args = ""
        if isinstance(fn, dict):
            if isinstance(fn.get("name"), str):
                slot["function"]["name"] += fn["name"]
            if isinstance(fn.get("arguments"), str):
                args = fn["arguments"]
                slot["function"]["arguments"] += args
        if isinstance(call.get("extra_content"), dict):
            slot["extra_content"] = call["extra_content"]
        return place, args

    def _new_call(self) -> int:
        self.calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        return len(self.calls) - 1

    def add_logprobs(self, logprobs: dict[str, Any]) -> None:
        for key in ("content", "refusal"):
            if isinstance(logprobs.get(key), list):
                if self.logprobs is None:
                    self.logprobs = {}
                self.logprobs.setdefault(key, []).extend(logprobs[key])

    def message(self) -> dict[str, Any]:
        content = "".join(self.content)
        message: dict[str, Any] = {
            "role": self.role or "assistant",
            "content": None if self.calls and not content else content,
        }
        if self.reasoning:
            message["reasoning"] = "".join(self.reasoning)
        if self.reasoning_content:
            message["reasoning_content"] = "".join(self.reasoning_content)
        if self.reasoning_details:
            message["reasoning_details"] = self.reasoning_details
        if self.refusal:
            message["refusal"] = "".join(self.refusal)
        if self.calls:
            message["tool_calls"] = self.calls
        return message


class Assembler:
    """Builds the `chat.completion` that the chunks of a stream add up to, whatever shape each chunk has.

    The rules (docs/api.md, "Providers"): per choice, string deltas are concatenated (`content`, `refusal`,
    `reasoning`, `reasoning_content`; Mistral's typed content parts split into text and thinking); tool
    calls go by `index`, or by id when there is no index; the last `finish_reason` and the last `usage`
    win (cumulative usage counts once; Groq's `x_groq.usage` when there is no other). A value of the wrong
    type is ignored: no chunk can make the answer impossible to build.
    """

    def __init__(self) -> None:
        self.meta: dict[str, Any] = {}
        self.choices: dict[int, ChoiceState] = {}
        self.usage: dict[str, Any] | None = None
        self.side_usage: dict[str, Any] | None = None  # x_groq.usage, used when no chunk has a `usage`
        self.chunks = 0
        self.text_chars = 0  # characters of content received, all choices (an estimate of tokens so far)

    def add(self, chunk: dict[str, Any]) -> None:
        self.chunks += 1
        for key, types in META_TYPES.items():
            if key not in self.meta and isinstance(chunk.get(key), types) and not isinstance(chunk[key], bool):
                self.meta[key] = chunk[key]
        usage = chunk.get("usage")
        if isinstance(usage, dict) and usage:
            self.usage = usage
        groq = chunk.get("x_groq")
        if isinstance(groq, dict) and isinstance(groq.get("usage"), dict) and groq["usage"]:
            self.side_usage = groq["usage"]
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if isinstance(choice, dict):
                self._add_choice(choice)

    def _add_choice(self, choice: dict[str, Any]) -> None:
        index = _index(choice.get("index", 0))
        index = 0 if index is None else index
        slot = self.choices.get(index)
        if slot is None:
            slot = self.choices[index] = ChoiceState()
        delta = choice.get("delta")
        if isinstance(delta, dict):
            self.text_chars += len(slot.add_delta(delta)[0])
        if isinstance(choice.get("finish_reason"), str) and choice["finish_reason"]:
            slot.finish_reason = choice["finish_reason"]
        if isinstance(choice.get("logprobs"), dict):
            slot.add_logprobs(choice["logprobs"])

    def all_finished(self) -> bool:
        return bool(self.choices) and all(c.finish_reason for c in self.choices.values())

    def finish_reasons(self) -> list[str]:
        return [c.finish_reason for c in self.choices.values() if c.finish_reason]

    def completion(self, default_model: str) -> dict[str, Any]:
        """The assembled `chat.completion` (also used, unfinished, while streaming)."""
        choices = [
            {
                "index": index,
                "message": self.choices[index].message(),
                "logprobs": self.choices[index].logprobs,
                "finish_reason": self.choices[index].finish_reason,
            }
            for index in sorted(self.choices)
        ]
        body: dict[str, Any] = {
            "id": self.meta.get("id"),
            "object": "chat.completion",
            "created": self.meta.get("created"),
            "model": self.meta.get("model", default_model),
        }
        for key in ("system_fingerprint", "service_tier"):
            if key in self.meta:
                body[key] = self.meta[key]
        body["choices"] = choices
        usage = self.usage if self.usage is not None else self.side_usage
        if usage is not None:
            body["usage"] = usage
        return body


def assistant_message(body: Any) -> dict[str, Any] | None:
    """The first choice's message of a `chat.completion`, as a message to continue a conversation."""
    try:
        message = body["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(message, dict):
        return None
    out: dict[str, Any] = {"role": message.get("role") or "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        out["tool_calls"] = message["tool_calls"]
    return out
