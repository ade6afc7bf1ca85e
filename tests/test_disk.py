"""Disk trouble on a real, small filesystem (a 3 MiB tmpfs): full disk, read-only data directory."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from pathlib import Path

import orjson
import pytest

from .conftest import RelayFactory, fill, msg, parse_sse, read_stream, text_of


async def test_full_disk_refuses_then_recovers(
    make_relay: RelayFactory, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    relay = await make_relay(data_dir=small_disk / "data", storage_reserve_bytes=256 * 1024)
    status, _, doc = await relay.post(msg("before"))
    assert status == 200
    assert (await relay.wait_status(doc["endpoints"]["status_url"]))["status"] == "done"  # nothing in flight
    filler = fill(small_disk)
    status, headers, err = await relay.post(msg("while full"))
    assert status == 507 and err["error"]["code"] == "storage_unavailable" and headers["Retry-After"]
    assert any("cannot write to the data directory" in r.getMessage() for r in caplog.records)
    filler.unlink()
    status, _, doc = await relay.post(msg("after"))
    assert status == 200
    final = await relay.wait_status(doc["endpoints"]["status_url"])
    assert final["status"] == "done"
    assert (small_disk / "data" / "reserve.bin").stat().st_size == 256 * 1024


async def test_running_request_ends_cleanly_when_the_disk_fills(make_relay: RelayFactory, small_disk: Path) -> None:
    relay = await make_relay(data_dir=small_disk / "data", storage_reserve_bytes=256 * 1024)
    doc = await relay.start(msg("word", model="echo:chunks=20000,pace=0.0005"))
    reader_url = doc["endpoints"]["stream_events_url"]
    await asyncio.sleep(0.5)
    filler = fill(small_disk)
    final = await relay.wait_status(doc["endpoints"]["status_url"], timeout=30)
    assert final["status"] == "error" and final["error"]["code"] == "storage_error"
    code, _, body = await read_stream(relay.session, reader_url)
    events = parse_sse(body)
    assert events[-1].data == "[DONE]" and events[-2].event == "error"
    for e in events[:-2]:
        orjson.loads(e.data)  # no half event
    kept = text_of(events)
    assert kept and set(kept.split("word")) == {""}
    assert final["response"]["body"]["choices"][0]["message"]["content"] == kept  # what was written is kept
    assert not list((small_disk / "data" / "running").glob("*.json"))
    # space returns: new requests work again by themselves
    filler.unlink()
    status, _, doc2 = await relay.post(msg("recovered"))
    assert status == 200
    assert (await relay.wait_status(doc2["endpoints"]["status_url"]))["status"] == "done"


async def test_read_only_data_dir(make_relay: RelayFactory, small_disk: Path) -> None:
    relay = await make_relay(data_dir=small_disk / "data", storage_reserve_bytes=64 * 1024)
    status, _, doc = await relay.post(msg("rw"))
    assert status == 200
    await relay.wait_status(doc["endpoints"]["status_url"])
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        status, _, err = await relay.post(msg("ro"))
        assert status == 507 and err["error"]["code"] == "storage_unavailable"
        # what is on disk is still served
        code, final = await relay.get_json(doc["endpoints"]["status_url"])
        assert code == 200 and final["status"] == "done"
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    status, _, _ = await relay.post(msg("rw again"))
    assert status == 200


async def test_a_refused_request_leaves_no_running_marker_on_a_full_disk(
    make_relay: RelayFactory, small_disk: Path
) -> None:
    """On a full tmpfs the marker file can be created but not written: the refusal must remove it too."""
    relay = await make_relay(data_dir=small_disk / "data", storage_reserve_bytes=0)
    status, _, doc = await relay.post(msg("before"))
    assert status == 200
    await relay.wait_status(doc["endpoints"]["status_url"])
    filler = fill(small_disk)
    try:
        status, _, err = await relay.post(msg("while full"))
        assert status == 507 and err["error"]["code"] == "storage_unavailable"
        assert list((small_disk / "data" / "running").glob("*.json")) == []
    finally:
        filler.unlink()
