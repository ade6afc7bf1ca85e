"""The files: atomic status writes, the append-only event log, reading from an offset.

Event ids are byte offsets: an event's `id:` is the offset in the `.txt` file at which that event
starts. That makes ids stable across restarts, unique, ordered, and lets a reader resume after any id
by reading just that one event (to find where it ends) instead of the file from the start. An id is
valid only if the file holds `id: <n>\\n` at offset n, so a made-up id is recognised and refused.

Small writes (events) are plain synchronous writes: they hit the page cache in microseconds, and a
thread hop per write would cost more than the write. Status documents and the `.raw` body are written
in a worker thread; the ending of a request is made durable there (fsync) before its marker goes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

DONE_DATA = b"[DONE]"
MAX_EVENT_SCAN = 16 * 1024 * 1024  # no single event is larger than this

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a write failed because the disk (or the quota) is full


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _discard(tmp: Path) -> None:
    """Remove a temp file left by a failed write (a full disk must not fill up with them)."""
    try:
        os.unlink(tmp)
    except OSError:
        pass


def write_json_atomic(path: Path, doc: Any) -> None:
    """Replace `path` with the JSON of `doc`: temp file + rename, so no reader sees a torn document."""
    write_atomic(path, orjson.dumps(doc))


def write_atomic(path: Path, data: bytes, durable: bool = False, sync_parent: bool = True) -> None:
    """Replace `path` with `data` (temp file + rename). Costs 0.1-0.3 ms on ext4, which flushes on rename:
    callers on a hot path run it in a worker thread. `durable`: the data and the rename reach the disk
    (fsync of the file and, unless `sync_parent` is False, of its directory) before this returns."""
    tmp = _tmp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    if durable and sync_parent:
        sync_dir(path.parent)


def sync_dir(directory: Path) -> None:
    """fsync a directory, so that the names created or renamed in it survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path) -> Any:
    with open(path, "rb") as fh:
        return orjson.loads(fh.read())


class FileTooLarge(Exception):
    """A file is larger than the caller is willing to read into memory."""


_NOT_THERE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENXIO)


class _OpenHow(ctypes.Structure):  # struct open_how (linux/openat2.h)
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_SYS_OPENAT2 = 437  # the same number on every architecture (a syscall newer than the split tables)
_RESOLVE_NO_SYMLINKS, _RESOLVE_BENEATH = 0x04, 0x08
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_libc: Any = None
_openat2_works: bool | None = None if sys.platform == "linux" else False  # None: not tried yet


def _openat2(dfd: int, rel: str) -> int | None:
    """`rel` opened below the directory `dfd` in one system call that refuses any symlink on the way and
    any step out of `dfd` (Linux 5.6+, `openat2` with RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH). None where
    the kernel (or a seccomp filter) does not have it: the caller walks the path itself."""
    global _libc, _openat2_works
    if _openat2_works is False:
        return None
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long  # (every argument a whole register: long syscall(long, ...))
        libc.syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_long]
        _libc = libc
    how = _OpenHow(_READ_FLAGS, 0, _RESOLVE_NO_SYMLINKS | _RESOLVE_BENEATH)
    fd = _libc.syscall(_SYS_OPENAT2, dfd, rel.encode(), ctypes.byref(how), ctypes.sizeof(how))
    if fd >= 0:
        _openat2_works = True
        return int(fd)
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM) and not _openat2_works:  # (EPERM: a seccomp filter's answer)
        _openat2_works = False
        return None
    if err == errno.EXDEV:  # a step out of the data directory (`..`, an absolute link): as missing
        err = errno.ENOENT
    raise OSError(err, os.strerror(err))


def opens_in_one_call() -> bool:
    """True once `open_under` has opened a file with `openat2` (this kernel has it)."""
    return _openat2_works is True


