"""The application's shared objects, by key: what `app.py` puts in the aiohttp application for the
handlers of both faces and the operator view to find (`request.app[MANAGER]`)."""

from __future__ import annotations

from aiohttp import web

from .archive import Archiver
from .book import UsageBook
from .config import Config
from .jobs import JobManager
from .metrics import Metrics
from .quotas import Quotas

CONFIG: web.AppKey[Config] = web.AppKey("config")
MANAGER: web.AppKey[JobManager] = web.AppKey("manager")
READERS: web.AppKey[list[int]] = web.AppKey("readers")
QUOTAS: web.AppKey[Quotas] = web.AppKey("quotas")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
BOOK: web.AppKey[UsageBook] = web.AppKey("usage_book", UsageBook)
ARCHIVE: web.AppKey[Archiver | None] = web.AppKey("archive")  # None unless [archive] enabled
KEY_CLAIM: web.RequestKey[str | None] = web.RequestKey("key_claim", str)  # the key name whose share it holds
