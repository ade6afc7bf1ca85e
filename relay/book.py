"""The recent usage in memory, for the operator view: the last finished requests and per-minute totals.

`UsageBook` keeps the last finished requests (the ledger lines, newest last) and per-minute totals for
the last 24 hours: requests, tokens, errors by code, and a bounded sample of first-token latencies. It is
fed as requests end (the job manager tells it each ledger line written, see `JobManager.on_counted`) and,
at start-up, from the tail of the last two days' ledgers, so every answer of the operator API is computed
from memory in time proportional to what it returns.
"""

from __future__ import annotations

import collections
import os
import random
import time
from pathlib import Path
from typing import Any

from . import ledger

RECENT = 500  # finished requests kept for the operator page
DAY_MINUTES = 24 * 60
TTFT_SAMPLES_PER_MINUTE = 64
TAIL_BYTES = 4 * 1024 * 1024  # of each of the last two ledgers, read at start-up


class Minute:
    __slots__ = ("requests", "tokens", "errors", "codes", "ttft", "seen")

    def __init__(self) -> None:
        self.requests = 0
        self.tokens = 0
        self.errors = 0
        self.codes: collections.Counter[str] = collections.Counter()
        self.ttft: list[float] = []
        self.seen = 0  # first-token latencies offered (the sample keeps TTFT_SAMPLES_PER_MINUTE of them)


class UsageBook:
    def __init__(self) -> None:
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT)
        self.minutes: dict[int, Minute] = {}

    def add(self, line: dict[str, Any]) -> None:
        self.recent.append(line)
        minute = int(line["t"] // 60)
        m = self.minutes.get(minute)
        if m is None:
            m = self.minutes[minute] = Minute()
            self._prune(minute)
        m.requests += 1
        m.tokens += line.get("total_tokens") or 0
        if line.get("code"):
            m.errors += 1
            m.codes[str(line["code"])] += 1
        ttft = line.get("ttft")
        if isinstance(ttft, (int, float)):
            m.seen += 1
            if len(m.ttft) < TTFT_SAMPLES_PER_MINUTE:
                m.ttft.append(float(ttft))
            else:  # reservoir sampling: every latency of the minute equally likely to be kept
                j = random.randrange(m.seen)
                if j < TTFT_SAMPLES_PER_MINUTE:
                    m.ttft[j] = float(ttft)

    def _prune(self, now_minute: int) -> None:
        for minute in [k for k in self.minutes if k <= now_minute - DAY_MINUTES]:
            del self.minutes[minute]

    def load(self, data_dir: Path, now: float | None = None) -> int:
        """Fill the book from the tail of yesterday's and today's ledgers (at start-up, before the app
        serves; at most TAIL_BYTES of each). Returns the lines read."""
        now = time.time() if now is None else now
        count = 0
        for day in (ledger.day_of(now - 86400), ledger.day_of(now)):
            path = ledger.day_file(data_dir, day)
            try:
                with ledger.open_regular(path) as fh:
                    size = os.fstat(fh.fileno()).st_size
                    fh.seek(max(0, size - TAIL_BYTES))
                    data = fh.read(TAIL_BYTES)
            except FileNotFoundError:
                continue
            if size > TAIL_BYTES:
                data = data[data.find(b"\n") + 1 :]  # a partial first line
            for raw in data.splitlines():
                line = ledger.parse_line(raw)
                if line is not None and isinstance(line.get("t"), (int, float)) and line["t"] > now - 86400:
                    self.add(line)
                    count += 1
        return count

    def stats(self, now: float | None = None) -> dict[str, Any]:
        """Per-minute totals for the last 24 hours, first-token latency p50/p99 and errors by code for the
        last hour and the last day."""
        now = time.time() if now is None else now
        this = int(now // 60)
        self._prune(this)
        out: dict[str, Any] = {"now": round(now, 3), "minutes": []}
        windows = {"hour": 60, "day": DAY_MINUTES}
        ttft: dict[str, list[float]] = {w: [] for w in windows}
        codes: dict[str, collections.Counter[str]] = {w: collections.Counter() for w in windows}
        totals: dict[str, dict[str, int]] = {w: {"requests": 0, "tokens": 0, "errors": 0} for w in windows}
        for minute in sorted(self.minutes):
            m = self.minutes[minute]
            sample = sorted(m.ttft)
            out["minutes"].append({"t": minute * 60, "requests": m.requests, "tokens": m.tokens, "errors": m.errors,
                                   "ttft_p50": _pct(sample, 0.5), "ttft_p99": _pct(sample, 0.99)})  # fmt: skip
            for w, span in windows.items():
                if minute > this - span:
                    ttft[w] += m.ttft
                    codes[w].update(m.codes)
                    for k in ("requests", "tokens", "errors"):
                        totals[w][k] += getattr(m, k)
        for w in windows:
            values = sorted(ttft[w])
            totals[w]["ttft_p50"] = _pct(values, 0.5)  # type: ignore[assignment]
            totals[w]["ttft_p99"] = _pct(values, 0.99)  # type: ignore[assignment]
            totals[w]["errors_by_code"] = dict(codes[w].most_common())  # type: ignore[assignment]
        out.update(totals)
        return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


# ----- the API ------------------------------------------------------------------------------------
