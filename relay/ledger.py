"""The usage ledger: one JSON line per finished request, in one small file per day, kept for months.

`<data_dir>/usage/YYYY-MM-DD.jsonl` (UTC day of the ending) gets a line at the end of every request,
whatever the ending (done, error, stop, interrupted), written before the request's running marker goes:
so a crash either leaves the marker (and the next start writes the line, once: it looks for the
request's id in that day's file first) or the line is there. The janitor keeps these files far longer
than conversations (`[retention] usage_max_age_months`, 13 by default), and nothing here needs the
conversation files: `relay.py usage` and the operator API read only the ledger.

A line: `{"t", "id", "node", "key", "model", "endpoint", "access", "outcome", "code", "prompt_tokens",
"completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens", "estimated", "ttft",
"duration", "path"}`. Token counts are the upstream's own `usage` when it reported one; otherwise an
estimate (about four characters a token, over the messages sent and the text received), with
`"estimated": true`. No message text, key or token is ever written here.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import stat
import time
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any

import orjson

from .config import ApiKey

OPEN = "open"  # the key name of requests made without a relay key (open loopback mode)


def key_label(key: ApiKey | None) -> str:
    """The name a key goes by in the ledger and the metrics: its configured name, else a short hash
    (never the key)."""
    if key is None:
        return OPEN
    if key.name:
        return key.name
    return "key-" + hashlib.sha256(key.key.encode()).hexdigest()[:8]


def open_regular(path: Path) -> IO[bytes]:
    """A file the relay keeps (a ledger day, the chat index), opened for reading. Anything else in its place
    (a FIFO, whose read would block the start for good, a device, a directory, a symlink) is as if absent:
    FileNotFoundError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENOTDIR, errno.ENXIO):
            raise FileNotFoundError(errno.ENOENT, f"not a regular file: {path}") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, f"not a regular file: {path}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def usage_dir(data_dir: Path) -> Path:
    return data_dir / "usage"


def day_of(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d")


def day_file(data_dir: Path, day: str) -> Path:
    return usage_dir(data_dir) / f"{day}.jsonl"


def _text_chars(value: Any, budget: int = 64 * 1024 * 1024) -> int:
    """Characters of text in messages (strings, and `text` parts of content arrays), bounded."""
    total = 0
    stack = [value]
    while stack and total < budget:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            for k in ("content", "text", "arguments", "refusal"):
                if k in item:
                    stack.append(item[k])
            if "tool_calls" in item:
                stack.append(item["tool_calls"])
            if "function" in item:
                stack.append(item["function"])
        elif isinstance(item, list):
            stack.extend(item)
    return total


def tokens(doc: dict[str, Any], messages: Any) -> dict[str, Any]:
    """Token counts of a finished request: the upstream's `usage` when its prompt and completion counts are
    non-negative integers (a total that is not one is their sum), else an estimate from the text."""
    body = (doc.get("response") or {}).get("body")
    usage = body.get("usage") if isinstance(body, dict) else None
    prompt, completion = (_int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))) if isinstance(
        usage, dict) else (None, None)  # fmt: skip
    if isinstance(usage, dict) and prompt is not None and completion is not None:
        details_in = usage.get("prompt_tokens_details") or {}
        details_out = usage.get("completion_tokens_details") or {}
        total = _int(usage.get("total_tokens"))
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": total if total is not None else prompt + completion,
            "cached_tokens": _int(details_in.get("cached_tokens")) if isinstance(details_in, dict) else None,
            "reasoning_tokens": _int(details_out.get("reasoning_tokens")) if isinstance(details_out, dict) else None,
            "estimated": False,
        }
    prompt = math.ceil(_text_chars(messages) / 4)
    choices = body.get("choices") if isinstance(body, dict) else None
    completion = (
        math.ceil(_text_chars([c.get("message") for c in choices if isinstance(c, dict)]) / 4)
        if isinstance(choices, list)
        else 0
    )
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cached_tokens": None,
        "reasoning_tokens": None,
        "estimated": True,
    }


MAX_TOKENS = 10**12  # a count above this is not a count: the upstream's usage is not taken


