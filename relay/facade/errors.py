"""OpenAI's error shape on the OpenAI-compatible paths: `{"error": {"message", "type", "param", "code"}}`.

The SDKs pick their exception class from the HTTP status (400 BadRequestError, 401 AuthenticationError,
403 PermissionDeniedError, 404 NotFoundError, 409 ConflictError, 429 RateLimitError, 5xx
InternalServerError) and show `message`; the relay's own error code goes in `code`.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from ..http import HTTPError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "invalid_request_error", 408: "invalid_request_error", 409: "invalid_request_error",
         413: "invalid_request_error", 429: "rate_limit_error"}  # fmt: skip


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    @classmethod
    def of(cls, exc: HTTPError) -> OpenAIError:
        """The same refusal as the relay's own endpoints make, in OpenAI's shape."""
        return cls(exc.status, exc.message, code=exc.code, headers=exc.headers)

    @classmethod
    def answer(cls, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
        """`http.error`'s signature, for the app's catch-all error answers."""
        return cls(status, message, code=code, headers=headers).response()

    def response(self) -> web.Response:
        body: dict[str, Any] = {
            "error": {
                "message": self.message,
                "type": TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }
        resp = web.Response(body=orjson.dumps(body), status=self.status, content_type="application/json",
                            headers=self.headers)  # fmt: skip
        if self.headers and self.headers.get("Connection") == "close":
            resp.force_close()
        return resp


def not_found(kind: str, object_id: str) -> OpenAIError:
    return OpenAIError(404, f"No {kind} found with id '{object_id[:80]}'.", param="id", code="not_found")
