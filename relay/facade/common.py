"""What the OpenAI-compatible paths share: object ids, the caller's key, stored objects, answers.

An object id names where its request lives, so no index is needed to find it:
`resp_<node><b|v><created, 10 digits><uuid without dashes>` (`b` public, `v` private), and the same after
`chatcmpl-` for a stored chat completion. A stored object belongs to the key that created it: its
status document holds `openai.owner`, a hash of that key's name; another key gets 404, as from OpenAI.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

import orjson
from aiohttp import web

from .. import api, intake, ledger, tiers
from ..archive import Archiver
from ..config import Config
from ..http import HTTPError
from ..janitor import EXTENSIONS
from ..jobs import Job, JobManager
from ..keys import ARCHIVE, CONFIG, MANAGER
from ..paths import RequestPath, expired
from ..sending import send_bytes
from ..serve import read_auth
from ..store import FileTooLarge, read_json_under
from .errors import OpenAIError, not_found

_ID_RE = re.compile(
    r"(?P<node>[1-9][0-9]{0,5})(?P<access>[bv])(?P<ts>[0-9]{10})"
    r"(?P<u>[0-9a-f]{8})(?P<v>[0-9a-f]{4})(?P<w>4[0-9a-f]{3})(?P<x>[89ab][0-9a-f]{3})(?P<y>[0-9a-f]{12})"
)
T = TypeVar("T")
RESPONSE = "resp_"
CHAT = "chatcmpl-"
KINDS = {RESPONSE: "response", CHAT: "chat.completion"}  # the `object` of each kind
NAMES = {RESPONSE: "response", CHAT: "chat completion"}  # as error messages name them


def object_id(prefix: str, rp: RequestPath) -> str:
    created = int(rp.created.timestamp())
    return f"{prefix}{rp.node_id}{'v' if rp.private else 'b'}{created:010d}{rp.request_id.replace('-', '')}"


def parse_id(prefix: str, value: str) -> RequestPath | None:
    if not value.startswith(prefix):
        return None
    m = _ID_RE.fullmatch(value[len(prefix) :])
    if m is None:
        return None
    return RequestPath(
        node_id=int(m["node"]),
        access="prv" if m["access"] == "v" else "pub",
        created=datetime.fromtimestamp(int(m["ts"]), tz=timezone.utc),
        request_id="-".join((m["u"], m["v"], m["w"], m["x"], m["y"])),
    )


def owner_of(label: str) -> str:
    """What a stored object keeps of the key that created it: a hash of the key's name."""
    return hashlib.sha256(b"owner:" + label.encode()).hexdigest()[:32]


@dataclass
class Caller:
    owner: str
    label: str
    entry: Any


def caller(request: web.Request) -> Caller:
    """The relay access key of a request on these paths (Authorization: Bearer, as the SDKs send it)."""
    try:
        entry = api.authorize(request, request.app[CONFIG])
    except HTTPError as exc:
        raise OpenAIError(401, "Incorrect or missing relay access key: send one of the relay's [auth] api_keys "
                          "as the SDK's api_key (Authorization: Bearer).", code="invalid_api_key",
                          headers=exc.headers) from None  # fmt: skip
    label = ledger.key_label(entry)
    return Caller(owner_of(label), label, entry)


async def read_payload(request: web.Request) -> dict[str, Any]:
    config: Config = request.app[CONFIG]
    raw = await intake.read_body(request, config.server_max_body_bytes, config.server_body_timeout_seconds)
    payload = intake.parse_body(raw, config)
    if not isinstance(payload, dict):
        raise OpenAIError(400, "The body must be a JSON object.", code="invalid_json")
    return payload


@dataclass
class Stored:
    """A stored object: where it lives, its status document, and its job while it runs."""

    rp: RequestPath
    doc: dict[str, Any]
    job: Job | None

    @property
    def messages(self) -> Any:
        if self.job is not None:
            return self.job.body.get("messages")
        return (self.doc.get("parameters") or {}).get("messages")


def _located(request: web.Request, prefix: str, object_id: str) -> tuple[RequestPath, Job | None]:
    """Where the object `object_id` lives and its job while it runs; 404 for an id that is not one of this
    node's, or expired (its owner is not checked here)."""
    config: Config = request.app[CONFIG]
    manager: JobManager = request.app[MANAGER]
    rp = parse_id(prefix, object_id)
    if rp is None or rp.node_id != config.server_node_id:
        raise not_found(NAMES[prefix], object_id)
    job = manager.get(rp.request_id)
    if job is not None and job.rp == rp and "openai" in job.doc:
        return rp, job
    if expired(rp, config.retention_max_age_days):
        raise not_found(NAMES[prefix], object_id)
    return rp, None


