"""Benchmarks: the relay against baselines measured in the same run, on loopback only.

    .venv/bin/python bench/run.py [--quick] [--out docs/benchmarks.md]

Every workload starts its own relay process (so CPU time and peak memory are its own) and the dev
upstream, and drives them with load generators in separate processes (bench/loadgen.py). The relay's
CPU is read from /proc/<pid>/stat, its memory from /proc/<pid>/status. Baselines: the same readers
reading the dev upstream directly (W1), nginx + nchan fanning out the same events (W2), nginx serving
the same `.txt` as a static file (W3). Every request goes to 127.0.0.1, bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
KEY = "sk-bench-not-a-real-key"
TICK = os.sysconf("SC_CLK_TCK")
NCHAN = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")  # the fan-out baseline (Debian's libnginx-mod-nchan)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def memory_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


async def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Bench:
    def __init__(self, workdir: Path, quick: bool) -> None:
        self.workdir = workdir
        self.quick = quick
        self.upstream: Proc | None = None
        self.results: dict[str, Any] = {}

    # ----- processes ---------------------------------------------------------------------------

    async def start_upstream(self) -> None:
        port = free_port()
        proc = subprocess.Popen([PY, "relay.py", "dev-upstream", "--port", str(port)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        await wait_port(port)
        self.upstream = Proc(proc, port)

    async def start_relay(self, name: str, extra: str = "") -> Proc:
        assert self.upstream is not None
        port = free_port()
        data = self.workdir / f"data-{name}"
        cfg = self.workdir / f"relay-{name}.toml"
        cfg.write_text(
            '[server]\nmax_concurrent_jobs = 20000\nmax_connections = 20000\nlog_level = "warning"\nmax_body_bytes = 1048576\n'
            f'[upstream]\napi_key = "{KEY}"\ndefault_model = "echo"\nmax_connections = 2000\n'
            "[storage]\nreserve_bytes = 0\n" + extra
        )
        proc = subprocess.Popen(
            [PY, "relay.py", "serve", "--config", str(cfg), "--port", str(port), "--data-dir", str(data),
             "--public-url", f"http://127.0.0.1:{port}", "--upstream-base-url", f"http://127.0.0.1:{self.upstream.port}/v1"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        await wait_port(port)
        return Proc(proc, port)

    def start_nginx(self, name: str, http_block: str) -> tuple[Proc, list[int]]:
        port = free_port()
        d = self.workdir / f"nginx-{name}"
        (d / "logs").mkdir(parents=True, exist_ok=True)
        modules = f"load_module {NCHAN};" if "nchan" in http_block else ""
        (d / "nginx.conf").write_text(
            f"""{modules}
