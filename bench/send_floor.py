"""The floor under W2's "per extra reader" figure: what one `send` of an event frame to one more loopback
TCP reader costs the sending process on this machine, with no server around it.

    .venv/bin/python bench/send_floor.py [--readers 1000] [--events 50] [--bytes 290]

Opens N loopback TCP connections to a reader process (asyncio, discarding what it gets), then sends
an event-sized frame to every connection, E times, from a plain loop of `socket.send` calls, then the
same through uvloop's transports in an event loop (what the relay's fan-out does, without the relay);
prints the sender's CPU per send for each. On loopback the sender's `send` also does the receiving side's TCP work (it runs
in the sender's context), which is why it costs what it does. A server that writes each event to each
reader's socket (the relay, nchan) cannot spend less per extra reader than this.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import uvloop

READER = r"""
import asyncio, sys
class Drain(asyncio.Protocol):
    def data_received(self, data): pass
async def main(port, n):
    loop = asyncio.get_running_loop()
    for _ in range(n):
        await loop.create_connection(Drain, "127.0.0.1", port)
    print("connected", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""


@contextlib.contextmanager
def reader_process(port: int, readers: int) -> Iterator[subprocess.Popen[str]]:
    """The reader process (READER) with `readers` connections to `port`, stopped on the way out."""
    child = subprocess.Popen([sys.executable, "-c", READER, str(port), str(readers)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        yield child
    finally:
        assert child.stdin is not None
        child.stdin.write("done\n")
        child.stdin.close()
        child.wait(timeout=30)


def frame_of(size: int) -> bytes:
    """An event of `size` bytes as one HTTP/1.1 chunk, as the relay sends it."""
    return b"%x\r\n" % size + b"x" * size + b"\r\n"


def measure(readers: int, events: int, size: int) -> float:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(readers)
    port = listener.getsockname()[1]
    with reader_process(port, readers) as child, contextlib.closing(listener):
        conns = [listener.accept()[0] for _ in range(readers)]
        assert child.stdout is not None and child.stdout.readline().strip() == "connected"
        for c in conns:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        frame = frame_of(size)
        for c in conns:  # warm-up
            c.send(frame)
        time.sleep(0.5)
        cpu0 = time.process_time()
        for _ in range(events):
            for c in conns:
                c.send(frame)
            time.sleep(0.1)  # like W2's live request: the readers take each event before the next
        cpu = time.process_time() - cpu0
        for c in conns:
            c.close()
    return cpu / (readers * events) * 1e6


async def measure_transports(readers: int, events: int, size: int) -> float:
    """The same through uvloop's transports (what the relay's fan-out writes with): CPU per write."""
    loop = asyncio.get_running_loop()
    transports: list[asyncio.Transport] = []

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transports.append(transport)  # type: ignore[arg-type]

    server = await loop.create_server(Accept, "127.0.0.1", 0, backlog=readers)
    port = server.sockets[0].getsockname()[1]
    with reader_process(port, readers) as child:
        assert child.stdout is not None
        assert (await loop.run_in_executor(None, child.stdout.readline)).strip() == "connected"
        while len(transports) < readers:
            await asyncio.sleep(0.01)
        frame = frame_of(size)
        await asyncio.sleep(0.5)
        cpu0 = time.process_time()
        for _ in range(events):
            for transport in transports:
                transport.write(frame)
            await asyncio.sleep(0.1)
        cpu = time.process_time() - cpu0
        for transport in transports:
            transport.close()
    server.close()
    return cpu / (readers * events) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readers", type=int, default=1000)
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--bytes", type=int, default=290, help="event size (W2's: ~300 bytes a reader gets per event)")
    args = parser.parse_args()
    per_send = measure(args.readers, args.events, args.bytes)
    per_write = uvloop.run(measure_transports(args.readers, args.events, args.bytes))
    print(f"{args.readers} loopback readers, {args.events} events of {args.bytes} bytes: "
          f"{per_send:.1f} µs of the sender's CPU per send (a plain Python loop of socket.send), "
          f"{per_write:.1f} µs per write through uvloop's transports (an event loop waking for each event)")  # fmt: skip


if __name__ == "__main__":
    main()
