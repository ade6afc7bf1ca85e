"""The archive tier against a real S3 store (SeaweedFS, tests/objectstore.py): upload, verification, local
removal, ranged reads, multipart, an outage, a restart and a kill -9, and a hostile store in front
(tests/s3proxy.py) that is slow, answers errors or serves other bytes. Nothing of the relay is mocked.
"""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from relay.archive import ArchiveError, Archiver, IntegrityError, NotArchived, StoreError
from relay.config import ConfigError, load
from relay.paths import RequestPath
from relay.store import DONE_DATA, encode_event, write_atomic

from .conftest import until
from .objectstore import SeaweedS3
from .s3proxy import HostileS3Proxy

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def make_request(
    data_dir: Path, *, private: bool = False, created_at: float | None = None, raw_bytes: int = 3000, events: int = 6000
) -> RequestPath:
    """An ended request's three files, as the relay writes them: a status document, an event log whose ids
    are byte offsets, ending in [DONE], and the upstream's raw bytes."""
    rp = RequestPath.new(1, private, int(created_at if created_at is not None else time.time()))
    rp.directory(data_dir).mkdir(parents=True, exist_ok=True)
    log = bytearray()
    for i in range(events):
        log += encode_event(len(log), orjson.dumps({"type": "delta", "sequence_number": i, "text": f"word{i} "}))
    log += encode_event(len(log), DONE_DATA)
    write_atomic(rp.file(data_dir, "txt"), bytes(log))
    raw = (b"data: " + os.urandom(raw_bytes // 2).hex().encode() + b"\n\n")[:raw_bytes]
    write_atomic(rp.file(data_dir, "raw"), raw)
    status = {"id": rp.request_id, "status": "done", "text": "".join(f"word{i} " for i in range(events))}
    write_atomic(rp.file(data_dir, "json"), orjson.dumps(status), durable=True)
    return rp


def local(data_dir: Path, rp: RequestPath) -> dict[str, bytes]:
    return {
        ext: rp.file(data_dir, ext).read_bytes() for ext in ("json", "txt", "raw") if rp.file(data_dir, ext).exists()
    }


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return f'"{v}"' if isinstance(v, str) else repr(v)


def write_config(path: Path, endpoint: str, bucket: str, **archive: Any) -> Path:
    values = dict(
        enabled=True,
        endpoint_url=endpoint,
        bucket=bucket,
        keep_local_hours=0,
        retry_min_seconds=0.05,
        retry_max_seconds=0.3,
        request_timeout_seconds=2,
    )
    values.update(archive)
    path.write_text("[archive]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
    return path


@pytest.fixture
async def archivers(tmp_path: Path, s3: SeaweedS3) -> AsyncIterator[Callable[..., Any]]:
    """Make started Archivers from a real config file and the store's credentials in the environment; each
    test's keys live under a prefix of its own in the shared bucket."""
    made: list[Archiver] = []
    prefix = f"t-{secrets.token_hex(4)}/"

    async def make(data_dir: Path | None = None, endpoint: str | None = None, **archive: Any) -> Archiver:
        archive.setdefault("prefix", prefix)
        cfg = write_config(tmp_path / f"relay{len(made)}.toml", endpoint or s3.endpoint, s3.bucket, **archive)
        archiver = Archiver(load(cfg, env=s3.env()), data_dir or tmp_path / "data")
        await archiver.start()
        made.append(archiver)
        return archiver

    make.prefix = prefix  # type: ignore[attr-defined]
    yield make
    for archiver in made:
        await archiver.stop()


@pytest.fixture
async def proxy(s3: SeaweedS3) -> AsyncIterator[HostileS3Proxy]:
    p = HostileS3Proxy(s3.endpoint)
    await p.start()
    yield p
    await p.stop()


class LoopWatch:
    """The longest the event loop was held while the block ran (a 2 ms sleep, woken late). What existed
    before is frozen out of the collector meanwhile, as in `LoopProbe` (conftest.py): a full collection of
    the test session's heap is not the archiver's doing."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(0.002)
            self.worst = max(self.worst, time.monotonic() - t0 - 0.002)

    async def __aenter__(self) -> LoopWatch:
        gc.collect()
        gc.freeze()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        gc.unfreeze()


async def archived(archiver: Archiver, count: int, timeout: float = 20) -> None:
    await until(lambda: archiver.backlog().archived >= count and archiver.backlog().pending == 0, timeout, "archived")


# the configuration


def test_archive_settings_are_checked_and_credentials_come_from_the_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    for line, needle in [
        ("keep_local_hours = -1", "keep_local_hours"),
        ('keep_local_hours = "sometimes"', '"forever"'),
        ("keep_local_hours = true", "keep_local_hours"),
        ("part_size_bytes = 1048576", "5 MiB"),
        ('bucket = "Not_A_Bucket"', "bucket"),
        ('prefix = "a/../b"', "prefix"),
        ('endpoint_url = "s3.example.com"', "endpoint_url"),
        ("max_concurrent_uploads = 0", "max_concurrent_uploads"),
        ('access_key_id = "AKIAFROMTHEFILE"', "unknown key [archive] access_key_id"),
    ]:
        cfg.write_text(f"[archive]\n{line}\n")
        with pytest.raises(ConfigError, match="archive") as err:
            load(cfg, env={})
        assert needle in str(err.value), (line, str(err.value))
    cfg.write_text('[archive]\nenabled = true\nkeep_local_hours = 1.5\nendpoint_url = "http://127.0.0.1:9"\n')
    config = load(cfg, env={"AWS_SECRET_ACCESS_KEY": "s3cr3t-from-env"})
    assert config.archive_keep_local_hours == 1.5 and config.archive_secret_access_key == "s3cr3t-from-env"
    assert "s3cr3t" not in repr(config)
    with pytest.raises(ConfigError) as err:
        Archiver(config, tmp_path / "data")
    assert "[archive] bucket" in str(err.value) and "AWS_ACCESS_KEY_ID" in str(err.value)
    assert "s3cr3t" not in str(err.value)


# uploads, verification, local copies, reads


async def test_an_ended_request_is_uploaded_verified_and_its_local_copy_removed(
    tmp_path: Path, s3: SeaweedS3, archivers: Any
) -> None:
    data = tmp_path / "data"
    pub, prv = make_request(data), make_request(data, private=True, raw_bytes=0)
    before = {rp.base: local(data, rp) for rp in (pub, prv)}
    archiver = await archivers(data, keep_local_hours=0)
    await archiver.ended(pub)
    await archiver.ended(prv)
    await archived(archiver, 2)
    objects = s3.keys(archivers.prefix)
    assert await archiver.read(prv.rel("raw")) == b""  # (an empty file too)
    for rp in (pub, prv):
        for ext, content in before[rp.base].items():
            assert objects[archivers.prefix + rp.rel(ext)] == len(content)
            assert s3.get(archivers.prefix + rp.rel(ext)) == content  # the same relative path, the same bytes
            assert not rp.file(data, ext).exists()  # removed locally once verified
        assert archivers.prefix + rp.rel("manifest.json") in objects
    assert "/prv/" in prv.rel("txt")
    backlog = archiver.backlog()
    assert backlog.pending == 0 and backlog.failures == 0 and backlog.local_removed == 2
    assert backlog.archived_bytes == sum(len(c) for files in before.values() for c in files.values())
    # served from the store now: whole, and from any offset, exactly the bytes there were
    for ext, content in before[pub.base].items():
        assert await archiver.read(pub.rel(ext)) == content
    log = before[pub.base]["txt"]
    for start in (0, 1, 4095, 256 * 1024 - 1, 256 * 1024, len(log) // 2, len(log) - 1, len(log)):
        assert await archiver.read(pub.rel("txt"), start) == log[start:]
        assert await archiver.read(pub.rel("txt"), start, min(start + 10, len(log))) == log[start : start + 10]
    resume = log.index(b"id: ", len(log) // 2)  # a reader resuming after an event: one ranged read
    opened = await archiver.open(pub.rel("txt"), resume)
    assert opened.size == len(log) and await opened.read() == log[resume:]
    with pytest.raises(ValueError):
        await archiver.read(pub.rel("txt"), len(log) + 1)
    with pytest.raises(NotArchived):
        await archiver.read(make_request(data).rel("txt"))  # a request that was never archived


async def test_local_copies_are_kept_forever_or_for_their_hours(tmp_path: Path, s3: SeaweedS3, archivers: Any) -> None:
    forever_dir, hours_dir = tmp_path / "forever", tmp_path / "hours"
    kept, timed = make_request(forever_dir), make_request(hours_dir)
    a = await archivers(forever_dir, keep_local_hours="forever")
    b = await archivers(hours_dir, keep_local_hours=0.001)  # 3.6 s
    await a.ended(kept)
    await b.ended(timed)
    await archived(a, 1)
    await archived(b, 1)
    assert len(local(hours_dir, timed)) == 3  # archived, still local for its hours
    await until(lambda: not timed.file(hours_dir, "json").exists(), 10, "local copy removed after its hours")
    assert local(hours_dir, timed) == {}
    await asyncio.sleep(0.5)
    assert len(local(forever_dir, kept)) == 3  # "forever": both copies
    assert s3.get(archivers.prefix + kept.rel("txt")) == kept.file(forever_dir, "txt").read_bytes()
    assert a.backlog().local_removed == 0 and b.backlog().local_removed == 1


async def test_upload_after_seconds_holds_the_upload_back(tmp_path: Path, s3: SeaweedS3, archivers: Any) -> None:
    data = tmp_path / "data"
    rp, early = make_request(data), make_request(data)
    unstarted = Archiver(load(write_config(tmp_path / "c.toml", s3.endpoint, s3.bucket), env=s3.env()), data)
    await unstarted.ended(early)  # (handed over before any start: on disk, uploaded once an archiver runs)
    archiver = await archivers(data, keep_local_hours=0, upload_after_seconds=1.5)
    await archiver.ended(rp)
    await asyncio.sleep(0.5)
    assert len(local(data, rp)) == 3 and rp.marker_name in os.listdir(data / "archive" / "pending")
    assert not [k for k in s3.keys(archivers.prefix) if rp.request_id in k]  # not yet
    await archived(archiver, 2)
    for request in (rp, early):
        assert local(data, request) == {}
        assert len([k for k in s3.keys(archivers.prefix) if request.request_id in k]) == 4


async def test_a_file_larger_than_the_part_size_goes_up_in_parts_off_the_event_loop(
    tmp_path: Path, s3: SeaweedS3, archivers: Any
) -> None:
    data = tmp_path / "data"
    rp = make_request(data, raw_bytes=11 * MiB + 12345)
    raw = rp.file(data, "raw").read_bytes()
    archiver = await archivers(data, keep_local_hours=0, part_size_bytes=5 * MiB)
    async with LoopWatch() as watch:  # hashing, uploading, reading back: none of it on the loop
        await archiver.ended(rp)
        await archived(archiver, 1)
        ranges = [(0, None), (5 * MiB - 3, 5 * MiB + 3), (10 * MiB, None), (len(raw) - 1, None)]
        for start, end in ranges:
            assert await archiver.read(rp.rel("raw"), start, end) == raw[start:end]
    print(f"event loop held at most {watch.worst * 1000:.1f} ms")  # (seen with -s)
    assert watch.worst < 0.05, f"the event loop was held {watch.worst * 1000:.0f} ms"
    meta = s3.head(archivers.prefix + rp.rel("raw"))
    assert meta["size"] == len(raw) and meta["e_tag"].rstrip('"').endswith("-3")  # three parts
    assert not rp.file(data, "raw").exists()


async def test_any_node_serves_an_archived_url_from_the_manifest_in_the_bucket(tmp_path: Path, archivers: Any) -> None:
    rp = make_request(tmp_path / "node1")
    content = local(tmp_path / "node1", rp)
    first = await archivers(tmp_path / "node1", keep_local_hours=0)
    await first.ended(rp)
    await archived(first, 1)
    other = await archivers(tmp_path / "node2")  # another host: no local record of node 1's requests
    for ext, data in content.items():
        assert await other.read(rp.rel(ext), 7) == data[7:]


# expiry and deletion


async def test_expire_deletes_old_archived_objects_and_keeps_the_rest(
    tmp_path: Path, s3: SeaweedS3, archivers: Any
) -> None:
    data = tmp_path / "data"
    old = make_request(data, created_at=time.time() - 40 * 86400)
    new = make_request(data)
    archiver = await archivers(data, keep_local_hours="forever")
    for rp in (old, new):
        await archiver.ended(rp)
    await archived(archiver, 2)
    assert await archiver.expire(time.time() - 30 * 86400) == 1
    keys = s3.keys(archivers.prefix)
    assert not [k for k in keys if old.request_id in k]
    assert len([k for k in keys if new.request_id in k]) == 4
    with pytest.raises(NotArchived):
        await archiver.read(old.rel("txt"))
    assert await archiver.read(new.rel("txt")) == new.file(data, "txt").read_bytes()
    listed = await archiver.bucket.list(archivers.prefix)
    assert {m["path"]: m["size"] for m in listed} == keys  # (the client's listing: what the store holds)
    await archiver.forget(new)
    assert s3.keys(archivers.prefix) == {}


async def test_forget_during_an_upload_leaves_nothing_in_the_bucket(
    tmp_path: Path, s3: SeaweedS3, proxy: HostileS3Proxy, archivers: Any
) -> None:
    data = tmp_path / "data"
    rp = make_request(data)
    proxy.mode, proxy.delay = "slow", 0.15
    archiver = await archivers(data, endpoint=proxy.endpoint, keep_local_hours="forever")
    await archiver.ended(rp)
    await until(lambda: proxy.hits["PUT"] >= 1, 10, "the upload under way")
    await archiver.forget(rp)  # (a request deleted on purpose, mid-upload)
    await asyncio.sleep(0.5)
    assert not [k for k in s3.keys(archivers.prefix) if rp.request_id in k]
    assert archiver.backlog().pending == 0 and os.listdir(data / "archive" / "pending") == []
    assert not (data / "archive" / "records" / (rp.base + ".json")).exists()
    assert len(local(data, rp)) == 3  # (its local files are the caller's to delete)


async def test_uploads_are_bounded_in_concurrency(tmp_path: Path, proxy: HostileS3Proxy, archivers: Any) -> None:
    data = tmp_path / "data"
    requests = [make_request(data) for _ in range(5)]
    proxy.mode, proxy.delay = "slow", 0.03  # every answer a little late, so that uploads overlap if they may
    archiver = await archivers(data, endpoint=proxy.endpoint, max_concurrent_uploads=2)
    for rp in requests:
        await archiver.ended(rp)
    await archived(archiver, 5)
    assert proxy.most_puts == 2  # two requests at a time, each one file at a time (small files: one PUT)


# an outage, a restart, a kill -9


async def test_store_down_loses_nothing_and_the_backlog_drains_when_it_returns(
    tmp_path: Path, s3: SeaweedS3, archivers: Any
) -> None:
    data = tmp_path / "data"
    archiver = await archivers(data, keep_local_hours=0, request_timeout_seconds=0.5)
    await s3.astop()
    try:
        requests = [make_request(data) for _ in range(3)]
        before = {rp.base: local(data, rp) for rp in requests}
        for rp in requests:
            await archiver.ended(rp)
        await until(lambda: archiver.backlog().failing == 3, 15, "every upload failed once")
        await asyncio.sleep(0.3)
        backlog = archiver.backlog()
        assert backlog.pending == 3 and backlog.failures >= 3 and backlog.archived == 0
        assert backlog.pending_bytes == sum(len(c) for files in before.values() for c in files.values())
        assert backlog.oldest_pending_seconds > 0.3 and backlog.last_error
        assert all(local(data, rp) == before[rp.base] for rp in requests)  # nothing removed
        with pytest.raises(StoreError):
            await archiver.read(requests[0].rel("txt"))
    finally:
        await s3.astart()
    await archived(archiver, 3)
    assert all(local(data, rp) == {} for rp in requests)
    for rp in requests:
        assert await archiver.read(rp.rel("txt")) == before[rp.base]["txt"]


KILLED_SCRIPT = """
import asyncio, sys
from pathlib import Path
from relay.archive import Archiver
from relay.config import load
from relay.paths import parse_request_path

async def main():
    archiver = Archiver(load(sys.argv[1]), Path(sys.argv[2]))
    await archiver.start()
    for rel in sys.argv[3:]:
        await archiver.ended(parse_request_path("/" + rel)[0])
    print("handed over", flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


async def test_pending_uploads_resume_after_a_kill_9(
    tmp_path: Path, s3: SeaweedS3, proxy: HostileS3Proxy, archivers: Any
) -> None:
    data = tmp_path / "data"
    requests = [make_request(data) for _ in range(3)]
    before = {rp.base: local(data, rp) for rp in requests}
    proxy.mode, proxy.delay = "slow", 30  # uploads hang mid-way: the process dies with them in flight
    cfg = write_config(tmp_path / "killed.toml", proxy.endpoint, s3.bucket, prefix=archivers.prefix)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED_SCRIPT, str(cfg), str(data), *(rp.rel("json") for rp in requests),
        cwd=ROOT, env={**os.environ, **s3.env()}, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 20) == b"handed over\n"
        await until(lambda: proxy.hits["PUT"] >= 2, 10, "uploads in flight")
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert len(os.listdir(data / "archive" / "pending")) == 3
    archiver = await archivers(data, keep_local_hours=0)  # the next start, on the same data directory
    assert archiver.backlog().pending == 3
    await archived(archiver, 3)
    for rp in requests:
        assert local(data, rp) == {}
        for ext, content in before[rp.base].items():
            assert s3.get(archivers.prefix + rp.rel(ext)) == content
    assert os.listdir(data / "archive" / "pending") == []


# a hostile store: slow, failing, or serving other bytes


@pytest.mark.parametrize("mode", ["slow", "error", "corrupt", "short", "long", "lose"])
async def test_a_hostile_store_never_costs_the_local_copy(
    tmp_path: Path, s3: SeaweedS3, proxy: HostileS3Proxy, archivers: Any, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    rp = make_request(data, raw_bytes=300 * 1024)
    before = local(data, rp)
    proxy.mode, proxy.delay = mode, 3
    archiver = await archivers(data, endpoint=proxy.endpoint, keep_local_hours=0, request_timeout_seconds=0.5)
    await archiver.ended(rp)
    await until(lambda: archiver.backlog().failures >= 2, 20, "failed attempts")
    backlog = archiver.backlog()
    assert backlog.archived == 0 and backlog.pending == 1 and backlog.local_removed == 0
    if mode in ("corrupt", "short", "long", "lose"):  # "stored", but what came back was not what was sent
        assert backlog.integrity_failures >= 1, backlog
    assert local(data, rp) == before
    assert not (data / "archive" / "records" / (rp.base + ".json")).exists()
    assert "archive:" in caplog.text and s3.secret_key not in caplog.text  # logged, without the credentials
    assert all(s3.secret_key.encode() not in f.read_bytes() for f in (data / "archive").rglob("*") if f.is_file())
    proxy.mode = "pass"  # the store comes to its senses: the upload goes through
    await archived(archiver, 1)
    assert local(data, rp) == {}


@pytest.mark.parametrize("mode", ["slow", "error", "corrupt", "short", "long", "etag"])
async def test_reads_from_a_hostile_store_raise_instead_of_serving_wrong_bytes(
    tmp_path: Path, proxy: HostileS3Proxy, archivers: Any, mode: str
) -> None:
    data = tmp_path / "data"
    rp = make_request(data, raw_bytes=600 * 1024)
    before = local(data, rp)
    archiver = await archivers(data, keep_local_hours=0)
    await archiver.ended(rp)
    await archived(archiver, 1)
    # this node (its local record) and another node (the manifest from the store), both through the proxy
    this = await archivers(data, endpoint=proxy.endpoint, request_timeout_seconds=0.5)
    other = await archivers(tmp_path / "other", endpoint=proxy.endpoint, request_timeout_seconds=0.5)
    await other.read(rp.rel("json"))  # (its manifest cached while the store behaves)
    proxy.mode, proxy.delay = mode, 3
    for reader in (this, other):
        for ext, start, end in [("raw", 0, None), ("raw", 300 * 1024, None), ("txt", 5, 50), ("json", 0, None)]:
            t0 = time.monotonic()
            try:
                got = await reader.read(rp.rel(ext), start, end)
            except ArchiveError as exc:
                assert mode != "etag", exc  # an ETag is not what is checked: the bytes are
                expected = {"slow": StoreError, "error": StoreError, "corrupt": IntegrityError}
                assert isinstance(exc, expected.get(mode, (IntegrityError, StoreError))), exc
                assert time.monotonic() - t0 < 5
            else:
                assert mode == "etag", f"{mode}: read returned instead of raising"
                assert got == before[ext][start:end]
