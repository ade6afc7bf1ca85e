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
import shutil
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from . import ledger, status
from .assemble import Assembler
from .paths import RequestPath, parse_marker_name
from .store import DONE_DATA, EventLog, Reserve, read_json, read_json_under, write_all, write_atomic

log = logging.getLogger("relay.recovery")


def marker_dir(data_dir: Path) -> Path:
    return data_dir / "running"


def _marker(data_dir: Path, rp: RequestPath) -> Path:
    # the name alone says which request it is (`1_r_pub_2026_…_<id>.json`), so the file needs no
    # atomic rename: a plain create is ~6 times cheaper on ext4, and a torn webhook URL is all a crash
    # could cost
    return marker_dir(data_dir) / rp.marker_name


def running_ids(data_dir: Path) -> set[str]:
    """Ids of the requests that have a marker (running now, or interrupted by a crash)."""
    return {rp.request_id for p in marker_dir(data_dir).glob("*.json") if (rp := parse_marker_name(p.name))}


def write_marker(data_dir: Path, rp: RequestPath, webhook_url: str | None, key: str = ledger.OPEN) -> None:
    directory = marker_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(_marker(data_dir, rp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, orjson.dumps({"webhook_url": webhook_url, "key": key}))
    finally:
        os.close(fd)


def remove_marker(data_dir: Path, rp: RequestPath) -> None:
    try:
        os.unlink(_marker(data_dir, rp))
    except FileNotFoundError:
        pass


def repair_event_log(path: Path) -> tuple[int, list[tuple[str | None, bytes]]]:
    """Cut a torn last event off the log; return its size and its events as (name, data)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0, []
    end = data.rfind(b"\n\n")
    keep = data[: end + 2] if end >= 0 else b""
    if len(keep) != len(data):
        with open(path, "r+b") as fh:
            fh.truncate(len(keep))
            fh.flush()
            os.fsync(fh.fileno())
    events: list[tuple[str | None, bytes]] = []
    for event in keep.split(b"\n\n"):
        name = None
        for line in event.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode("utf-8", "replace")
            elif line.startswith(b"data: "):
                events.append((name, line[6:]))
    return len(keep), events


class Unsafe(Exception):
    """A request's files are not ones the relay would have made (a symlink, a non-regular file)."""


def _check_no_symlinks(data_dir: Path, rp: RequestPath) -> None:
    """Refuse a request whose path below the data directory holds a symlink (or a non-directory)."""
    current = data_dir
    for part in rp.base.split("/")[:-1]:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            raise Unsafe(f"{current} is not a plain directory")
    for ext in ("json", "txt", "raw"):
        try:
            st = os.lstat(rp.file(data_dir, ext))
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            raise Unsafe(f"{rp.file(data_dir, ext)} is not a regular file")


class Replay(Protocol):
    """A face's log format, rebuilt from a log it wrote (see `LogFormats`)."""

    def completion(self, model: str) -> dict[str, Any] | None: ...  # the answer its events amount to

    def closing(self, doc: dict[str, Any]) -> list[tuple[bytes, str | None]]: ...  # its closing events


# Each face that writes its own log format gives the app one function: for a status document and the
# events of its log, the format rebuilt, or None when the request is not one of that face's. Recovery
# tries them in turn, so it reads a request's format from what is on disk without knowing the faces.
LogFormats = Sequence[Callable[[dict[str, Any], list[tuple[str | None, bytes]]], Replay | None]]


def repair(
    data_dir: Path,
    node_id: int,
    public_url: str,
    now: float | None = None,
    reserve: Reserve | None = None,
    formats: LogFormats = (),
    released: Callable[[RequestPath], None] | None = None,
) -> list[tuple[RequestPath, dict[str, Any], str | None]]:
    """Finish every request a previous run left running. Returns (request, final status, webhook URL)
    of each. `public_url` is the base of the `response_raw_url` it adds; `formats` are the faces' log
    formats (see `LogFormats`); `released` is told of each request ended, before its marker is removed
    (as `JobManager.on_released`: an OSError keeps the marker for the next start).

    Never raises: a marker that cannot be repaired now (disk full or read-only) stays for the next
    start; one whose files are damaged beyond repair, or not the relay's own, is moved to
    `running/quarantine/` with one log line. The reserve is given back first, so that a full disk
    still has room for the repairs."""
    directory = marker_dir(data_dir)
    try:
        markers = sorted(p for p in directory.glob("*.json") if p.is_file())
    except OSError as exc:
        log.error("cannot read running markers in %s: %s", directory, exc.strerror)
        return []
    if not markers:
        return []
    if reserve is not None:
        reserve.release()
    run = _Run(data_dir, node_id, public_url, time.time() if now is None else now, formats, released)
    # the lines a crashed run wrote just before it died (its end's day: the start's, or the day after)
    parsed = [(marker, parse_marker_name(marker.name)) for marker in markers]
    known = {rp.request_id: rp for _, rp in parsed if rp is not None}
    days = {ledger.day_of(rp.created.timestamp() + d * 86400) for rp in known.values() for d in (0, 1)}
    try:
        run.ledgered = ledger.present(data_dir, set(known), days)
    except OSError as exc:
        log.error("cannot read the usage ledger (%s): repaired requests' lines may be missing", exc.strerror)
        run.ledgered = set(known)
    repaired = []
    for marker, rp in parsed:
        if rp is None or rp.node_id != node_id:
            _quarantine(marker, "its name is not a request of this node")
        elif (done := _repair_marker(run, marker, rp)) is not None:
            repaired.append(done)
    if repaired:
        log.warning("marked %d request(s) interrupted by the previous run as ended", len(repaired))
    return repaired


@dataclass
class _Run:
    """One start's repairs: where, and what they share."""

    data_dir: Path
    node_id: int
    public_url: str
    now: float
    formats: LogFormats
    released: Callable[[RequestPath], None] | None = None
    ledgered: set[str] = field(default_factory=set)  # requests whose ledger line is already written


def _repair_marker(run: _Run, marker: Path, rp: RequestPath) -> tuple[RequestPath, dict[str, Any], str | None] | None:
    """Repair the request of one marker and remove the marker; None when nothing was repaired (or it
    cannot be now: the marker then stays for the next start)."""
    try:
        info = read_json(marker)
        info = info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        info = {}
    webhook_url = info.get("webhook_url") if isinstance(info.get("webhook_url"), str) else None
    key = info.get("key") if isinstance(info.get("key"), str) else ledger.OPEN
    try:
        _check_no_symlinks(run.data_dir, rp)
    except Unsafe as exc:  # not files the relay made: left exactly as they are
        _quarantine(marker, f"{type(exc).__name__}: {str(exc)[:200]!r}")
        return None
    except OSError as exc:
        log.error("cannot repair request %s now (%s); it is retried at the next start", rp.request_id, exc.strerror)
        return None
    try:
        try:
            doc, final = _repair_one(run, rp)
        except OSError:
            raise
        except Exception as exc:  # damaged beyond repair: the originals set aside, the request ended anyway
            why = f"{type(exc).__name__}: {str(exc)[:200]!r}"
            doc = final = _end_damaged(run.data_dir, rp, run.public_url, run.now, why)
            _quarantine(marker, why, keep=True)
        if final is not None and rp.request_id not in run.ledgered:
            line = ledger.entry(final, request_id=rp.request_id, node=run.node_id, key=key, path=rp.base,
                                ttft=None, now=run.now)  # fmt: skip
            ledger.append(run.data_dir, line, durable=True)
        if final is not None and run.released is not None:
            run.released(rp)
    except OSError as exc:
        log.error("cannot repair request %s now (%s); it is retried at the next start", rp.request_id, exc.strerror)
        return None
    try:
        marker.unlink(missing_ok=True)
    except OSError as exc:
        log.error("cannot remove the running marker of %s: %s", rp.request_id, exc.strerror)
    return (rp, doc, webhook_url) if doc is not None else None


def _quarantine(marker: Path, why: str, keep: bool = False) -> None:
    """Set a marker aside (it is not repaired again), with one log line saying why. `keep`: a copy (the
    request was ended anyway, and its marker is removed by the caller)."""
    target = marker.parent / "quarantine"
    try:
        target.mkdir(exist_ok=True)
        if keep:
            shutil.copyfile(marker, target / marker.name)
        else:
            os.replace(marker, target / marker.name)
        log.error("quarantined running marker %s: %s", marker.name, why)
    except OSError as exc:
        log.error("cannot quarantine running marker %s (%s): %s", marker.name, why, exc.strerror)


def _repair_one(run: _Run, rp: RequestPath) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Finish one request. Returns (the status it now has if this repaired it, else None; its terminal
    status either way, None when it never had one)."""
    data_dir, public_url, now = run.data_dir, run.public_url, run.now
    try:
        doc = read_json_under(data_dir, rp.rel("json"))
    except FileNotFoundError:
        return None, None  # the crash came before the status existed: nothing was promised to anyone
    if not isinstance(doc, dict):
        raise ValueError("the status file is not a JSON object")
    txt = rp.file(data_dir, "txt")
    is_stream = txt.exists()
    size, events = repair_event_log(txt) if is_stream else (0, [])
    responses = _replayed(run.formats, doc, events)
    if doc.get("status") in status.TERMINAL:
        if is_stream:  # the crash came between the terminal status and the log's last event
            err = doc.get("error") if isinstance(doc.get("error"), dict) else {}
            error = (str(err.get("code")), str(err.get("message"))) if err else None
            _append_ending(txt, size, events, str(doc["status"]), error, doc, responses)
        return None, doc
    assembler = Assembler()
    for name, data in events:
        if name is None and data != DONE_DATA:
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(chunk, dict):
                assembler.add(chunk)
    stated = status.stated_ending(events) if is_stream else None
    state, error = stated if stated else ("error", status.INTERRUPTED)
    raw_path = rp.file(data_dir, "raw")
    if not raw_path.exists():
        write_atomic(raw_path, b"".join(b"data: " + d + b"\n\n" for name, d in events if name is None), True)
    model = (doc.get("parameters") or {}).get("model", "")
    model = model if isinstance(model, str) else ""
    if assembler.chunks:
        status.response_body(doc, assembler.completion(model))
    elif responses is not None and (rebuilt := responses.completion(model)) is not None:
        status.response_body(doc, rebuilt)
    request_at = (doc.get("request") or {}).get("request_at")
    since = float(request_at) if isinstance(request_at, (int, float)) else now
    status.finish(doc, state, error, now=now, since=since, raw_url=rp.url(public_url, "raw"))
    write_atomic(rp.file(data_dir, "json"), orjson.dumps(doc), True)
    if is_stream and stated is None:
        _append_ending(txt, size, events, state, error, doc, responses)
    return doc, doc


def _end_damaged(data_dir: Path, rp: RequestPath, public_url: str, now: float, why: str) -> dict[str, Any]:
    """End a request whose files cannot be repaired (a status that is not a status document, a log that
    cannot be replayed, a bug): its damaged status is copied to `running/quarantine/files/` for inspection,
    and a new terminal status says what happened, with the text its log still holds when that can be
    read; its log gets the ending's last events. No request stays `queued` or `streaming` after a start.
    A private request's tokens lived in the damaged status: nobody can open it any more (403), which is
    safer than opening it to anyone."""
    kept = marker_dir(data_dir) / "quarantine" / "files"
    kept.mkdir(parents=True, exist_ok=True)
    status_file = rp.file(data_dir, "json")
    try:
        shutil.copyfile(status_file, kept / f"{rp.request_id}.json")
    except FileNotFoundError:
        pass
    txt = rp.file(data_dir, "txt")
    is_stream = txt.exists()
    size, events = repair_event_log(txt) if is_stream else (0, [])
    endpoints = {"status_url": rp.url(public_url, "json")}
    if is_stream:
        endpoints["stream_events_url"] = rp.url(public_url, "txt")
    created = int(rp.created.timestamp())
    doc: dict[str, Any] = {
        "status": "error",
        "created_at": created,
        "conversation_id": rp.request_id,
        "README": status.README["error"],
        "authorization": {"access": "private" if rp.access == "prv" else "public"},
        "endpoints": endpoints,
        "request": {
            "endpoint": None,
            "request_at": created,
            "finished_at": 0,
            "processed_at": 0,
            "request_time": 0.0,
            "total_time": 0.0,
        },  # fmt: skip
        "response": {},
    }
    assembler = Assembler()
    try:
        for name, data in events:
            if name is None and data != DONE_DATA:
                chunk = orjson.loads(data)
                if isinstance(chunk, dict):
                    assembler.add(chunk)
        if assembler.chunks:
            status.response_body(doc, assembler.completion(""))
            orjson.dumps(doc)
    except Exception:
        doc["response"] = {}
    error = ("interrupted", "the relay stopped while this request was running, and its files were damaged "
             f"beyond repair ({why[:120]}); what could be kept is here")  # fmt: skip
    status.finish(doc, "error", error, now=now, since=created)
    write_atomic(status_file, orjson.dumps(doc), True)
    if is_stream and not (events and events[-1][1] == DONE_DATA):
        _append_ending(txt, size, events, "error", error, doc)
    return doc


def _replayed(formats: LogFormats, doc: dict[str, Any], events: list[tuple[str | None, bytes]]) -> Replay | None:
    """The face's log format the request's log was written in; None for the relay's own."""
    for replay in formats:
        if (found := replay(doc, events)) is not None:
            return found
    return None


def _append_ending(
    txt: Path,
    size: int,
    events: list[tuple[str | None, bytes]],
    state: str,
    error: tuple[str, str] | None,
    doc: dict[str, Any],
    responses: Replay | None = None,
) -> None:
    """Append the ending's last events to a log that lacks them (never a second `[DONE]`): the relay's
    own, or the closing Responses events of a Responses request."""
    if events and events[-1][1] == DONE_DATA:
        return
    if state == "error" and error is None:
        error = status.INTERRUPTED
    log_file = EventLog(txt, size)
    try:
        log_file.append(status.ending_events(state, error) if responses is None else responses.closing(doc))
        log_file.sync()
    finally:
        log_file.close()
