"""Small HTTP helpers shared by the endpoints: the JSON error body and JSON answers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from .config import Config
    from .jobs import JobManager
    from .metrics import Metrics
    from .quotas import Quotas

CONFIG: web.AppKey[Config] = web.AppKey("config")
MANAGER: web.AppKey[JobManager] = web.AppKey("manager")
READERS: web.AppKey[list[int]] = web.AppKey("readers")
QUOTAS: web.AppKey[Quotas] = web.AppKey("quotas")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
KEY_CLAIM: web.RequestKey[str | None] = web.RequestKey("key_claim", str)  # the key name whose share it holds


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(doc),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """The contract's error body: `{"status": "error", "error": {"code", "message"}}`."""
    return json_response({"status": "error", "error": {"code": code, "message": message}}, status, headers)


class HTTPError(Exception):
    """Raised by validation deep inside a handler; turned into `error(...)` by the handler."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers

    def response(self) -> web.Response:
        resp = error(self.status, self.code, self.message, self.headers)
        if self.headers and self.headers.get("Connection") == "close":
            resp.force_close()  # no lingering read of what the client still sends
        return resp
