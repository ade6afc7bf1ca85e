"""The command line: `serve` and `dev-upstream`, logging set-up, signals."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from . import devupstream, janitor, ledger, usage
from .app import AccessLogger, make_app
from .archive import ArchiveSettings
from .config import Config, ConfigError, check_public_url, check_startup, describe, load
from .keys import MANAGER
from .recovery import running_ids
from .server import RelayRunner
from .upstream import quiet_sdk_loggers

log = logging.getLogger("relay")


class CannotStart(Exception):
    """The relay cannot start: its data directory is unusable (exit 2) or its address is taken (exit 1)."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


class EscapeControl(logging.Filter):
    """Escape control characters in every log message, so that no peer-chosen byte can forge or hide a
    log line (a CR/LF in a header, an ANSI escape in a model name)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in message):
            record.msg = escape_control(message)
            record.args = None
        return True


def escape_control(text: str) -> str:
    return "".join(c if not (ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0) else f"\\x{ord(c):02x}" for c in text)


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(EscapeControl())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet_sdk_loggers()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay.py",
        description="Self-hosted OffloadGPT-compatible relay for LLM chat requests.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the relay server")
    serve.add_argument("--config", help="config file (default: ./config.toml if it exists)")
    serve.add_argument("--host", help=describe("server", "host"))
    serve.add_argument("--port", type=int, help=describe("server", "port"))
    serve.add_argument("--data-dir", help=describe("storage", "data_dir"))
    serve.add_argument("--public-url", help=describe("server", "public_url"))
    serve.add_argument("--upstream-base-url", help=describe("upstream", "base_url"))
    serve.add_argument("--node-id", type=int, help=describe("server", "node_id"))
    serve.add_argument("--event-loop", choices=("auto", "uvloop", "asyncio"), help=describe("server", "event_loop"))
    serve.add_argument(
        "--demo",
        action="store_true",
        help="first run: when no upstream key is configured, run the built-in echo upstream beside the relay "
        "and use it; when no admin key is configured, turn the operator page on with a random admin key "
        "printed once in the start-up log",
    )
    nodes = sub.add_parser(
        "nodes",
        help="run N relay nodes (one per core): node i on port BASE+i-1 with data in DATA_DIR/node<i>",
    )
    nodes.add_argument("--count", type=int, default=os.cpu_count() or 1, help="how many nodes (default: one per core)")
    nodes.add_argument("--base-port", type=int, default=8081, help="port of node 1 (default: 8081)")
    nodes.add_argument("--config", help="config file shared by every node (default: ./config.toml if it exists)")
    nodes.add_argument("--host", help=describe("server", "host"))
    nodes.add_argument("--data-dir", help="parent of the nodes' data directories (default: [storage] data_dir)")
    nodes.add_argument("--public-url", help="base of every generated URL: the proxy in front of the nodes")
    nodes.add_argument("--upstream-base-url", help=describe("upstream", "base_url"))
    nodes.add_argument(
        "--demo", action="store_true", help="as for serve: each node with its own echo upstream and admin key"
    )
    jan = sub.add_parser("janitor", help="remove expired requests once, print what was removed, and exit")
    jan.add_argument("--config", help="config file (default: ./config.toml if it exists)")
    jan.add_argument("--data-dir", help=describe("storage", "data_dir"))
    use = sub.add_parser("usage", help="token and request totals from the usage ledger, by key, model and day")
    use.add_argument("--config", help="config file (default: ./config.toml if it exists)")
    use.add_argument("--data-dir", help=describe("storage", "data_dir"))
    use.add_argument("--since", help="first day, YYYY-MM-DD or Nd (N days ago); default: the 1st of this month (UTC)")
    use.add_argument("--until", help="last day, YYYY-MM-DD or Nd; default: today (UTC)")
    use.add_argument("--key", help="only this relay key name (`open` for requests made without a key)")
    use.add_argument("--model", help="only this model")
    use.add_argument(
        "--by", default="key,model", help="group by these, comma-separated: key, model, day, outcome, node"
    )
    out = use.add_mutually_exclusive_group()
    out.add_argument("--csv", action="store_true", help="CSV instead of a table")
    out.add_argument("--json", action="store_true", help="JSON instead of a table")
    dev = sub.add_parser("dev-upstream", help="run the development OpenAI-compatible echo server")
    dev.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    dev.add_argument("--port", type=int, default=8090, help="TCP port to listen on (default: 8090)")
    dev.add_argument("--require-key", help="answer 401 unless this key is sent (default: accept any)")
    return parser


def load_config(args: argparse.Namespace) -> Config:
    path = args.config
    if path is None and Path("config.toml").exists():
        path = "config.toml"
    config = load(path)
    config = config.with_overrides(
        server_host=getattr(args, "host", None),
        server_port=getattr(args, "port", None),
        storage_data_dir=args.data_dir,
        server_public_url=getattr(args, "public_url", None),
        upstream_base_url=getattr(args, "upstream_base_url", None),
        server_node_id=getattr(args, "node_id", None),
        server_event_loop=getattr(args, "event_loop", None),
    )
    check_startup(config, path or "defaults")
    if config.archive_enabled:
        ArchiveSettings.from_config(config, path or "defaults")  # (ConfigError: a setting or a credential missing)
    if getattr(args, "command", None) == "serve" and getattr(args, "public_url", None) is None:
        check_public_url(config, path or "defaults")  # (a URL passed as --public-url is meant as it is)
    return config


async def _demo(config: Config) -> tuple[Config, web.AppRunner | None, str | None]:
    """`--demo`: the built-in echo upstream when no upstream key is configured, and the operator page on
    with a random admin key, in memory only (printed once at start-up), when no admin key is configured."""
    demo_runner = None
    if not config.upstream_api_key:
        # paced like a real model (50 ms a word), so that a newcomer sees the answer stream in
        demo_runner, _, port = await devupstream.start("127.0.0.1", 0, default_pace=0.05)
        config = config.with_overrides(upstream_base_url=f"http://127.0.0.1:{port}/v1", upstream_api_key="demo")
        log.warning(
            "no upstream key configured: answering with the built-in echo upstream at http://127.0.0.1:%d/v1 "
            "(set [upstream] api_key or RELAY_UPSTREAM_API_KEY to use a real model)",
            port,
        )
    admin_key = None
    if not config.auth_admin_keys:
        admin_key = secrets.token_urlsafe(24)
        config = config.with_overrides(auth_admin_keys=[admin_key])
    return config, demo_runner, admin_key


def _any_port(host: str) -> socket.socket:
    """A listening socket on a free port of `host`, for `port = 0`: bound before the app is made, because
    every URL the relay makes names the port (when `public_url` is not set)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _announce(config: Config, demo: bool, admin_key: str | None) -> None:
    log.info(
        "relay listening on http://%s:%d (public URL %s, node %d, data in %s, upstream %s, %s event loop)",
        config.server_host,
        config.server_port,
        config.public_url,
        config.server_node_id,
        config.data_dir.resolve(),
        config.upstream_base_url,
        type(asyncio.get_running_loop()).__module__.split(".")[0],
    )
    if not config.server_public_url and config.server_host.strip("[]") in ("0.0.0.0", "::"):
        log.warning("[server] public_url is not set: the URLs the relay makes name %s, which only this machine "
                    "reaches; set it to the address clients use", config.public_url)  # fmt: skip
    if admin_key:  # like a notebook server's token: for this start only, never written anywhere
        log.info("operator page: %s/#operator?key=%s (an admin key for this start only)", config.public_url,
                 admin_key)  # fmt: skip
    elif demo:
        log.info("operator page: %s/ (the Operator tab), with a key of [auth] admin_keys", config.public_url)


