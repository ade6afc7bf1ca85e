"""The object store, through obstore (Rust's `object_store`): put, read back, ranged get, head, delete, list.

Every request runs in obstore's own Rust threads: the event loop only awaits its futures, so a slow store
never holds it. Every call is bounded twice: by the HTTP client (connect and silence limits of
`[archive] request_timeout_seconds`, and four times that for a whole request, except reads streamed to a
client, which may take as long as the client does while bytes keep coming) and here, by `asyncio`
deadlines. Failures come out as `StoreError` (retry later), `NotArchived` (no such object) or
`IntegrityError` (the store answered, but not what was asked); obstore's own retries are off, the archiver
retries with its backoff.

Uploads stream from the file: one PUT up to the part size (that much in memory), multipart above it with
two parts in flight (a few part sizes of memory per upload, whatever the file's size).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import obstore
from obstore.exceptions import BaseError, NotFoundError
from obstore.store import S3Store

from .settings import ArchiveSettings

T = TypeVar("T")

PART_CONCURRENCY = 2  # parts of one multipart upload in flight at once
CHUNK = 256 * 1024  # bytes handed on at a time by a streamed GET (at least; a block, for reads)


class ArchiveError(Exception):
    """Something went wrong with the archive (the base of the three below)."""


class StoreError(ArchiveError):
    """The object store failed, timed out or could not be reached: retry later, nothing is lost."""


class IntegrityError(ArchiveError):
    """The store answered with other bytes or another size than the ones uploaded: never served."""


class NotArchived(ArchiveError, FileNotFoundError):
    """No such archived file (or object)."""


def describe_error(exc: BaseException) -> str:
    """One short line for logs and the backlog's last error (never a credential: obstore prints none)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first[:300]}"


