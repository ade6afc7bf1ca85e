"""Reading archived files: any range, one ranged GET, every byte checked against the manifest first."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson

from ..paths import RequestPath, parse_request_path
from .client import Bucket, IntegrityError, NotArchived
from .manifest import EXTS, MAX_MANIFEST_BYTES, Manifest, block_span, decode, verified
from .settings import ArchiveSettings
from .state import State

MANIFESTS_CACHED = 4096  # manifests kept in memory (a few KiB each), most recently read first


@dataclass
class ArchivedRange:
    """Bytes [start, end) of an archived file of `size` bytes, verified block by block as they come."""

    size: int
    start: int
    end: int
    chunks: Any  # AsyncIterator[bytes]

    def __aiter__(self) -> Any:
        return self.chunks.__aiter__()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks])

    async def aclose(self) -> None:
        """Drop the GET early (a reader that went away)."""
        await self.chunks.aclose()


class Reader:
    """Serves archived files: this node's own (its records), and any other node's (the manifests in the
    bucket), so that an archived URL can be answered by any node sharing the bucket."""

    def __init__(self, settings: ArchiveSettings, bucket: Bucket, state: State) -> None:
        self.settings = settings
        self.bucket = bucket
        self.state = state
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()

    def forget(self, base: str) -> None:
        self._manifests.pop(base, None)

    async def open(self, rel: str, start: int = 0, end: int | None = None) -> ArchivedRange:
        """Bytes [start, end) (end None: to the end) of an archived file, `rel` as in its URL without the
        leading `/`. One ranged GET; the bytes come verified. NotArchived (a FileNotFoundError) when
        there is no such archived file, ValueError for a range outside it, StoreError when the store
        fails, IntegrityError (from the iteration too) when it serves other bytes than were archived."""
        parsed = parse_request_path("/" + rel)
        if parsed is None or parsed[1] not in EXTS:
            raise NotArchived(rel)
        rp, ext = parsed
        manifest = await self._manifest(rp)
        fs = manifest.files.get(ext)
        if fs is None:
            raise NotArchived(rel)
        end = fs.size if end is None else end
        if not 0 <= start <= end <= fs.size:
            raise ValueError(f"range {start}-{end} is outside {rel} ({fs.size} bytes)")
        if start == end:
            return ArchivedRange(fs.size, start, end, _empty())
        first, last = block_span(fs, manifest.block, start, end)
        size, chunks = await self.bucket.open_range(self.settings.key(rel), first, last)
        if size != fs.size:
            raise IntegrityError(f"{rel}: the store holds {size} bytes, {fs.size} were archived")
        return ArchivedRange(fs.size, start, end, verified(chunks, fs, manifest.block, start, end, rel))

    async def _manifest(self, rp: RequestPath) -> Manifest:
        """The manifest of an archived request: this node's record, else the one in the store (cached)."""
        cached = self._manifests.get(rp.base)
        if cached is not None:
            self._manifests.move_to_end(rp.base)
            return cached
        record = await asyncio.to_thread(self.state.read_record, rp.base)
        if record is not None and isinstance(record.get("manifest"), dict):
            manifest = decode(orjson.dumps(record["manifest"]), rp.base)
        else:
            data = await self.bucket.get_bytes(self.settings.key(rp.rel("manifest.json")), MAX_MANIFEST_BYTES)
            manifest = decode(data, rp.base)
        self._manifests[rp.base] = manifest
        if len(self._manifests) > MANIFESTS_CACHED:
            self._manifests.popitem(last=False)
        return manifest


async def _empty() -> Any:
    return
    yield b""
