"""`HiddenUsage`: a passed-through stream without the usage-only chunk its client did not ask for; every
other byte unchanged, however the upstream's bytes are cut into blocks and whatever line ends it uses."""

from __future__ import annotations

import random

import orjson

from relay.facade.passthrough import HiddenUsage


def stream(eol: bytes) -> tuple[bytes, bytes]:
    """An upstream stream with usage (every chunk `usage: null`, then the usage-only chunk) and the same
    stream as the client should get it."""
    chunks = [orjson.dumps({"id": "c", "choices": [{"index": 0, "delta": {"content": f"w{i} " * (i * 50)}}],
                            "usage": None}) for i in range(20)]  # fmt: skip
    usage = orjson.dumps({"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 20,
                                                              "total_tokens": 23}})  # fmt: skip
    ev = [b": comment" + eol + eol] + [b"data: " + c + eol + eol for c in chunks]
    done = b"data: [DONE]" + eol + eol
    return b"".join([*ev, b"data: " + usage + eol + eol, done]), b"".join([*ev, done])


def test_the_usage_chunk_is_held_back_and_nothing_else_changes() -> None:
    rng = random.Random(3)
    for eol in (b"\n", b"\r\n", b"\r"):
        full, expected = stream(eol)
        for _ in range(50):
            cuts = sorted(rng.sample(range(1, len(full)), rng.randrange(0, 40)))
            blocks = [full[a:b] for a, b in zip([0, *cuts], [*cuts, len(full)], strict=True)]
            hidden = HiddenUsage()
            out = b"".join(hidden.feed(b) for b in blocks) + hidden.flush()
            assert out == expected, (eol, cuts)


def test_a_stream_without_a_usage_chunk_or_a_final_blank_line_is_passed_unchanged() -> None:
    body = b'data: {"choices":[{"delta":{"content":"usage"}}],"usage":{"total_tokens":1}}\n\ndata: [DONE]'
    hidden = HiddenUsage()
    assert hidden.feed(body[:30]) + hidden.feed(body[30:]) + hidden.flush() == body


def test_one_huge_event_in_many_blocks_is_not_copied_per_block() -> None:
    """16 MiB without an event boundary, in 4 KiB blocks (a hostile upstream): held until it ends, in
    time linear in its size."""
    import time

    hidden = HiddenUsage()
    block = b"x" * 4096
    started = time.process_time()
    for _ in range(4096):
        assert hidden.feed(block) == b""
    assert hidden.feed(b"\n\n") == block * 4096 + b"\n\n"
    assert time.process_time() - started < 5  # ~0.2 s; copying what is held at every block: ~36 s
