"""A Responses request into one chat-completions call upstream (`to_chat`), checked field by field; its
input items as the Response's `input_items`. Pure data. (The Response object: `objects`; the stream's
events: `events`.)
"""

from __future__ import annotations

from typing import Any

from .errors import OpenAIError

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
