"""The site around the two faces: CORS, error bodies for what no handler answers, the console and its
static files, /healthz, /v1/info and /openapi.json. Wired by `app.py`, above both faces (an error on an
OpenAI-compatible path answers in OpenAI's shape)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from .config import Config
from .facade.errors import OpenAIError
from .http import error, json_response
from .keys import CONFIG

log = logging.getLogger("relay.site")

OPENAI_PATHS = ("/v1/responses", "/v1/chat/", "/v1/models")  # errors there in OpenAI's shape (see facade)
CLIENT_CLOSED_REQUEST = 499  # the access log's status for a client gone before its answer (nginx's number)
PREFLIGHT_HEADERS = (
    "Authorization, Content-Type, Last-Event-ID, "
    "X-OpenAI-API-Key, X-OpenAI-Organization, X-RapidAPI-Key, X-RapidAPI-Host"
)


async def preflight(request: web.Request) -> web.Response:
    """The contract's methods on the relay's own URLs; DELETE too on the OpenAI-compatible paths."""
    methods = "GET, POST, DELETE, OPTIONS" if request.path.startswith(OPENAI_PATHS) else "GET, POST, OPTIONS"
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Headers": PREFLIGHT_HEADERS,
            "Access-Control-Allow-Methods": methods,
            "Access-Control-Max-Age": "600",
        },
    )


def cors_origin(config: Config, origin: str | None) -> str | None:
    if "*" in config.server_cors_origins:
        return "*"
    if origin and origin in config.server_cors_origins:
        return origin
    return None


async def add_cors(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: CORS headers on every answer (streams included)."""
    config: Config = request.app[CONFIG]
    allowed = cors_origin(config, request.headers.get("Origin"))
    if allowed:
        response.headers["Access-Control-Allow-Origin"] = allowed
        response.headers["Access-Control-Expose-Headers"] = (
            "Retry-After, WWW-Authenticate, X-Relay-Status-Url, X-Relay-Stream-Url, X-Relay-Bearer-Token"
        )
    if allowed != "*":
        response.headers.add("Vary", "Origin")


CONSOLE = Path(__file__).resolve().parent.parent / "static" / "index.html"
CONSOLE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src *; img-src 'self' data:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


async def console(request: web.Request) -> web.FileResponse:
    """The web console (static/index.html)."""
    return web.FileResponse(CONSOLE, headers={"Content-Security-Policy": CONSOLE_CSP, "Cache-Control": "no-cache"})


OPENAPI = Path(__file__).resolve().parent / "openapi.json"
OPENAPI_DOC: web.AppKey[bytes] = web.AppKey("openapi_doc", bytes)


def load_openapi() -> bytes:
    """The OpenAPI document (`relay/openapi.json`), read and checked once at start, served compact."""
    return orjson.dumps(orjson.loads(OPENAPI.read_bytes()))


async def openapi(request: web.Request) -> web.Response:
    """GET /openapi.json: the OpenAPI 3.1 document of every route (tests/test_openapi.py keeps it so)."""
    return web.Response(
        body=request.app[OPENAPI_DOC], content_type="application/json", headers={"Cache-Control": "no-cache"}
    )


STATIC_FILES: web.AppKey[dict[str, Path]] = web.AppKey("static_files", dict)


async def static_file(request: web.Request) -> web.StreamResponse:
    """GET /static/<name>: one of the console's files, as listed at start (no path is built from the URL);
    anything else is the JSON 404 (aiohttp's static route answered an empty octet-stream 404)."""
    path = request.app[STATIC_FILES].get(request.match_info["file"])
    if path is None:
        return error(404, "not_found", "no such file of the console")
    return web.FileResponse(path)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def info(request: web.Request) -> web.Response:
    """What a client must send: whether a relay key is needed and whether the relay has an upstream key
    (else each request brings its own). Nothing secret; the console uses it to open its Settings."""
    config: Config = request.app[CONFIG]
    return json_response(
        {
            "relay_key_required": bool(config.auth_api_keys),
            "upstream_key_configured": bool(config.upstream_api_key),
            "default_model": config.upstream_default_model,
            "node_id": config.server_node_id,
            "operator_enabled": bool(config.auth_admin_keys),
        },
        headers={"Cache-Control": "no-store"},
    )


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """CORS preflights; aiohttp's own 404/405 and unexpected failures answer with the JSON error body
    (in OpenAI's shape on the OpenAI-compatible paths)."""
    if request.method == "OPTIONS":
        return await preflight(request)
    answer = OpenAIError.answer if request.path.startswith(OPENAI_PATHS) else error
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods - {"HEAD"}))
        return answer(
            405,
            "method_not_allowed",
            f"{request.path} answers {allowed}, not {request.method}"
            + (" (send the chat request as a JSON body)" if "POST" in exc.allowed_methods else ""),
            {"Allow": allowed},
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            return answer(
                404,
                "not_found",
                "no such URL on this relay: requests are POST /v1/stream-chatgpt or POST /v1/async-chatgpt, "
                "and their URLs are the ones in the answer; POST /v1/responses and /v1/chat/completions speak "
                "OpenAI's API; GET /healthz, /metrics and / (the console) exist too",
            )
        return answer(exc.status, "http_error", exc.reason)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        transport = request.transport
        if isinstance(exc, ConnectionError) and (transport is None or transport.is_closing()):
            # the client left before or while its answer was written (a reset, pipelined requests behind a
            # dropped one): nothing failed and nothing can reach it; aiohttp finishes it quietly
            return web.Response(status=CLIENT_CLOSED_REQUEST)
        log.exception("unhandled error on %s %s", request.method, request.path)
        return answer(500, "internal_error", "the relay failed unexpectedly; see its log")
