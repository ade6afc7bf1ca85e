"""A hostile HTTP proxy in front of the tests' S3 store: it forwards requests as they are (the Host header
too, so the SigV4 signatures still hold) and, depending on `mode`, spoils the answers:

    "pass"      forward everything unchanged
    "slow"      hold every answer `delay` seconds before sending it
    "error"     answer every request 503 SlowDown (an S3 error document), forwarding nothing
    "corrupt"   GET bodies with one byte flipped (same length, same headers)
    "short"     GET bodies one byte short, Content-Length and Content-Range made to agree
    "long"      GET bodies with a byte added, Content-Length made to agree
    "etag"      every ETag replaced by another (bodies intact)
    "lose"      PUTs answered 200 but never forwarded: the store says it has what it does not

`only` limits the spoiling to requests whose path contains it (e.g. ".txt"); `hits` counts the requests
seen, by method, and `most_puts` the most PUTs that were in flight at once.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class HostileS3Proxy:
    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.mode = "pass"
        self.delay = 5.0
        self.only = ""
        self.hits: Counter[str] = Counter()
        self.puts = 0
        self.most_puts = 0
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def _spoils(self, request: web.Request) -> bool:
        return self.mode != "pass" and self.only in request.path_qs

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.method] += 1
        if request.method != "PUT":
            return await self._answer(request)
        self.puts += 1
        self.most_puts = max(self.most_puts, self.puts)
        try:
            return await self._answer(request)
        finally:
            self.puts -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        spoil = self._spoils(request)
        if spoil and self.mode == "error":
            xml = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>try later</Message></Error>"
            return web.Response(status=503, body=xml, content_type="application/xml")
        if spoil and self.mode == "slow":
            await asyncio.sleep(self.delay)
        if spoil and self.mode == "lose" and request.method == "PUT":
            return web.Response(status=200, headers={"ETag": '"0123456789abcdef0123456789abcdef"'})
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP | {"content-length"}}
        assert self._session is not None
        async with self._session.request(
            request.method, self.target + request.path_qs, headers=headers, data=body, skip_auto_headers={"User-Agent"}
        ) as up:
            data = await up.read()
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in HOP | {"content-length"}}
            status = up.status
        if spoil and request.method == "GET" and status in (200, 206) and data:
            data, out_headers = self._spoil(data, out_headers)
        if spoil and self.mode == "etag":
            for k in [k for k in out_headers if k.lower() == "etag"]:
                out_headers[k] = '"0123456789abcdef0123456789abcdef"'
        if request.method == "HEAD":
            return web.Response(status=status, headers=out_headers)
        return web.Response(status=status, body=data, headers=out_headers)

    def _spoil(self, data: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        if self.mode == "corrupt":
            i = len(data) // 2
            return data[:i] + bytes([data[i] ^ 0x55]) + data[i + 1 :], headers
        if self.mode == "short":
            data = data[:-1]
        elif self.mode == "long":
            data = data + b"X"
        else:
            return data, headers
        for k, v in list(headers.items()):
            m = re.match(r"bytes (\d+)-(\d+)/(\d+)", v) if k.lower() == "content-range" else None
            if m:
                start, total = int(m[1]), int(m[3])
                headers[k] = f"bytes {start}-{start + len(data) - 1}/{total}"
        return data, headers
