"""`relay.py usage`: totals from the usage ledger, by key, model and day, for a period.

Reads only the ledger files of the days asked for (`<data_dir>/usage/YYYY-MM-DD.jsonl`), one line at a
time, so a year of ledgers is one pass over 365 small files and memory holds only the totals.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson

from . import ledger

GROUPS = ("key", "model", "day", "outcome", "node")
COUNTS = ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens",
          "reasoning_tokens", "estimated")  # fmt: skip


class UsageError(Exception):
    """A bad command-line value (exit 2, one line)."""


def parse_day(value: str, today: date) -> date:
    """`YYYY-MM-DD`, or `Nd` for N days before today (`0d` = today)."""
    m = re.fullmatch(r"(\d{1,5})d", value)
    if m:
        return today - timedelta(days=int(m.group(1)))
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{value!r} is not a day: use YYYY-MM-DD or Nd (N days ago)") from None


def totals(
    lines: Iterable[dict[str, Any]], by: list[str], key: str | None = None, model: str | None = None
) -> dict[tuple[str, ...], dict[str, int]]:
    out: dict[tuple[str, ...], dict[str, int]] = {}
    for line in lines:
        if key is not None and line.get("key") != key:
            continue
        if model is not None and line.get("model") != model:
            continue
        group = tuple(
            ledger.day_of(line["t"]) if g == "day" and isinstance(line.get("t"), (int, float)) else str(line.get(g, ""))
            for g in by
        )
        row = out.get(group)
        if row is None:
            row = out[group] = dict.fromkeys(COUNTS, 0)
        row["requests"] += 1
        row["errors"] += 1 if line.get("code") else 0
        for c in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens"):
            v = line.get(c)
            row[c] += v if isinstance(v, int) else 0
        row["estimated"] += 1 if line.get("estimated") else 0
    return dict(sorted(out.items()))


def report(
    data_dir: Path,
    *,
    since: str | None,
    until: str | None,
    key: str | None,
    model: str | None,
    by: str,
    fmt: str,
    today: date | None = None,
) -> str:
    today = today or datetime.now(timezone.utc).date()
    start = parse_day(since, today) if since else today.replace(day=1)
    end = parse_day(until, today) if until else today
    if end < start:
        raise UsageError(f"--until ({end}) is before --since ({start})")
    groups = [g.strip() for g in by.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if not groups or unknown:
        raise UsageError(f"--by takes a comma-separated list of {', '.join(GROUPS)}")
    rows = totals(ledger.read(data_dir, start, end), groups, key, model)
    grand = dict.fromkeys(COUNTS, 0)
    for row in rows.values():
        for c in COUNTS:
            grand[c] += row[c]
    if fmt == "json":
        doc = {
            "since": start.isoformat(),
            "until": end.isoformat(),
            "by": groups,
            "rows": [{**dict(zip(groups, g, strict=True)), **row} for g, row in rows.items()],
            "total": grand,
        }
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([*groups, *COUNTS])
        for g, row in rows.items():
            writer.writerow([*g, *(row[c] for c in COUNTS)])
        return buf.getvalue()
    table = [[*groups, *COUNTS]]
    table += [[*g, *(f"{row[c]:,}" for c in COUNTS)] for g, row in rows.items()]
    table.append(["TOTAL", *([""] * (len(groups) - 1)), *(f"{grand[c]:,}" for c in COUNTS)])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [f"usage {start} … {end} ({len(rows)} row(s); tokens marked estimated where the upstream reported none)"]
    for i, r in enumerate(table):
        cells = [c.ljust(w) if j < len(groups) else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if i == 0 or i == len(table) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"