def open_under(root: Path, rel: str) -> int:
    """Open `root/rel` for reading without following a symlink in any component below `root`.

    Only regular files are opened: a symlink, a directory, a FIFO or a device anywhere on the way counts
    as missing (FileNotFoundError). `root` itself may be a symlink (an operator's choice). One `openat2`
    where the kernel has it (every GET of a file opens one: 3 system calls instead of two per path
    component), else a walk of the path a component at a time."""
    parts = rel.split("/")
    if ".." in parts or "" in parts:  # (never in a request's path; refused rather than resolved)
        raise FileNotFoundError(errno.ENOENT, "not found")
    try:
        dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        if exc.errno in _NOT_THERE:
            raise FileNotFoundError(errno.ENOENT, "not found") from None
        raise
    try:
        fd = _openat2(dfd, rel)
        if fd is None:
            for part in parts[:-1]:
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
                os.close(dfd)
                dfd = nfd
            fd = os.open(parts[-1], _READ_FLAGS, dir_fd=dfd)
    except OSError as exc:
        if exc.errno in _NOT_THERE:
            raise FileNotFoundError(errno.ENOENT, "not found") from None
        raise
    finally:
        os.close(dfd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "not a regular file")
    return fd


def read_under(root: Path, rel: str, max_bytes: int | None = None) -> bytes:
    """The bytes of `root/rel` (see `open_under`); FileTooLarge when larger than `max_bytes`."""
    fd = open_under(root, rel)
    try:
        size = os.fstat(fd).st_size
        if max_bytes is not None and size > max_bytes:
            raise FileTooLarge(size)
        chunks = []
        read = 0
        while True:
            block = os.read(fd, max(size, 65536))
            if not block:
                break
            chunks.append(block)
            read += len(block)
            if max_bytes is not None and read > max_bytes:
                raise FileTooLarge(read)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_json_under(root: Path, rel: str, max_bytes: int | None = None) -> Any:
    """The JSON document in `root/rel`; ValueError (orjson.JSONDecodeError) when it is not JSON."""
    return orjson.loads(read_under(root, rel, max_bytes))


def _event_head(offset: int, event: str | None) -> bytes:
    """What comes before an event's data: its `id:` (its offset in the log), its name, `data: `."""
    head = b"id: %d\n" % offset
    if event:
        head += b"event: " + event.encode() + b"\n"
    return head + b"data: "


def encode_event(offset: int, data: bytes, event: str | None = None) -> bytes:
    """One SSE event starting at byte `offset` of the log."""
    return _event_head(offset, event) + data + b"\n\n"


def event_size(offset: int, data: bytes, event: str | None = None) -> int:
    """len(encode_event(offset, data, event)), without making it."""
    return len(_event_head(offset, event)) + len(data) + 2


class EventLog:
    """The append-only `.txt` of one running request. Only the owning job writes to it."""

    def __init__(self, path: Path, size: int = 0) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.size = size  # bytes committed; readers never read past this
        self.tail_start = size  # the last append, so live readers need no read from disk
        self.tail: bytes | bytearray = b""

    def append(self, events: list[tuple[bytes, str | None]]) -> int:
        """Append events (data, event name); returns the number of bytes written.

        All or nothing: if the disk fills up half-way, the part written is cut off again, so the log
        never holds half an event."""
        out = bytearray()
        offset = self.size
        for data, name in events:  # (built in place: an event of many MiB is copied once, not twice)
            out += _event_head(offset, name)
            out += data
            out += b"\n\n"
            offset = self.size + len(out)
        try:
            write_all(self.fd, out)
        except OSError:
            try:
                os.ftruncate(self.fd, self.size)
            except OSError:
                pass
            raise
        self.tail_start, self.tail = self.size, out  # (not copied again: nothing changes it from here on)
        self.size = offset
        return len(out)

    def sync(self) -> None:
        """Make what was appended durable (the file was created with its directory synced later)."""
        if self.fd >= 0:
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def event_end(fd: int, event_id: str, size: int) -> int | None:
    """Offset just after the event whose id is `event_id`, or None when there is no such event."""
    if len(event_id) > 19 or not event_id.isascii() or not event_id.isdigit():
        return None  # ids are file offsets: at most 19 digits (and Python refuses int() of 4,300+)
    if len(event_id) > 1 and event_id[0] == "0":
        return None
    start = int(event_id)
    if start >= size:
        return None
    head = b"id: %d\n" % start
    window = 4096
    while True:
        data = os.pread(fd, min(window, size - start), start)
        if not data.startswith(head):
            return None
        end = data.find(b"\n\n")
        if end >= 0:
            return start + end + 2
        if start + len(data) >= size or window >= MAX_EVENT_SCAN:
            return None
        window *= 4


