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


class Assembler:
    """Builds the `chat.completion` that the chunks of a stream add up to."""

    def __init__(self) -> None:
        self.meta: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: Any = None
        self.chunks = 0
        self.text_chars = 0  # characters of content received, all choices (an estimate of tokens so far)

    def add(self, chunk: dict[str, Any]) -> None:
        self.chunks += 1
        if not self.meta:
            for key in ("id", "created", "model", "system_fingerprint", "service_tier"):
                if key in chunk:
                    self.meta[key] = chunk[key]
        elif chunk.get("system_fingerprint") and "system_fingerprint" not in self.meta:
            self.meta["system_fingerprint"] = chunk["system_fingerprint"]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            if not isinstance(index, int):
                index = 0
            slot = self.choices.get(index)
            if slot is None:
                slot = self.choices[index] = {
                    "role": None,
                    "content": [],
                    "refusal": [],
                    "tool_calls": {},
                    "finish_reason": None,
                    "logprobs": None,
                }
            delta = choice.get("delta") or {}
            if isinstance(delta, dict):
                if delta.get("role"):
                    slot["role"] = delta["role"]
                if isinstance(delta.get("content"), str):
                    slot["content"].append(delta["content"])
                    self.text_chars += len(delta["content"])
                if isinstance(delta.get("refusal"), str):
                    slot["refusal"].append(delta["refusal"])
                for call in delta.get("tool_calls") or ():
                    if isinstance(call, dict):
                        self._add_tool_call(slot["tool_calls"], call)
            if choice.get("finish_reason"):
                slot["finish_reason"] = choice["finish_reason"]
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict):
                merged = slot["logprobs"] or {}
                for key in ("content", "refusal"):
                    if isinstance(logprobs.get(key), list):
                        merged.setdefault(key, []).extend(logprobs[key])
                slot["logprobs"] = merged

    @staticmethod
    def _add_tool_call(calls: dict[int, dict[str, Any]], call: dict[str, Any]) -> None:
        index = call.get("index", len(calls))
        slot = calls.get(index)
        if slot is None:
            slot = calls[index] = {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
        if call.get("id"):
            slot["id"] = call["id"]
        if call.get("type"):
            slot["type"] = call["type"]
        fn = call.get("function") or {}
        if isinstance(fn, dict):
            if isinstance(fn.get("name"), str):
                slot["function"]["name"] += fn["name"]
            if isinstance(fn.get("arguments"), str):
                slot["function"]["arguments"] += fn["arguments"]

    def all_finished(self) -> bool:
        return bool(self.choices) and all(c["finish_reason"] for c in self.choices.values())

    def completion(self, default_model: str) -> dict[str, Any]:
        """The assembled `chat.completion` (also used, unfinished, while streaming)."""
        choices = []
        for index in sorted(self.choices):
            slot = self.choices[index]
            content = "".join(slot["content"])
            message: dict[str, Any] = {
                "role": slot["role"] or "assistant",
                "content": None if slot["tool_calls"] and not content else content,
            }
            if slot["refusal"]:
                message["refusal"] = "".join(slot["refusal"])
            if slot["tool_calls"]:
                message["tool_calls"] = [slot["tool_calls"][i] for i in sorted(slot["tool_calls"])]
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": slot["logprobs"],
                    "finish_reason": slot["finish_reason"],
                }
            )
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
        if self.usage is not None:
            body["usage"] = self.usage
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