def _settle_gc() -> None:
    """Once started: what exists now (modules, the app, the configuration) lives as long as the process,
    so the collector stops scanning it (`gc.freeze`). A full collection used to walk all of it, a pause
    of ~40 ms on the loop about once per W1 run; with it frozen, none came in the same run and the
    collector's time fell from ~50 to ~6.5 ms (docs/performance.md, speed round three)."""
    gc.collect()
    gc.freeze()


async def _serve(config: Config, demo: bool) -> None:
    demo_runner, admin_key = None, None
    if demo:
        config, demo_runner, admin_key = await _demo(config)
    sock = None
    if config.server_port == 0:
        try:
            sock = _any_port(config.server_host)
        except OSError as exc:
            raise CannotStart(1, f"cannot listen on {config.server_host}:0: {exc.strerror}") from None
        config = config.with_overrides(server_port=sock.getsockname()[1])
    app = make_app(config)
    runner = RelayRunner(
        app,
        config,
        access_log_class=AccessLogger,
        shutdown_timeout=config.server_shutdown_grace_seconds + 5,
    )
    try:
        await runner.setup()  # creates the data directory, repairs what a crash left
    except OSError as exc:
        raise CannotStart(2, f"cannot use the data directory {config.data_dir}: {exc.strerror}") from None
    if sock is not None:
        site: web.BaseSite = web.SockSite(runner, sock, backlog=4096)
    else:
        site = web.TCPSite(runner, config.server_host, config.server_port, reuse_address=True, backlog=4096)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise CannotStart(1, f"cannot listen on {config.server_host}:{config.server_port}: {exc.strerror}") from None
    _announce(config, demo, admin_key)
    _settle_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: stopping (grace %gs for running requests)", config.server_shutdown_grace_seconds)
    started = time.monotonic()
    # keep listening while running requests finish: new POSTs get 503, readers keep reading
    await app[MANAGER].shutdown(config.server_shutdown_grace_seconds)
    await runner.cleanup()
    if demo_runner is not None:
        await demo_runner.cleanup()
    log.info("stopped after %.1fs", time.monotonic() - started)


