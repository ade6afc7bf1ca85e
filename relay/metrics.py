"""Prometheus metrics (`GET /metrics`), one registry per application.

Labels are fixed, small sets (endpoint, outcome, error code; relay key *names* from the config; at most
MAX_MODELS model names): never a key, a token, an id or any message content.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MAX_MODELS = 100  # distinct model labels on the token counters
ARCHIVE_GAUGES = (  # (metric, key of the archive's backlog, help)
    ("relay_archive_pending_requests", "pending", "Ended requests waiting to be uploaded to the archive"),
    ("relay_archive_pending_bytes", "pending_bytes", "Bytes of the requests waiting to be uploaded"),
    ("relay_archive_oldest_pending_seconds", "oldest_pending_seconds", "Age of the oldest upload waiting"),
    ("relay_archive_failing_requests", "failing", "Pending uploads whose last attempt failed"),
    ("relay_archive_failures", "failures", "Upload attempts that failed, since start"),
    ("relay_archive_integrity_failures", "integrity_failures", "Uploads or reads whose bytes did not match"),
    ("relay_archive_archived_requests", "archived", "Requests archived and verified, since start"),
    ("relay_archive_archived_bytes", "archived_bytes", "Bytes archived and verified, since start"),
    ("relay_archive_local_removed_requests", "local_removed", "Requests whose local copy was removed once archived"),
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "relay_requests", "Requests by endpoint and outcome (done, error, stop, or refused at the POST)",
            ["endpoint", "outcome"], registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "relay_request_errors", "Requests that ended in error, by error code", ["code"], registry=r
        )
        self.refusals = Counter("relay_refusals", "POSTs refused, by HTTP status", ["status"], registry=r)
        self.running = Gauge("relay_running_jobs", "Requests running now", registry=r)
        self.readers = Gauge("relay_open_readers", "Event-stream readers connected now", registry=r)
        self.first_chunk = Histogram(
            "relay_upstream_first_chunk_seconds", "Time from the upstream call to its first chunk",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=r,
        )  # fmt: skip
        self.bytes_written = Counter("relay_bytes_written", "Bytes written to event logs and raw files", registry=r)
        self.janitor_requests = Counter("relay_janitor_removed_requests", "Expired requests removed", registry=r)
        self.janitor_bytes = Counter("relay_janitor_removed_bytes", "Bytes of expired files removed", registry=r)
        self.webhooks = Counter(
            "relay_webhook_deliveries",
            "Webhook deliveries by result (delivered, failed, dropped)",
            ["result"],
            registry=r,
        )
        self.tokens = Counter(
            "relay_tokens", "Tokens of finished requests, by relay key name, model and kind (prompt, completion)",
            ["key", "model", "kind"], registry=r,
        )  # fmt: skip
        self.estimated = Counter(
            "relay_tokens_estimated_requests", "Finished requests whose tokens were estimated (no upstream usage)",
            ["key"], registry=r,
        )  # fmt: skip
        self._models: set[str] = set()

    def count_tokens(self, line: dict[str, Any]) -> None:
        """Token counters from a usage-ledger line. Models are client-chosen: the first MAX_MODELS names
        get their own label, the rest count as "other" (a bounded label set)."""
        model = str(line.get("model") or "")
        if model not in self._models:
            if len(self._models) >= MAX_MODELS:
                model = "other"
            else:
                self._models.add(model)
        key = str(line.get("key") or "")
        for kind in ("prompt", "completion"):
            self.tokens.labels(key, model, kind).inc(line.get(f"{kind}_tokens") or 0)
        if line.get("estimated"):
            self.estimated.labels(key).inc()

    def bind(self, running: Callable[[], int], readers: Callable[[], int]) -> None:
        self.running.set_function(running)
        self.readers.set_function(readers)

    def bind_archive(self, backlog: Callable[[], dict[str, Any]]) -> None:
        """The archive tier's backlog and totals ([archive] enabled only), read at each scrape."""
        r = self.registry
        for name, key, text in ARCHIVE_GAUGES:
            gauge = Gauge(name, text, registry=r)
            gauge.set_function(lambda key=key: float(backlog().get(key) or 0))

    async def handler(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"},
        )
