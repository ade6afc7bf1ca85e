"""Running the shipped nginx configs (deploy/nginx/) with a real nginx on loopback, for the tests.

The site files are used as they are, with only their deployment-specific values replaced: the listen
port, the data directories, the relays' addresses and the snippet paths.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "nginx"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


class Nginx:
    def __init__(self, workdir: Path, site: str, replacements: dict[str, str], port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        workdir.mkdir(parents=True, exist_ok=True)
        for d in ("logs", "tmp"):
            (workdir / d).mkdir(exist_ok=True)
        replacements = {
            "/etc/nginx/snippets/": f"{workdir}/",
            "listen 80;": f"listen 127.0.0.1:{port};",
            "/var/log/nginx/relay.access.log": f"{workdir}/logs/relay.access.log",
            **replacements,
        }
        for snippet in ("relay-common.conf", "relay-static.conf", "relay-bucket.conf"):
            shutil.copy(DEPLOY / snippet, workdir / snippet)
        text = (DEPLOY / site).read_text()
        for old, new in replacements.items():
            assert old in text, f"{old!r} is not in {site}"
            text = text.replace(old, new)
        (workdir / "site.conf").write_text(text)
        tmp = workdir / "tmp"
        (workdir / "nginx.conf").write_text(
            f"""
user root;
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {workdir}/logs/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {workdir}/site.conf;
}}
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def test_config(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [NGINX, "-t", "-p", str(self.workdir), "-c", str(self.workdir / "nginx.conf")],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    def start(self) -> None:
        checked = self.test_config()
        assert checked.returncode == 0, checked.stderr
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(self.workdir), "-c", str(self.workdir / "nginx.conf")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def access_log(self) -> str:
        path = self.workdir / "logs" / "relay.access.log"
        return path.read_text() if path.exists() else ""
