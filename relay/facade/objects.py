"""The Response object and its output items, built from a request's status document and assembled
answer, for a GET and for the stream's last event alike, so both always agree. Pure data."""

from __future__ import annotations

from typing import Any

from .. import ledger

MAX_CALLS = 128  # tool calls in one answer: each is an output item with events of its own at the end
STATUS = {"queued": "queued", "streaming": "in_progress", "processing": "in_progress", "done": "completed",
          "error": "failed", "stop": "cancelled"}  # fmt: skip
WEBHOOK_EVENT = {"completed": "response.completed", "failed": "response.failed",
                 "cancelled": "response.cancelled", "incomplete": "response.incomplete"}  # fmt: skip


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


def message_item(response_id: str, text: str, refusal: str | None, status: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if text or not refusal:
        content.append({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    if refusal:
        content.append({"type": "refusal", "refusal": refusal})
    return {"type": "message", "id": item_ids(response_id)[0], "status": status, "role": "assistant",
            "content": content}  # fmt: skip


def call_item(response_id: str, index: int, call: dict[str, Any], status: str) -> dict[str, Any]:
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
        items.append(message_item(response_id, text, refusal, status))
    for i, call in enumerate(message.get("tool_calls") or ()):
        if isinstance(call, dict):
            items.append(call_item(response_id, i, call, "completed" if final else "in_progress"))
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
