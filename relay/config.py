"""Reading and checking `config.toml` into a frozen dataclass.

The schema is one table (`SCHEMA`): section, key, type, default, check and help text. It is the one
source of each setting: errors name the key and the file, `--help` shows its text and default
(`describe`), and the tests hold `Config`'s defaults, the shipped `config.toml` and the table in
docs/deploy.md to it. The environment is read here and nowhere else: `RELAY_UPSTREAM_API_KEY`
overrides `upstream.api_key`, so that a real key can live in a systemd `EnvironmentFile` instead of a
world-readable config file; the archive's credentials come from `AWS_ACCESS_KEY_ID` and
`AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`) only, never from the file.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .paths import is_http_url


class ConfigError(Exception):
    """A config problem, phrased as one line that names the key and the file."""


def _url(value: Any) -> str | None:
    return None if is_http_url(value) else "must be an absolute http(s) URL"


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def _port(value: Any) -> str | None:
    return None if 0 <= value <= 65535 else "must be between 0 and 65535"


def _node_id(value: Any) -> str | None:
    return None if 1 <= value <= 999_999 else "must be between 1 and 999999"


def _non_empty(value: Any) -> str | None:
    return None if value.strip() else "must not be empty"


def _admin_keys(value: Any) -> str | None:
    if all(isinstance(k, str) and len(k) >= 16 and k.isprintable() and " " not in k for k in value):
        return None
    return "must be a list of keys: strings of at least 16 visible characters"


def _keys(value: Any) -> str | None:
    problem = (
        "must be a list of keys: strings of at least 8 characters, or tables "
        '{key = "…", name = "…", requests_per_month = N, requests_per_minute = N}'
    )
    names = set()
    for item in value:
        if isinstance(item, dict):
            if set(item) - {"key", "name", "requests_per_month", "requests_per_minute"}:
                return problem
            key, name = item.get("key"), item.get("name")
            limits = [item.get("requests_per_month", 0), item.get("requests_per_minute", 0)]
            if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in limits):
                return problem
            if name is not None and (not isinstance(name, str) or not name or name in names):
                return problem + " (names must be unique)"
            names.add(name)
        else:
            key = item
        if not isinstance(key, str) or len(key) < 8:
            return problem
    return None


def _secret(value: Any) -> str | None:
    if value.startswith("whsec_"):
        try:
            base64.b64decode(value[6:], validate=True)
        except ValueError:
            return "starts with whsec_ but the rest is not base64"
    return None


def _optional_url(value: Any) -> str | None:
    return None if value == "" or is_http_url(value) else "must be empty or an absolute http(s) URL"


def _origins(value: Any) -> str | None:
    if not value or not all(isinstance(o, str) and o for o in value):
        return 'must be a non-empty list of origins, e.g. ["*"] or ["https://app.example.com"]'
    return None


def _depth(value: Any) -> str | None:
    return None if 2 <= value <= 200 else "must be between 2 and 200"


def _log_format(value: Any) -> str | None:
    return None if value in ("text", "json") else 'must be "text" or "json"'


def _event_loop(value: Any) -> str | None:
    return None if value in ("auto", "uvloop", "asyncio") else 'must be "auto", "uvloop" or "asyncio"'


def _log_level(value: Any) -> str | None:
    ok = ("debug", "info", "warning", "error")
    return None if value.lower() in ok else "must be one of " + ", ".join(ok)


def _bucket(value: Any) -> str | None:
    ok = value == "" or (3 <= len(value) <= 63 and all(c.islower() or c.isdigit() or c in ".-" for c in value))
    return None if ok and value.isascii() else "must be empty or an S3 bucket name (3-63 of a-z, 0-9, '.', '-')"


def _prefix(value: Any) -> str | None:
    parts = value.strip("/").split("/")
    if value and (value.startswith("/") or not value.isascii() or not value.isprintable() or " " in value):
        return 'must be empty or a relative key prefix such as "relay/" (ASCII, no spaces)'
    return "must not contain empty, `.` or `..` segments" if value and {"", ".", ".."} & set(parts) else None


def _keep_hours(value: Any) -> str | None:
    if value == "forever" or (isinstance(value, int | float) and not isinstance(value, bool) and value >= 0):
        return None
    return 'must be a number of hours (0 = remove at once) or "forever"'


def _part_size(value: Any) -> str | None:
    ok = 5 * 1024 * 1024 <= value <= 5 * 1024**3
    return None if ok else "must be between 5242880 (5 MiB, the S3 minimum) and 5368709120 (5 GiB)"


# (section, key, type, default, check, help). `float` accepts ints too; `object` takes any value, which
# its check then judges (a number or a word).
SCHEMA: list[tuple[str, str, type, Any, Callable[[Any], str | None] | None, str]] = [
    ("server", "host", str, "127.0.0.1", _non_empty, "address to listen on"),
    ("server", "port", int, 8080, _port, "TCP port to listen on (0 = any free port)"),
    ("server", "public_url", str, "", _optional_url, "base of every generated URL; empty = http://<host>:<port>"),
    ("server", "node_id", int, 1, _node_id, "this instance's number, first path segment of every file URL"),
    ("server", "max_body_bytes", int, 4 * 1024 * 1024, _positive, "largest accepted POST body (413 above)"),
    ("server", "max_concurrent_jobs", int, 512, _positive, "running requests at once (503 above)"),
    ("server", "max_connections", int, 4096, _positive, "open client connections at once; more are closed at once"),
    ("server", "header_timeout_seconds", float, 15.0, _positive, "time to send request headers; idle keep-alive limit"),
    ("server", "body_timeout_seconds", float, 30.0, _positive, "time to send a whole POST body (408 after)"),
    ("server", "send_timeout_seconds", float, 60.0, _positive, "a reader that takes no bytes for this long is dropped"),
    ("server", "max_messages", int, 10000, _positive, "messages in one conversation, chained history included"),
    ("server", "max_json_depth", int, 32, _depth, "nesting depth of a POST body (arrays and objects)"),
    ("server", "max_json_containers", int, 50000, _positive, "`[` and `{` characters in a POST body, strings included"),
    ("server", "max_conversation_bytes", int, 16 * 1024 * 1024, _positive, "largest parent status to chain from"),
    ("server", "max_conversation_containers", int, 100000, _positive, "`[` and `{` in a parent status to chain from"),
    ("server", "cors_origins", list, ["*"], _origins, "origins allowed to read the URLs from a browser"),
    ("server", "shutdown_grace_seconds", float, 10.0, _non_negative, "how long running requests may finish on SIGTERM"),
    ("server", "heartbeat_seconds", float, 15.0, _positive, "keep-alive comment interval on event streams"),
    ("server", "log_format", str, "text", _log_format, 'log lines as "text" or "json" (one object per line)'),
    ("server", "log_level", str, "info", _log_level, "debug, info, warning or error"),
    ("server", "event_loop", str, "auto", _event_loop, '"uvloop" when installed ("auto"), or "uvloop"/"asyncio"'),
    ("storage", "data_dir", str, "data", _non_empty, "directory that holds every request's files"),
    (
        "storage",
        "reserve_bytes",
        int,
        8 * 1024 * 1024,
        _non_negative,
        "space held back for finishing on a full disk",
    ),
    ("storage", "fsync", bool, True, None, "make each request's ending durable (fsync) before its marker goes"),
    ("upstream", "base_url", str, "https://api.openai.com/v1", _url, "any OpenAI-compatible server"),
    ("upstream", "api_key", str, "", None, "server-side upstream key; else X-OpenAI-API-Key is required"),
    ("upstream", "default_model", str, "gpt-4o-mini", _non_empty, "model used when a request names none"),
    ("upstream", "max_timeout", float, 600.0, _positive, "largest `timeout` a request may ask for, seconds"),
    ("upstream", "include_usage", bool, True, None, "ask streaming upstreams for a final usage chunk"),
    ("upstream", "max_connections", int, 1000, _positive, "connections in the shared upstream HTTP pool"),
    ("upstream", "max_event_bytes", int, 1024 * 1024, _positive, "largest single event in an upstream stream"),
    ("upstream", "max_response_bytes", int, 16 * 1024 * 1024, _positive, "largest upstream response body"),
    ("upstream", "max_json_depth", int, 32, _depth, "nesting depth of an upstream chunk or answer"),
    ("upstream", "idle_timeout_seconds", float, 60.0, _non_negative, "silence mid-answer that ends it (0 = off)"),
    ("auth", "api_keys", list, [], _keys, "relay access keys; empty = no key needed (loopback hosts only)"),
    ("auth", "admin_keys", list, [], _admin_keys, "keys of the operator API and page; empty = both off"),
    ("quotas", "requests_per_month", int, 0, _non_negative, "requests per relay key per calendar month (0 = no limit)"),
    ("quotas", "requests_per_minute", int, 0, _non_negative, "requests per relay key per minute (0 = no limit)"),
    ("quotas", "max_running_per_key", int, 0, _non_negative, "running requests per relay key (0 = 3/4 of all)"),
    ("retention", "max_age_days", float, 30.0, _positive, "days before a request's files expire"),
    ("retention", "janitor_interval_seconds", float, 600.0, _positive, "how often expired files are removed"),
    ("retention", "janitor_batch", int, 500, _positive, "requests removed per batch (the loop serves between)"),
    ("retention", "usage_max_age_months", int, 13, _positive, "months the usage ledger (data_dir/usage/) is kept"),
    ("webhooks", "secret", str, "", _secret, "HMAC secret: X-Relay-Signature and webhook-signature"),
    ("webhooks", "openai_url", str, "", _optional_url, "receiver of response.* events of /v1/responses requests"),
    ("webhooks", "allow_private_addresses", bool, False, None, "allow webhooks to private/loopback addresses"),
    ("webhooks", "timeout_seconds", float, 10.0, _positive, "time limit of one delivery attempt"),
    ("webhooks", "max_attempts", int, 3, _positive, "delivery attempts on network errors and 5xx"),
    ("webhooks", "backoff_seconds", float, 1.0, _non_negative, "wait before the 2nd attempt, doubled after"),
    ("archive", "enabled", bool, False, None, "upload ended requests to an S3-compatible bucket"),
    ("archive", "endpoint_url", str, "", _optional_url, "the object store, e.g. https://s3.eu-west-1.amazonaws.com"),
    ("archive", "bucket", str, "", _bucket, "bucket shared by every node (created beforehand; never by the relay)"),
    ("archive", "prefix", str, "", _prefix, "key prefix before each request's relative path (empty = none)"),
    ("archive", "region", str, "", None, "signing region (empty = us-east-1)"),
    ("archive", "upload_after_seconds", float, 0.0, _non_negative, "upload this long after a request ends (0 = then)"),
    ("archive", "keep_local_hours", object, "forever", _keep_hours, 'hours local files stay once verified; "forever"'),
    ("archive", "expire_objects", bool, True, None, "janitor deletes objects at max_age_days (false: a rule)"),
    ("archive", "max_concurrent_uploads", int, 2, _positive, "requests uploaded at once"),
    ("archive", "part_size_bytes", int, 8 * 1024 * 1024, _part_size, "multipart above this size, in parts this size"),
    ("archive", "retry_min_seconds", float, 1.0, _positive, "first wait after a failed upload (doubled, with jitter)"),
    ("archive", "retry_max_seconds", float, 300.0, _positive, "longest wait between two upload attempts"),
    ("archive", "request_timeout_seconds", float, 30.0, _positive, "connect / silence limit of one store request"),
]

# The archive's credentials, read from these variables (the names every S3 tool uses) and never from a file.
ARCHIVE_ENV = {
    "archive_access_key_id": "AWS_ACCESS_KEY_ID",
    "archive_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "archive_session_token": "AWS_SESSION_TOKEN",
}


def describe(section: str, key: str) -> str:
    """`--help` text of a setting, from the schema: what it is, the key it overrides, its default."""
    for s, k, _kind, default, _check, text in SCHEMA:
        if (s, k) == (section, key):
            return f"{text} (overrides [{section}] {key}; default: {default if default != '' else 'empty'})"
    raise KeyError((section, key))


@dataclass(frozen=True)
class ApiKey:
    """One relay access key and its limits (None = the [quotas] default)."""

    key: str = field(repr=False)
    name: str | None = None
    requests_per_month: int | None = None
    requests_per_minute: int | None = None

    @property
    def ident(self) -> str:
        """How the key is named in quota files and logs: its name, else a short hash (never the key)."""
        return self.name or "key-" + hashlib.sha256(self.key.encode()).hexdigest()[:12]


def _api_keys(value: list[Any]) -> tuple[ApiKey, ...]:
    return tuple(ApiKey(key=item) if isinstance(item, str) else ApiKey(**item) for item in value)


@dataclass(frozen=True)
class Config:
    """Every setting, flat: `section_key`."""

    server_host: str = "127.0.0.1"
    server_port: int = 8080
    server_public_url: str = ""
    server_node_id: int = 1
    server_max_body_bytes: int = 4 * 1024 * 1024
    server_max_concurrent_jobs: int = 512
    server_max_connections: int = 4096
    server_header_timeout_seconds: float = 15.0
    server_body_timeout_seconds: float = 30.0
    server_send_timeout_seconds: float = 60.0
    server_max_messages: int = 10000
    server_max_json_depth: int = 32
    server_max_json_containers: int = 50000
    server_max_conversation_bytes: int = 16 * 1024 * 1024
    server_max_conversation_containers: int = 100000
    server_cors_origins: tuple[str, ...] = ("*",)
    server_shutdown_grace_seconds: float = 10.0
    server_heartbeat_seconds: float = 15.0
    server_log_format: str = "text"
    server_log_level: str = "info"
    server_event_loop: str = "auto"
    storage_data_dir: str = "data"
    storage_reserve_bytes: int = 8 * 1024 * 1024
    storage_fsync: bool = True
    upstream_base_url: str = "https://api.openai.com/v1"
    upstream_api_key: str = field(default="", repr=False)
    upstream_default_model: str = "gpt-4o-mini"
    upstream_max_timeout: float = 600.0
    upstream_include_usage: bool = True
    upstream_max_connections: int = 1000
    upstream_max_event_bytes: int = 1024 * 1024
    upstream_max_response_bytes: int = 16 * 1024 * 1024
    upstream_max_json_depth: int = 32
    upstream_idle_timeout_seconds: float = 60.0
    auth_api_keys: tuple[ApiKey, ...] = field(default=(), repr=False)
    auth_admin_keys: tuple[str, ...] = field(default=(), repr=False)
    quotas_requests_per_month: int = 0
    quotas_requests_per_minute: int = 0
    quotas_max_running_per_key: int = 0
    retention_max_age_days: float = 30.0
    retention_janitor_interval_seconds: float = 600.0
    retention_janitor_batch: int = 500
    retention_usage_max_age_months: int = 13
    webhooks_secret: str = field(default="", repr=False)
    webhooks_openai_url: str = ""
    webhooks_allow_private_addresses: bool = False
    webhooks_timeout_seconds: float = 10.0
    webhooks_max_attempts: int = 3
    webhooks_backoff_seconds: float = 1.0
    archive_enabled: bool = False
    archive_endpoint_url: str = ""
    archive_bucket: str = ""
    archive_prefix: str = ""
    archive_region: str = ""
    archive_upload_after_seconds: float = 0.0
    archive_keep_local_hours: float | str = "forever"
    archive_expire_objects: bool = True
    archive_max_concurrent_uploads: int = 2
    archive_part_size_bytes: int = 8 * 1024 * 1024
    archive_retry_min_seconds: float = 1.0
    archive_retry_max_seconds: float = 300.0
    archive_request_timeout_seconds: float = 30.0
    # the archive's credentials: from the environment only (AWS_ACCESS_KEY_ID, …), never from the file
    archive_access_key_id: str = field(default="", repr=False)
    archive_secret_access_key: str = field(default="", repr=False)
    archive_session_token: str = field(default="", repr=False)

    @property
    def public_url(self) -> str:
        """`[server] public_url`, or where the relay listens when it is not set."""
        return self.server_public_url.rstrip("/") or listen_url(self.server_host, self.server_port)

    @property
    def data_dir(self) -> Path:
        return Path(self.storage_data_dir)

    def with_overrides(self, **overrides: Any) -> Config:
        """A copy with some values replaced (after checking them like file values)."""
        values = {k: v for k, v in overrides.items() if v is not None}
        for name, value in values.items():
            section, key = name.split("_", 1)
            _check(section, key, value, "command line")
        return replace(self, **{k: _convert(k, v) for k, v in values.items()})


def _convert(name: str, value: Any) -> Any:
    if name == "auth_api_keys":
        return _api_keys(list(value))
    return tuple(value) if isinstance(value, list) else value


def _type_name(kind: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}[kind]


def _check(section: str, key: str, value: Any, where: str) -> Any:
    for s, k, kind, _default, check, _help in SCHEMA:
        if (s, k) != (section, key):
            continue
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if not ok:
            raise ConfigError(f"{where}: [{section}] {key} must be {_type_name(kind)}, got {value!r}")
        problem = check(value) if check else None
        if problem:
            raise ConfigError(f"{where}: [{section}] {key} {problem} (got {value!r})")
        return value
    raise ConfigError(f"{where}: unknown key [{section}] {key}")


def load(path: str | Path | None, env: dict[str, str] | None = None) -> Config:
    """Read `path` (missing file = all defaults when it is the default path) into a checked Config."""
    env = dict(os.environ) if env is None else env
    raw: dict[str, Any] = {}
    where = str(path) if path is not None else "config.toml"
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{where}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
    known_sections = {s for s, *_ in SCHEMA}
    values: dict[str, Any] = {}
    for section, table in raw.items():
        if section not in known_sections:
            raise ConfigError(f"{where}: unknown section [{section}]")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{section}] must be a table")
        for key, value in table.items():
            value = _check(section, key, value, where)
            values[f"{section}_{key}"] = _convert(f"{section}_{key}", value)
    env_key = env.get("RELAY_UPSTREAM_API_KEY")
    if env_key:
        values["upstream_api_key"] = env_key
    for name, var in ARCHIVE_ENV.items():
        if env.get(var):
            values[name] = env[var]
    names = {f.name for f in fields(Config)}
    assert set(values) <= names
    return Config(**values)


def is_loopback_host(host: str) -> bool:
    """True when `host` only listens on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_startup(config: Config, where: str = "config") -> None:
    """Refusals that depend on several keys at once."""
    if not config.auth_api_keys and not is_loopback_host(config.server_host):
        raise ConfigError(
            f"{where}: [auth] api_keys is empty but [server] host = {config.server_host!r} is not loopback: "
            "set relay access keys in [auth] api_keys, or listen on 127.0.0.1"
        )


def listen_url(host: str, port: int) -> str:
    """The URL of a relay listening on `host`:`port`, as a client on this machine reaches it: a wildcard
    address (0.0.0.0, ::) stands for this machine's loopback address."""
    host = host.strip("[]")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def check_public_url(config: Config, where: str = "config") -> None:
    """Refuse a `public_url` on this machine's loopback that names another port than the one a relay
    listening on loopback serves: every URL it made would be dead (a `--port` changed, the file not)."""
    if not config.server_public_url or not config.server_port or not is_loopback_host(config.server_host):
        return
    parts = urlsplit(config.server_public_url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a port out of range: not a URL of this machine's
        return
    if is_loopback_host(parts.hostname or "") and port != config.server_port:
        raise ConfigError(
            f"{where}: [server] public_url = {config.server_public_url!r} names port {port} of this machine, "
            f"but the relay listens on {config.server_host}:{config.server_port}, so every URL it makes would "
            "be dead: remove public_url (it then follows the port) or make the two agree "
            "(behind a proxy on this machine, pass its URL as --public-url)"
        )
