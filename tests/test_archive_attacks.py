"""Attacks on the archive tier's reads (independent review): a store that serves a damaged or swapped
manifest, or another request's bytes, to a node that has no record of its own (another node's URL) never
gets a wrong byte served: each read raises an ArchiveError or returns exactly the archived bytes."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from relay.archive import ArchiveError

from .test_archive_store import archived, archivers, local, make_request  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(120)

READS = [("raw", 0, None), ("raw", 300 * 1024, 300 * 1024 + 7), ("txt", 5, 50), ("txt", 0, None), ("json", 0, None)]


async def _all_reads_safe(reader: Any, rp: Any, before: dict[str, bytes]) -> int:
    served = 0
    for ext, start, end in READS:
        reader.reader.forget(rp.base)
        try:
            got = await reader.read(rp.rel(ext), start, end)
        except (ArchiveError, ValueError):
            continue
        assert got == before[ext][start:end], f"{ext} [{start}:{end}] served other bytes"
        served += 1
    return served


async def test_a_damaged_manifest_from_the_store_never_serves_a_wrong_byte(
    tmp_path: Path,
    archivers: Any,  # noqa: F811 (the fixture imported above)
) -> None:
    data = tmp_path / "data"
    rp = make_request(data, raw_bytes=600 * 1024, events=3000)
    before = local(data, rp)
    archiver = await archivers(data, keep_local_hours=0)
    await archiver.ended(rp)
    await archived(archiver, 1)
    other = await archivers(tmp_path / "other")  # another node: the manifest comes from the store
    key = other.settings.key(rp.rel("manifest.json"))
    good = await other.bucket.get_bytes(key, 4 * 1024 * 1024)
    real_get = other.bucket.get_bytes
    rnd = random.Random(7)
    spoil: dict[str, Any] = {}

    async def get_bytes(k: str, limit: int) -> bytes:
        data = await real_get(k, limit)
        return spoil["f"](data) if k == key else data

    other.bucket.get_bytes = get_bytes  # type: ignore[method-assign]
    positions = sorted(rnd.sample(range(len(good)), min(120, len(good))))
    for i in positions:
        spoil["f"] = lambda d, i=i: d[:i] + bytes([d[i] ^ rnd.choice([1, 2, 4, 0x20, 0x55])]) + d[i + 1 :]
        await _all_reads_safe(other, rp, before)
    # well-formed lies: another block size, sizes, the files of another extension swapped
    doc = orjson.loads(good)
    lies = []
    for block in (1, 4096, 131072, 524288, 10**9):
        d = dict(doc, block=block)
        lies.append(d)
    files = doc["files"]
    lies.append(dict(doc, files={"json": files["txt"], "txt": files["json"], "raw": files["raw"]}))
    lies.append(dict(doc, files={"json": files["json"], "txt": files["txt"]}))
    for lie in lies:
        spoil["f"] = lambda d, lie=lie: orjson.dumps(lie)
        await _all_reads_safe(other, rp, before)
    spoil["f"] = lambda d: d
    assert await _all_reads_safe(other, rp, before) == len(READS)
