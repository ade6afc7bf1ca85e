"""A scripted upstream for the generated tests: a raw TCP server that answers each chat-completion request
with exactly the bytes a test chose (status line, headers, body blocks, HTTP framing, how it ends).

The dev upstream (`relay/devupstream.py`) misbehaves in named ways; this one can send anything at all,
including what no HTTP library would write: broken chunked framing, a body compressed against the
request's `Accept-Encoding`, a transfer that stalls after some bytes. The request's `model` names the
script (`register` returns the name), so one server serves many examples, on both faces of the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass, field

import orjson


@dataclass
class Script:
    blocks: list[bytes]  # the body, written block by block (each its own chunk when `chunked`)
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=lambda: [("Content-Type", "text/event-stream")])
    chunked: bool = True
    pause: float = 0.0  # seconds between blocks
    end: str = "close"  # "close" (clean), "abort" (reset), "hang", "garbled" (a chunk cut short, then silence)


class ScriptedUpstream:
    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.requests: dict[str, dict[str, object]] = {}  # the last request body per script name
        self.open = 0  # connections being answered now
        self.total = 0  # requests answered with a script
        self._names = itertools.count()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def register(self, script: Script) -> str:
        name = f"script-{next(self._names)}"
        self.scripts[name] = script
        return name

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            await self._answer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        body = orjson.loads(await reader.readexactly(length)) if length else {}
        model = body.get("model") if isinstance(body, dict) else None
        script = self.scripts.get(model) if isinstance(model, str) else None
        if script is None:
            error = orjson.dumps({"error": {"message": f"unknown script {model!r}", "type": "invalid_request_error"}})
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(error), error))  # fmt: skip
            await writer.drain()
            return
        self.requests[model] = body
        self.total += 1
        lines = [f"HTTP/1.1 {script.status} X".encode()]
        lines += [f"{k}: {v}".encode() for k, v in script.headers]
        lines.append(b"Transfer-Encoding: chunked" if script.chunked else b"Connection: close")
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
        for block in script.blocks:
            if script.pause:
                await asyncio.sleep(script.pause)
            if script.chunked:
                if not block:
                    continue  # (an empty chunk would end the body)
                writer.write(b"%x\r\n%s\r\n" % (len(block), block))
            else:
                writer.write(block)
            await writer.drain()
        if script.end == "abort":
            writer.transport.abort()
            return
        if script.end == "garbled":  # a chunk that announces more than ever comes: the read waits, no error
            await asyncio.sleep(0.05)
            writer.write(b'1000\r\ndata: {"cho')
            await writer.drain()
        if script.end in ("hang", "garbled"):
            await reader.read()  # until the relay goes away
            return
        if script.chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
