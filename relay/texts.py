"""The human-readable sentences of the answers and status documents (one place, for every writer)."""

README = {
    "queued": "The request is queued and will start in a moment; this document updates as it runs.",
    "streaming": "The answer is streaming: open stream_events_url to receive it live; response.body here "
    "holds the text so far and is refreshed every second.",
    "processing": "The upstream is working on the answer; poll this status_url until status is done.",
    "done": "The answer is complete: response.body holds it.",
    "error": "The request failed: error.message says why, and response holds what the upstream sent.",
    "stop": "The request was stopped by its stop URL: response.body holds the text produced until then.",
}

STREAM_README = (
    "The `stream_events_url` endpoint below streams data sent by the ChatGPT API. Open it to receive incoming messages."
)
ASYNC_README = "The `status_url` endpoint below updates until the request is done. Poll it to get the result."

TERMINAL = frozenset({"done", "error", "stop"})  # the status values a request ends in; never changed after
