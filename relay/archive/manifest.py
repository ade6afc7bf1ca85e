"""What an archived request is: each file's size, SHA-256 and the SHA-256 of each block of it.

A request's manifest is made from the local files before the upload, compared with what the store
serves back (size and SHA-256 of the whole object), then uploaded beside them as `<id>.manifest.json`
(last: its presence means every file was verified) and kept in the node's local record. Any node can
then serve any range of an archived file without trusting the store: it reads the blocks that cover the
range (one ranged GET, at most one block of extra bytes each side), checks each block's hash, and gives
out only bytes that matched. A store that serves other bytes, or another size, makes the read fail
(`IntegrityError`), never return them.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ..paths import RequestPath
from .client import IntegrityError

BLOCK = 256 * 1024  # bytes per hashed block: a resume reads at most this much before its offset
EXTS = ("json", "txt", "raw")
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FileSum:
    size: int
    sha256: str
    blocks: tuple[str, ...]  # SHA-256 of each BLOCK-sized piece (the last one shorter)
    stamp: tuple[int, int] = (0, 0)  # (inode, mtime_ns) of the local file hashed; local records only

    def to_doc(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256, "blocks": list(self.blocks)}


@dataclass(frozen=True)
class Manifest:
    base: str  # RequestPath.base: `1/r/pub/YYYY/MM/DD/HH/mm/SS/<id>`
    files: dict[str, FileSum]
    block: int = BLOCK

    def encode(self) -> bytes:
        files = {ext: fs.to_doc() for ext, fs in self.files.items()}
        return orjson.dumps({"v": 1, "base": self.base, "block": self.block, "files": files})

    @property
    def bytes(self) -> int:
        return sum(fs.size for fs in self.files.values())


def _file_sum(doc: Any, block: int) -> FileSum:
    if not isinstance(doc, dict):
        raise ValueError("a file entry is not an object")
    size, sha, blocks = doc.get("size"), doc.get("sha256"), doc.get("blocks")
    if type(size) is not int or size < 0 or not isinstance(sha, str) or not _HEX64.match(sha):
        raise ValueError("bad size or sha256")
    if not isinstance(blocks, list) or len(blocks) != -(-size // block):
        raise ValueError("wrong number of blocks")
    if not all(isinstance(b, str) and _HEX64.match(b) for b in blocks):
        raise ValueError("bad block hash")
    return FileSum(size, sha, tuple(blocks))


def decode(data: bytes, base: str) -> Manifest:
    """The manifest in `data`, which must be the one of request `base`; IntegrityError otherwise."""
    try:
        doc = orjson.loads(data)
        if not isinstance(doc, dict) or doc.get("v") != 1 or doc.get("base") != base:
            raise ValueError("not the manifest of this request")
        block, files = doc.get("block"), doc.get("files")
        if type(block) is not int or block <= 0 or not isinstance(files, dict) or not set(files) <= set(EXTS):
            raise ValueError("bad block size or files")
        return Manifest(base, {ext: _file_sum(files[ext], block) for ext in EXTS if ext in files}, block)
    except ValueError as exc:
        raise IntegrityError(f"manifest of {base}: {exc}") from None


def hash_file(path: Path) -> FileSum | None:
    """Size, SHA-256 and block hashes of a local file (None when missing); blocking: run in a thread."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except (FileNotFoundError, OSError):
        return None
    try:
        st = os.fstat(fd)
        whole = hashlib.sha256()
        blocks = []
        size = 0
        while block := os.read(fd, BLOCK):
            while len(block) < BLOCK:  # (a short read mid-file: complete the block)
                more = os.read(fd, BLOCK - len(block))
                if not more:
                    break
                block += more
            size += len(block)
            whole.update(block)
            blocks.append(hashlib.sha256(block).hexdigest())
        return FileSum(size, whole.hexdigest(), tuple(blocks), (st.st_ino, st.st_mtime_ns))
    finally:
        os.close(fd)


def hash_request(data_dir: Path, rp: RequestPath) -> Manifest | None:
    """The manifest of a request's local files (None when its status document is gone)."""
    files = {}
    for ext in EXTS:
        fs = hash_file(rp.file(data_dir, ext))
        if fs is not None:
            files[ext] = fs
    return Manifest(rp.base, files) if "json" in files else None


def stamp(path: Path) -> tuple[int, int] | None:
    """(inode, mtime_ns) of a local file now, None when it is gone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def block_span(fs: FileSum, block: int, start: int, end: int) -> tuple[int, int]:
    """The block-aligned byte range that covers [start, end) of a file."""
    return start // block * block, min(-(-end // block) * block, fs.size)


async def verified(
    chunks: AsyncIterator[bytes], fs: FileSum, block: int, start: int, end: int, what: str
) -> AsyncIterator[bytes]:
    """The bytes [start, end) out of `chunks`, which hold the blocks covering them (see `block_span`):
    each block is checked against its hash before any of it is given out."""
    pos, _ = block_span(fs, block, start, end)  # the file offset of buf[used]
    index = pos // block
    buf = bytearray()
    async for chunk in chunks:
        buf += chunk
        used = 0
        while pos < end and len(buf) - used >= (length := min(block, fs.size - pos)):
            piece = bytes(buf[used : used + length])
            used += length
            if hashlib.sha256(piece).hexdigest() != fs.blocks[index]:  # (~0.15 ms a block)
                raise IntegrityError(f"{what}: block {index} does not match its hash")
            out = piece[max(start - pos, 0) : min(end - pos, length)]
            index += 1
            pos += length
            if out:
                yield out
        del buf[:used]  # (once a chunk: what is left is less than a block)
    if pos < end or buf:
        raise IntegrityError(f"{what}: the store's bytes do not end where the range does")
