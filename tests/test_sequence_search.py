"""`store.seq_offset`: where a Responses stream resumes after `starting_after`, found in the event log by
a binary search, so the cost of a resume does not grow with how far into the stream it starts."""

from __future__ import annotations

import os
import random
from pathlib import Path

import orjson
import pytest

from relay import store
from relay.store import DONE_DATA, EventLog, seq_offset


def build(path: Path, sizes: list[int]) -> tuple[int, list[int]]:
    """A log of len(sizes) numbered events (data padded to the given sizes) and [DONE]; returns the
    file's size and each event's offset."""
    log = EventLog(path)
    offsets = []
    for seq, size in enumerate(sizes):
        offsets.append(log.size)
        data = orjson.dumps({"type": "response.output_text.delta", "sequence_number": seq, "delta": "x" * size})
        log.append([(data, "response.output_text.delta")])
    log.append([(DONE_DATA, None)])
    log.close()
    return log.size, offsets


@pytest.fixture
def sizes() -> list[int]:
    rng = random.Random(7)
    # small deltas, some events larger than the 4 KiB first read, one larger than 64 KiB
    out = [rng.choice((1, 3, 20, 200, 5000)) for _ in range(600)]
    out[300] = 70_000
    return out


def test_every_starting_point(tmp_path: Path, sizes: list[int]) -> None:
    size, offsets = build(tmp_path / "log.txt", sizes)
    fd = os.open(tmp_path / "log.txt", os.O_RDONLY)
    try:
        for after in range(-1, len(sizes)):
            got = seq_offset(fd, size, after)
            if after + 1 < len(offsets):
                assert got == offsets[after + 1], after
            else:
                assert os.pread(fd, 100, got).endswith(b"data: [DONE]\n\n"), after  # only [DONE] is left
        assert seq_offset(fd, size, 10**9) == seq_offset(fd, size, len(sizes) - 1)
    finally:
        os.close(fd)


def test_reads_do_not_grow_with_the_starting_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    size, offsets = build(tmp_path / "log.txt", [10] * 100_000)  # ~10 MB
    reads = [0]
    real = os.pread

    def counting(fd: int, n: int, at: int) -> bytes:
        reads[0] += 1
        return real(fd, n, at)

    monkeypatch.setattr(store.os, "pread", counting)
    fd = os.open(tmp_path / "log.txt", os.O_RDONLY)
    try:
        counts = []
        for after in (5, 50_000, 99_990):
            reads[0] = 0
            assert seq_offset(fd, size, after) == offsets[after + 1]
            counts.append(reads[0])
    finally:
        os.close(fd)
    assert max(counts) <= 3 * 24, counts  # ~2 reads per halving of 10 MB, wherever the resume starts
    assert max(counts) - min(counts) <= 12, counts


def test_large_closing_events_are_not_read_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished response's log: many small deltas, then closing events that each repeat the whole answer
    (4 × 4 MiB here). Given where they start, a resume reads a few KiB before them, and nothing to resume
    among them; every starting point is still found. Without, a search reads through them."""
    sizes = [10] * 20_000 + [4 * 1024 * 1024] * 4
    size, offsets = build(tmp_path / "log.txt", sizes)
    done_at = next(d for d in range(size - 64, size) if d + len(store.encode_event(d, DONE_DATA)) == size)
    tail = [20_000, *offsets[20_000:], done_at]  # (what a finished response's status document records)
    read = [0]
    real = os.pread

    def counting(fd: int, n: int, at: int) -> bytes:
        data = real(fd, n, at)
        read[0] += len(data)
        return data

    fd = os.open(tmp_path / "log.txt", os.O_RDONLY)
    try:
        assert os.pread(fd, 100, done_at).endswith(b"data: [DONE]\n\n")
        expected = {after: offsets[after + 1] if after + 1 < len(offsets) else done_at for after in
                    (-1, 0, 5, 10_000, 19_998, 19_999, 20_000, 20_001, 20_002, 20_003, 10**6)}  # fmt: skip
        for after, want in expected.items():
            monkeypatch.setattr(store.os, "pread", counting)
            read[0] = 0
            got = seq_offset(fd, size, after, tail)
            monkeypatch.setattr(store.os, "pread", real)
            assert got == want == seq_offset(fd, size, after), after  # the same place as a plain search
            assert read[0] <= 256 * 1024, (after, read[0])
        read[0] = 0
        monkeypatch.setattr(store.os, "pread", counting)
        seq_offset(fd, size, 19_999)  # without `tail`: the search reads through the large events
        assert read[0] > 8 * 1024 * 1024
    finally:
        monkeypatch.setattr(store.os, "pread", real)
        os.close(fd)


def test_event_size_is_the_encoded_length() -> None:
    for offset in (0, 9, 10, 123_456_789):
        for data, name in ((b"x", None), (b'{"a":1}', "response.completed"), (DONE_DATA, None)):
            assert store.event_size(offset, data, name) == len(store.encode_event(offset, data, name))


def test_the_log_holds_exactly_the_encoded_events(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "log.txt")
    events = [(b'{"a":1}', None), (b'{"error":{}}', "error"), (b"x" * 70_000, "response.completed"), (DONE_DATA, None)]
    log.append(events[:2])
    log.append(events[2:])
    log.close()
    expected, at = b"", 0
    for data, name in events:
        expected += store.encode_event(at, data, name)
        at = len(expected)
    assert (tmp_path / "log.txt").read_bytes() == expected and log.size == len(expected)
    assert bytes(log.tail) == expected[log.tail_start :]
