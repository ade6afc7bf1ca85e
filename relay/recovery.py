"""Running markers, and repairing the requests a crash left unfinished.

Every running request has a marker file `<data_dir>/running/<its path, / as _>.json` (holding its
webhook URL, if any), created before the POST answers and removed once the request's terminal
state is on disk. After a crash (kill -9, power loss, OOM) the markers that remain are exactly the
interrupted requests, so the next start repairs them without scanning the whole data directory:
a torn last event is cut off, the status becomes `error` / `interrupted` with the text received so
far, `event: error` and `[DONE]` are appended, and a `.raw` is rebuilt from the logged chunks.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import orjson

from .assemble import Assembler
from .paths import RequestPath, parse_request_path
from .store import DONE_DATA, EventLog, read_json, write_all, write_json_atomic
from .texts import README

log = logging.getLogger("relay.recovery")

INTERRUPTED_MESSAGE = "the relay stopped (crash or kill) while this request was running"


def marker_dir(data_dir: Path) -> Path:
    return data_dir / "running"


def _marker(data_dir: Path, rp: RequestPath) -> Path:
    # the name alone says which request it is (`1_r_pub_2026_…_<id>.json`), so the file needs no
    # atomic rename: a plain create is ~6 times cheaper on ext4, and a torn webhook URL is all a crash
    # could cost
    return marker_dir(data_dir) / (rp.base.replace("/", "_") + ".json")


def running_ids(data_dir: Path) -> set[str]:
    """Ids of the requests that have a marker (running now, or interrupted by a crash)."""
    return {p.name[: -len(".json")].rsplit("_", 1)[-1] for p in marker_dir(data_dir).glob("*.json")}


def write_marker(data_dir: Path, rp: RequestPath, webhook_url: str | None) -> None:
    directory = marker_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(_marker(data_dir, rp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, orjson.dumps({"webhook_url": webhook_url}))
    finally:
        os.close(fd)


def remove_marker(data_dir: Path, rp: RequestPath) -> None:
    try:
        os.unlink(_marker(data_dir, rp))
    except FileNotFoundError:
        pass


def repair_event_log(path: Path) -> tuple[int, list[bytes]]:
    """Cut a torn last event off the log; return its size and the data of its events."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0, []
    end = data.rfind(b"\n\n")
    keep = data[: end + 2] if end >= 0 else b""
    if len(keep) != len(data):
        with open(path, "r+b") as fh:
            fh.truncate(len(keep))
    datas = []
    for event in keep.split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(b"data: "):
                datas.append(line[6:])
    return len(keep), datas


def repair(data_dir: Path, node_id: int, now: float | None = None) -> list[tuple[dict[str, Any], str | None]]:
    """Finish every request a previous run left running. Returns (final status, webhook URL) of each."""
    directory = marker_dir(data_dir)
    if not directory.is_dir():
        return []
    now = time.time() if now is None else now
    repaired = []
    for marker in sorted(directory.glob("*.json")):
        parsed = parse_request_path("/" + marker.name[: -len(".json")].replace("_", "/") + ".json")
        try:
            info = read_json(marker)
            info = info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            info = {}
        if parsed is None or parsed[0].node_id != node_id:
            log.warning("ignoring unreadable running marker %s", marker.name)
            marker.unlink(missing_ok=True)
            continue
        rp = parsed[0]
        doc = _repair_one(data_dir, rp, now)
        if doc is not None:
            repaired.append((doc, info.get("webhook_url")))
        marker.unlink(missing_ok=True)
    if repaired:
        log.warning("marked %d request(s) interrupted by the previous run as error/interrupted", len(repaired))
    return repaired


def _repair_one(data_dir: Path, rp: RequestPath, now: float) -> dict[str, Any] | None:
    status_path = rp.file(data_dir, "json")
    try:
        doc = read_json(status_path)
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    if doc.get("status") in ("done", "error", "stop"):
        _ensure_done(rp.file(data_dir, "txt"))  # the crash came between the status and the final event
        return None
    txt = rp.file(data_dir, "txt")
    is_stream = txt.exists()
    size, datas = repair_event_log(txt) if is_stream else (0, [])
    assembler = Assembler()
    for data in datas:
        if data != DONE_DATA:
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(chunk, dict):
                assembler.add(chunk)
    error = {"code": "interrupted", "message": INTERRUPTED_MESSAGE}
    raw_path = rp.file(data_dir, "raw")
    if not raw_path.exists():
        raw_path.write_bytes(b"".join(b"data: " + d + b"\n\n" for d in datas))
    if assembler.chunks:
        model = (doc.get("parameters") or {}).get("model", "")
        doc.setdefault("response", {})["body"] = assembler.completion(model)
    doc["status"] = "error"
    doc["README"] = README["error"]
    doc["error"] = error
    req = doc.setdefault("request", {})
    req["finished_at"] = int(now)
    req["total_time"] = round(now - float(req.get("request_at") or now), 3)
    endpoints = doc.setdefault("endpoints", {})
    endpoints.pop("stop_url", None)
    endpoints["response_raw_url"] = endpoints.get("status_url", "")[: -len(".json")] + ".raw"
    write_json_atomic(status_path, doc)
    if is_stream:
        events = EventLog(txt, size)
        try:
            events.append([(orjson.dumps({"error": error}), "error"), (DONE_DATA, None)])
        finally:
            events.close()
    return doc


def _ensure_done(txt: Path) -> None:
    if not txt.exists():
        return
    size, datas = repair_event_log(txt)
    if datas and datas[-1] == DONE_DATA:
        return
    events = EventLog(txt, size)
    try:
        events.append([(DONE_DATA, None)])
    finally:
        events.close()