SEQ_KEY = b'"sequence_number":'


def _event_start(fd: int, pos: int, size: int) -> int:
    """The offset of the first event that starts at or after `pos` (`size` when none does). An event
    starts after a blank line with `id: <its offset>`; a JSON data line cannot hold a raw line break."""
    if pos <= 0:
        return 0
    at = max(pos - 2, 0)  # a start at `pos` shows as "\n\nid: " two bytes before it
    window = 4096
    while at < size:
        data = os.pread(fd, min(window, size - at), at)
        if not data:
            break
        i = data.find(b"\n\nid: ")
        while i >= 0:
            start = at + i + 2
            if start >= pos and os.pread(fd, 24, start).startswith(b"id: %d\n" % start):
                return start
            i = data.find(b"\n\nid: ", i + 1)
        at += max(len(data) - 6, 1)  # the pattern may straddle two reads
        window = min(window * 4, MAX_EVENT_SCAN)
    return size


def _sequence_number(fd: int, start: int) -> int | None:
    """The `sequence_number` of the event at `start` (written second in its data, after `type`)."""
    return sequence_number(os.pread(fd, 512, start))


def sequence_number(head: bytes) -> int | None:
    """The `sequence_number` of the event whose first bytes are `head` (second in its data, after `type`)."""
    i = head.find(SEQ_KEY)
    if i < 0:
        return None
    digits = head[i + len(SEQ_KEY) : i + len(SEQ_KEY) + 20]
    n = 0
    for c in digits:
        if not 48 <= c <= 57:
            break
        n = n * 10 + c - 48
    return n


def seq_offset(fd: int, size: int, after: int, tail: Any = None) -> int:
    """Where the first event with a `sequence_number` greater than `after` starts in a log of events
    numbered in order (`size` when there is none): a binary search over byte offsets, so a resume
    reads a few blocks whatever its position (about 2 × log2(size / 4 KiB) reads).

    A search that lands inside a large event reads on to its end, and a finished response's closing
    events may each repeat its whole answer. `tail` is [the first closing event's number, then where
    each closing event starts] (numbered in order; the last one, `[DONE]`, is not): the search is then
    confined to the events before them, and a resume among them needs no read at all. A `tail` that is
    not that (as read from a status document) is not used."""
    if closing_places(tail, size):
        first, starts = tail[0], tail[1:]
        if after >= first:
            return starts[min(after - first + 1, len(starts) - 1)]
        size = starts[0]  # (an event starts there: the search's answer is at most that)
    lo, hi = 0, size  # events starting before lo are <= after; events starting at or after hi are > after
    while lo < hi:
        mid = (lo + hi) // 2
        start = _event_start(fd, mid, size)
        if start >= hi:
            hi = mid
            continue
        seq = _sequence_number(fd, start)
        if seq is None or seq > after:  # ([DONE] and other unnumbered events come last)
            hi = start
        else:
            lo = start + 1
    return _event_start(fd, lo, size)


def closing_places(tail: Any, size: int) -> bool:
    """`tail` is [a number, then offsets in order, all within a log of `size` bytes]."""
    if not (isinstance(tail, list) and len(tail) >= 2 and all(type(n) is int for n in tail)):
        return False
    return tail[1:] == sorted(tail[1:]) and 0 <= tail[1] and tail[-1] < size


class Reserve:
    """A file of `size` allocated bytes kept in the data directory.

    When the disk fills up, running requests give it back, so that they can still write their terminal
    status and `[DONE]` instead of being left half-written. New requests are refused (507) while it
    cannot be re-created, and accepted again by themselves once space returns.
    """

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size

    def ensure(self) -> bool:
        """True when the reserve is in place (created now if needed)."""
        if self.size <= 0:
            return True
        try:
            if os.stat(self.path).st_size >= self.size:
                return True
        except FileNotFoundError:
            pass
        tmp = _tmp_name(self.path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            return True
        except OSError:
            _discard(tmp)
            return False

    def release(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def retrying(self, write: Callable[[], object]) -> None:
        """Run a small write; on a full disk, give the reserve back and try once more."""
        try:
            write()
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            self.release()
            write()
