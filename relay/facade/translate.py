"""Responses ⇄ chat completions: the request, the Response object and the stream's events. Pure data.

A Responses request becomes one chat-completions call upstream (`to_chat`). The job then writes, for
each upstream chunk, the Responses events it amounts to (`ResponsesFormat`), each with the next
`sequence_number`, and at the end the events that close the open output items and state the outcome.
`response_object` builds the Response object from a request's status document and assembled answer,
for a GET and for the last event alike, so both always agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from .. import ledger
from ..assemble import ChoiceState
from ..store import DONE_DATA
from ..upstream import UpstreamError
from .errors import OpenAIError

if TYPE_CHECKING:
    from ..jobs import Events, Job

# Fields of POST /v1/responses: how each is taken. Anything else is refused by name.
FORWARDED = {"temperature": "temperature", "top_p": "top_p", "user": "user", "max_output_tokens": "max_tokens",
             "prompt_cache_key": "prompt_cache_key", "safety_identifier": "safety_identifier"}  # fmt: skip
TAKEN = {"model", "input", "instructions", "background", "stream", "store", "previous_response_id", "tools",
         "tool_choice", "text", "metadata", "parallel_tool_calls", "reasoning", "include", "truncation",
         "stream_options", "service_tier", *FORWARDED}  # fmt: skip
WHY_REFUSED = {
    "conversation": "conversations objects are not kept by this relay: chain with previous_response_id",
    "prompt": "stored prompts live on OpenAI's platform, not on this relay",
    "max_tool_calls": "the relay runs no built-in tools, so it cannot count their calls",
    "top_logprobs": "logprobs are not translated to Responses events by this relay",
    "context_management": "the relay does not compact conversations",
}
MAX_CALLS = 128  # tool calls in one answer: each is an output item with events of its own at the end
STATUS = {"queued": "queued", "streaming": "in_progress", "processing": "in_progress", "done": "completed",
          "error": "failed", "stop": "cancelled"}  # fmt: skip
WEBHOOK_EVENT = {"completed": "response.completed", "failed": "response.failed",
                 "cancelled": "response.cancelled", "incomplete": "response.incomplete"}  # fmt: skip


def _invalid(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"Invalid '{param}': {message}.", param=param, code="invalid_value")


def _unsupported(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"`{param}` is not supported by this relay: {message}", param=param,
                       code="unsupported_parameter")  # fmt: skip


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if (
                isinstance(part, dict)
                and part.get("type") in ("input_text", "output_text")
                and isinstance(part.get("text"), str)
            ):
                texts.append(part["text"])
            else:
                raise _invalid(f"{where}[{j}]", "must be a text part ({type: input_text|output_text, text})")
        return "".join(texts)
    raise _invalid(where, "must be a string or an array of content parts")


def _content(content: Any, where: str) -> Any:
    """A message's content for chat completions: text as it is, parts as chat parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid(where, "must be a string or an array of content parts")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image: dict[str, Any] = {"url": part["image_url"]}
            if part.get("detail") in ("low", "high", "auto"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        elif kind == "input_image":
            raise _unsupported(f"{where}[{j}].file_id", "send images as image_url (a URL or a data: URL)")
        elif kind == "input_file":
            raise _unsupported(f"{where}[{j}]", "input_file parts need OpenAI's file store; send the text instead")
        else:
            raise _invalid(f"{where}[{j}]", f"unknown content part type {str(kind)[:40]!r}")
    return parts


def input_messages(value: Any) -> list[dict[str, Any]]:
    """`input` (a string or items) as chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise _invalid("input", "must be a string or a non-empty array of input items")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _invalid(where, "must be an object")
        kind = item.get("type", "message")
        if kind == "message" and "role" in item:
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise _invalid(f"{where}.role", "must be user, assistant, system or developer")
            if role == "assistant":
                out.append({"role": "assistant", "content": _text_of(item.get("content"), f"{where}.content")})
            else:
                content = _content(item.get("content"), f"{where}.content")
                out.append({"role": "system" if role == "developer" else role, "content": content})
        elif kind == "function_call":
            call_id, name, args = item.get("call_id"), item.get("name"), item.get("arguments")
            if not (isinstance(call_id, str) and isinstance(name, str) and isinstance(args, str)):
                raise _invalid(where, "a function_call needs call_id, name and arguments (strings)")
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str):
                raise _invalid(f"{where}.call_id", "must be the call_id of the function call")
            out.append({"role": "tool", "tool_call_id": call_id, "content": _text_of(output, f"{where}.output")})
        elif kind == "message":
            raise _invalid(f"{where}.role", "a message item needs a role (user, assistant, system or developer)")
        elif kind == "reasoning":
            raise _unsupported(f"{where}.type", "reasoning items are produced by OpenAI's reasoning models "
                               "only; a chat-completions upstream cannot take them back")  # fmt: skip
        else:
            raise _unsupported(f"{where}.type", f"input items of type {str(kind)[:40]!r} (only messages, "
                               "function_call and function_call_output)")  # fmt: skip
    return out


def _tools(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _invalid("tools", "must be an array of tools")
    out = []
    for i, tool in enumerate(value):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise _unsupported(f"tools[{i}].type", f"built-in tools such as {str(kind)[:40]!r} run on OpenAI's "
                               "platform only; the relay passes function tools to any upstream")  # fmt: skip
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise _invalid(f"tools[{i}].name", "is required")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(value: Any) -> Any:
    if value in ("auto", "none", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
        return {"type": "function", "function": {"name": value["name"]}}
    raise _unsupported("tool_choice", "only auto, none, required or {type: function, name}")


def _text_format(text: Any) -> dict[str, Any] | None:
    if not isinstance(text, dict):
        raise _invalid("text", "must be an object")
    for key in text:
        if key not in ("format", "verbosity"):
            raise _unsupported(f"text.{key}", "only text.format is translated")
    if text.get("verbosity") not in (None, "medium"):
        raise _unsupported("text.verbosity", "chat-completions upstreams have no verbosity setting")
    fmt = text.get("format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema"), dict):
            raise _invalid("text.format", "a json_schema format needs a name and a schema")
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": schema}
    raise _invalid("text.format.type", "must be text, json_object or json_schema")


def check_fields(payload: dict[str, Any]) -> None:
    """Every field is one the relay takes; the others are refused by name (never dropped in silence)."""
    for key, value in payload.items():
        if key in TAKEN or value is None:
            continue
        if key in WHY_REFUSED:
            raise _unsupported(key, WHY_REFUSED[key])
        raise _unsupported(key, "not a Responses parameter the relay knows")
    include = payload.get("include")
    if include not in (None, []):
        raise _unsupported("include", "no includable output (logprobs, encrypted reasoning, tool results) is kept")
    reasoning = payload.get("reasoning")
    if reasoning is not None and (not isinstance(reasoning, dict) or set(reasoning) - {"effort"}):
        raise _unsupported("reasoning", "only reasoning.effort is passed on (as reasoning_effort); summaries "
                           "come from OpenAI's reasoning models only")  # fmt: skip
    if payload.get("truncation") not in (None, "disabled"):
        raise _unsupported("truncation", "the relay never cuts a conversation; only `disabled`")
    if payload.get("service_tier") not in (None, "auto", "default"):
        raise _unsupported("service_tier", "only auto or default")
    for flag in ("background", "stream", "store", "parallel_tool_calls"):
        if payload.get(flag) is not None and not isinstance(payload[flag], bool):
            raise _invalid(flag, "must be true or false")
    metadata = payload.get("metadata")
    if metadata is not None:
        check_metadata(metadata)


def check_metadata(metadata: Any) -> None:
    """OpenAI's rule: at most 16 pairs, keys up to 64 characters, values strings up to 512."""
    if not isinstance(metadata, dict) or len(metadata) > 16:
        raise _invalid("metadata", "must be an object of at most 16 string pairs")
    for k, v in metadata.items():
        if len(k) > 64 or not isinstance(v, str) or len(v) > 512:
            raise _invalid("metadata", "keys are strings of at most 64 characters, values of at most 512")


def to_chat(payload: dict[str, Any], default_model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The chat-completions body of a Responses request (without its history), and what the Response
    object repeats of the request."""
    check_fields(payload)
    if "input" not in payload:
        raise OpenAIError(400, "Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
    model = payload.get("model") or default_model
    if not isinstance(model, str) or len(model) > 256:
        raise _invalid("model", "must be a string")
    body: dict[str, Any] = {"model": model}
    for field, name in FORWARDED.items():
        if payload.get(field) is not None:
            body[name] = payload[field]
    tools = payload.get("tools")
    if tools:
        body["tools"] = _tools(tools)
        if payload.get("parallel_tool_calls") is not None:
            body["parallel_tool_calls"] = payload["parallel_tool_calls"]
    if payload.get("tool_choice") is not None:
        body["tool_choice"] = _tool_choice(payload["tool_choice"])
    response_format = _text_format(payload["text"]) if payload.get("text") is not None else None
    if response_format is not None:
        body["response_format"] = response_format
    if payload.get("reasoning") and payload["reasoning"].get("effort"):
        body["reasoning_effort"] = payload["reasoning"]["effort"]
    instructions = payload.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _invalid("instructions", "must be a string")
    text_cfg = payload.get("text") or {"format": {"type": "text"}}
    echo = {
        "model": model,
        "instructions": instructions,
        "background": bool(payload.get("background")),
        "store": payload.get("store", True) is not False,
        "metadata": payload.get("metadata") or {},
        "tools": tools or [],
        "tool_choice": payload.get("tool_choice") or "auto",
        "parallel_tool_calls": payload.get("parallel_tool_calls", True) is not False,
        "text": {"format": text_cfg.get("format") or {"type": "text"}},
        "temperature": payload.get("temperature"),
        "top_p": payload.get("top_p"),
        "max_output_tokens": payload.get("max_output_tokens"),
        "user": payload.get("user"),
        "previous_response_id": payload.get("previous_response_id"),
        "reasoning": payload.get("reasoning"),
    }
    return body, echo


def input_items(payload_input: Any, response_id: str) -> list[dict[str, Any]]:
    """The input as listed by GET …/input_items: items with ids, in the order given."""
    items = payload_input
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    out = []
    for i, item in enumerate(items):
        item = dict(item)
        item.setdefault("type", "message")
        if item["type"] == "message":
            content = item.get("content")
            if isinstance(content, str):
                kind = "output_text" if item.get("role") == "assistant" else "input_text"
                item["content"] = [{"type": kind, "text": content}]
            item.setdefault("status", "completed")
        item.setdefault("id", f"{'msg' if item['type'] == 'message' else 'item'}_{response_id[5:]}_in{i}")
        out.append(item)
    return out


# ----- the Response object --------------------------------------------------------------------------


def item_ids(response_id: str) -> tuple[str, str]:
    """The id of the answer's message item, and the prefix of its function-call items."""
    return f"msg_{response_id[5:]}", f"fc_{response_id[5:]}_"


def reasoning_item(response_id: str, text: str, status: str) -> dict[str, Any]:
    """The reasoning item of an answer whose upstream sent reasoning text (`reasoning`, `reasoning_content`,
    thinking parts): as OpenAI gives it for open-weight models, the text as `reasoning_text` content."""
    content = [{"type": "reasoning_text", "text": text}] if text else []
    return {"type": "reasoning", "id": f"rs_{response_id[5:]}", "summary": [], "content": content, "status": status}


def reasoning_of(message: dict[str, Any]) -> str:
    """The reasoning text of an assembled message (`reasoning`, else `reasoning_content`)."""
    for key in ("reasoning", "reasoning_content"):
        if isinstance(message.get(key), str) and message[key]:
            return message[key]
    return ""


def _message_item(response_id: str, text: str, refusal: str | None, status: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if text or not refusal:
        content.append({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    if refusal:
        content.append({"type": "refusal", "refusal": refusal})
    return {"type": "message", "id": item_ids(response_id)[0], "status": status, "role": "assistant",
            "content": content}  # fmt: skip


def _call_item(response_id: str, index: int, call: dict[str, Any], status: str) -> dict[str, Any]:
    fn = call.get("function") or {}
    return {"type": "function_call", "id": f"{item_ids(response_id)[1]}{index}", "call_id": call.get("id") or "",
            "name": fn.get("name") or "", "arguments": fn.get("arguments") or "", "status": status}  # fmt: skip


def output_items(response_id: str, completion: Any, final: bool) -> list[dict[str, Any]]:
    """The output items of the first choice of an assembled `chat.completion`."""
    try:
        choice = completion["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError):
        return []
    status = "completed" if final and choice.get("finish_reason") not in (None, "length") else (
        "incomplete" if final else "in_progress")  # fmt: skip
    items = []
    if not isinstance(message, dict):
        return []
    thought = reasoning_of(message)
    if thought:
        items.append(reasoning_item(response_id, thought, "completed" if final else "in_progress"))
    text = message.get("content") if isinstance(message.get("content"), str) else ""
    refusal = message.get("refusal") if isinstance(message.get("refusal"), str) else None
    if text or refusal or not message.get("tool_calls"):
        items.append(_message_item(response_id, text, refusal, status))
    for i, call in enumerate(message.get("tool_calls") or ()):
        if isinstance(call, dict):
            items.append(_call_item(response_id, i, call, "completed" if final else "in_progress"))
    return items


def usage_of(doc: dict[str, Any], messages: Any, final: bool) -> dict[str, Any] | None:
    """Responses usage: the upstream's, else (at the end) an estimate marked `estimated: true`."""
    t = ledger.tokens(doc, messages)
    if not final and t["estimated"]:
        return None
    usage: dict[str, Any] = {
        "input_tokens": t["prompt_tokens"] or 0,
        "input_tokens_details": {"cached_tokens": t["cached_tokens"] or 0},
        "output_tokens": t["completion_tokens"] or 0,
        "output_tokens_details": {"reasoning_tokens": t["reasoning_tokens"] or 0},
        "total_tokens": t["total_tokens"] or 0,
    }
    if t["estimated"]:
        usage["estimated"] = True
    return usage


def response_status(doc: dict[str, Any]) -> str:
    state = STATUS.get(doc.get("status", ""), "in_progress")
    if state == "completed":
        finish = _finish_reason(doc)
        if finish in ("length", "content_filter"):
            return "incomplete"
    return state


def _finish_reason(doc: dict[str, Any]) -> Any:
    try:
        return doc["response"]["body"]["choices"][0]["finish_reason"]
    except (KeyError, IndexError, TypeError):
        return None


def response_object(doc: dict[str, Any], messages: Any) -> dict[str, Any]:
    """The Response object of a request, from its status document (`openai` section, status, answer)."""
    oa = doc["openai"]
    echo = oa["echo"]
    response_id = oa["id"]
    status = response_status(doc)
    final = status not in ("queued", "in_progress")
    body = (doc.get("response") or {}).get("body")
    error = None
    if status == "failed":
        err = doc.get("error") or {}
        error = {"code": "server_error", "message": f"{err.get('code', 'error')}: {err.get('message', '')}"}
    incomplete = None
    if status == "incomplete":
        reason = "max_output_tokens" if _finish_reason(doc) == "length" else "content_filter"
        incomplete = {"reason": reason}
    obj: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": doc.get("created_at"),
        "status": status,
        "background": echo["background"],
        "error": error,
        "incomplete_details": incomplete,
        "instructions": echo["instructions"],
        "max_output_tokens": echo["max_output_tokens"],
        "model": (body.get("model") if isinstance(body, dict) else None) or echo["model"],
        "output": output_items(response_id, body, final) if isinstance(body, dict) else [],
        "parallel_tool_calls": echo["parallel_tool_calls"],
        "previous_response_id": echo["previous_response_id"],
        "reasoning": echo["reasoning"] or {"effort": None, "summary": None},
        "store": echo["store"],
        "temperature": echo["temperature"],
        "text": echo["text"],
        "tool_choice": echo["tool_choice"],
        "tools": echo["tools"],
        "top_p": echo["top_p"],
        "truncation": "disabled",
        "usage": usage_of(doc, messages, final),
        "user": echo["user"],
        "metadata": echo["metadata"],
    }
    if final:
        obj["completed_at"] = (doc.get("request") or {}).get("finished_at")
    return obj


# ----- the stream's events --------------------------------------------------------------------------


class ResponsesFormat:
    """Writes a Responses request's event log: one or more events per upstream chunk, each with the
    next `sequence_number` (`type` first, `sequence_number` second: `store.seq_offset` reads it there)."""

    def __init__(self, response_id: str, messages: list[dict[str, Any]]) -> None:
        self.response_id = response_id
        self.messages = messages  # the conversation sent upstream (for a usage estimate)
        self.seq = 0
        self.items: list[dict[str, Any]] = []  # open output items, in output_index order
        self.message: dict[str, Any] | None = None  # the message item, once text has come
        self.reasoning: dict[str, Any] | None = None  # the reasoning item, once reasoning text has come
        self.calls: dict[int, dict[str, Any]] = {}  # a tool call's place (see `ChoiceState`) → its item
        self.tracker = ChoiceState()  # the first choice's deltas, to place index-less tool calls as the status does
        self._ending: Events | None = None
        self._ending_for: tuple[Any, ...] = ()  # the ending that `_ending` closes (see `closing`)
        self._closing_from = 0  # the number of the first closing event

    def _event(self, kind: str, **fields: Any) -> tuple[bytes, str]:
        data = orjson.dumps({"type": kind, "sequence_number": self.seq, **fields})
        self.seq += 1
        return data, kind

    @classmethod
    def replayed(cls, response_id: str, messages: Any, events: list[tuple[str | None, bytes]]) -> ResponsesFormat:
        """The state a log's events leave (crash recovery: the log is all that is left of a run)."""
        fmt = cls(response_id, messages if isinstance(messages, list) else [])
        for _, data in events:
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(event, dict) or not isinstance(event.get("sequence_number"), int):
                continue
            fmt.seq = event["sequence_number"] + 1
            kind = event.get("type")
            if kind == "response.output_item.added" and isinstance(event.get("item"), dict):
                state = {"index": len(fmt.items), "item": event["item"], "text": [], "args": []}
                fmt.items.append(state)
                if event["item"].get("type") == "message":
                    fmt.message = state
                elif event["item"].get("type") == "reasoning":
                    fmt.reasoning = state
                else:
                    fmt.calls[len(fmt.calls)] = state
            elif kind == "response.output_text.delta" and fmt.message is not None:
                fmt.message["text"].append(str(event.get("delta", "")))
            elif kind == "response.reasoning_text.delta" and fmt.reasoning is not None:
                fmt.reasoning["text"].append(str(event.get("delta", "")))
            elif kind == "response.function_call_arguments.delta":
                for state in fmt.items:
                    if state["item"].get("id") == event.get("item_id"):
                        state["args"].append(str(event.get("delta", "")))
        return fmt

    def completion(self, model: str) -> dict[str, Any] | None:
        """What the events so far amount to, as a `chat.completion` (for a repaired status document)."""
        if not self.items:
            return None
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.message["text"]) if self.message else None,
        }
        calls = [{"id": s["item"].get("call_id"), "type": "function", "function": {"name": s["item"].get("name", ""),
                  "arguments": "".join(s["args"])}} for s in self.calls.values()]  # fmt: skip
        if calls:
            message["tool_calls"] = calls
        if self.reasoning is not None:
            message["reasoning"] = "".join(self.reasoning["text"])
        return {"id": None, "object": "chat.completion", "created": None, "model": model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": None}]}  # fmt: skip

    def _lifecycle(self, kind: str, job: Job) -> tuple[bytes, str]:
        return self._event(kind, response=response_object(job.doc, self.messages))

    def opening(self, job: Job) -> Events:
        return [self._lifecycle("response.created", job), self._lifecycle("response.queued", job)]

    def started(self, job: Job) -> Events:
        return [self._lifecycle("response.in_progress", job)]

    def _open(self, out: Events, item: dict[str, Any]) -> dict[str, Any]:
        state = {"index": len(self.items), "item": item, "text": [], "args": []}
        self.items.append(state)
        out.append(self._event("response.output_item.added", output_index=state["index"], item=item))
        return state

    def chunk(self, line: bytes, chunk: dict[str, Any]) -> Events:
        out: Events = []
        choices = chunk.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
        delta = choice.get("delta") if choice is not None else None
        if not isinstance(delta, dict):
            return out
        text, thought, calls = self.tracker.add_delta(delta)
        if thought:
            if self.reasoning is None:
                item = reasoning_item(self.response_id, "", "in_progress")
                self.reasoning = self._open(out, item)
                part = {"type": "reasoning_text", "text": ""}
                out.append(self._event("response.content_part.added", item_id=item["id"],
                                       output_index=self.reasoning["index"], content_index=0, part=part))  # fmt: skip
            self.reasoning["text"].append(thought)
            out.append(self._event("response.reasoning_text.delta", item_id=self.reasoning["item"]["id"],
                                   output_index=self.reasoning["index"], content_index=0, delta=thought))  # fmt: skip
        if text:
            if self.message is None:
                item = _message_item(self.response_id, "", None, "in_progress")
                item["content"] = []
                self.message = self._open(out, item)
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                out.append(self._event("response.content_part.added", item_id=item["id"],
                                       output_index=self.message["index"], content_index=0, part=part))  # fmt: skip
            self.message["text"].append(text)
            out.append(self._event("response.output_text.delta", item_id=self.message["item"]["id"],
                                   output_index=self.message["index"], content_index=0, delta=text,
                                   logprobs=[]))  # fmt: skip
        for place, args in calls:
            state = self.calls.get(place)
            if state is None:
                if len(self.calls) >= MAX_CALLS:
                    raise UpstreamError("upstream_invalid_response", f"the upstream sent more than {MAX_CALLS} tool "
                                        "calls in one answer")  # fmt: skip
                call = self.tracker.calls[place]
                item = _call_item(self.response_id, place, {"id": call["id"], "function": {
                    "name": call["function"]["name"], "arguments": ""}}, "in_progress")  # fmt: skip
                state = self.calls[place] = self._open(out, item)
            if args:
                state["args"].append(args)
                out.append(self._event("response.function_call_arguments.delta", item_id=state["item"]["id"],
                                       output_index=state["index"], delta=args))  # fmt: skip
        return out

    def ending(self, job: Job, status: str, error: tuple[str, str] | None) -> Events:
        return self.closing(job.doc)

    def closing_at(self, job: Job, offsets: list[int]) -> None:
        """Where the closing events will start, after the first one's number: kept in the stored
        authorization object, in the status document's first bytes (`serve.read_auth`), so that a resume
        searches only the small events before them, and finds one among them (each may repeat the whole
        answer) without reading it (`store.seq_offset`)."""
        job.doc["authorization"]["log_tail"] = [self._closing_from, *offsets]

    def closing(self, doc: dict[str, Any]) -> Events:
        """Close the open items (with what the assembled answer holds), then the outcome of the final
        `doc`; computed once per ending, so a retried write of the ending appends the same events (and
        their places, recorded in the status first, hold)."""
        ending_for = (doc.get("status"), orjson.dumps(doc.get("error")))
        if self._ending is not None:
            if ending_for == self._ending_for:
                return self._ending
            self.seq = self._closing_from  # a different ending (internal_error after a failed write): renumbered
        self._closing_from = self.seq
        out: Events = []
        body = (doc.get("response") or {}).get("body")
        final_items = {item["id"]: item for item in output_items(self.response_id, body, True)} if isinstance(
            body, dict) else {}  # fmt: skip
        for state in self.items:
            item = state["item"]
            done = final_items.get(item["id"])
            if item["type"] == "reasoning":
                text = "".join(state["text"])
                if done is None:
                    done = reasoning_item(self.response_id, text, "incomplete")
                part = done["content"][0] if done["content"] else {"type": "reasoning_text", "text": text}
                out.append(self._event("response.reasoning_text.done", item_id=item["id"],
                                       output_index=state["index"], content_index=0, text=part["text"]))  # fmt: skip
                out.append(self._event("response.content_part.done", item_id=item["id"],
                                       output_index=state["index"], content_index=0, part=part))  # fmt: skip
            elif item["type"] == "message":
                text = "".join(state["text"])
                if done is None:
                    done = _message_item(self.response_id, text, None, "incomplete")
                part = next((p for p in done["content"] if p["type"] == "output_text"), None) or {
                    "type": "output_text", "text": text, "annotations": [], "logprobs": []}  # fmt: skip
                out.append(self._event("response.output_text.done", item_id=item["id"], output_index=state["index"],
                                       content_index=0, text=part["text"], logprobs=[]))  # fmt: skip
                out.append(self._event("response.content_part.done", item_id=item["id"],
                                       output_index=state["index"], content_index=0, part=part))  # fmt: skip
            else:
                if done is None:
                    done = {**item, "arguments": "".join(state["args"]), "status": "incomplete"}
                out.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                       output_index=state["index"], name=done["name"],
                                       arguments=done["arguments"]))  # fmt: skip
            out.append(self._event("response.output_item.done", output_index=state["index"], item=done))
        final = response_status(doc)
        kind = {"completed": "response.completed", "failed": "response.failed"}.get(final, "response.incomplete")
        out.append(self._event(kind, response=response_object(doc, self.messages)))  # (cancelled: incomplete)
        out.append((DONE_DATA, None))
        self._ending, self._ending_for = out, ending_for
        return out


def replay_responses(doc: dict[str, Any], events: list[tuple[str | None, bytes]]) -> ResponsesFormat | None:
    """For crash recovery (`recovery.LogFormats`): the Responses format of a request of the Responses API,
    rebuilt from the events of its log; None for any other request."""
    oa = doc.get("openai")
    if not isinstance(oa, dict) or oa.get("object") != "response":
        return None
    return ResponsesFormat.replayed(str(oa.get("id")), (doc.get("parameters") or {}).get("messages"), events)