async def _dev_upstream(host: str, port: int, key: str | None) -> None:
    runner, _, actual = await devupstream.start(host, port, key)
    log.info("dev upstream listening on http://%s:%d/v1", host, actual)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def nginx_upstream(host: str, ports: list[int]) -> str:
    """The nginx upstream blocks for nodes 1…N on `ports` (see deploy/nginx/relay-multinode.conf)."""
    blocks = [f"upstream relay_node{i} {{ server {host}:{port}; keepalive 64; }}" for i, port in enumerate(ports, 1)]
    servers = " ".join(f"server {host}:{port};" for port in ports)
    return "\n".join([*blocks, f"upstream relay_all {{ {servers} keepalive 64; }}"])


def run_nodes(args: argparse.Namespace) -> int:
    """Start `--count` relay processes as nodes 1…N, stop them all on SIGINT/SIGTERM or when one exits."""
    config = load_config(args)  # the shared config must be valid before anything starts
    if not 1 <= args.count <= 64 or not 1 <= args.base_port <= 65535 - args.count:
        print("relay: --count must be 1…64 and the ports must fit below 65536", file=sys.stderr)
        return 2
    parent = Path(args.data_dir) if args.data_dir else config.data_dir
    ports = [args.base_port + i for i in range(args.count)]
    passed = []
    for flag in ("config", "host", "public_url", "upstream_base_url"):
        value = getattr(args, flag)
        if flag == "public_url" and value is None:
            value = config.server_public_url or None  # the proxy in front, never a node's own port
        if value is not None:
            passed += ["--" + flag.replace("_", "-"), str(value)]
    if args.demo:
        passed.append("--demo")
    script = Path(__file__).resolve().parent.parent / "relay.py"
    children = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                "serve",
                "--node-id",
                str(node),
                "--port",
                str(port),
                "--data-dir",
                str(parent / f"node{node}"),
                *passed,
            ]
        )  # fmt: skip
        for node, port in enumerate(ports, 1)
    ]
    print(f"started {len(children)} node(s); nginx in front of them:\n{nginx_upstream(config.server_host, ports)}")
    sys.stdout.flush()
    stopping = False

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    while any(child.poll() is None for child in children):
        for child in children:
            if child.poll() is not None and child.returncode != 0 and not stopping:
                code = code or child.returncode
                stop(signal.SIGTERM, None)  # one node failed: stop the others rather than run short-handed
        time.sleep(0.2)
    return code or max((child.returncode for child in children), default=0)


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop for `[server] event_loop`: uvloop when asked for or ("auto") when installed."""
    if choice == "asyncio":
        return None
    try:
        import uvloop  # noqa: PLC0415 (optional: only when installed)
    except ImportError:
        if choice == "uvloop":
            raise CannotStart(2, '[server] event_loop = "uvloop", but uvloop is not installed') from None
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "nodes":
        try:
            return run_nodes(args)
        except ConfigError as exc:
            print(f"relay: config error: {exc}", file=sys.stderr)
            return 2
    if args.command == "dev-upstream":
        setup_logging("text", "info")
        asyncio.run(_dev_upstream(args.host, args.port, args.require_key))
        return 0
    try:
        config = load_config(args)
    except ConfigError as exc:
        print(f"relay: config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "usage":
        try:
            text = usage.report(config.data_dir, since=args.since, until=args.until, key=args.key, model=args.model,
                                by=args.by, fmt="csv" if args.csv else "json" if args.json else "table")  # fmt: skip
        except usage.UsageError as exc:
            print(f"relay: {exc}", file=sys.stderr)
            return 2
        sys.stdout.write(text)
        return 0
    setup_logging(config.server_log_format, config.server_log_level)
    if args.command == "janitor":
        report = asyncio.run(
            janitor.run_once(
                config.data_dir,
                config.server_node_id,
                config.retention_max_age_days,
                running_ids(config.data_dir).__contains__,
                config.retention_janitor_batch,
            )
        )
        ledgers = ledger.remove_expired(config.data_dir, config.retention_usage_max_age_months)
        print(
            f"removed {report.requests} expired request(s): {report.files} file(s), {report.bytes} byte(s), "
            f"{report.folders} empty folder(s); {ledgers} usage ledger file(s) older than "
            f"{config.retention_usage_max_age_months} months; {len(report.errors)} error(s)"
        )
        return 1 if report.errors else 0
    try:
        with asyncio.Runner(loop_factory=loop_factory(config.server_event_loop)) as runner:
            runner.run(_serve(config, args.demo))
    except CannotStart as exc:
        log.error("%s", exc)
        return exc.exit_code
    return 0
