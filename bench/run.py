"""Benchmarks: the relay against baselines measured in the same run, on loopback only.

    .venv/bin/python bench/run.py [--quick] [--out docs/benchmarks.md]

Every workload starts its own relay process (so CPU time and peak memory are its own) and the dev
upstream, and drives them with load generators in separate processes (bench/loadgen.py). The relay's
CPU is read from /proc/<pid>/stat, its memory from /proc/<pid>/status. Baselines: the same readers
reading the dev upstream directly (W1), nginx + nchan fanning out the same events (W2), nginx serving
the same `.txt` as a static file (W3), the same stream read from the local disk before it is archived
(W8, against a real SeaweedFS). Every request goes to 127.0.0.1, bounded in count and time.
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
# Data directories go on /var/tmp, not /tmp: on the machine these figures come from, creating a file
# under /tmp costs ~0.3-0.8 ms of CPU (a crowded ext4 block group) against ~0.03 ms elsewhere on the same
# disk, which would bill the relay for the benchmark host's /tmp rather than for its own work.
WORKDIR = os.environ.get("RELAY_BENCH_WORKDIR", "/var/tmp")
PEER_VENV = ROOT / ".venv-peer"  # the LiteLLM proxy, in a venv of its own (bench/requirements-peer.txt)
PEER_KEY = "sk-bench-peer-master-key"
ADMIN_KEY = "bench-admin-key-0123456789"
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


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (a server that forks workers counts whole)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        kids = subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True).stdout.split()
        todo += [int(k) for k in kids]
    return out


def figures(res: dict[str, Any], base: dict[str, Any], cpu: float, delay: float, rss_kb: int) -> dict[str, Any]:
    """One W1 run against its direct baseline."""
    relayed = res["events"]
    return {
        "res": res, "cpu_s": cpu, "cpu_us_per_chunk": cpu / max(relayed, 1) * 1e6,
        "chunks_per_s": relayed / max(res["duration"] - delay, 1e-9), "peak_rss_mb": rss_kb / 1024,
        "added_p99_ms": res["p99_ms"] - base["p99_ms"], "added_p50_ms": res["p50_ms"] - base["p50_ms"],
    }  # fmt: skip


def busy(server_cpu: float, upstream_cpu: float, res: dict[str, Any], wall: float) -> dict[str, float]:
    """Cores each process of a run kept busy on average (CPU seconds over the run's wall time)."""
    cpu = {"server": server_cpu, "dev upstream": upstream_cpu, "load generator": res["loadgen_cpu_s"]}
    return {k: v / max(wall, 1e-9) for k, v in cpu.items()}


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
        self.polls = 0

    # ----- processes ---------------------------------------------------------------------------

    async def start_upstream(self) -> None:
        port = free_port()
        proc = subprocess.Popen([PY, "relay.py", "dev-upstream", "--port", str(port)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        await wait_port(port)
        self.upstream = Proc(proc, port)

    async def start_relay(
        self,
        name: str,
        extra: str = "",
        loop: str = "auto",
        node: int = 1,
        public_url: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        assert self.upstream is not None
        port = free_port()
        data = self.workdir / f"data-{name}"
        cfg = self.workdir / f"relay-{name}.toml"
        cfg.write_text(
            '[server]\nmax_concurrent_jobs = 20000\nmax_connections = 20000\nlog_level = "warning"\nmax_body_bytes = 1048576\n'
            f'event_loop = "{loop}"\nnode_id = {node}\n'
            f'[upstream]\napi_key = "{KEY}"\ndefault_model = "echo"\nmax_connections = 2000\n'
            "[storage]\nreserve_bytes = 0\n" + extra
        )
        proc = subprocess.Popen(
            [PY, "relay.py", "serve", "--config", str(cfg), "--port", str(port), "--data-dir", str(data),
             "--public-url", public_url or f"http://127.0.0.1:{port}", "--upstream-base-url", f"http://127.0.0.1:{self.upstream.port}/v1"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})},
        )  # fmt: skip
        await wait_port(port)
        return Proc(proc, port)

    async def start_bare(self) -> Proc:
        """The bare pass-through (bench/passthrough.py) in front of the dev upstream."""
        assert self.upstream is not None
        port = free_port()
        url = f"http://127.0.0.1:{self.upstream.port}/v1/chat/completions"
        proc = subprocess.Popen([PY, str(ROOT / "bench" / "passthrough.py"), url, str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        bare = Proc(proc, port)
        try:
            await wait_port(port)
        except BaseException:
            bare.stop()
            raise
        return bare

    async def start_peer(self) -> tuple[Proc, list[int]]:
        """The LiteLLM proxy (one process, its defaults) in front of the same dev upstream."""
        assert self.upstream is not None
        port = free_port()
        cfg = self.workdir / "litellm.yaml"
        cfg.write_text(
            "model_list:\n  - model_name: echo\n    litellm_params:\n      model: openai/echo\n"
            f"      api_base: http://127.0.0.1:{self.upstream.port}/v1\n      api_key: {KEY}\n"
        )
        env = {**os.environ, "LITELLM_MASTER_KEY": PEER_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
               "LITELLM_TELEMETRY": "False", "NO_DOCS": "True"}  # fmt: skip
        proc = subprocess.Popen([str(PEER_VENV / "bin" / "litellm"), "--config", str(cfg), "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=self.workdir, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        await wait_port(port, timeout=120)
        return Proc(proc, port), tree(proc.pid)

    def start_nginx(self, name: str, http_block: str, port: int = 0, upstreams: str = "") -> tuple[Proc, list[int]]:
        port = port or free_port()
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
    {upstreams}
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
        opts = {"chunks": chunks, "pace": pace, "delay": delay, "stamp": True}
        model = f"echo:chunks={chunks},pace={pace},delay={delay},stamp"
        messages = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}]
        # baseline: the same readers, straight from the dev upstream
        direct = [{"url": f"http://127.0.0.1:{self.upstream.port}/v1/chat/completions",
                   "body": {"model": model, "messages": messages, "stream": True},
                   "headers": {"Authorization": f"Bearer {KEY}"}} for _ in range(c)]  # fmt: skip
        base = await self.loadgen({"kind": "stream", "targets": direct, "expected": chunks})
        entry: dict[str, Any] = {"direct": base}
        variants = [("uvloop", "uvloop", False), ("asyncio", "asyncio", False)]
        if c == 100:  # the same run with the console's operator page open, polling the admin API every second
            variants.append(("polled", "uvloop", True))
        for name, loop, polled in variants:
            extra = f'[auth]\nadmin_keys = ["{ADMIN_KEY}"]\n' if polled else ""
            relay = await self.start_relay(f"w1-{c}-{name}", extra=extra, loop=loop)
            poller = asyncio.create_task(self.poll_operator(relay)) if polled else None
            try:
                cpu0, up0, t0 = cpu_seconds([relay.pid]), cpu_seconds([self.upstream.pid]), time.monotonic()
                docs = await asyncio.gather(
                    *(self.post(relay, {"model": model, "messages": messages}) for _ in range(c))
                )
                targets = [{"url": d["endpoints"]["stream_events_url"]} for d in docs]
                res = await self.loadgen({"kind": "stream", "targets": targets, "expected": chunks})
                cpu = cpu_seconds([relay.pid]) - cpu0
                cores = busy(cpu, cpu_seconds([self.upstream.pid]) - up0, res, time.monotonic() - t0)
                rss = memory_kb(relay.pid, "VmHWM")
            finally:
                if poller is not None:
                    poller.cancel()
                relay.stop()
            entry[name] = figures(res, base, cpu, delay, rss) | {"cores_used": cores}
            if poller is not None:
                entry[name]["polls"] = self.polls
        # reference: a bare aiohttp pass-through (bench/passthrough.py), the least a Python proxy can do per chunk
        bare = await self.start_bare()
        try:
            targets = [{**t, "url": f"http://127.0.0.1:{bare.port}/s"} for t in direct]
            cpu0, up0, t0 = cpu_seconds([bare.pid]), cpu_seconds([self.upstream.pid]), time.monotonic()
            res = await self.loadgen({"kind": "stream", "targets": targets, "expected": chunks})
            cpu = cpu_seconds([bare.pid]) - cpu0
            cores = busy(cpu, cpu_seconds([self.upstream.pid]) - up0, res, time.monotonic() - t0)
            entry["bare"] = figures(res, base, cpu, delay, memory_kb(bare.pid, "VmHWM")) | {"cores_used": cores}
        finally:
            bare.stop()
        if c == 100:  # the peer: LiteLLM's proxy, streaming the same upstream to the same readers
            peer, pids = await self.start_peer()
            try:
                body = {"model": "echo", "dev": opts, "messages": messages, "stream": True}
                targets = [{"url": f"http://127.0.0.1:{peer.port}/v1/chat/completions", "body": body,
                            "headers": {"Authorization": f"Bearer {PEER_KEY}"}} for _ in range(c)]  # fmt: skip
                cpu0 = cpu_seconds(pids)
                res = await self.loadgen({"kind": "stream", "targets": targets, "expected": chunks})
                cpu = cpu_seconds(pids) - cpu0
                rss = sum(memory_kb(pid, "VmHWM") for pid in pids)
            finally:
                peer.stop()
            entry["peer"] = figures(res, base, cpu, delay, rss)
        # the relay's own figures (on its default event loop, uvloop) under the names earlier runs used
        entry.update({k: v for k, v in entry["uvloop"].items() if k != "res"}, relay=entry["uvloop"]["res"])
        self.results[f"W1 C={c}"] = entry

    async def w7(self) -> None:
        """The OpenAI-compatible face against the relay's own endpoint, in the same run: the same streams
        (C requests of 200 chunks at 20 ms, one reader each), once through POST /v1/stream-chatgpt and its
        stream URL, once through POST /v1/responses (background) and GET /v1/responses/{id}?stream=true,
        which writes and serves Responses events. CPU per upstream chunk, each in a fresh relay process."""
        c, chunks, pace = (50, 100, 0.02) if self.quick else (100, 200, 0.02)
        delay = 1.0 + c / 250
        model = f"echo:chunks={chunks},pace={pace},delay={delay}"
        text = "the quick brown fox jumps over the lazy dog"
        entry: dict[str, Any] = {"streams": c, "chunks": chunks}
        for name in ("native", "facade", "native_again"):
            relay = await self.start_relay(f"w7-{name}")
            base = f"http://127.0.0.1:{relay.port}"
            try:
                cpu0 = cpu_seconds([relay.pid])
                if name.startswith("native"):
                    body = {"model": model, "messages": [{"role": "user", "content": text}]}
                    docs = await asyncio.gather(*(self.post(relay, body) for _ in range(c)))
                    targets = [{"url": d["endpoints"]["stream_events_url"]} for d in docs]
                else:
                    body = {"model": model, "input": text, "background": True}
                    docs = await asyncio.gather(*(self.post(relay, body, "/v1/responses") for _ in range(c)))
                    targets = [{"url": f"{base}/v1/responses/{d['id']}?stream=true"} for d in docs]
                res = await self.loadgen({"kind": "stream", "targets": targets, "expected": 0})
                cpu = cpu_seconds([relay.pid]) - cpu0
            finally:
                relay.stop()
            entry[name] = {"cpu_s": cpu, "cpu_us_per_chunk": cpu / (c * chunks) * 1e6, "events": res["events"],
                           "failed": res["failed"], "duration_s": res["duration"]}  # fmt: skip
        native = min(entry["native"]["cpu_us_per_chunk"], entry["native_again"]["cpu_us_per_chunk"])
        entry["ratio"] = entry["facade"]["cpu_us_per_chunk"] / native
        self.results["W7 OpenAI face"] = entry

    async def w8(self) -> None:
        """The archive tier ([archive] enabled, a real SeaweedFS on loopback: tests/objectstore.py).

        Uploads: N requests (instant upstream, small answers) finished at intake's pace on a relay with
        `keep_local_hours = 0` and the default `max_concurrent_uploads`; their uploads are held back
        `upload_after_seconds` until every request has ended, so that the clock and the relay's CPU count
        the uploads (PUTs, the read-back check, the manifest, removing the local copies) and nothing of the
        intake. Done when /metrics shows every request archived and its local copy removed (its polls, every
        20 ms, are in the relay's CPU).

        Reads: one finished stream of a few hundred chunks on a second relay, its `.txt` read K times by a
        few keep-alive readers (bench/reads.py) while the file is local (its upload held back), then the
        same once the relay has archived it and removed the local copy (served from the bucket); and a
        resume from the middle (Last-Event-ID) in each tier."""
        sys.path.insert(0, str(ROOT))
        from tests.objectstore import SeaweedS3  # a real S3 store; `make test` installs `weed`

        n, k, readers, chunks = (50, 50, 4, 400) if self.quick else (500, 500, 4, 400)
        hold = 2.0 + n / 100  # seconds an upload waits after its request ended: longer than the intake
        s3 = SeaweedS3(self.workdir / "s3")
        relays: list[Proc] = []
        entry: dict[str, Any] = {"requests": n, "reads": k, "readers": readers}
        try:
            await s3.astart()
            store_pids = tree(s3.proc.pid) if s3.proc else []

            def archive(prefix: str, after: float) -> str:
                return (f'[archive]\nenabled = true\nendpoint_url = "{s3.endpoint}"\nbucket = "{s3.bucket}"\n'
                        f'prefix = "{prefix}"\nregion = "{s3.region}"\nkeep_local_hours = 0\n'
                        f"upload_after_seconds = {after}\n")  # fmt: skip

            # ----- uploads per second
            relay = await self.start_relay("w8-uploads", archive("w8-uploads/", hold), env=s3.env())
            relays.append(relay)
            body = {"model": "echo", "messages": [{"role": "user", "content": "archive me, a short answer"}]}
            posts = await self.loadgen({"kind": "post", "url": f"http://127.0.0.1:{relay.port}/v1/stream-chatgpt",
                                        "body": body, "count": n, "concurrency": 20})  # fmt: skip
            assert posts["ok"] == n, posts
            t_posts = time.monotonic() - posts["duration"]  # the first POST (after the load generator started)
            await self.wait_idle(relay)
            await self.wait_metrics(relay, lambda m: m["relay_archive_pending_requests"] >= n, 30)
            cpu0, store0 = cpu_seconds([relay.pid]), cpu_seconds(store_pids)
            t_start = t_posts + hold  # (the first request ended just after its POST: its upload is due then)
            early = (await self.metrics(relay))["relay_archive_archived_requests"]
            assert early == 0 and time.monotonic() < t_start, "the intake took longer than `hold`: raise it"
            last = await self.wait_metrics(relay, lambda m: m["relay_archive_local_removed_requests"] >= n
                                           and m["relay_archive_pending_requests"] == 0, 60 + n / 2)  # fmt: skip
            took = max(time.monotonic() - t_start, 1e-9)
            cpu, store_cpu = cpu_seconds([relay.pid]) - cpu0, cpu_seconds(store_pids) - store0
            entry["uploads"] = {
                "posts": posts, "hold_s": hold, "seconds": took,
                "archived": last["relay_archive_archived_requests"], "bytes": last["relay_archive_archived_bytes"],
                "failures": last["relay_archive_failures"] + last["relay_archive_integrity_failures"],
                "per_s": n / took, "bytes_per_s": last["relay_archive_archived_bytes"] / took,
                "cpu_us_per_request": cpu / n * 1e6, "store_cpu_us_per_request": store_cpu / n * 1e6,
            }  # fmt: skip
            relay.stop()

            # ----- one stream read from the local disk, then from the bucket
            held = 5.0 + k / 50  # the local reads fit well within it (checked below)
            relay = await self.start_relay("w8-reads", archive("w8-reads/", held), env=s3.env())
            relays.append(relay)
            words = " ".join(f"word{i}" for i in range(40))
            doc = await self.post(
                relay, {"model": f"echo:chunks={chunks}", "messages": [{"role": "user", "content": words}]}
            )
            await self.wait_done(doc["endpoints"]["status_url"])
            url = doc["endpoints"]["stream_events_url"]
            local_file = self.workdir / "data-w8-reads" / url.split("/", 3)[3]
            tiers: dict[str, Any] = {}
            for tier in ("local", "archived"):
                if tier == "archived":
                    await self.wait_metrics(relay, lambda m: m["relay_archive_local_removed_requests"] >= 1, 60 + held)
                    assert not local_file.exists(), local_file
                else:
                    assert local_file.exists(), local_file
                async with aiohttp.ClientSession() as s, s.get(url) as r:
                    assert r.status == 200, r.status
                    whole = await r.read()
                ids = [line[4:] for line in whole.decode().split("\n") if line.startswith("id: ")]
                cpu0 = cpu_seconds([relay.pid])
                res = await self.reads({"url": url, "count": k, "concurrency": readers})
                res["cpu_us_per_read"] = (cpu_seconds([relay.pid]) - cpu0) / k * 1e6
                resume = await self.reads({"url": url, "count": 5, "headers": {"Last-Event-ID": ids[len(ids) // 2]}})
                tiers[tier] = {**res, "whole": whole, "events": len(ids), "resume": resume}
                if tier == "local":  # the upload was still held back: every read above came from the disk
                    m = await self.metrics(relay)
                    assert m["relay_archive_archived_requests"] == 0 and local_file.exists(), "raise `held`"
            local, archived = tiers["local"], tiers["archived"]
            assert local.pop("whole") == archived.pop("whole"), "the archive served other bytes"
            entry.update(local=local, archived=archived, ratio=archived["reads_per_s"] / local["reads_per_s"],
                         p50_ratio=archived["p50_ms"] / local["p50_ms"], chunks=chunks)  # fmt: skip
        finally:
            for r in relays:
                r.stop()
            await s3.astop()
        self.results["W8 archive tier"] = entry

    @staticmethod
    async def reads(job: dict[str, Any]) -> dict[str, Any]:
        """Timed whole GETs in their own process (bench/reads.py)."""
        proc = await asyncio.create_subprocess_exec(
            PY, str(ROOT / "bench" / "reads.py"), stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate((json.dumps(job) + "\n").encode()), 300)
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        return json.loads(out.decode().strip().splitlines()[-1])

    @staticmethod
    async def metrics(relay: Proc) -> dict[str, float]:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{relay.port}/metrics") as r:
            text = await r.text()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and " " in line:
                name, value = line.rsplit(" ", 1)
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    async def wait_metrics(self, relay: Proc, done: Any, timeout: float) -> dict[str, float]:
        """Poll /metrics (every 20 ms) until `done(metrics)`; the last metrics."""
        deadline = time.monotonic() + timeout
        while True:
            m = await self.metrics(relay)
            if done(m):
                return m
            if time.monotonic() > deadline:
                archive = {k: v for k, v in m.items() if k.startswith("relay_archive")}
                raise TimeoutError(f"the archive did not get there in {timeout:.0f} s: {archive}")
            await asyncio.sleep(0.02)

    @staticmethod
    async def wait_done(status_url: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                async with s.get(status_url) as r:
                    if (await r.json())["status"] == "done":
                        return
                await asyncio.sleep(0.05)
        raise TimeoutError(f"{status_url} is not done")

    async def poll_operator(self, relay: Proc) -> None:
        """What the console's operator page does: the three admin endpoints, every second."""
        self.polls = 0
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with aiohttp.ClientSession(headers=headers) as s:
            while True:
                for path in ("/v1/admin/running", "/v1/admin/finished?limit=300", "/v1/admin/stats"):
                    async with s.get(f"http://127.0.0.1:{relay.port}{path}") as r:
                        assert r.status == 200, await r.text()
                        await r.read()
                self.polls += 1
                await asyncio.sleep(1.0)

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
        concurrency, repeat = (20, 5) if self.quick else (50, 40)
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
            cpu0 = cpu_seconds([relay.pid])
            posts = await self.loadgen({"kind": "post", "url": url, "body": body, "count": count, "concurrency": 20})
            await self.wait_idle(relay)  # every request accepted has also ended: its whole cost is counted
            cpu = cpu_seconds([relay.pid]) - cpu0
            first = await self.loadgen(
                {"kind": "first_event", "url": url, "body": body, "count": 50 if self.quick else 200}
            )
        finally:
            relay.stop()
        # reference: the same POSTs through the bare pass-through, each answered with the upstream's whole
        # (non-streamed) answer: the least a Python proxy does per POST on this machine
        bare = await self.start_bare()
        try:
            cpu0 = cpu_seconds([bare.pid])
            bare_posts = await self.loadgen({"kind": "post", "url": f"http://127.0.0.1:{bare.port}/c", "body": body,
                                             "count": count, "concurrency": 20,
                                             "headers": {"Authorization": f"Bearer {KEY}"}})  # fmt: skip
            bare_cpu = cpu_seconds([bare.pid]) - cpu0
        finally:
            bare.stop()
        self.results["W4 intake"] = {
            "posts": posts,
            "posts_per_s": posts["ok"] / posts["duration"],
            "cpu_us_per_request": cpu / max(posts["ok"], 1) * 1e6,
            "first_event": first,
            "bare": {"posts": bare_posts, "posts_per_s": bare_posts["ok"] / bare_posts["duration"],
                     "cpu_us_per_request": bare_cpu / max(bare_posts["ok"], 1) * 1e6},
        }  # fmt: skip

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

    async def w6(self) -> None:
        """One relay node against two, each behind the same nginx: at saturation (W1 with C streams), chunks
        per second counted from the first chunk any reader received to the last; and below saturation (100
        streams, each node count run twice, interleaved, the lower kept), the relays' CPU per chunk."""
        c = 400 if self.quick else 1000
        out: dict[str, Any] = {"streams": c, "chunks": 100, "light_streams": 100}
        for n in (1, 2):
            out[f"{n}_node"] = await self._w6_pass(n, c)
        out["ratio"] = out["2_node"]["chunks_per_s"] / out["1_node"]["chunks_per_s"]
        for n in (1, 2, 1, 2):  # below saturation: what a node costs per chunk when the cores are not all busy
            light = await self._w6_pass(n, out["light_streams"])
            kept = out.get(f"{n}_node_light")
            if kept is None or light["cpu_us_per_chunk"] < kept["cpu_us_per_chunk"]:
                out[f"{n}_node_light"] = light
        out["cpu_ratio"] = out["2_node_light"]["cpu_us_per_chunk"] / out["1_node_light"]["cpu_us_per_chunk"]
        self.results["W6 nodes"] = out

    async def _w6_pass(self, n: int, c: int) -> dict[str, Any]:
        chunks, pace = 100, 0.02
        delay = 2.0 + c / 250
        model = f"echo:chunks={chunks},pace={pace},delay={delay},stamp"
        messages = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}]
        port = free_port()
        relays = [await self.start_relay(f"w6-{n}-{c}-{i}-{time.monotonic_ns()}", node=i,
                                         public_url=f"http://127.0.0.1:{port}")
                  for i in range(1, n + 1)]  # fmt: skip
        nodes = "".join(
            f"upstream relay_node{i} {{ server 127.0.0.1:{r.port}; keepalive 256; }}\n    "
            for i, r in enumerate(relays, 1)
        )
        every = " ".join(f"server 127.0.0.1:{r.port};" for r in relays)
        proxy = 'proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; proxy_read_timeout 600s;'
        nginx, workers = self.start_nginx(f"nodes-{n}-{c}-{time.monotonic_ns()}", f"""
        location ~ "^/(?<relay_node>[0-9]+)/" {{ proxy_pass http://relay_node$relay_node; {proxy} }}
        location /v1/ {{ proxy_pass http://relay_all; {proxy} }}
        """, port=port, upstreams=nodes + f"upstream relay_all {{ {every} keepalive 256; }}")  # fmt: skip
        try:
            pids = [r.pid for r in relays]
            assert self.upstream is not None
            others0 = cpu_seconds([self.upstream.pid]), cpu_seconds(workers)
            cpu0 = cpu_seconds(pids)
            t0 = time.monotonic()
            url = f"http://127.0.0.1:{port}/v1/stream-chatgpt"
            async with aiohttp.ClientSession() as s:
                docs = []
                for i in range(0, c, 100):
                    docs += await asyncio.gather(*(self._post_url(s, url, {"model": model, "messages": messages})
                                                   for _ in range(min(100, c - i))))  # fmt: skip
            targets = [{"url": d["endpoints"]["stream_events_url"]} for d in docs]
            res = await self.loadgen({"kind": "stream", "targets": targets, "expected": chunks})
            cpu = cpu_seconds(pids) - cpu0
            wall = time.monotonic() - t0
            shares = {"relays": cpu, "dev upstream": cpu_seconds([self.upstream.pid]) - others0[0],
                      "nginx": cpu_seconds(workers) - others0[1], "load generator": res["loadgen_cpu_s"]}  # fmt: skip
        finally:
            nginx.stop()
            for r in relays:
                r.stop()
        return {
            "res": res, "chunks_per_s": res["samples"] / max(res["active_s"], 1e-9),
            "cpu_us_per_chunk": cpu / max(res["events"], 1) * 1e6,
            "nodes_used": sorted({d["endpoints"]["stream_events_url"].split("/")[3] for d in docs}),
            "cores_used": {k: v / wall for k, v in shares.items()},
        }  # fmt: skip

    @staticmethod
    async def _post_url(s: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
        async with s.post(url, json=body) as r:
            assert r.status == 200, await r.text()
            return await r.json()

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

    async def run(self, only: set[str] | None = None) -> None:
        want = lambda name: not only or name in only  # noqa: E731
        if want("w2") and not NCHAN.exists():
            raise SystemExit(f"{NCHAN} is missing: run `make bench` (it installs libnginx-mod-nchan) or install it")
        if want("w1") and not (PEER_VENV / "bin" / "litellm").exists():
            raise SystemExit(f"the peer (LiteLLM) is missing from {PEER_VENV}: run `make bench` (it installs it there)")
        await self.start_upstream()
        try:
            if want("w1"):
                for c in (100,) if self.quick else (100, 500):
                    await self.w1(c)
            if want("w2"):
                for r in (100, 1000) if self.quick else (100, 1000, 5000):
                    await self.w2(r)
            if want("w3"):
                await self.w3()
            if want("w4"):
                await self.w4()
            if want("w5"):
                await self.w5()
            if want("idle"):
                await self.idle_memory()
            if want("w6"):
                await self.w6()
            if want("w7"):
                await self.w7()
            if want("w8"):
                await self.w8()
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


P99_FLOOR_MS = 1.0  # an added p99 below this is within the direct baseline's own run-to-run noise


def goals(results: dict[str, Any]) -> list[str]:
    """The speed goals against this run's figures (each against its reference in the same run)."""
    rows: list[tuple[str, str, str, bool]] = []
    for c in (100, 500):
        if (w1 := results.get(f"W1 C={c}")) and "bare" in w1:
            cpu = w1["cpu_us_per_chunk"] / w1["bare"]["cpu_us_per_chunk"]
            rows.append((f"W1 C = {c}: relay CPU per chunk ÷ the bare pass-through's", "≤ 1.5 ×",
                         f"{w1['cpu_us_per_chunk']:.1f} / {w1['bare']['cpu_us_per_chunk']:.1f} µs = {cpu:.2f} ×", cpu <= 1.5))  # fmt: skip
            bare = w1["bare"]["added_p99_ms"]
            p99 = w1["added_p99_ms"] / max(bare, P99_FLOOR_MS)
            floor = (
                f" (the bare's below {P99_FLOOR_MS:g} ms: counted as {P99_FLOOR_MS:g})" if bare < P99_FLOOR_MS else ""
            )
            rows.append((f"W1 C = {c}: added p99 ÷ the bare pass-through's", "≤ 2 ×",
                         f"{w1['added_p99_ms']:.1f} / {bare:.1f} ms = {p99:.1f} ×{floor}", p99 <= 2))  # fmt: skip
    if w4 := results.get("W4 intake"):
        ok = w4["posts_per_s"] >= 1000 and w4["posts"]["p99_ms"] <= 20
        bare = (
            f" (bare: {w4['bare']['posts_per_s']:.0f}/s, p99 {w4['bare']['posts']['p99_ms']:.1f} ms)"
            if "bare" in w4
            else ""
        )
        rows.append(("W4: POSTs answered per second (instant upstream), POST p99", "≥ 1,000/s, ≤ 20 ms",
                     f"{w4['posts_per_s']:.0f}/s, {w4['posts']['p99_ms']:.1f} ms{bare}", ok))  # fmt: skip
    w2 = [(k, r) for k, r in results.items() if k.startswith("W2")]
    if w2:
        worst = max(r["cpu_us_per_extra_reader_event"] for _, r in w2)
        nchan = ", ".join(f"{r['nchan_cpu_us_per_event']:.1f}" for _, r in w2)
        rows.append(("W2: relay CPU per extra reader per event (worst R)", "≤ 8 µs",
                     f"{worst:.1f} µs (nchan, all its CPU per event: {nchan})", worst <= 8))  # fmt: skip
    if w3 := results.get("W3 replay"):
        rows.append(
            ("W3: replay of a finished stream ÷ nginx static", "≥ 1.0 ×", f"{w3['ratio']:.2f} ×", w3["ratio"] >= 1.0)
        )
    if idle := results.get("Idle readers"):
        rows.append(
            ("relay memory per idle reader", "≤ 10 KB", f"{idle['kb_per_reader']:.1f} KB", idle["kb_per_reader"] <= 10)
        )
    if (w6 := results.get("W6 nodes")) and "cpu_ratio" in w6:
        rows.append(("W6: relay CPU per chunk, two nodes ÷ one (below saturation)", "≤ 1.1 ×",
                     f"{w6['2_node_light']['cpu_us_per_chunk']:.1f} / {w6['1_node_light']['cpu_us_per_chunk']:.1f} µs = "
                     f"{w6['cpu_ratio']:.2f} ×", w6["cpu_ratio"] <= 1.1))  # fmt: skip
    if not rows:
        return []
    lines = ["## Goals", "", "Each figure against its reference measured in this same run (docs/performance.md says why "
             "a goal that is not met is not, and what would meet it).", "",
             "| figure | goal | this run | met |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {name} | {goal} | {got} | {'yes' if met else '**no**'} |" for name, goal, got, met in rows]
    return lines + [""]


def report(results: dict[str, Any], command: str, seconds: float) -> str:
    f = lambda x: f"{x:.1f}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = [
        "# Benchmarks", "",
        f"Machine: {machine()}. Run on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {seconds:.0f} s in all.",
        f"Command: `{command}` (everything on loopback; the machine is shared and noisy: compare ratios).", "",
        *goals(results),
        "## W1: many streams (200 chunks at 20 ms each, one reader per stream)", "",
        "Added delay is measured against the same readers reading the dev upstream directly, in the same run. "
        "The relay writes every event to disk and its status every second; the peer (LiteLLM's proxy, one process, "
        "its defaults) streams through without keeping anything; the bare pass-through (`bench/passthrough.py`: "
        "aiohttp on uvloop copying the upstream's bytes to the reader, nothing else) is the floor of a Python proxy "
        "on this machine.", "",
        "| C | server | p50 / p99 delay (ms) | direct p50 / p99 (ms) | added p99 (ms) | lost / reordered | chunks/s | CPU µs/chunk | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    names = {"uvloop": "relay (uvloop)", "polled": "relay (uvloop), operator page polling every second",
             "asyncio": "relay (asyncio loop)", "peer": "LiteLLM proxy (peer)",
             "bare": "bare pass-through (reference)"}  # fmt: skip
    for key, r in results.items():
        if key.startswith("W1"):
            for variant, name in names.items():
                if variant not in r:
                    continue
                v, res = r[variant], r[variant]["res"]
                lines.append(
                    f"| {key.split('=')[1]} | {name} | {f(res['p50_ms'])} / {f(res['p99_ms'])} | "
                    f"{f(r['direct']['p50_ms'])} / {f(r['direct']['p99_ms'])} | {f(v['added_p99_ms'])} | "
                    f"{res['lost']} / {res['reordered']} | {v['chunks_per_s']:.0f} | "
                    f"{f(v['cpu_us_per_chunk'])} | {f(v['peak_rss_mb'])} |"
                )
    for key, r in results.items():
        if key.startswith("W1") and "bare" in r:
            lines.append(
                f"\n{key}: the relay against the bare pass-through: **{r['cpu_us_per_chunk'] / r['bare']['cpu_us_per_chunk']:.2f} ×** "
                f"the CPU per chunk, **{r['added_p99_ms'] / max(r['bare']['added_p99_ms'], P99_FLOOR_MS):.1f} ×** the added p99 "
                f"(an added p99 below {P99_FLOOR_MS:g} ms counted as {P99_FLOOR_MS:g}: the direct baseline's own noise)."
            )
            for name, v in (("relay (uvloop)", r["uvloop"]), ("bare pass-through", r["bare"])):
                if "cores_used" in v:
                    used = v["cores_used"]
                    lines.append(f"- cores busy with the {name} (of {os.cpu_count()}): "
                                 + ", ".join(f"{k} {x:.2f}" for k, x in used.items()) + f"; total {sum(used.values()):.2f}")  # fmt: skip
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
                  f"{r['posts']['ok']} POSTs (20 connections): **{r['posts_per_s']:.0f} POSTs/s**, {r['posts']['failed']} failed, "
                  f"POST answered in p50 {r['posts']['p50_ms']:.1f} ms, p99 {r['posts']['p99_ms']:.1f} ms; relay CPU "
                  f"{r['cpu_us_per_request']:.0f} µs per request (intake, upstream call, files, ending). "
                  f"POST → first event at a reader (one at a time, new connections): p50 {r['first_event']['p50_ms']:.1f} ms, "
                  f"p99 {r['first_event']['p99_ms']:.1f} ms."]  # fmt: skip
        if "bare" in r:
            b = r["bare"]
            lines += ["", f"The bare pass-through, the same POSTs each answered with the upstream's whole answer (one "
                      f"upstream call, nothing kept): {b['posts_per_s']:.0f} POSTs/s, {b['posts']['failed']} failed, p50 "
                      f"{b['posts']['p50_ms']:.1f} ms, p99 {b['posts']['p99_ms']:.1f} ms, {b['cpu_us_per_request']:.0f} µs CPU per "
                      f"request: the relay takes **{r['cpu_us_per_request'] / b['cpu_us_per_request']:.1f} ×** its CPU per request."]  # fmt: skip
    if "W5 durable endings" in results:
        r = results["W5 durable endings"]
        lines += ["", "## W5: durable endings (instant upstream, async requests)", "",
                  f"{r['count']} requests, from the first POST until every ending is written (best of two): "
                  f"fsync on {r['fsync']:.2f} s, off {r['no_fsync']:.2f} s, **ratio {r['ratio']:.2f}** "
                  f"({r['fsync_failed'] + r['no_fsync_failed']} failed)."]  # fmt: skip
    if "W6 nodes" in results:
        r = results["W6 nodes"]
        lines += ["", f"## W6: one node or two, behind nginx ({r['streams']} streams of {r['chunks']} chunks at 20 ms, saturating)", "",
                  "| nodes | chunks/s | p50 / p99 delay (ms) | lost / reordered | relay CPU µs/chunk (all nodes) | nodes that took streams |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for n in (1, 2):
            v = r[f"{n}_node"]
            lines.append(
                f"| {n} | {v['chunks_per_s']:.0f} | {f(v['res']['p50_ms'])} / {f(v['res']['p99_ms'])} | "
                f"{v['res']['lost']} / {v['res']['reordered']} | {f(v['cpu_us_per_chunk'])} | {', '.join(v['nodes_used'])} |"
            )
        lines += [
            "",
            f"Two nodes against one: **{r['ratio']:.2f} ×** the chunks per second. Cores each part of the "
            "run kept busy (of the machine's " + str(os.cpu_count()) + "):",
        ]
        for n in (1, 2):
            used = r[f"{n}_node"]["cores_used"]
            lines.append(f"- {n} node(s): " + ", ".join(f"{k} {v:.2f}" for k, v in used.items())
                         + f"; total {sum(used.values()):.2f}")  # fmt: skip
        if "cpu_ratio" in r:
            lines += ["", "On two cores that also run the upstream, nginx and the load generator, two nodes cannot "
                      "double the throughput: what nodes must not do is add CPU per chunk. Below saturation "
                      f"({r['light_streams']} streams; each node count run twice, interleaved, the lower kept):", "",
                      "| nodes | relay CPU µs/chunk (all nodes) | p50 / p99 delay (ms) | lost / reordered | nodes that took streams |",
                      "|---|---|---|---|---|"]  # fmt: skip
            for n in (1, 2):
                v = r[f"{n}_node_light"]
                lines.append(f"| {n} | {f(v['cpu_us_per_chunk'])} | {f(v['res']['p50_ms'])} / {f(v['res']['p99_ms'])} | "
                             f"{v['res']['lost']} / {v['res']['reordered']} | {', '.join(v['nodes_used'])} |")  # fmt: skip
            lines += ["", f"Two nodes against one: **{r['cpu_ratio']:.2f} ×** the relay CPU per chunk."]
    if "W7 OpenAI face" in results:
        r = results["W7 OpenAI face"]
        lines += ["", f"## W7: the OpenAI-compatible face ({r['streams']} streams of {r['chunks']} chunks at 20 ms, one reader each)", "",
                  "The same streams through the relay's own endpoint (POST `/v1/stream-chatgpt`, its stream URL) and through "
                  "the Responses API (POST `/v1/responses` in the background, `GET /v1/responses/{id}?stream=true`), each in "
                  "a fresh relay process; the native run is made before and after the facade's, and the lower is kept.", "",
                  "| endpoint | CPU µs per upstream chunk | events read | failed |", "|---|---|---|---|"]  # fmt: skip
        for key, name in (
            ("native", "native (first)"),
            ("facade", "Responses API"),
            ("native_again", "native (after)"),
        ):
            v = r[key]
            lines.append(f"| {name} | {f(v['cpu_us_per_chunk'])} | {v['events']} | {v['failed']} |")
        lines += ["", f"Facade against native: **{r['ratio']:.2f} ×** the CPU per chunk."]
    if "W8 archive tier" in results:
        r = results["W8 archive tier"]
        u, lo, ar = r["uploads"], r["local"], r["archived"]
        lines += ["", "## W8: the archive tier (SeaweedFS `weed mini` on loopback)", "",
                  f"Uploads: {r['requests']} requests (instant upstream, small answers) finished at intake's pace, "
                  f"`keep_local_hours = 0`, default `max_concurrent_uploads`, uploads held back {u['hold_s']:.2f} s so that "
                  f"the clock and the CPU count the uploads only: every request archived (uploaded, read back and "
                  f"checked) and its local copy removed in {u['seconds']:.2f} s, **{u['per_s']:.1f} requests/s**, "
                  f"{u['bytes_per_s'] / 1e3:.0f} KB/s ({u['bytes'] / max(u['archived'], 1) / 1e3:.1f} KB a request); "
                  f"relay CPU {u['cpu_us_per_request']:.0f} µs per archived request (the store's: "
                  f"{u['store_cpu_us_per_request']:.0f} µs); {u['failures']:.0f} failed attempts.", "",
                  f"Reads: one finished stream of {r['chunks']} chunks ({lo['events']} events, {lo['size']:,} bytes), its `.txt` "
                  f"read {r['reads']} times by {r['readers']} keep-alive readers from the local disk, then from the bucket once "
                  "the relay archived it and removed the local copy (same relay, same bytes); a resume from the middle "
                  "(`Last-Event-ID`), 5 times.", "",
                  "| tier | reads/s | p50 / p99 (ms) | relay CPU µs/read | resume p50 / max (ms) | failed |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for name, v in (("local disk", lo), ("archive (bucket)", ar)):
            lines.append(
                f"| {name} | {v['reads_per_s']:.0f} | {f(v['p50_ms'])} / {f(v['p99_ms'])} | {v['cpu_us_per_read']:.0f} | "
                f"{f(v['resume']['p50_ms'])} / {f(v['resume']['max_ms'])} | {v['failed'] + v['resume']['failed']} |"
            )
        lines += [
            "",
            f"Archived against local: **{r['ratio']:.2f} ×** the reads per second, {r['p50_ratio']:.1f} × the p50 latency.",
        ]
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
    parser.add_argument(
        "--workdir",
        default=WORKDIR,
        help=f"where the relays' data directories go (default {WORKDIR}: a disk like a VPS's /var/lib)",
    )
    parser.add_argument(
        "--only", default="", help="comma-separated workloads to run (w1,w2,w3,w4,w5,w6,w7,w8,idle); all by default"
    )
    args = parser.parse_args()
    only = {w.strip().lower() for w in args.only.split(",") if w.strip()}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="relay-bench-", dir=args.workdir) as tmp:
        bench = Bench(Path(tmp), args.quick)
        asyncio.run(bench.run(only))
    command = (
        "python bench/run.py"
        + (" --quick" if args.quick else "")
        + (f" --only {args.only}" if only else "")
        + (f" --out {args.out}" if args.out else "")
    )
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
