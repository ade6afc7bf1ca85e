"""A loopback TCP proxy for the tests that can cut every open connection at once (a network drop)."""

from __future__ import annotations

import asyncio
import contextlib


class CuttableProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.heads: list[bytes] = []  # the first bytes each client sent (its request line and headers)
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bool) -> None:
        first = True
        try:
            while data := await reader.read(65536):
                if record and first:
                    self.heads.append(data)
                    first = False
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        self._writers |= {client_writer, upstream_writer}
        try:
            await asyncio.gather(
                self._pipe(client_reader, upstream_writer, record=True),
                self._pipe(upstream_reader, client_writer, record=False),
            )
        finally:
            self._writers -= {client_writer, upstream_writer}

    def cut(self) -> int:
        """Abort every open connection (both sides); returns how many were cut."""
        writers = list(self._writers)
        for w in writers:
            w.transport.abort()
        return len(writers) // 2

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
