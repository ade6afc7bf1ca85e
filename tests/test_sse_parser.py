"""The upstream SSE parser on its own: line ends, multi-line data, comments, a BOM, an unterminated
last event, reads split at every byte, and its bounds (size, and time linear in the input)."""

from __future__ import annotations

import time

import pytest

from relay.assemble import EventTooLarge, SSEParser

STREAM = (
    b"\xef\xbb\xbf: a comment\n"
    b"event: ignored\nid: 7\nretry: 100\n"
    b'data: {"a": 1}\n\n'
    b"data:no-space\r\n\r\n"
    b"data: first line\rdata: second line\r\r"
    b"data: multi\ndata: line\n\n"
    b": only a comment\n\n"
    b"data: [DONE]\n\n"
    b"data: unterminated at EOF"
)
EXPECTED = [b'{"a": 1}', b"no-space", b"first line\nsecond line", b"multi\nline", b"[DONE]", b"unterminated at EOF"]


def parse(blocks: list[bytes], limit: int = 1 << 20) -> list[bytes]:
    parser = SSEParser(limit)
    out: list[bytes] = []
    for block in blocks:
        out += parser.feed(block)
    return out + parser.flush()


def test_whole_stream() -> None:
    assert parse([STREAM]) == EXPECTED


@pytest.mark.parametrize("at", range(1, len(STREAM)))
def test_split_at_every_byte(at: int) -> None:
    assert parse([STREAM[:at], STREAM[at:]]) == EXPECTED


def test_one_byte_at_a_time() -> None:
    assert parse([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


def test_an_event_over_the_limit_is_refused_even_without_a_line_end() -> None:
    parser = SSEParser(1000)
    with pytest.raises(EventTooLarge):
        for _ in range(100):
            parser.feed(b"data: " + b"x" * 100)
    parser = SSEParser(1000)
    with pytest.raises(EventTooLarge):  # many small data lines of one event add up
        parser.feed(b"data: xxxxxxxxxx\n" * 200)


def test_cost_is_linear_in_the_input() -> None:
    """64 MiB of one endless line in 64 KiB reads: a rescanning parser needs minutes, this one well
    under a second (generous bound for a shared machine)."""
    parser = SSEParser(128 * 1024 * 1024)
    block = b"x" * 65536
    started = time.monotonic()
    parser.feed(b"data: ")
    for _ in range(1024):
        parser.feed(block)
    assert time.monotonic() - started < 2.0
