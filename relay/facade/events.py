"""The Responses API's stream events: for each upstream chunk, the events it amounts to
(`ResponsesFormat`, a log format handed to the job), each with the next `sequence_number`, and at the
end the events that close the open output items and state the outcome. Pure data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from ..assemble import ChoiceState
from ..store import DONE_DATA
from ..upstream import UpstreamError
from .objects import MAX_CALLS, call_item, message_item, output_items, reasoning_item, response_object, response_status

if TYPE_CHECKING:
    from ..jobs import Events, Job


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
                item = message_item(self.response_id, "", None, "in_progress")
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
                item = call_item(self.response_id, place, {"id": call["id"], "function": {
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
                    done = message_item(self.response_id, text, None, "incomplete")
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
