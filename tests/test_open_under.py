"""Opening a request's file below the data directory (relay/store.py, `open_under`): never through a
symlink below the data directory, only regular files, on both ways it is done (one `openat2` where the
kernel has it, a walk of the path a component at a time where it does not)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import store
from relay.store import open_under, read_under

REL = "1/r/pub/2026/12/05/07/58/09/0f0f0f0f-0f0f-4f0f-8f0f-0f0f0f0f0f0f.json"


@pytest.fixture(params=["openat2", "walk"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "walk":
        monkeypatch.setattr(store, "_openat2_works", False)  # as on a kernel without openat2
    else:
        store.open_under(Path(__file__).parent, Path(__file__).name)  # (tries it once)
        assert store._openat2_works is True, "this machine's kernel has openat2 (Linux 5.6+)"
    yield request.param


def _tree(root: Path) -> Path:
    target = root / REL
    target.parent.mkdir(parents=True)
    target.write_bytes(b'{"status": "done"}')
    return target


def test_a_regular_file_is_opened_and_read(tmp_path: Path, way: str) -> None:
    _tree(tmp_path / "data")
    assert read_under(tmp_path / "data", REL) == b'{"status": "done"}'
    linked_root = tmp_path / "linked"
    linked_root.symlink_to(tmp_path / "data", target_is_directory=True)  # the root itself may be a link
    assert read_under(linked_root, REL) == b'{"status": "done"}'


@pytest.mark.parametrize("where", ["file", "directory", "top", "absolute", "relative-out"])
def test_no_symlink_below_the_data_directory_is_followed(tmp_path: Path, way: str, where: str) -> None:
    root = tmp_path / "data"
    target = _tree(root)
    secret = tmp_path / "secret.json"
    secret.write_bytes(b"root:x:0:0")
    if where == "file":
        target.unlink()
        target.symlink_to(secret)
    elif where == "directory":  # a day's directory swapped for a link to a copy of it
        day = target.parents[3]
        day.rename(day.with_name("elsewhere"))
        day.symlink_to(day.with_name("elsewhere"), target_is_directory=True)
    elif where == "top":
        (root / "1").rename(tmp_path / "one")
        (root / "1").symlink_to(tmp_path / "one", target_is_directory=True)
    elif where == "absolute":
        target.unlink()
        target.symlink_to("/etc/passwd")
    else:
        target.unlink()
        target.symlink_to("../../../../../../../../../../secret.json")
    with pytest.raises(FileNotFoundError):
        open_under(root, REL)


@pytest.mark.parametrize("rel", ["1/..", "1/r/../../secret.json", "/etc/passwd", "1//r", ""])
def test_paths_that_would_leave_or_bend_are_missing(tmp_path: Path, way: str, rel: str) -> None:
    _tree(tmp_path / "data")
    (tmp_path / "secret.json").write_bytes(b"root:x:0:0")
    with pytest.raises(FileNotFoundError):
        open_under(tmp_path / "data", rel)


def test_only_regular_files_open(tmp_path: Path, way: str) -> None:
    root = tmp_path / "data"
    target = _tree(root)
    with pytest.raises(FileNotFoundError):
        open_under(root, str(target.parent.relative_to(root)))  # a directory
    target.unlink()
    os.mkfifo(target)  # a FIFO: opened without blocking, then refused
    with pytest.raises(FileNotFoundError):
        open_under(root, REL)
    target.unlink()
    with pytest.raises(FileNotFoundError):
        open_under(root, REL)  # missing
