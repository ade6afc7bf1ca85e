"""Where the memory of an idle event-stream reader goes: the Python heap a relay holds per reader, by owner.

    .venv/bin/python bench/reader_memory.py [--readers 500]

Starts the dev upstream and a relay (under tracemalloc, through `--traced`), holds one request that never
ends (`echo:hang`), opens 50 idle readers of its stream (warm-up), takes a snapshot, opens N more, takes
another: the difference, divided by N, is what one more idle reader costs, grouped by the code that
allocated it (aiohttp, the relay's own modules, the event loop's C code, the rest) with the largest lines.
The benchmark's "Idle readers" row measures RSS instead (heap plus allocator slack, without tracemalloc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402


def traced(report: Path, argv: list[str]) -> None:
    """In the relay's process: serve with tracemalloc on; SIGUSR1 takes a snapshot, the second one writes
    the difference to `report` (JSON)."""
    tracemalloc.start(1)
    snaps: list[tracemalloc.Snapshot] = []

    def snapshot(*_: object) -> None:
        import gc

        gc.collect()
        snaps.append(tracemalloc.take_snapshot())
        if len(snaps) == 2:
            diff = snaps[1].compare_to(snaps[0], "lineno")
            lines = [(str(d.traceback[0]), d.size_diff, d.count_diff) for d in diff if d.size_diff]
            report.write_text(json.dumps(lines))

    signal.signal(signal.SIGUSR1, snapshot)
    sys.path.insert(0, str(run.ROOT))
    from relay.cli import main

    sys.argv = ["relay.py", *argv]
    main()


def owner(where: str) -> str:
    if f"{run.ROOT}/relay/" in where:
        return "the relay's own code (relay/)"
    if "/aiohttp/" in where:
        return "aiohttp (its connection, parser, request, response)"
    if "asyncio/runners.py" in where:
        return "the event loop's C code (uvloop: transports, handles)"
    return "other (weakref sets, asyncio)"


async def measure(readers: int) -> str:
    with tempfile.TemporaryDirectory(prefix="relay-memory-", dir=run.WORKDIR) as tmp:
        bench = run.Bench(Path(tmp), quick=True)
        await bench.start_upstream()
        assert bench.upstream is not None
        port, report, cfg = run.free_port(), Path(tmp) / "report.json", Path(tmp) / "relay.toml"
        cfg.write_text('[server]\nmax_connections = 20000\nlog_level = "warning"\n'
                       f'[upstream]\napi_key = "{run.KEY}"\n[storage]\nreserve_bytes = 0\n')  # fmt: skip
        proc = subprocess.Popen(
            [run.PY, __file__, "--traced", str(report), "serve", "--config", str(cfg), "--port", str(port),
             "--data-dir", str(Path(tmp) / "data"), "--public-url", f"http://127.0.0.1:{port}",
             "--upstream-base-url", f"http://127.0.0.1:{bench.upstream.port}/v1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        relay = run.Proc(proc, port)
        holders = []
        try:
            await run.wait_port(port)
            doc = await bench.post(relay, {"model": "echo:hang", "messages": [{"role": "user", "content": "idle"}]})
            url = doc["endpoints"]["stream_events_url"]
            for count in (50, readers):
                holder = await asyncio.create_subprocess_exec(
                    run.PY, str(run.ROOT / "bench" / "loadgen.py"), stdin=subprocess.PIPE, stdout=subprocess.PIPE
                )
                holders.append(holder)
                assert holder.stdin and holder.stdout
                holder.stdin.write((json.dumps({"kind": "idle", "url": url, "count": count}) + "\n").encode())
                await holder.stdin.drain()
                await holder.stdout.readline()  # all open
                await asyncio.sleep(1.0)
                proc.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 60
            while not report.exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            lines = json.loads(report.read_text())
        finally:
            for holder in holders:
                if holder.returncode is None:
                    holder.kill()
                    await holder.wait()
            relay.stop()
            bench.upstream.stop()
    groups: dict[str, int] = {}
    for where, size, _ in lines:
        groups[owner(where)] = groups.get(owner(where), 0) + size
    total = sum(groups.values())
    out = [f"{readers} more idle readers of one stream: {total / readers / 1024:.1f} KB of Python heap each", ""]
    out += [f"  {size / readers / 1024:6.2f} KB  {name}" for name, size in sorted(groups.items(), key=lambda g: -g[1])]
    out += ["", "Largest lines (bytes per reader, objects per reader):"]
    for where, size, count in sorted(lines, key=lambda x: -x[1])[:25]:
        out.append(f"  {size / readers:7.0f} B {count / readers:5.1f}  {where.replace(str(run.ROOT) + '/', '')}")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--traced":
        traced(Path(sys.argv[2]), sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readers", type=int, default=500)
    args = parser.parse_args()
    print(asyncio.run(measure(args.readers)))


if __name__ == "__main__":
    main()
