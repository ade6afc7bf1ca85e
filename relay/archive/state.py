"""The archive's state on local disk, under `<data_dir>/archive/`; every write atomic (temp file + rename).

    pending/<marker>.json   a request to upload: {"base", "ended", "due", "attempts", "error", "bytes"},
                            written (durably) when the request has ended, removed once it is archived
    records/<base>.json     an archived request (same dated path as its files): {"manifest": …,
                            "archived_at", "stamps": {ext: [inode, mtime_ns]}, "local": bool}, written
                            durably once every file was read back and matched
    keep/<marker>.json      local copies to remove at {"due"} (when `keep_local_hours` is a number)

`<marker>` is the request's path with `_` for `/` (`RequestPath.marker_name`). A kill -9 at any point
leaves a state the next start resumes from: an entry of pending/ is uploaded again unless its record
exists, and a record is never written before its verification.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from ..paths import RequestPath, parse_marker_name, parse_request_path
from ..store import write_atomic


@dataclass
class Pending:
    base: str
    ended: float  # when it was handed over (the backlog's age counts from here)
    due: float  # not uploaded before this
    attempts: int = 0
    error: str | None = None
    bytes: int = 0


def request_of(base: str) -> RequestPath | None:
    parsed = parse_request_path("/" + base + ".json")
    return parsed[0] if parsed else None


class State:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.pending_dir = root / "pending"
        self.records_dir = root / "records"
        self.keep_dir = root / "keep"

    def create(self) -> None:
        for d in (self.pending_dir, self.records_dir, self.keep_dir):
            d.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _marker(base: str) -> str:
        return base.replace("/", "_") + ".json"

    # pending/

    def save_pending(self, p: Pending, durable: bool = True) -> None:
        self.pending_dir.mkdir(parents=True, exist_ok=True)  # (`ended` may come before `start`)
        write_atomic(self.pending_dir / self._marker(p.base), orjson.dumps(asdict(p)), durable=durable)

    def drop_pending(self, base: str) -> None:
        (self.pending_dir / self._marker(base)).unlink(missing_ok=True)

    def load_pending(self) -> list[Pending]:
        """Every pending entry; a damaged one is made anew from its name (uploaded at once)."""
        out = []
        for name in sorted(os.listdir(self.pending_dir)):
            rp = parse_marker_name(name)
            if rp is None:
                continue
            try:
                doc = orjson.loads((self.pending_dir / name).read_bytes())
                p = Pending(**{k: doc[k] for k in ("base", "ended", "due", "attempts", "error", "bytes")})
                if p.base != rp.base:
                    raise ValueError(name)
            except (OSError, ValueError, KeyError, TypeError):
                p = Pending(rp.base, ended=os.path.getmtime(self.pending_dir / name), due=0)
            out.append(p)
        return out

    # records/

    def record_path(self, base: str) -> Path:
        return self.records_dir / (base + ".json")

    def read_record(self, base: str) -> dict[str, Any] | None:
        try:
            doc = orjson.loads(self.record_path(base).read_bytes())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except ValueError:  # damaged (a disk error): as if not archived, so it is uploaded again
            return None
        return doc if isinstance(doc, dict) else None

    def write_record(self, base: str, doc: dict[str, Any], durable: bool = True) -> None:
        path = self.record_path(base)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, orjson.dumps(doc), durable=durable)

    def drop_record(self, base: str) -> None:
        self.record_path(base).unlink(missing_ok=True)

    def expired_records(self, cutoff: float, batch: int) -> list[str]:
        """Up to `batch` archived requests created before `cutoff` (epoch seconds), oldest first."""
        limit = datetime.fromtimestamp(math.ceil(cutoff), tz=timezone.utc)
        out: list[str] = []
        for node in _digits(self.records_dir):
            for access in ("pub", "prv"):
                for second_dir in _dated_dirs(self.records_dir / node / "r" / access, limit):
                    for name in sorted(os.listdir(second_dir)):
                        if name.endswith(".json") and not name.startswith("."):
                            out.append(str(second_dir.relative_to(self.records_dir) / name[: -len(".json")]))
                            if len(out) >= batch:
                                return out
        return out

    # keep/

    def save_keep(self, base: str, due: float) -> None:
        write_atomic(self.keep_dir / self._marker(base), orjson.dumps({"due": due}), durable=True)

    def drop_keep(self, base: str) -> None:
        (self.keep_dir / self._marker(base)).unlink(missing_ok=True)

    def load_keep(self) -> list[tuple[float, str]]:
        out = []
        for name in os.listdir(self.keep_dir):
            rp = parse_marker_name(name)
            if rp is None:
                continue
            try:
                due = float(orjson.loads((self.keep_dir / name).read_bytes())["due"])
            except (OSError, ValueError, KeyError, TypeError):
                due = 0.0  # damaged: due at once (the record decides whether anything is removed)
            out.append((due, rp.base))
        return out


def _digits(directory: Path) -> list[str]:
    try:
        with os.scandir(directory) as entries:
            return sorted(e.name for e in entries if e.name.isdigit() and e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _dated_dirs(access_dir: Path, cutoff: datetime) -> Iterator[Path]:
    """Second folders (…/YYYY/MM/DD/HH/mm/SS) before `cutoff`, oldest first; newer subtrees are skipped."""
    limits = (cutoff.year, cutoff.month, cutoff.day, cutoff.hour, cutoff.minute, cutoff.second)

    def walk(directory: Path, depth: int, before: bool) -> Iterator[Path]:
        for name in _digits(directory):
            value = int(name)
            if not before and value > limits[depth]:
                break
            older = before or value < limits[depth]
            if depth == 5:
                if older:
                    yield directory / name
            else:
                yield from walk(directory / name, depth + 1, older)

    yield from walk(access_dir, 0, False)


def remove_empty_parents(directory: Path, stop: Path) -> None:
    """rmdir `directory` and its parents below `stop` while they are empty (records only)."""
    while directory != stop and stop in directory.parents:
        try:
            os.rmdir(directory)
        except OSError:
            return
        directory = directory.parent
