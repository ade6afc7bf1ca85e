"""The command line: `serve` and `dev-upstream`, logging set-up, signals."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from . import devupstream, janitor
from .app import AccessLogger, make_app
from .config import Config, ConfigError, check_startup, describe, load
from .http import MANAGER
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
    serve.add_argument(
        "--demo",
        action="store_true",
        help="when no upstream key is configured, run the built-in echo upstream beside the relay and use it",
    )
    jan = sub.add_parser("janitor", help="remove expired requests once, print what was removed, and exit")
    jan.add_argument("--config", help="config file (default: ./config.toml if it exists)")
    jan.add_argument("--data-dir", help=describe("storage", "data_dir"))
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
    )
    check_startup(config, path or "defaults")
    return config


async def _serve(config: Config, demo: bool) -> None:
    demo_runner = None
    if demo and not config.upstream_api_key:
        # paced like a real model (50 ms a word), so that a newcomer sees the answer stream in
        demo_runner, _, port = await devupstream.start("127.0.0.1", 0, default_pace=0.05)
        config = config.with_overrides(upstream_base_url=f"http://127.0.0.1:{port}/v1", upstream_api_key="demo")
        log.warning(
            "no upstream key configured: answering with the built-in echo upstream at http://127.0.0.1:%d/v1 "
            "(set [upstream] api_key or RELAY_UPSTREAM_API_KEY to use a real model)",
            port,
        )
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
    site = web.TCPSite(runner, config.server_host, config.server_port, reuse_address=True, backlog=4096)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise CannotStart(1, f"cannot listen on {config.server_host}:{config.server_port}: {exc.strerror}") from None
    log.info(
        "relay listening on http://%s:%d (public URL %s, node %d, data in %s, upstream %s)",
        config.server_host,
        config.server_port,
        config.public_url,
        config.server_node_id,
        config.data_dir.resolve(),
        config.upstream_base_url,
    )
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


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
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
        print(
            f"removed {report.requests} expired request(s): {report.files} file(s), {report.bytes} byte(s), "
            f"{report.folders} empty folder(s); {len(report.errors)} error(s)"
        )
        return 1 if report.errors else 0
    try:
        asyncio.run(_serve(config, args.demo))
    except CannotStart as exc:
        log.error("%s", exc)
        return exc.exit_code
    return 0
