"""Timed whole GETs of one URL, for the benchmarks (W8: a stream's `.txt` from the local disk or the archive).

Run as its own process by bench/run.py (so its CPU is not the relay's). Reads a JSON job on stdin,
`{"url": …, "count": N, "concurrency": C, "headers": {…}}`, and prints a JSON result on stdout: reads,
failed (a status other than `expect`, 200 by default, or a body of another size than the first),
bytes, duration, reads_per_s and the p50 / p99 / max latency of one read (request sent → last byte), over
C keep-alive connections sharing N reads.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from typing import Any
from urllib.parse import urlsplit

LENGTH = re.compile(rb"(?im)^content-length: *(\d+)")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))]


async def read_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, int]:
    """One GET on a keep-alive connection: (status, body size)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if (m := LENGTH.search(head)) is not None:
        return status, len(await reader.readexactly(int(m.group(1))))
    if b"chunked" not in head.lower():  # (no body: a 204 or a 304)
        return status, 0
    size = 0
    while True:
        n = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
        if n == 0:
            await reader.readuntil(b"\r\n")
            return status, size
        size += len(await reader.readexactly(n + 2)) - 2


async def job(spec: dict[str, Any]) -> dict[str, Any]:
    url = urlsplit(spec["url"])
    path = url.path + (f"?{url.query}" if url.query else "")
    lines = [f"GET {path} HTTP/1.1", f"Host: {url.netloc}"] + [f"{k}: {v}" for k, v in spec.get("headers", {}).items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    expect = spec.get("expect", 200)
    left = [spec["count"]]
    out: dict[str, Any] = {"reads": 0, "failed": 0, "bytes": 0}
    sizes: set[int] = set()
    latencies: list[float] = []

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        try:
            while left[0] > 0:
                left[0] -= 1
                t0 = time.monotonic()
                status, size = await read_one(reader, writer, request)
                latencies.append(time.monotonic() - t0)
                out["reads"] += 1
                out["bytes"] += size
                sizes.add(size)
                if status != expect:
                    out["failed"] += 1
        finally:
            writer.close()

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(spec.get("concurrency", 1))))
    out["duration"] = time.monotonic() - t0
    out["failed"] += len(sizes) - 1 if sizes else 0  # every read of one URL answers the same bytes
    out["size"] = max(sizes) if sizes else 0
    out["reads_per_s"] = out["reads"] / max(out["duration"], 1e-9)
    out["p50_ms"] = percentile(latencies, 0.50) * 1000
    out["p99_ms"] = percentile(latencies, 0.99) * 1000
    out["max_ms"] = (max(latencies) if latencies else float("nan")) * 1000
    return out


def main() -> None:
    result = asyncio.run(job(json.loads(sys.stdin.readline())))
    result["reader_cpu_s"] = time.process_time()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