class Bucket:
    """One bucket of an S3-compatible store (path-style requests, which every implementation accepts)."""

    def __init__(self, settings: ArchiveSettings) -> None:
        self.settings = settings
        t = settings.timeout
        self._store = self._make(settings, timeout=timedelta(seconds=4 * t))
        self._reader = self._make(settings, timeout=None)  # streamed reads: bounded by silence instead

    @staticmethod
    def _make(s: ArchiveSettings, timeout: timedelta | None) -> S3Store:
        options: dict[str, Any] = {
            "allow_http": s.endpoint_url.startswith("http://"),
            "connect_timeout": timedelta(seconds=s.timeout),
            "read_timeout": timedelta(seconds=s.timeout),
        }
        if timeout is not None:
            options["timeout"] = timeout
        extra = {"session_token": s.session_token} if s.session_token else {}
        return S3Store(
            s.bucket,
            endpoint=s.endpoint_url,
            region=s.region,
            access_key_id=s.access_key_id,
            secret_access_key=s.secret_access_key,
            virtual_hosted_style_request=False,
            client_options=options,
            retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=4 * s.timeout)},
            **extra,
        )

    async def _bounded(self, what: str, call: Awaitable[T], seconds: float | None = None) -> T:
        """Await one store call with a deadline, its failures as StoreError / NotArchived."""
        try:
            return await asyncio.wait_for(call, seconds if seconds is not None else 4 * self.settings.timeout + 1)
        except (NotFoundError, FileNotFoundError):  # (obstore raises the latter)
            raise NotArchived(what) from None
        except TimeoutError:
            raise StoreError(f"{what}: timed out") from None
        except (BaseError, OSError, ValueError, RuntimeError) as exc:
            raise StoreError(f"{what}: {describe_error(exc)}") from None

    async def put_file(self, key: str, path: Path, size: int) -> None:
        """Upload a local file: one PUT up to the part size, multipart above it."""
        parts = -(-size // self.settings.part_size)
        await self._bounded(
            f"PUT {key}",
            obstore.put_async(
                self._store,
                key,
                path,
                use_multipart=size > self.settings.part_size,
                chunk_size=self.settings.part_size,
                max_concurrency=PART_CONCURRENCY,
            ),
            seconds=4 * self.settings.timeout * (1 + parts) + 1,
        )

    async def put_bytes(self, key: str, data: bytes) -> None:
        await self._bounded(f"PUT {key}", obstore.put_async(self._store, key, data, use_multipart=False))

    async def get_bytes(self, key: str, limit: int) -> bytes:
        """A small object whole (NotArchived when missing, IntegrityError when larger than `limit`)."""

        async def get() -> bytes:
            result = await obstore.get_async(self._store, key)
            if result.meta["size"] > limit:
                raise IntegrityError(f"GET {key}: {result.meta['size']} bytes, more than {limit}")
            return bytes(await result.bytes_async())

        data = await self._bounded(f"GET {key}", get())
        if len(data) > limit:
            raise IntegrityError(f"GET {key}: more than {limit} bytes")
        return data

    async def digest(self, key: str) -> tuple[int, str]:
        """(size, SHA-256 hex) of the bytes the store now serves for `key`, read back whole, streamed."""
        h = hashlib.sha256()
        size = 0
        async for chunk in self.stream(key, 0, None):
            size += len(chunk)
            await asyncio.to_thread(h.update, chunk)  # (hashing a MiB costs ~1 ms: not on the loop)
        return size, h.hexdigest()

    async def open_range(self, key: str, start: int, end: int | None) -> tuple[int, AsyncIterator[bytes]]:
        """(the object's whole size, its bytes [start, end)) — end None: to the end. One ranged GET."""
        options: dict[str, Any] = {"range": {"offset": start} if end is None else (start, end)}
        if start == 0 and end is None:
            options = {}  # (a whole object: a plain GET, whose size is then checked here, not by obstore)
        result = await self._bounded(f"GET {key}", obstore.get_async(self._reader, key, options=options))
        size = result.meta["size"]
        want = (start, size if end is None else end)
        if tuple(result.range) != want:
            raise IntegrityError(f"GET {key}: asked for bytes {want}, got {tuple(result.range)}")
        return size, self._chunks(key, result, want[1] - want[0])

    def stream(self, key: str, start: int, end: int | None) -> AsyncIterator[bytes]:
        """The bytes of `key` from `start`, each chunk within the silence limit; exactly as many as promised."""

        async def gen() -> AsyncIterator[bytes]:
            _size, chunks = await self.open_range(key, start, end)
            async for chunk in chunks:
                yield chunk

        return gen()

    async def _chunks(self, key: str, result: Any, expected: int) -> AsyncIterator[bytes]:
        stream = result.stream(min_chunk_size=CHUNK)
        got = 0
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), self.settings.timeout + 1)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise StoreError(f"GET {key}: no bytes for {self.settings.timeout} s") from None
            except (BaseError, OSError, ValueError, RuntimeError) as exc:
                raise StoreError(f"GET {key}: {describe_error(exc)}") from None
            got += len(chunk)
            if got > expected:
                raise IntegrityError(f"GET {key}: more than the {expected} bytes promised")
            yield bytes(chunk)
        if got != expected:
            raise IntegrityError(f"GET {key}: {got} bytes instead of {expected}")

    async def head(self, key: str) -> dict[str, Any]:
        """The object's metadata (`size`, `e_tag`, `last_modified`); NotArchived when missing."""
        return dict(await self._bounded(f"HEAD {key}", obstore.head_async(self._store, key)))

    async def delete(self, key: str) -> None:
        """Delete an object (a missing one is no error)."""
        try:
            await self._bounded(f"DELETE {key}", obstore.delete_async(self._store, key))
        except NotArchived:
            pass

    async def list(self, prefix: str, limit: int = 10000) -> list[dict[str, Any]]:
        """Up to `limit` objects under `prefix` (each `path`, `size`, …), in pages."""

        async def collect() -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            async for batch in obstore.list(self._store, prefix=prefix, chunk_size=1000):
                out += [dict(meta) for meta in batch]
                if len(out) >= limit:
                    return out[:limit]
            return out

        return await self._bounded(f"LIST {prefix}", collect(), seconds=4 * self.settings.timeout * (1 + limit // 1000))
