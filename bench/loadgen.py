"""Cheap load generators for the benchmarks: raw asyncio sockets, minimal HTTP/1.1 and SSE parsing.

Run as its own process by bench/run.py (so its CPU is not the relay's). Reads a JSON job on stdin,
prints a JSON result on stdout. Jobs:

- `stream`: open one SSE stream per target (GET, or POST with a body for the upstream directly) and
  record, for every event carrying `x_seq`/`x_sent`, the delivery delay (now − x_sent, both
  CLOCK_MONOTONIC, which is system-wide), lost and reordered sequence numbers.
- `fetch`: fetch a URL (GET, whole body, counted in place, not copied) with a given concurrency, `repeat`
  times over each keep-alive connection; bytes and time.
- `post`: POST a body N times with a given concurrency over keep-alive connections; answers/s.
- `first_event`: POST, then open the stream at once, timing POST → first data event, N times.
- `idle`: open N streams and keep them open until told to stop on stdin.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from typing import Any
from urllib.parse import urlsplit

SEQ_RE = re.compile(rb'"x_seq":(\d+),"x_sent":([0-9.e+-]+)')


class SSEClient(asyncio.Protocol):
    """One HTTP/1.1 request whose answer is an event stream (chunked or not)."""

    def __init__(self, request: bytes, done: asyncio.Future[None], stats: dict[str, Any]) -> None:
        self.request = request
        self.done = done
        self.stats = stats
        self.head = b""
        self.headers_done = False
        self.chunked = False
        self.raw = bytearray()  # undecoded body bytes (chunked framing)
        self.body = bytearray()  # decoded body bytes, not yet split into events
        self.expected = 0
        self.status = 0
        self.last_seq = -1
        self.seen = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self.headers_done:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4 :]
            self.headers_done = True
            self.status = int(head.split(b" ", 2)[1])
            self.chunked = b"transfer-encoding: chunked" in head.lower()
        self.stats["bytes"] += len(data)
        if self.chunked:
            self.raw += data
            self._dechunk()
        else:
            self.body += data
        self._events()

    def _dechunk(self) -> None:
        raw = self.raw
        pos = 0
        while True:
            if self.expected == 0:
                nl = raw.find(b"\r\n", pos)
                if nl < 0:
                    break
                line = bytes(raw[pos:nl])
                if not line:  # the CRLF after a chunk's data
                    pos = nl + 2
                    continue
                size = int(line.split(b";")[0], 16)
                pos = nl + 2
                if size == 0:
                    self.transport.close()  # type: ignore[attr-defined]
                    break
                self.expected = size
            take = min(self.expected, len(raw) - pos)
            if take <= 0:
                break
            self.body += raw[pos : pos + take]
            pos += take
            self.expected -= take
        del raw[:pos]

    def _events(self) -> None:
        body = self.body
        end = body.rfind(b"\n\n")
        if end < 0:
            return
        block = bytes(body[: end + 2])
        del body[: end + 2]
        now = time.monotonic()
        stats = self.stats
        if "first" not in stats:
            stats["first"] = now
        stats["last"] = now
        for seq_b, sent_b in SEQ_RE.findall(block):
            seq = int(seq_b)
            stats["delays"].append(now - float(sent_b))
            self.seen += 1
            if seq <= self.last_seq:
                stats["reordered"] += 1
            elif seq != self.last_seq + 1:
                stats["lost"] += seq - self.last_seq - 1
            self.last_seq = max(self.last_seq, seq)
        stats["events"] += block.count(b"\n\n")
        if b"data: [DONE]" in block:
            self.transport.close()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


def request_bytes(method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    parts = urlsplit(url)
    path = parts.path + (("?" + parts.query) if parts.query else "")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {parts.netloc}", "Accept: text/event-stream"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def open_stream(target: dict[str, Any], stats: dict[str, Any], expected: int) -> None:
    loop = asyncio.get_running_loop()
    parts = urlsplit(target["url"])
    done: asyncio.Future[None] = loop.create_future()
    body = json.dumps(target["body"]).encode() if target.get("body") else b""
    req = request_bytes("POST" if body else "GET", target["url"], body, target.get("headers"))
    proto = SSEClient(req, done, stats)
    for attempt in range(20):
        try:
            await loop.create_connection(lambda: proto, parts.hostname, parts.port)
            break
        except OSError:
            await asyncio.sleep(0.05 * (attempt + 1))
    else:
        stats["failed"] += 1
        return
    await done
    if expected and proto.last_seq + 1 < expected:
        stats["lost"] += expected - proto.last_seq - 1
    if proto.status != 200:
        stats["failed"] += 1


async def job_stream(job: dict[str, Any]) -> dict[str, Any]:
    stats: dict[str, Any] = {"delays": [], "lost": 0, "reordered": 0, "events": 0, "bytes": 0, "failed": 0}
    t0 = time.monotonic()
    tasks = []
    for i, target in enumerate(job["targets"]):
        tasks.append(asyncio.create_task(open_stream(target, stats, job.get("expected", 0))))
        if i % 200 == 199:
            await asyncio.sleep(0.02)  # connect in waves, not 5,000 SYNs at once
    await asyncio.gather(*tasks)
    stats["duration"] = time.monotonic() - t0
    return summarize(stats)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))
    return values[k]


def summarize(stats: dict[str, Any]) -> dict[str, Any]:
    delays = stats.pop("delays")
    stats["active_s"] = stats.pop("last", 0.0) - stats.pop("first", 0.0)  # first event to last, all readers
    stats["samples"] = len(delays)
    stats["p50_ms"] = percentile(delays, 0.50) * 1000
    stats["p99_ms"] = percentile(delays, 0.99) * 1000
    stats["max_ms"] = (max(delays) if delays else float("nan")) * 1000
    return stats


class BodyCounter(asyncio.Protocol):
    """GETs over one keep-alive connection, counting each answer's body bytes as they arrive without
    copying them (Content-Length or chunked framing followed in place): the reader of W3, which must cost
    less than the servers it compares, or it measures itself."""

    def __init__(self, request: bytes, repeat: int, done: asyncio.Future[int]) -> None:
        self.request, self.left, self.done = request, repeat, done
        self.transport: asyncio.Transport | None = None
        self.buf = b""  # a head or a chunk-size line still incomplete
        self.state = "head"  # head | body (Content-Length) | size (chunk-size line) | data (with its CRLF) | trailer
        self.need = 0  # bytes still to come in the current body or chunk (with its CRLF)
        self.total = 0  # body bytes of every answer so far

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.buf:  # (a head or size line split across reads: joined, rarely)
            data, self.buf = self.buf + data, b""
        pos, size = 0, len(data)
        while pos < size:
            if self.state in ("body", "data"):  # counted, not copied
                take = min(self.need, size - pos)
                pos += take
                self.need -= take
                if self.need == 0:
                    self._body_part_done()
                continue
            sep = b"\r\n\r\n" if self.state == "head" else b"\r\n"
            end = data.find(sep, pos)
            if end < 0:
                self.buf = data[pos:]
                return
            self._line(data[pos:end])
            pos = end + len(sep)

    def _line(self, line: bytes) -> None:
        if self.state == "head":
            lower = line.lower()
            if b"content-length:" in lower:
                self.need = int(re.search(rb"content-length: *(\d+)", lower).group(1))  # type: ignore[union-attr]
                self.total += self.need
                self.state = "body"
                if self.need == 0:
                    self._answer_done()
            else:
                self.state = "size"
        elif self.state == "size":
            n = int(line.split(b";")[0], 16)
            if n == 0:
                self.state = "trailer"
            else:
                self.total += n
                self.need = n + 2  # the chunk and its CRLF
                self.state = "data"
        elif self.state == "trailer":  # the empty line after the last chunk
            self._answer_done()

    def _body_part_done(self) -> None:
        if self.state == "body":
            self._answer_done()
        else:
            self.state = "size"

    def _answer_done(self) -> None:
        self.left -= 1
        self.state = "head"
        if self.left == 0:
            assert self.transport is not None
            self.transport.close()
            if not self.done.done():
                self.done.set_result(self.total)
        else:
            assert self.transport is not None
            self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed with {self.left} answers to go"))


async def job_fetch(job: dict[str, Any]) -> dict[str, Any]:
    url = urlsplit(job["url"])
    request = f"GET {url.path} HTTP/1.1\r\nHost: {url.hostname}:{url.port}\r\n\r\n".encode()
    loop = asyncio.get_running_loop()

    async def worker() -> int:
        done: asyncio.Future[int] = loop.create_future()
        await loop.create_connection(lambda: BodyCounter(request, job["repeat"], done), url.hostname, url.port)
        return await done

    t0 = time.monotonic()
    sizes = await asyncio.gather(*(worker() for _ in range(job["concurrency"])))
    return {"bytes": sum(sizes), "fetches": job["concurrency"] * job["repeat"], "duration": time.monotonic() - t0}


async def job_post(job: dict[str, Any]) -> dict[str, Any]:
    url = urlsplit(job["url"])
    body = json.dumps(job["body"]).encode()
    req = request_bytes("POST", job["url"], body, job.get("headers"))
    count: dict[str, Any] = {"ok": 0, "failed": 0}
    remaining = [job["count"]]
    latencies: list[float] = []

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        while remaining[0] > 0:
            remaining[0] -= 1
            sent = time.monotonic()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            latencies.append(time.monotonic() - sent)
            count["ok" if head.startswith(b"HTTP/1.1 200") else "failed"] += 1
        writer.close()

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(job["concurrency"])))
    count["duration"] = time.monotonic() - t0
    count["p50_ms"] = percentile(latencies, 0.5) * 1000
    count["p99_ms"] = percentile(latencies, 0.99) * 1000
    return count


async def job_first_event(job: dict[str, Any]) -> dict[str, Any]:
    url = urlsplit(job["url"])
    body = json.dumps(job["body"]).encode()
    times = []
    for _ in range(job["count"]):
        t0 = time.monotonic()
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        writer.write(request_bytes("POST", job["url"], body, job.get("headers")))
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        answer = json.loads(await reader.readexactly(length))
        writer.close()
        stream = urlsplit(answer["endpoints"]["stream_events_url"])
        reader, writer = await asyncio.open_connection(stream.hostname, stream.port)
        writer.write(request_bytes("GET", answer["endpoints"]["stream_events_url"]))
        buf = b""
        while b"\ndata: " not in buf and b"\r\ndata: " not in buf:
            chunk = await reader.read(65536)
            if not chunk:
                break
            buf += chunk
        times.append(time.monotonic() - t0)
        writer.close()
    return {"p50_ms": percentile(times, 0.5) * 1000, "p99_ms": percentile(times, 0.99) * 1000, "count": len(times)}


async def job_idle(job: dict[str, Any]) -> dict[str, Any]:
    url = urlsplit(job["url"])
    conns = []
    for _ in range(job["count"]):
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        writer.write(request_bytes("GET", job["url"]))
        conns.append((reader, writer))
    for reader, _ in conns:
        await reader.readuntil(b": connected\n\n")
    print(json.dumps({"open": len(conns)}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for _, writer in conns:
        writer.close()
    return {"closed": len(conns)}


JOBS = {
    "stream": job_stream,
    "fetch": job_fetch,
    "post": job_post,
    "first_event": job_first_event,
    "idle": job_idle,
}


def main() -> None:
    job = json.loads(sys.stdin.readline())
    result = asyncio.run(JOBS[job["kind"]](job))
    result["loadgen_cpu_s"] = time.process_time()  # what reading cost the load generator itself
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
