"""Small HTTP helpers shared by the endpoints: the JSON error body and JSON answers."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web


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