def _int(value: Any) -> int | None:
    """A token count the upstream reported: a non-negative integer of a plausible size, else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS else None


def entry(
    doc: dict[str, Any],
    *,
    request_id: str,
    node: int,
    key: str,
    path: str,
    ttft: float | None,
    now: float,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ledger line of a request whose terminal status is `doc`; `params`: the request's model and
    messages, when the caller has them parsed already (else the document's own `parameters`)."""
    if params is None:
        params = doc.get("parameters") if isinstance(doc.get("parameters"), dict) else {}
    request = doc.get("request") or {}
    error = doc.get("error") if isinstance(doc.get("error"), dict) else {}
    code = error.get("code") if isinstance(error.get("code"), str) else None
    model = params.get("model")
    outcome = str(doc.get("status"))
    if outcome == "error" and code == "interrupted":
        outcome = "interrupted"
    total = request.get("total_time")
    return {
        "t": round(now, 3),
        "id": request_id,
        "node": node,
        "key": key,
        "model": model if isinstance(model, str) else "",
        "endpoint": str(request.get("endpoint", "")),
        "access": str((doc.get("authorization") or {}).get("access", "public")),
        "outcome": outcome,
        "code": code,
        **tokens(doc, params.get("messages")),
        "ttft": round(ttft, 3) if ttft is not None else None,
        "duration": total if isinstance(total, (int, float)) else None,
        "path": path,
    }


def append(data_dir: Path, line: dict[str, Any], durable: bool) -> None:
    """Append one line to its day's file (O_APPEND: whole lines, even from several processes)."""
    directory = usage_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(day_file(data_dir, day_of(line["t"])), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o640)
    try:
        os.write(fd, orjson.dumps(line) + b"\n")
        if durable:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def present(data_dir: Path, ids: set[str], days: set[str]) -> set[str]:
    """Which of `ids` already have a line in these days' files: each file read once, line by line."""
    found: set[str] = set()
    if not ids:
        return found
    for day in sorted(days):
        try:
            with open_regular(day_file(data_dir, day)) as fh:
                for raw in fh:
                    start = raw.find(b'"id":"')
                    if start < 0:
                        continue
                    end = raw.find(b'"', start + 6)
                    value = raw[start + 6 : end].decode("ascii", "replace")
                    if value in ids:
                        found.add(value)
        except FileNotFoundError:
            continue
    return found


def days_between(since: date, until: date) -> Iterator[str]:
    d = since
    while d <= until:
        yield d.isoformat()
        d += timedelta(days=1)


NUMBERS = {"t": 1e11, "prompt_tokens": MAX_TOKENS, "completion_tokens": MAX_TOKENS, "total_tokens": MAX_TOKENS,
           "cached_tokens": MAX_TOKENS, "reasoning_tokens": MAX_TOKENS, "ttft": 1e9, "duration": 1e9}  # fmt: skip
TEXTS = ("id", "key", "model", "endpoint", "outcome")


def parse_line(raw: bytes) -> dict[str, Any] | None:
    """One ledger line, or None for a damaged one (torn by a crash mid-write, or edited by hand into
    something the relay never writes: a time or a count that is not a number in its range, a name that is
    not text), so that nothing summed or shown from the ledger can fail on it."""
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(line, dict) or not isinstance(line.get("t"), (int, float)):
        return None
    for key, top in NUMBERS.items():
        value = line.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= top
        ):
            return None
    if any(line.get(key) is not None and not isinstance(line[key], str) for key in TEXTS):
        return None
    return line


def read(data_dir: Path, since: date, until: date) -> Iterator[dict[str, Any]]:
    """Every line of the days from `since` to `until` (inclusive), oldest first; damaged lines skipped."""
    for day in days_between(since, until):
        try:
            with open_regular(day_file(data_dir, day)) as fh:
                for raw in fh:
                    if (line := parse_line(raw)) is not None:
                        yield line
        except FileNotFoundError:
            continue


def expired_files(data_dir: Path, max_age_months: int, now: float | None = None) -> list[Path]:
    """Ledger files older than `max_age_months` months (30.44 days each)."""
    now = time.time() if now is None else now
    cutoff = day_of(now - max_age_months * 30.44 * 86400)
    out = []
    try:
        for p in usage_dir(data_dir).glob("*.jsonl"):
            if p.stem < cutoff and len(p.stem) == 10:
                out.append(p)
    except OSError:
        return []
    return sorted(out)


def remove_expired(data_dir: Path, max_age_months: int, now: float | None = None) -> int:
    """Delete the ledger files older than `max_age_months`; returns how many went."""
    removed = 0
    for path in expired_files(data_dir, max_age_months, now):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed
