"""Profile the relay under W1 (C streams, one reader each), W3 (replay) or W4 (intake) with py-spy; print where its CPU goes.

    .venv/bin/python bench/profile.py [--workload w1|w3|w4] [--streams 100] [--seconds 6] [--native] [--out docs/profile-w1.txt]

Writes the collapsed stacks next to the summary (…-stacks.txt) for flame-graph tools.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402


async def main(streams: int, seconds: float, out: Path | None, native: bool = False, workload: str = "w1") -> str:
    with tempfile.TemporaryDirectory(prefix="relay-profile-", dir=run.WORKDIR) as tmp:
        bench = run.Bench(Path(tmp), quick=True)
        await bench.start_upstream()
        relay = await bench.start_relay("profile")
        stacks = Path(tmp) / "stacks.txt"
        try:
            if workload == "w3":  # replay: a finished 4,000-event stream fetched whole, again and again (W3)
                doc = await bench.post(
                    relay, {"model": "echo:chunks=4000", "messages": [{"role": "user", "content": "replay"}]}
                )
                await bench.wait_done(doc["endpoints"]["status_url"])
                load = {"kind": "fetch", "url": doc["endpoints"]["stream_events_url"], "concurrency": 50,
                        "repeat": int(seconds * 40)}  # fmt: skip
            elif workload == "w4":  # intake: POSTs with an instant upstream, 20 connections (W4)
                url = f"http://127.0.0.1:{relay.port}/v1/stream-chatgpt"
                body = {"model": "echo", "messages": [{"role": "user", "content": "intake"}]}
                load = {"kind": "post", "url": url, "body": body, "count": int(seconds * 400), "concurrency": 20}
            else:  # W1: streams of 400 chunks at 20 ms, one reader each
                model = "echo:chunks=400,pace=0.02,delay=1.5,stamp"
                messages = [{"role": "user", "content": "profile me"}]
                docs = await asyncio.gather(
                    *(bench.post(relay, {"model": model, "messages": messages}) for _ in range(streams))
                )
                load = {"kind": "stream", "targets": [{"url": d["endpoints"]["stream_events_url"]} for d in docs],
                        "expected": 400}  # fmt: skip
            spy = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--pid",
                str(relay.pid),
                "--duration",
                str(int(seconds)),
                "--rate",
                "250",
                "--format",
                "raw",
                "--output",
                str(stacks),
                *(["--native"] if native else ["--nonblocking"]),  # (py-spy refuses the two together)
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            await asyncio.gather(bench.loadgen(load), spy.wait())
        finally:
            relay.stop()
            assert bench.upstream is not None
            bench.upstream.stop()
        own: collections.Counter[str] = collections.Counter()
        total_samples = 0
        by_area: collections.Counter[str] = collections.Counter()
        raw = stacks.read_text()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        total_samples += n
        leaf = frames[-1]
        own[leaf] += n
        joined = stack
        area = (
            "event stream writes to readers (relay/fanout.py, relay/serve.py, relay/sending.py)"
            if any(k in joined for k in ("fanout.py", "serve.py", "sending.py"))
            else "status refresh pass (relay/refresh.py, its worker thread)"
            if "refresh.py" in joined
            else "job: parse, assemble, append (relay/jobs/, assemble.py, store.py)"
            if any(k in joined for k in ("relay/jobs/", "assemble.py", "store.py"))
            else "upstream read (aiohttp client)"
            if any(k in joined for k in ("aiohttp/streams.py", "client_proto.py", "upstream.py"))
            else "event loop (uvloop's C code or asyncio's selector loop)"
            if leaf.startswith("Runner.run") or any(k in joined for k in ("base_events", "selectors"))
            else "other"
        )
        by_area[area] += n
    what = {
        "w1": f"W1: {streams} streams at 50 chunks/s each, one reader each",
        "w3": "W3: a finished 4,000-event stream (1 MB) fetched whole by 50 keep-alive readers, again and again",
        "w4": "W4: POSTs over 20 connections, instant upstream (each POST a whole request)",
    }[workload]
    lines = [
        f"py-spy ({'--native' if native else '--nonblocking'}), {seconds:.0f} s at 250 Hz on the relay process; {what}",
        "",
    ]
    lines.append("Share of samples by area:")
    for area, n in by_area.most_common():
        lines.append(f"  {100 * n / total_samples:5.1f}%  {area}")
    lines += ["", "Top functions by own samples:"]
    for name, n in own.most_common(25):
        lines.append(f"  {100 * n / total_samples:5.1f}%  {name}")
    text = "\n".join(lines) + "\n"
    if out:
        out.write_text(text)
        out.with_name(out.stem + "-stacks.txt").write_text(raw)
    return text


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--native", action="store_true", help="C frames too (py-spy --native): what the loop's time is")
    parser.add_argument(
        "--workload",
        choices=("w1", "w3", "w4"),
        default="w1",
        help="w3: replay of a finished stream; w4: intake, POSTs with an instant upstream",
    )
    args = parser.parse_args()
    print(asyncio.run(main(args.streams, args.seconds, args.out, args.native, args.workload)))
