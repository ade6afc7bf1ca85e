"""Expiry: the janitor removes expired requests and empty folders, in batches, never a running one,
never breaking a reader mid-file."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from relay import janitor

from .conftest import ROOT, Relay, RelayFactory, msg, parse_sse, text_of

DAY = 86400


def request_files(relay: Relay) -> list[Path]:
    return sorted(p for p in (relay.data_dir / "1").rglob("*") if p.is_file())


async def test_sweep_removes_expired_in_batches_and_keeps_running(relay: Relay) -> None:
    finished = [await relay.start(msg(f"old {i}")) for i in range(3)]
    for d in finished:
        await relay.wait_status(d["endpoints"]["status_url"])
    running = await relay.start(msg("still running", model="echo:delay=30"))
    manager_running = {running["endpoints"]["status_url"].rsplit("/", 1)[1][:-5]}
    assert len(request_files(relay)) == 3 * 3 + 2  # json, txt, raw each; the running one has no raw yet

    # nothing is expired yet
    report, more = janitor.sweep(relay.data_dir, 1, 30, manager_running.__contains__)
    assert (report.requests, more) == (0, False)
    # 31 days later: batches of 2
    later = time.time() + 31 * DAY
    report, more = janitor.sweep(relay.data_dir, 1, 30, manager_running.__contains__, batch=2, now=later)
    assert report.requests == 2 and more
    report2, more = janitor.sweep(relay.data_dir, 1, 30, manager_running.__contains__, batch=2, now=later)
    assert report2.requests == 1 and not more
    assert report.files + report2.files == 9 and report.bytes + report2.bytes > 0
    assert report2.skipped_running == 1
    left = request_files(relay)
    assert len(left) == 2 and all(running["endpoints"]["status_url"].rsplit("/", 1)[1][:-5] in str(p) for p in left)
    async with relay.session.post(running["endpoints"]["stop_url"]):
        pass
    report3, _ = janitor.sweep(relay.data_dir, 1, 30, lambda _id: False, now=later)
    assert report3.requests == 1
    assert request_files(relay) == []
    assert report3.folders >= 6  # the empty date folders went too
    assert (relay.data_dir / "1" / "r" / "pub").is_dir()  # but not the access folder itself
    assert list((relay.data_dir / "1" / "r" / "pub").iterdir()) == []


async def test_a_reader_mid_file_is_not_broken(make_relay: RelayFactory) -> None:
    relay = await make_relay(retention_max_age_days=0.00003)  # about 2.6 s
    doc = await relay.start(msg("word", model="echo:chunks=3000"))
    final = await relay.wait_status(doc["endpoints"]["status_url"])
    assert final["status"] == "done"
    async with relay.session.get(doc["endpoints"]["stream_events_url"]) as r:
        head = await r.content.read(2048)  # the reader holds the file open from here on
        await asyncio.sleep(3)
        report = await janitor.run_once(relay.data_dir, 1, relay.config.retention_max_age_days, lambda _id: False)
        assert report.requests == 1
        rest = await r.read()
    events = parse_sse((head + rest).decode())
    assert events[-1].data == "[DONE]" and text_of(events) == "word" * 3000
    async with relay.session.get(doc["endpoints"]["stream_events_url"]) as r:
        assert r.status == 404  # a new reader finds it gone


def test_janitor_command(tmp_path: Path) -> None:
    old = tmp_path / "data" / "1" / "r" / "pub" / "2020" / "01" / "02" / "03" / "04" / "05"
    old.mkdir(parents=True)
    rid = "3f2b7c1e-8d4a-4b6e-9f0a-1c2d3e4f5a6b"
    for ext in (".json", ".txt", ".raw"):
        (old / (rid + ext)).write_text("{}")
    fresh = tmp_path / "data" / "1" / "r" / "pub" / "2099" / "01" / "01" / "00" / "00" / "00"
    fresh.mkdir(parents=True)
    (fresh / (rid + ".json")).write_text("{}")
    out = subprocess.run(
        [sys.executable, "relay.py", "janitor", "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "removed 1 expired request(s): 3 file(s)" in out.stdout
    assert not (tmp_path / "data" / "1" / "r" / "pub" / "2020").exists()
    assert (fresh / (rid + ".json")).exists()


def test_janitor_command_skips_requests_with_a_running_marker(tmp_path: Path) -> None:
    from relay.paths import parse_request_path
    from relay.recovery import write_marker

    base = "1/r/pub/2020/01/02/03/04/05/3f2b7c1e-8d4a-4b6e-9f0a-1c2d3e4f5a6b"
    (tmp_path / "data" / base).parent.mkdir(parents=True)
    (tmp_path / "data" / (base + ".json")).write_text("{}")
    parsed = parse_request_path("/" + base + ".json")
    assert parsed
    write_marker(tmp_path / "data", parsed[0], None)
    out = subprocess.run(
        [sys.executable, "relay.py", "janitor", "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "removed 0 expired request(s)" in out.stdout
    assert (tmp_path / "data" / (base + ".json")).exists()


def test_sweep_never_follows_a_symlink_out_of_the_data_directory(tmp_path: Path) -> None:
    """A dated folder that is a symlink is not walked into, and a file symlink is removed, not its target."""
    data = tmp_path / "data"
    outside = tmp_path / "outside"
    (outside / "11" / "12" / "13" / "14" / "15").mkdir(parents=True)
    victim = outside / "11" / "12" / "13" / "14" / "15" / "0f0f0f0f-0f0f-4f0f-8f0f-0f0f0f0f0f0f.json"
    victim.write_text("precious")
    pub = data / "1" / "r" / "pub"
    pub.mkdir(parents=True)
    (pub / "2001").symlink_to(outside, target_is_directory=True)
    target = tmp_path / "target.json"
    target.write_text("also precious")
    second = pub / "2002" / "01" / "01" / "00" / "00" / "00"
    second.mkdir(parents=True)
    (second / "1e1e1e1e-1e1e-4e1e-8e1e-1e1e1e1e1e1e.json").symlink_to(target)
    report, _ = janitor.sweep(data, 1, 30, lambda _id: False)
    assert victim.read_text() == "precious" and target.read_text() == "also precious"
    assert report.requests == 1 and not (second / "1e1e1e1e-1e1e-4e1e-8e1e-1e1e1e1e1e1e.json").is_symlink()
