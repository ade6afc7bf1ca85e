"""What the relay's file operations cost on a file system: CPU per status rewrite and per log append.

    .venv/bin/python bench/fs_cost.py /var/tmp /dev/shm [more directories]

For each directory: 100 status documents of 3 KB rewritten in turn for 3 s with the relay's own
`write_atomic` (a temporary file, its write, a rename over the old one: what the once-a-second status
refresh does for every running request), and 100,000 appends of one ~170-byte event to an event log (one
`write`, what each upstream read costs the log). Prints the process's CPU per operation. On an ext4
without a journal, creating a file is far dearer than on one with a journal (the allocator skips the
inodes deleted in the last seconds, which it must then scan past), which is why this is worth knowing
about the disk a relay runs on.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from relay.store import write_atomic  # noqa: E402


def status_rewrite_us(directory: Path, seconds: float = 3.0) -> float:
    files = [directory / f"{i}.json" for i in range(100)]
    data = b'{"status":"streaming","response":{"body":"' + b"x" * 3000 + b'"}}'
    for f in files:
        write_atomic(f, data)
    count, cpu0, until = 0, time.process_time(), time.monotonic() + seconds
    while time.monotonic() < until:
        for f in files:
            write_atomic(f, data)
        count += len(files)
    return (time.process_time() - cpu0) / count * 1e6


def append_us(directory: Path, count: int = 100_000) -> float:
    fd = os.open(directory / "log.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    event = b"id: 1234567\ndata: " + b"x" * 150 + b"\n\n"
    cpu0 = time.process_time()
    try:
        for _ in range(count):
            os.write(fd, event)
    finally:
        os.close(fd)
    return (time.process_time() - cpu0) / count * 1e6


def main() -> None:
    for name in sys.argv[1:] or ["/var/tmp"]:
        with tempfile.TemporaryDirectory(prefix="relay-fs-", dir=name) as tmp:
            rewrite = status_rewrite_us(Path(tmp))
            append = append_us(Path(tmp))
        print(f"{name}: {rewrite:.1f} µs of CPU per status rewrite, {append:.2f} µs per log append")


if __name__ == "__main__":
    main()
