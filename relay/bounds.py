"""Bounds on the JSON that peers send (clients, upstreams): cheap checks that run before or instead of
any work whose cost grows with what the peer chose.

Parsing JSON holds the event loop (and the GIL, so a thread would not help): `orjson` needs ~0.5 µs per
array, ~0.1 µs per object and ~0.05 µs per scalar. A 4 MiB body of empty arrays would take ~0.6 s.
`containers` counts `[` and `{` bytes (strings included, so it is an upper bound) in C before parsing,
and `too_deep` checks nesting depth in C after parsing, so the status document that embeds the value
can always be serialised (orjson refuses more than 254 levels).
"""

from __future__ import annotations

from typing import Any

import orjson

ORJSON_MAX_DEPTH = 254  # orjson.dumps raises for 255 nested arrays/objects


def containers(raw: bytes) -> int:
    """Upper bound of the arrays and objects in the JSON text `raw` (bracket bytes, strings included)."""
    return raw.count(b"[") + raw.count(b"{")


def more_containers(raw: bytes, limit: int) -> bool:
    """True when `raw` may hold more than `limit` arrays and objects (`containers`); a text no longer than
    `limit` bytes cannot, and is not counted."""
    return len(raw) > limit and containers(raw) > limit


def too_deep(value: Any, limit: int) -> bool:
    """True when `value` nests more than `limit` arrays/objects.

    Done in C: wrapped in (254 - limit) lists, the value can be serialised by orjson exactly when its
    own depth is at most `limit`. Costs one serialisation of the value.
    """
    wrapped: Any = value
    for _ in range(ORJSON_MAX_DEPTH - limit):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)
    except orjson.JSONEncodeError:
        return True
    return False


def raw_too_deep(raw: bytes, value: Any, limit: int) -> bool:
    """`too_deep` for a value parsed from `raw`, skipped when `raw` has too few brackets to be deep."""
    return more_containers(raw, limit) and too_deep(value, limit)


def has_control(text: str) -> bool:
    """True when `text` holds an ASCII control character (CR, LF, NUL, DEL, …)."""
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def printable_ascii(text: str) -> bool:
    """True for a non-empty string of visible ASCII characters (what an API key or header token is)."""
    return bool(text) and text.isascii() and all(0x21 <= ord(c) <= 0x7E for c in text)
