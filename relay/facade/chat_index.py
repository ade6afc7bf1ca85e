"""The index of stored chat completions: `data_dir/openai/chat-completions.jsonl`, one line per stored
completion, per metadata update and per deletion, read once at start (and compacted then), kept in memory
for listing by owner."""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from .. import ledger
from .common import in_background

log = logging.getLogger("relay.openai")


class ChatIndex:
    """The stored chat completions of this node, for listing (see the module's docstring).

    Besides the entries by id, each owner's keys `(created, id)` are kept sorted, so a list call finds
    its place (`after`) by bisection and reads only that caller's entries, in order, until its page is
    full; a scan that filters many out gives the loop back every SCAN_STEP entries."""

    SCAN_STEP = 2048

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "openai" / "chat-completions.jsonl"
        self.entries: dict[str, dict[str, Any]] = {}  # id → {id, created, model, owner, metadata}
        self._owned: dict[str, list[tuple[float, str]]] = {}  # owner → sorted (created, id)
        self._lock = asyncio.Lock()

    def load(self, max_age_days: float, now: float | None = None) -> int:
        """In a worker thread at start: the live entries; the file rewritten with only those."""
        cutoff = (time.time() if now is None else now) - max_age_days * 86400
        entries: dict[str, dict[str, Any]] = {}
        try:
            with ledger.open_regular(self.path) as fh:
                raw = fh.read()
        except FileNotFoundError:
            return 0
        lines = 0
        for line in raw.splitlines():
            lines += 1
            try:
                _apply(entries, orjson.loads(line))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a torn last line after a crash
        self.entries = {k: v for k, v in entries.items() if v["created"] >= cutoff}
        owned: dict[str, list[tuple[float, str]]] = {}
        for e in self.entries.values():
            owned.setdefault(e["owner"], []).append((e["created"], e["id"]))
        for keys in owned.values():
            keys.sort()
        self._owned = owned
        if lines > len(self.entries):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_bytes(b"".join(orjson.dumps({"op": "add", **e}) + b"\n" for e in self.entries.values()))
            os.replace(tmp, self.path)
        return len(self.entries)

    def _append(self, op: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o644)
        try:
            os.write(fd, orjson.dumps(op) + b"\n")
        finally:
            os.close(fd)

    def record(self, op: dict[str, Any]) -> None:
        """Apply `op` in memory at once, and append it to the file in the storage pool."""
        old = self.entries.get(op["id"])
        _apply(self.entries, op)
        new = self.entries.get(op["id"])
        if old is not None and new is not old:
            self._unlink(old)
        if new is not None and new is not old:
            bisect.insort(self._owned.setdefault(new["owner"], []), (new["created"], new["id"]))
        in_background(self._write(op))

    def _unlink(self, entry: dict[str, Any]) -> None:
        keys = self._owned.get(entry["owner"])
        if keys is None:
            return
        key = (entry["created"], entry["id"])
        i = bisect.bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            del keys[i]
        if not keys:
            del self._owned[entry["owner"]]

    async def _write(self, op: dict[str, Any]) -> None:
        """One line, in the order the changes were made (one write at a time)."""
        try:
            async with self._lock:
                await asyncio.to_thread(self._append, op)
        except OSError as exc:
            log.error("cannot write the chat completion index: %s", exc.strerror)

    def _expire(self, owner: str, cutoff: float) -> None:
        """Forget the owner's entries older than `cutoff` (the oldest come first); their files are the
        janitor's, and the file's lines go at the next start's compaction."""
        keys = self._owned.get(owner)
        if not keys or keys[0][0] >= cutoff:
            return
        end = bisect.bisect_left(keys, (cutoff, ""))
        for _, cid in keys[:end]:
            self.entries.pop(cid, None)
        del keys[:end]
        if not keys:
            del self._owned[owner]

    async def listed(
        self, owner: str, *, model: str | None, metadata: dict[str, str], max_age_days: float,
        after: str | None, limit: int, descending: bool,
    ) -> tuple[list[str], bool]:  # fmt: skip
        """The owner's ids that pass the filters, oldest first (or newest first), starting after the id
        `after` (none when `after` is not one of the owner's); at most `limit`, and whether more follow."""
        self._expire(owner, time.time() - max_age_days * 86400)
        last: tuple[float, str] | None = None
        if after is not None:
            entry = self.entries.get(after)
            if entry is None or entry["owner"] != owner:
                return [], False
            last = (entry["created"], entry["id"])
        found: list[str] = []
        while True:
            keys = self._owned.get(owner, [])
            if descending:
                end = len(keys) if last is None else bisect.bisect_left(keys, last)
                step = keys[max(0, end - self.SCAN_STEP) : end][::-1]
            else:
                start = 0 if last is None else bisect.bisect_right(keys, last)
                step = keys[start : start + self.SCAN_STEP]
            for key in step:
                e = self.entries[key[1]]
                if (model is None or e["model"] == model) and all(
                    e["metadata"].get(k) == v for k, v in metadata.items()
                ):
                    if len(found) == limit:
                        return found, True
                    found.append(e["id"])
            if len(step) < self.SCAN_STEP:
                return found, False
            last = step[-1]
            await asyncio.sleep(0)  # the loop's turn; the keys may change meanwhile, so the place is found again


def _apply(entries: dict[str, dict[str, Any]], op: dict[str, Any]) -> None:
    """One line of the index (added, metadata replaced, deleted), read back or made now."""
    kind, cid = op["op"], op["id"]
    if kind == "add":
        if not isinstance(op["created"], (int, float)):
            raise TypeError("created")
        entries[cid] = {k: op[k] for k in ("id", "created", "model", "owner", "metadata")}
    elif kind == "metadata" and cid in entries:
        entries[cid]["metadata"] = op["metadata"]
    elif kind == "delete":
        entries.pop(cid, None)


INDEX: web.AppKey[ChatIndex] = web.AppKey("chat_index")