async def find(request: web.Request, prefix: str, object_id: str, who: Caller) -> Stored:
    """The stored object `object_id` of the caller; 404 for anything else (unknown, expired, another key's)."""
    config: Config = request.app[CONFIG]
    rp, job = _located(request, prefix, object_id)
    if job is not None:
        doc = job.doc
    else:
        try:
            doc = await off_loop(request, read_json_under, config.data_dir, rp.rel("json"))
        except FileNotFoundError:
            doc = await _archived_doc(request, rp, prefix, object_id)
        except ValueError:
            raise not_found(NAMES[prefix], object_id) from None
    oa = doc.get("openai") if isinstance(doc, dict) else None
    if not isinstance(oa, dict) or oa.get("id") != object_id or oa.get("owner") != who.owner:
        raise not_found(NAMES[prefix], object_id)
    return Stored(rp, doc, job)


async def _archived_doc(request: web.Request, rp: RequestPath, prefix: str, object_id: str) -> Any:
    """The status document of an object that is only in the archive tier now (see `tiers`), read within
    `tiers.MAX_DOCUMENT` bytes and parsed off the loop; 404 when it is not there either."""
    try:
        raw = await tiers.document(request.app[ARCHIVE], rp)
        return await off_loop(request, orjson.loads, raw)
    except (FileNotFoundError, FileTooLarge, ValueError):
        raise not_found(NAMES[prefix], object_id) from None


def owned(prefix: str, who: Caller) -> dict[str, str]:
    """What the stored `authorization` of a new object keeps besides its token hashes: its kind and its
    owner, so that `find_owned` can check them from the document's first bytes (never shown to clients)."""
    return {"openai": KINDS[prefix], "owner": who.owner}


async def find_owned(
    request: web.Request, prefix: str, object_id: str, who: Caller
) -> tuple[RequestPath, Job | None, dict[str, Any]]:
    """Where the caller's stored object `object_id` lives, its job while it runs, and its stored
    authorization object; 404 as `find`. It reads only the head of the status document
    (`serve.read_auth`), not the answer it holds: a resumed stream or a DELETE of a 16 MiB response
    parses nothing large. A document without the kind and owner in its authorization object (made before
    they were kept there) is read whole by `find`."""
    config: Config = request.app[CONFIG]
    rp, job = _located(request, prefix, object_id)
    if job is None:
        try:
            auth = await asyncio.to_thread(read_auth, config.data_dir, rp.rel("json"))
        except FileNotFoundError:
            archived = await tiers.authorization(request.app[ARCHIVE], rp)  # (only in the archive now)
            if archived is None:
                raise not_found(NAMES[prefix], object_id) from None
            auth = archived
        except ValueError:
            raise not_found(NAMES[prefix], object_id) from None
        if "owner" in auth:
            if auth.get("openai") != KINDS[prefix] or auth.get("owner") != who.owner:
                raise not_found(NAMES[prefix], object_id)
            return rp, None, auth
    stored = await find(request, prefix, object_id, who)
    auth = stored.doc.get("authorization")
    return stored.rp, stored.job, auth if isinstance(auth, dict) else {}


def remove_files(config: Config, rp: RequestPath) -> None:
    """In a worker thread: a request's files (DELETE of a stored object, or `store: false`)."""
    for ext in EXTENSIONS:  # (the janitor's, for the same files)
        try:
            (config.data_dir / (rp.base + ext)).unlink(missing_ok=True)
        except OSError:
            pass


async def discard(config: Config, archiver: Archiver | None, rp: RequestPath) -> None:
    """A request's files go from both tiers: the local ones first, then its objects in the archive and its
    pending upload (`Archiver.forget`, which waits for an upload in flight), so that no upload can put
    back what was removed. HTTPError 503 `archive_unavailable` when the store cannot be reached."""
    await asyncio.to_thread(remove_files, config, rp)
    await tiers.forget(archiver, rp)


BACKGROUND: set[asyncio.Task[Any]] = set()


def in_background(coro: Coroutine[Any, Any, Any]) -> None:
    """Run `coro` on its own (an index line, removing files), keeping a reference until it is done."""
    task = asyncio.create_task(coro)
    BACKGROUND.add(task)
    task.add_done_callback(BACKGROUND.discard)


async def drain(seconds: float = 5.0) -> None:
    """At shutdown, after the jobs: let what runs on its own finish (index lines, file removals)."""
    if BACKGROUND:
        await asyncio.wait(list(BACKGROUND), timeout=seconds)