user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
    uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        {http_block}
    }}
}}
"""
        )
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        proc = subprocess.Popen([nginx, "-p", str(d), "-c", str(d / "nginx.conf")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        workers = [
            int(p)
            for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        ]
        return Proc(proc, port), workers

    @staticmethod
    async def loadgen(job: dict[str, Any]) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            PY, str(ROOT / "bench" / "loadgen.py"), stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            out, _ = await proc.communicate((json.dumps(job) + "\n").encode())
        except BaseException:  # a workload failed or was cancelled: never leave a load generator behind
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        return json.loads(out.decode().strip().splitlines()[-1])

    async def post(self, relay: Proc, body: dict[str, Any], endpoint: str = "/v1/stream-chatgpt") -> dict[str, Any]:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{relay.port}{endpoint}", json=body) as r:
                assert r.status == 200, await r.text()
                return await r.json()

    # ----- workloads ---------------------------------------------------------------------------

    async def w1(self, c: int) -> None:
        assert self.upstream is not None
        chunks, pace = 200, 0.02
        delay = 1.0 + c / 250
        model = f"echo:chunks={chunks},pace={pace},delay={delay},stamp"
        messages = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}]
        # baseline: the same readers, straight from the dev upstream
        direct = [{"url": f"http://127.0.0.1:{self.upstream.port}/v1/chat/completions",
                   "body": {"model": model, "messages": messages, "stream": True},
                   "headers": {"Authorization": f"Bearer {KEY}"}} for _ in range(c)]  # fmt: skip
        base = await self.loadgen({"kind": "stream", "targets": direct, "expected": chunks})
        relay = await self.start_relay(f"w1-{c}")
        try:
            cpu0 = cpu_seconds([relay.pid])
            docs = await asyncio.gather(*(self.post(relay, {"model": model, "messages": messages}) for _ in range(c)))
            targets = [{"url": d["endpoints"]["stream_events_url"]} for d in docs]
            res = await self.loadgen({"kind": "stream", "targets": targets, "expected": chunks})
            cpu = cpu_seconds([relay.pid]) - cpu0
            rss = memory_kb(relay.pid, "VmHWM")
        finally:
            relay.stop()
        relayed = res["events"]
        self.results[f"W1 C={c}"] = {
            "relay": res, "direct": base, "relay_cpu_s": cpu, "cpu_us_per_chunk": cpu / max(relayed, 1) * 1e6,
            "chunks_per_s": relayed / max(res["duration"] - delay, 1e-9), "peak_rss_mb": rss / 1024,
            "added_p99_ms": res["p99_ms"] - base["p99_ms"], "added_p50_ms": res["p50_ms"] - base["p50_ms"],
        }  # fmt: skip

    async def w2_relay(self, r: int, chunks: int) -> dict[str, Any]:
        relay = await self.start_relay(f"w2-{r}")
        try:
            delay = 2.0 + r / 800
            doc = await self.post(relay, {"model": f"echo:chunks={chunks},pace=0.1,delay={delay},stamp",
                                          "messages": [{"role": "user", "content": "fan out"}]})  # fmt: skip
            targets = [{"url": doc["endpoints"]["stream_events_url"]}] * r
            reader = asyncio.create_task(self.loadgen({"kind": "stream", "targets": targets, "expected": chunks}))
            # count only the delivery of events: start the clock once every reader is connected
            async with aiohttp.ClientSession() as s:
                for _ in range(400):
                    async with s.get(f"http://127.0.0.1:{relay.port}/metrics") as m:
                        text = await m.text()
                    if any(
                        line.startswith("relay_open_readers ") and float(line.split()[1]) >= r
                        for line in text.splitlines()
                    ):
                        break
                    await asyncio.sleep(0.05)
            cpu0 = cpu_seconds([relay.pid])
            res = await reader
            res["cpu_s"] = cpu_seconds([relay.pid]) - cpu0
            res["peak_rss_mb"] = memory_kb(relay.pid, "VmHWM") / 1024
        finally:
            relay.stop()
        return res

    async def w2_nchan(self, r: int, chunks: int) -> dict[str, Any]:
        nginx, workers = self.start_nginx(f"nchan-{r}", """
        location = /sub { nchan_subscriber eventsource; nchan_channel_id bench; nchan_subscriber_first_message newest; }
        location = /pub { nchan_publisher; nchan_channel_id bench; nchan_message_buffer_length 100; }
        """)  # fmt: skip
        try:
            targets = [{"url": f"http://127.0.0.1:{nginx.port}/sub"}] * r
            reader = asyncio.create_task(self.loadgen({"kind": "stream", "targets": targets, "expected": chunks}))
            async with aiohttp.ClientSession() as s:
                pub = f"http://127.0.0.1:{nginx.port}/pub"
                for _ in range(200):  # wait until every subscriber is connected
                    async with s.get(pub, headers={"Accept": "application/json"}) as resp:
                        info = await resp.json(content_type=None) if resp.status == 200 else {}
                    if info.get("subscribers", 0) >= r:
                        break
                    await asyncio.sleep(0.1)
                cpu0 = cpu_seconds(workers)  # as for the relay: once every subscriber is connected
                start = time.monotonic()
                for seq in range(chunks):
                    await asyncio.sleep(max(0.0, start + (seq + 1) * 0.1 - time.monotonic()))
                    event = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "x_seq": seq,
                             "x_sent": time.monotonic(), "choices": [{"index": 0, "delta": {"content": "fan "}}]}  # fmt: skip
                    body = json.dumps(event, separators=(",", ":")).encode()
                    async with s.post(pub, data=body) as resp:
                        await resp.read()
                async with s.post(pub, data=b"[DONE]") as resp:
                    await resp.read()
            res = await reader
            res["cpu_s"] = cpu_seconds(workers) - cpu0
        finally:
            nginx.stop()
        return res

    async def w2(self, r: int) -> None:
        chunks = 20 if self.quick else 50
        one = self.results.setdefault("_w2_one", await self.w2_relay(1, chunks))
        res = await self.w2_relay(r, chunks)
        nchan = await self.w2_nchan(r, chunks)
        delivered = max(res["samples"], 1)
        self.results[f"W2 R={r}"] = {
            "relay": res, "nchan": nchan,
            "cpu_us_per_event": res["cpu_s"] / delivered * 1e6,
            "cpu_us_per_extra_reader_event": (res["cpu_s"] - one["cpu_s"]) / max((r - 1) * chunks, 1) * 1e6,
            "nchan_cpu_us_per_event": nchan["cpu_s"] / max(nchan["samples"], 1) * 1e6,
        }  # fmt: skip

    async def w3(self) -> None:
        concurrency, repeat = (20, 5) if self.quick else (50, 10)
        relay = await self.start_relay("w3")
        try:
            doc = await self.post(
                relay, {"model": "echo:chunks=4000", "messages": [{"role": "user", "content": "replay"}]}
            )
            async with aiohttp.ClientSession() as s:
                for _ in range(300):
                    async with s.get(doc["endpoints"]["status_url"]) as r:
                        if (await r.json())["status"] == "done":
                            break
                    await asyncio.sleep(0.05)
            cpu0 = cpu_seconds([relay.pid])
            res = await self.loadgen({"kind": "fetch", "url": doc["endpoints"]["stream_events_url"],
                                      "concurrency": concurrency, "repeat": repeat})  # fmt: skip
            res["cpu_s"] = cpu_seconds([relay.pid]) - cpu0
            data_dir = self.workdir / "data-w3"
        finally:
            relay.stop()
        rel = doc["endpoints"]["stream_events_url"].split("/", 3)[3]
        nginx, workers = self.start_nginx("static", f"location / {{ root {data_dir}; }}")
        try:
            cpu0 = cpu_seconds(workers)
            static = await self.loadgen({"kind": "fetch", "url": f"http://127.0.0.1:{nginx.port}/{rel}",
                                         "concurrency": concurrency, "repeat": repeat})  # fmt: skip
            static["cpu_s"] = cpu_seconds(workers) - cpu0
        finally:
            nginx.stop()
        self.results["W3 replay"] = {
            "relay": res, "nginx_static": static,
            "relay_mb_s": res["bytes"] / res["duration"] / 1e6, "nginx_mb_s": static["bytes"] / static["duration"] / 1e6,
            "ratio": (res["bytes"] / res["duration"]) / (static["bytes"] / static["duration"]),
            "file_bytes": res["bytes"] // max(res["fetches"], 1),
        }  # fmt: skip

    async def w4(self) -> None:
        count = 500 if self.quick else 2000
        relay = await self.start_relay("w4")
        try:
            body = {"model": "echo", "messages": [{"role": "user", "content": "intake"}]}
            url = f"http://127.0.0.1:{relay.port}/v1/stream-chatgpt"
            posts = await self.loadgen({"kind": "post", "url": url, "body": body, "count": count, "concurrency": 20})
            first = await self.loadgen(
                {"kind": "first_event", "url": url, "body": body, "count": 50 if self.quick else 200}
            )
        finally:
            relay.stop()
        self.results["W4 intake"] = {
            "posts": posts,
            "posts_per_s": posts["ok"] / posts["duration"],
            "first_event": first,
        }

    async def w5(self) -> None:
        """Durable endings: the same burst of async requests (instant upstream) on a relay that fsyncs each
        request's ending before dropping its marker, and on one that does not."""
        count = 300 if self.quick else 1000
        out: dict[str, Any] = {"count": count}
        for fsync in (False, True, False, True):  # interleaved, so that machine noise hits both
            relay = await self.start_relay(f"w5-{fsync}-{len(out)}", f"fsync = {'true' if fsync else 'false'}\n")
            try:
                body = {"model": "echo", "messages": [{"role": "user", "content": "ending"}]}
                url = f"http://127.0.0.1:{relay.port}/v1/async-chatgpt"
                t0 = time.monotonic()
                posts = await self.loadgen(
                    {"kind": "post", "url": url, "body": body, "count": count, "concurrency": 20}
                )
                await self.wait_idle(relay)
                took = time.monotonic() - t0
            finally:
                relay.stop()
            key = "fsync" if fsync else "no_fsync"
            out[key] = min(out.get(key, took), took)
            out[key + "_failed"] = out.get(key + "_failed", 0) + posts["failed"]
        out["ratio"] = out["fsync"] / out["no_fsync"]
        self.results["W5 durable endings"] = out

    @staticmethod
    async def wait_idle(relay: Proc, timeout: float = 120) -> None:
        """Until the relay reports no running request (all endings written)."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                async with s.get(f"http://127.0.0.1:{relay.port}/metrics") as r:
                    text = await r.text()
                if "\nrelay_running_jobs 0.0" in text:
                    return
                await asyncio.sleep(0.02)
        raise TimeoutError("the relay still runs requests")

    async def idle_memory(self) -> None:
        count = 500 if self.quick else 2000
        relay = await self.start_relay("idle")
        try:
            doc = await self.post(relay, {"model": "echo:hang", "messages": [{"role": "user", "content": "idle"}]})
            await asyncio.sleep(0.5)
            before = memory_kb(relay.pid, "VmRSS")
            proc = await asyncio.create_subprocess_exec(PY, str(ROOT / "bench" / "loadgen.py"),
                                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
            assert proc.stdin and proc.stdout
            proc.stdin.write(
                (
                    json.dumps({"kind": "idle", "url": doc["endpoints"]["stream_events_url"], "count": count}) + "\n"
                ).encode()
            )
            await proc.stdin.drain()
            await proc.stdout.readline()  # all open
            await asyncio.sleep(1.0)
            after = memory_kb(relay.pid, "VmRSS")
            proc.stdin.write(b"done\n")
            await proc.stdin.drain()
            await proc.communicate()
        finally:
            relay.stop()
        self.results["Idle readers"] = {"count": count, "kb_per_reader": (after - before) / count}

    async def run(self) -> None:
        if not NCHAN.exists():
            raise SystemExit(f"{NCHAN} is missing: run `make bench` (it installs libnginx-mod-nchan) or install it")
        await self.start_upstream()
        try:
            for c in (100,) if self.quick else (100, 500):
                await self.w1(c)
            for r in (100, 1000) if self.quick else (100, 1000, 5000):
                await self.w2(r)
            await self.w3()
            await self.w4()
            await self.w5()
            await self.idle_memory()
        finally:
            assert self.upstream is not None
            self.upstream.stop()
        self.results.pop("_w2_one", None)


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({model}), Linux {platform.release()}, Python {platform.python_version()}"


def report(results: dict[str, Any], command: str, seconds: float) -> str:
    f = lambda x: f"{x:.1f}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = [
        "# Benchmarks", "",
        f"Machine: {machine()}. Run on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {seconds:.0f} s in all.",
        f"Command: `{command}` (everything on loopback; the machine is shared and noisy: compare ratios).", "",
        "## W1: many streams (200 chunks at 20 ms each, one reader per stream)", "",
        "| C | relay p50 / p99 delay (ms) | direct p50 / p99 (ms) | added p99 (ms) | lost / reordered | chunks/s | relay CPU µs/chunk | relay peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for key, r in results.items():
        if key.startswith("W1"):
            lines.append(
                f"| {key.split('=')[1]} | {f(r['relay']['p50_ms'])} / {f(r['relay']['p99_ms'])} | "
                f"{f(r['direct']['p50_ms'])} / {f(r['direct']['p99_ms'])} | {f(r['added_p99_ms'])} | "
                f"{r['relay']['lost']} / {r['relay']['reordered']} | {r['chunks_per_s']:.0f} | "
                f"{f(r['cpu_us_per_chunk'])} | {f(r['peak_rss_mb'])} |"
            )
    lines += ["", "## W2: fan-out (one live request at 10 chunks/s, R readers)", "",
              "| R | relay p50 / p99 delay (ms) | nchan p50 / p99 (ms) | lost / reordered (relay, nchan) | relay CPU µs/event | per extra reader µs/event | nchan CPU µs/event | relay peak RSS (MB) |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, r in results.items():
        if key.startswith("W2"):
            lines.append(
                f"| {key.split('=')[1]} | {f(r['relay']['p50_ms'])} / {f(r['relay']['p99_ms'])} | "
                f"{f(r['nchan']['p50_ms'])} / {f(r['nchan']['p99_ms'])} | "
                f"{r['relay']['lost']} / {r['relay']['reordered']}, {r['nchan']['lost']} / {r['nchan']['reordered']} | "
                f"{f(r['cpu_us_per_event'])} | {f(r['cpu_us_per_extra_reader_event'])} | {f(r['nchan_cpu_us_per_event'])} | "
                f"{f(r['relay']['peak_rss_mb'])} |"
            )
    if "W3 replay" in results:
        r = results["W3 replay"]
        lines += ["", "## W3: replay of a finished 4,000-event stream", "",
                  f"{r['relay']['fetches']} fetches of {r['file_bytes']:,} bytes each, same readers: "
                  f"relay {r['relay_mb_s']:.1f} MB/s, nginx static {r['nginx_mb_s']:.1f} MB/s, **ratio {r['ratio']:.2f}**."]  # fmt: skip
    if "W4 intake" in results:
        r = results["W4 intake"]
        lines += ["", "## W4: intake (instant upstream)", "",
                  f"{r['posts']['ok']} POSTs (20 connections): **{r['posts_per_s']:.0f} POSTs/s**, {r['posts']['failed']} failed. "
                  f"POST → first event at a reader: p50 {r['first_event']['p50_ms']:.1f} ms, p99 {r['first_event']['p99_ms']:.1f} ms."]  # fmt: skip
    if "W5 durable endings" in results:
        r = results["W5 durable endings"]
        lines += ["", "## W5: durable endings (instant upstream, async requests)", "",
                  f"{r['count']} requests, from the first POST until every ending is written (best of two): "
                  f"fsync on {r['fsync']:.2f} s, off {r['no_fsync']:.2f} s, **ratio {r['ratio']:.2f}** "
                  f"({r['fsync_failed'] + r['no_fsync_failed']} failed)."]  # fmt: skip
    if "Idle readers" in results:
        r = results["Idle readers"]
        lines += [
            "",
            "## Idle readers",
            "",
            f"{r['count']} idle event-stream readers: **{r['kb_per_reader']:.1f} KB** of relay RSS each.",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--out", default=None, help="write the Markdown report here (e.g. docs/benchmarks.md)")
    parser.add_argument("--json", default=None, help="also write the raw results as JSON")
    args = parser.parse_args()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        bench = Bench(Path(tmp), args.quick)
        asyncio.run(bench.run())
    command = "python bench/run.py" + (" --quick" if args.quick else "") + (f" --out {args.out}" if args.out else "")
    text = report(bench.results, command, time.monotonic() - t0)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(bench.results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
