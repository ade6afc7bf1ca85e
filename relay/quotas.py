"""Per relay key limits: requests per calendar month (counted on disk) and per minute (in memory).

Monthly counts live in `<data_dir>/quota/<YYYY-MM>.json`, rewritten atomically on every accepted
request, so a restart does not reset a month. The per-minute window is a sliding 60 s window kept in
memory: a restart forgetting the last minute is harmless.
"""

from __future__ import annotations

import calendar
import collections
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

from .config import ApiKey, Config
from .store import read_json, write_json_atomic

log = logging.getLogger("relay.quotas")

ANONYMOUS = ApiKey(key="anonymous-open-relay", name="anonymous")


class QuotaExceeded(Exception):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


def _month(now: float) -> str:
    return datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y-%m")


def _seconds_to_next_month(now: float) -> int:
    d = datetime.fromtimestamp(now, tz=timezone.utc)
    days = calendar.monthrange(d.year, d.month)[1]
    start = datetime(d.year, d.month, 1, tzinfo=timezone.utc).timestamp()
    return max(1, int(start + days * 86400 - now) + 1)


class Quotas:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.dir: Path = config.data_dir / "quota"
        self._month = ""
        self._counts: dict[str, int] = {}
        self._recent: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)

    def _limits(self, key: ApiKey) -> tuple[int, int]:
        cfg = self.config
        month = key.requests_per_month if key.requests_per_month is not None else cfg.quotas_requests_per_month
        minute = key.requests_per_minute if key.requests_per_minute is not None else cfg.quotas_requests_per_minute
        return month, minute

    def _load(self, month: str) -> None:
        if month == self._month:
            return
        try:
            counts = read_json(self.dir / f"{month}.json")
            self._counts = {str(k): int(v) for k, v in counts.items()} if isinstance(counts, dict) else {}
        except FileNotFoundError:
            self._counts = {}
        except (ValueError, TypeError):
            log.error("quota file %s is damaged: counting this month from 0", self.dir / f"{month}.json")
            self._counts = {}
        self._month = month

    def take(self, key: ApiKey | None, now: float | None = None) -> None:
        """Count one request for `key`, or raise QuotaExceeded (nothing counted then)."""
        key = key or ANONYMOUS
        per_month, per_minute = self._limits(key)
        if not per_month and not per_minute:
            return
        now = time.time() if now is None else now
        ident = key.ident
        if per_minute:
            window = self._recent[ident]
            while window and window[0] <= now - 60:
                window.popleft()
            if len(window) >= per_minute:
                retry = max(1, int(window[0] + 60 - now) + 1)
                raise QuotaExceeded(f"rate limit of {per_minute} requests per minute reached", retry)
        if per_month:
            month = _month(now)
            self._load(month)
            used = self._counts.get(ident, 0)
            if used >= per_month:
                raise QuotaExceeded(f"monthly quota of {per_month} requests used up", _seconds_to_next_month(now))
            counts = {**self._counts, ident: used + 1}
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.dir / f"{month}.json", counts)  # counted only once it is on disk
            self._counts = counts
        if per_minute:
            self._recent[ident].append(now)
