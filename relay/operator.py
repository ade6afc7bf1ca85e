"""What operators see: the operator API under /v1/admin/, answered from the usage book (`book.py`).

The API answers only to an admin key (`[auth] admin_keys`, distinct from access keys) sent as
`Authorization: Bearer <key>`: 401 without one, 403 with another key, 403 `admin_disabled` when no
admin key is configured. Private requests are listed with their metadata only (no text, no URL that
would open them).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .book import RECENT
from .http import HTTPError, json_response
from .keys import ARCHIVE, BOOK, CONFIG, MANAGER
from .security import bearer


def require_admin(request: web.Request) -> None:
    keys = request.app[CONFIG].auth_admin_keys
    if not keys:
        raise HTTPError(
            403,
            "admin_disabled",
            "the operator API is off: set [auth] admin_keys in the relay's config.toml (see docs/deploy.md)",
        )
    token = bearer(request)
    if token is None:
        raise HTTPError(
            401,
            "unauthorized",
            "send an admin key as Authorization: Bearer <key>",
            {"WWW-Authenticate": 'Bearer realm="relay-admin"'},
        )
    candidate = token.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(candidate, key.encode())
    if not ok:
        raise HTTPError(403, "forbidden", "this key is not an admin key ([auth] admin_keys)")


def _reported(usage: Any) -> int | None:
    """The completion tokens an upstream's `usage` reports, if it is the usual object."""
    value = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _view_url(request: web.Request, path: str, access: str) -> str | None:
    """The status URL of a public request (a private one is never opened from here)."""
    if access != "public" or not path:
        return None
    return f"{request.app[CONFIG].public_url}/{path}.json"


async def running(request: web.Request) -> web.Response:
    require_admin(request)
    now = time.time()
    out = []
    for job in list(request.app[MANAGER].jobs.values()):
        access = str((job.doc.get("authorization") or {}).get("access", "public"))
        out.append(
            {
                "id": job.rp.request_id,
                "model": job.body.get("model", ""),
                "key": job.key_label,
                "access": access,
                "endpoint": job.doc["request"]["endpoint"],
                "status": job.doc["status"],
                "created_at": job.doc["created_at"],
                "elapsed": round(now - job.started_at, 3),
                "chunks": job.assembler.chunks,
                "tokens_so_far": _reported(job.assembler.usage) or -(-job.assembler.text_chars // 4),
                "status_url": _view_url(request, job.rp.base, access),
            }
        )
    out.sort(key=lambda r: r["elapsed"], reverse=True)
    return json_response({"running": out, "count": len(out)})


async def stop(request: web.Request) -> web.Response:
    require_admin(request)
    request_id = request.match_info["id"]
    if not request.app[MANAGER].stop(request_id):
        raise HTTPError(404, "not_running", "no request with this id is running on this node")
    return json_response({"id": request_id, "stopping": True})


FILTERS = ("outcome", "model", "key", "code", "access")


async def finished(request: web.Request) -> web.Response:
    require_admin(request)
    try:
        limit = min(RECENT, max(1, int(request.query.get("limit", "200"))))
    except ValueError:
        raise HTTPError(400, "invalid_field", "`limit` must be a whole number") from None
    wanted = {k: request.query[k] for k in FILTERS if request.query.get(k)}
    out = []
    for line in reversed(request.app[BOOK].recent):
        if all(str(line.get(k) or "") == v for k, v in wanted.items()):
            out.append({**line, "status_url": _view_url(request, line.get("path", ""), line.get("access", ""))})
            if len(out) >= limit:
                break
    return json_response({"finished": out, "count": len(out)})


async def stats(request: web.Request) -> web.Response:
    require_admin(request)
    doc = request.app[BOOK].stats()
    archiver = request.app[ARCHIVE]
    doc["archive"] = archiver.backlog().as_dict() if archiver is not None else None  # ([archive] enabled)
    return json_response(doc)


def _answering(handler: Callable[[web.Request], Awaitable[web.Response]]) -> Callable[..., Awaitable[web.Response]]:
    async def run(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except HTTPError as exc:
            return exc.response()

    return run


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/admin/running", _answering(running))
    app.router.add_post("/v1/admin/running/{id}/stop", _answering(stop))
    app.router.add_get("/v1/admin/finished", _answering(finished))
    app.router.add_get("/v1/admin/stats", _answering(stats))
