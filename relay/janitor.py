"""Expiry: removing requests older than `[retention] max_age_days`, and the date folders they leave empty.

The dated layout makes this cheap: folders are walked oldest first and a whole subtree is skipped as
soon as its date is newer than the cut-off, so a run reads only what it removes. Work is done in
bounded batches in a worker thread, so the event loop keeps serving. A running request is never
removed (its id is skipped), and a reader in the middle of a file keeps reading: on POSIX an unlinked
file stays readable through the descriptor that reader already holds; only new readers get 404, which
the serving code answers for expired URLs anyway.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("relay.janitor")

EXTENSIONS = (".json", ".txt", ".raw")


@dataclass
class Report:
    requests: int = 0
    files: int = 0
    bytes: int = 0
    folders: int = 0
    skipped_running: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, other: Report) -> None:
        self.requests += other.requests
        self.files += other.files
        self.bytes += other.bytes
        self.folders += other.folders
        self.skipped_running += other.skipped_running
        self.errors += other.errors


def _expired_second_dirs(access_dir: Path, cutoff: datetime) -> Iterator[Path]:
    """Second-level folders (…/YYYY/MM/DD/HH/mm/SS) whose time is before `cutoff`, oldest first."""
    limits = (cutoff.year, cutoff.month, cutoff.day, cutoff.hour, cutoff.minute, cutoff.second)

    def walk(directory: Path, depth: int, prefix_before: bool) -> Iterator[Path]:
        try:  # plain directories only: a symlink is never walked into (it could lead out of the data dir)
            with os.scandir(directory) as entries:
                names = sorted(e.name for e in entries if e.name.isdigit() and e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return
        for name in names:
            value = int(name)
            before = prefix_before or value < limits[depth]
            if not prefix_before and value > limits[depth]:
                break  # sorted: everything after is newer
            if depth == 5:
                if before:
                    yield directory / name
                continue
            yield from walk(directory / name, depth + 1, before)

    yield from walk(access_dir, 0, False)


def _remove_empty_parents(directory: Path, stop: Path, report: Report) -> None:
    while directory != stop and stop in directory.parents:
        try:
            os.rmdir(directory)
        except OSError:
            return  # not empty (or gone): its parents are not empty either
        report.folders += 1
        directory = directory.parent


def sweep(
    data_dir: Path,
    node_id: int,
    max_age_days: float,
    is_running: Callable[[str], bool],
    batch: int = 500,
    now: float | None = None,
) -> tuple[Report, bool]:
    """Remove up to `batch` expired requests. Returns the report and whether more may remain."""
    now = time.time() if now is None else now
    # a request of second S is expired when S < now - max_age; S is whole, so compare with the ceiling
    cutoff = datetime.fromtimestamp(math.ceil(now - max_age_days * 86400), tz=timezone.utc)
    report = Report()
    root = data_dir / str(node_id) / "r"
    for access in ("pub", "prv"):
        access_dir = root / access
        for second_dir in _expired_second_dirs(access_dir, cutoff):
            try:
                names = os.listdir(second_dir)
            except FileNotFoundError:
                continue
            ids = sorted({n.rsplit(".", 1)[0] for n in names if n.endswith(EXTENSIONS)})
            for request_id in ids:
                if is_running(request_id):
                    report.skipped_running += 1
                    continue
                if report.requests >= batch:
                    return report, True
                removed = False
                for ext in EXTENSIONS:
                    path = second_dir / (request_id + ext)
                    try:
                        size = path.lstat().st_size  # a symlink is removed itself, never its target
                        path.unlink()
                    except FileNotFoundError:
                        continue
                    except OSError as exc:
                        report.errors.append(f"{path}: {exc.strerror}")
                        continue
                    report.files += 1
                    report.bytes += size
                    removed = True
                report.requests += removed
            for name in names:  # temp files of writes that a crash interrupted
                if name.startswith(".") and name.endswith(".tmp"):
                    (second_dir / name).unlink(missing_ok=True)
            _remove_empty_parents(second_dir, access_dir, report)
    return report, False


async def run_once(
    data_dir: Path, node_id: int, max_age_days: float, is_running: Callable[[str], bool], batch: int = 500
) -> Report:
    """Sweep in batches (each in a worker thread) until nothing expired is left."""
    total = Report()
    while True:
        report, more = await asyncio.to_thread(sweep, data_dir, node_id, max_age_days, is_running, batch)
        total.add(report)
        if not more:
            break
        await asyncio.sleep(0)  # let the loop breathe between batches
    if total.requests or total.folders or total.errors:
        log.info(
            "janitor removed %d expired request(s): %d file(s), %d byte(s), %d empty folder(s)%s",
            total.requests,
            total.files,
            total.bytes,
            total.folders,
            f"; {len(total.errors)} error(s), first: {total.errors[0]}" if total.errors else "",
        )
    return total
