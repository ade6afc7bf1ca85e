"""A reference point for W1, not a product: the least a Python proxy can do per chunk on this machine.

    python bench/passthrough.py <upstream chat-completions URL> <port>

POST /s with a chat-completion body: the body goes to the upstream as is, and the upstream's response
bytes come back as they arrive (aiohttp client and server on uvloop; no parsing, no files, no status,
no second reader). The relay does all of that on top; its CPU per chunk is compared against this one.
POST /c (W4's reference): the same for a whole answer, read and sent back with its length: one request
in, one upstream call, one answer out, the least a Python proxy does per POST.
"""

from __future__ import annotations

import sys

import aiohttp
import uvloop
from aiohttp import web

SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)


async def relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {"Content-Type": "application/json", "Authorization": request.headers.get("Authorization", "")}
    async with request.app[SESSION].post(sys.argv[1], data=body, headers=headers) as upstream:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        async for block in upstream.content.iter_any():
            await resp.write(block)
        await resp.write_eof()
    return resp


async def whole(request: web.Request) -> web.Response:
    body = await request.read()
    headers = {"Content-Type": "application/json", "Authorization": request.headers.get("Authorization", "")}
    async with request.app[SESSION].post(sys.argv[1], data=body, headers=headers) as upstream:
        answer = await upstream.read()
        return web.Response(body=answer, status=upstream.status, content_type="application/json")


async def session(app: web.Application):  # type: ignore[no-untyped-def]
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
    yield
    await app[SESSION].close()


def main() -> None:
    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_post("/s", relay)
    app.router.add_post("/c", whole)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), print=None, access_log=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