async def ended(job: Job) -> None:
    """Wait until a job has ended (its terminal status is on disk and its readers were told)."""
    if job.task is not None and not job.task.done():
        await asyncio.shield(job.task)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def answering(handler: Handler) -> Handler:
    """A handler of these paths whose refusals (OpenAIError, or the relay's HTTPError from shared checks)
    answer in OpenAI's error shape."""

    @functools.wraps(handler)
    async def run(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except HTTPError as exc:
            return OpenAIError.of(exc).response()
        except OpenAIError as exc:
            return exc.response()

    return run


JSON_HEADERS = {"Content-Type": "application/json", "Cache-Control": "no-store"}


async def json_answer(request: web.Request, doc: Any, headers: dict[str, str] | None = None) -> web.StreamResponse:
    """An OpenAI object as the answer, encoded off the loop (`off_loop`) and sent, a large one in blocks
    (see `sending.send_bytes`)."""
    return await send_bytes(request, await off_loop(request, orjson.dumps, doc), {**JSON_HEADERS, **(headers or {})})


WORKER: web.AppKey[ThreadPoolExecutor] = web.AppKey("openai_worker", ThreadPoolExecutor)


async def off_loop(request: web.Request, fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)` in the face's own worker thread: reading a stored object and encoding an answer.
    A Response object can be as large as the answer (16 MiB), and orjson holds the GIL while it parses
    or encodes one; in a single thread these run one after the other, so the loop gets the GIL between
    two of them however many clients ask at once (in the default pool several would take turns
    with each other before the loop's)."""
    return await asyncio.get_running_loop().run_in_executor(request.app[WORKER], fn, *args)


def paging(request: web.Request, default_order: str = "asc") -> tuple[str | None, int, str]:
    """`after`, `limit` (1-100, default 20) and `order` (asc|desc) of a list request."""
    q = request.query
    try:
        limit = int(q.get("limit", "20"))
    except ValueError:
        raise OpenAIError(400, "`limit` must be an integer between 1 and 100.", param="limit") from None
    if not 1 <= limit <= 100:
        raise OpenAIError(400, "`limit` must be an integer between 1 and 100.", param="limit")
    order = q.get("order", default_order)
    if order not in ("asc", "desc"):
        raise OpenAIError(400, "`order` must be asc or desc.", param="order")
    return q.get("after"), limit, order


def page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """An OpenAI list page of `items` (already ordered) after the item with id `after`."""
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    data = items[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(items) > limit}  # fmt: skip


ANSWERS_BYTES = 64 * 1024 * 1024  # the encoded objects kept in all (see `Answers`)


class Answers:
    """The encoded answers of GETs of stored objects, by object id, with the owner's hash.

    Objects that have ended change only by a DELETE or a metadata update, which `drop` them; they are
    kept (up to ANSWERS_BYTES in all, least recently used out first), so that a client polling a finished
    response of 16 MiB costs a lookup, not a parse and an encoding each time. GETs of one object that
    arrive while its answer is being made wait for that one and share it (a running object's too: the
    same moment's snapshot), instead of making one each."""

    def __init__(self, limit: int = ANSWERS_BYTES) -> None:
        self.limit = limit
        self.size = 0
        self._kept: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._making: dict[str, asyncio.Future[tuple[str, bytes]]] = {}

    def drop(self, object_id: str) -> None:
        old = self._kept.pop(object_id, None)
        if old is not None:
            self.size -= len(old[1])

    def _keep(self, object_id: str, owner: str, data: bytes) -> None:
        if len(data) > self.limit // 3:
            return
        self.drop(object_id)
        self._kept[object_id] = (owner, data)
        self.size += len(data)
        while self.size > self.limit:
            _, (_, old) = self._kept.popitem(last=False)
            self.size -= len(old)

    async def answer(
        self, object_id: str, owner: str, make: Callable[[], Awaitable[tuple[bytes, bool]]]
    ) -> bytes | None:
        """The caller's answer for `object_id`: kept, shared with a GET making it now, or made by `make`
        (which returns the bytes and whether the object has ended; it raises for a caller it is not for).
        None when a kept or shared answer is another owner's: the caller then finds it for itself."""
        kept = self._kept.get(object_id)
        if kept is not None:
            self._kept.move_to_end(object_id)
            return kept[1] if kept[0] == owner else None
        making = self._making.get(object_id)
        if making is not None:
            try:
                shared = await asyncio.shield(making)
            except Exception:
                return await make_alone(make)
            return shared[1] if shared[0] == owner else None
        future: asyncio.Future[tuple[str, bytes]] = asyncio.get_running_loop().create_future()
        self._making[object_id] = future
        try:
            data, ended = await make()
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
            future.exception()  # (retrieved: waiters make their own)
            raise
        finally:
            self._making.pop(object_id, None)
        future.set_result((owner, data))
        if ended:
            self._keep(object_id, owner, data)
        return data


async def make_alone(make: Callable[[], Awaitable[tuple[bytes, bool]]]) -> bytes:
    return (await make())[0]


ANSWERS: web.AppKey[Answers] = web.AppKey("openai_answers", Answers)


async def stored_answer(
    request: web.Request, prefix: str, who: Caller, make: Callable[[], Awaitable[tuple[bytes, bool]]]
) -> web.StreamResponse:
    """A GET of the stored object named in the URL, through `Answers`; when the answer at hand is not
    the caller's, `make` is called for it, and refuses it (404) as `find` does."""
    config: Config = request.app[CONFIG]
    object_id = request.match_info["id"]
    rp = parse_id(prefix, object_id)
    data = None
    if rp is not None and not expired(rp, config.retention_max_age_days):  # (a kept one may have expired)
        data = await request.app[ANSWERS].answer(object_id, who.owner, make)
    if data is None:
        data = await make_alone(make)
    return await send_bytes(request, data, JSON_HEADERS)
