"""URL paths ⇄ file paths: the dated layout, and rejecting anything that is not one of ours.

Every path that comes from a URL passes through `parse_request_path`, which accepts exactly the shape
this relay generates (`/<node>/r/<pub|prv>/YYYY/MM/DD/HH/mm/SS/<uuid4>.<json|txt|raw>` or `…/stop`) on
the *raw* (still percent-encoded) path. Encoded slashes, `..`, doubled slashes, upper-case ids or any
other spelling simply do not match, so they never reach the disk. This module never touches the disk.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

_PATH_RE = re.compile(
    r"^/(?P<node>[1-9][0-9]{0,5})/r/(?P<access>pub|prv)/"
    r"(?P<Y>[0-9]{4})/(?P<m>[0-9]{2})/(?P<d>[0-9]{2})/(?P<H>[0-9]{2})/(?P<M>[0-9]{2})/(?P<S>[0-9]{2})/"
    r"(?P<id>[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12})"
    r"(?:\.(?P<ext>json|txt|raw)|/(?P<stop>stop))$"
)


@dataclass(frozen=True, slots=True)  # (slots: one per open reader and running request)
class RequestPath:
    """Where one request lives: node, access, creation second and id."""

    node_id: int
    access: str  # "pub" | "prv"
    created: datetime  # UTC, whole seconds
    request_id: str

    @classmethod
    def new(cls, node_id: int, private: bool, created_at: int) -> RequestPath:
        return cls(
            node_id=node_id,
            access="prv" if private else "pub",
            created=datetime.fromtimestamp(created_at, tz=timezone.utc),
            request_id=str(uuid.uuid4()),
        )

    @property
    def base(self) -> str:
        """Relative path without extension, e.g. `1/r/pub/2026/11/27/10/05/09/<id>`."""
        c = self.created
        return (
            f"{self.node_id}/r/{self.access}/{c.year:04d}/{c.month:02d}/{c.day:02d}/"
            f"{c.hour:02d}/{c.minute:02d}/{c.second:02d}/{self.request_id}"
        )

    @property
    def private(self) -> bool:
        return self.access == "prv"

    def url(self, public_url: str, kind: str) -> str:
        """Absolute URL of one of the request's resources (`json`, `txt`, `raw` or `stop`)."""
        if kind == "stop":
            return f"{public_url}/{self.base}/stop"
        return f"{public_url}/{self.base}.{kind}"

    @property
    def marker_name(self) -> str:
        """The name of the request's running marker: its path with `_` for `/` (see `recovery`)."""
        return self.base.replace("/", "_") + ".json"

    def rel(self, ext: str) -> str:
        """Path of one of the request's files relative to the data directory."""
        return f"{self.base}.{ext}"

    def file(self, data_dir: Path, ext: str) -> Path:
        return data_dir / f"{self.base}.{ext}"

    def directory(self, data_dir: Path) -> Path:
        return (data_dir / self.base).parent


def expired(rp: RequestPath, max_age_days: float, now: float | None = None) -> bool:
    """True when the request is older than the retention period (its URLs then answer 404)."""
    now = time.time() if now is None else now
    return (now - rp.created.timestamp()) / 86400 > max_age_days


def parse_request_path(raw_path: str) -> tuple[RequestPath, str] | None:
    """(request path, kind) for a raw URL path of ours, else None. Kind is json, txt, raw or stop."""
    m = _PATH_RE.match(raw_path)
    if m is None:
        return None
    try:
        created = datetime(
            int(m["Y"]), int(m["m"]), int(m["d"]), int(m["H"]), int(m["M"]), int(m["S"]), tzinfo=timezone.utc
        )
    except ValueError:
        return None
    rp = RequestPath(node_id=int(m["node"]), access=m["access"], created=created, request_id=m["id"])
    return rp, (m["ext"] or m["stop"])


def is_http_url(url: str) -> bool:
    """True for an absolute http(s) URL with a host (what public_url, base_url and webhook URLs must be)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def parse_marker_name(name: str) -> RequestPath | None:
    """The request a running marker's file name stands for (see `RequestPath.marker_name`), else None."""
    if not name.endswith(".json"):
        return None
    parsed = parse_request_path("/" + name[: -len(".json")].replace("_", "/") + ".json")
    return parsed[0] if parsed else None


def parse_status_url(url: str, public_url: str) -> RequestPath | None:
    """The request behind a `status_url` this relay generated, else None (never fetched)."""
    if not isinstance(url, str) or len(url) > 2048:
        return None
    base = urlsplit(public_url)
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed `[` (an IPv6 literal), which urlsplit refuses
        return None
    if (parts.scheme, parts.netloc.lower()) != (base.scheme, base.netloc.lower()):
        return None
    if parts.query or parts.fragment:
        return None
    prefix = base.path.rstrip("/")
    if not parts.path.startswith(prefix + "/"):
        return None
    parsed = parse_request_path(parts.path[len(prefix) :])
    if parsed is None or parsed[1] != "json":
        return None
    return parsed[0]
