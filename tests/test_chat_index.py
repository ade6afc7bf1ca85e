"""The index of stored chat completions: list pages match a plain filter-and-sort of the entries, whatever
order the entries were added, changed and removed in, across the steps in which a long scan gives the
loop back."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

from relay.facade.chat_index import ChatIndex


def reference(entries: dict[str, dict[str, Any]], owner: str, model: str | None, metadata: dict[str, str],
              after: str | None, limit: int, descending: bool) -> tuple[list[str], bool]:  # fmt: skip
    ids = [e["id"] for e in sorted(entries.values(), key=lambda e: (e["created"], e["id"]), reverse=descending)
           if e["owner"] == owner and (model is None or e["model"] == model)
           and all(e["metadata"].get(k) == v for k, v in metadata.items())]  # fmt: skip
    if after is not None:
        mine = entries.get(after)
        if mine is None or mine["owner"] != owner:
            return [], False
        key = (mine["created"], mine["id"])
        ids = [i for i in ids if ((entries[i]["created"], i) < key if descending else (entries[i]["created"], i) > key)]
    return ids[:limit], len(ids) > limit


async def test_pages_match_a_plain_sort_of_the_entries(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(ChatIndex, "SCAN_STEP", 3)  # many steps, and their edges, on a small index
    index = ChatIndex(tmp_path)
    rng = random.Random(7)
    now = time.time()
    for i in range(400):
        created = now - rng.randrange(0, 50)  # added out of creation order, with ties
        owner, model = rng.choice("ab"), rng.choice(["m1", "m2"])
        index.record({"op": "add", "id": f"chatcmpl-{i:04d}", "created": created, "model": model, "owner": owner,
                      "metadata": {"topic": rng.choice("xyz")}})  # fmt: skip
    for i in rng.sample(range(400), 60):
        index.record({"op": "delete", "id": f"chatcmpl-{i:04d}"})
    for i in rng.sample(range(400), 60):
        index.record({"op": "metadata", "id": f"chatcmpl-{i:04d}", "metadata": {"topic": "w"}})
    ids = list(index.entries)
    for _ in range(300):
        query = {
            "model": rng.choice([None, "m1", "m2"]),
            "metadata": rng.choice([{}, {"topic": "x"}, {"topic": "w"}, {"topic": "none"}]),
            "after": rng.choice([None, None, rng.choice(ids), "chatcmpl-9999"]),
            "limit": rng.choice([1, 2, 5, 20, 100]),
            "descending": rng.random() < 0.5,
        }
        owner = rng.choice("ab")
        got = await index.listed(owner, max_age_days=30, **query)
        assert got == reference(index.entries, owner, **query), query
    await asyncio.sleep(0.05)  # the background appends of the file


async def test_paging_through_everything_in_both_orders(tmp_path: Path) -> None:
    index = ChatIndex(tmp_path)
    now = time.time()
    for i in range(5000):
        index.record({"op": "add", "id": f"c{i:05d}", "created": now - 5000 + i, "model": "m", "owner": "o",
                      "metadata": {}})  # fmt: skip
    for descending in (False, True):
        seen: list[str] = []
        after, more = None, True
        while more:
            page, more = await index.listed("o", model=None, metadata={}, max_age_days=30, after=after, limit=100,
                                            descending=descending)  # fmt: skip
            seen += page
            after = page[-1]
        expected = [f"c{i:05d}" for i in range(5000)]
        assert seen == (expected[::-1] if descending else expected)
    await asyncio.sleep(0.2)


async def test_entries_older_than_the_retention_are_not_listed_and_are_forgotten(tmp_path: Path) -> None:
    index = ChatIndex(tmp_path)
    now = time.time()
    index.record({"op": "add", "id": "old", "created": now - 31 * 86400, "model": "m", "owner": "o", "metadata": {}})
    index.record({"op": "add", "id": "new", "created": now, "model": "m", "owner": "o", "metadata": {}})
    assert await index.listed("o", model=None, metadata={}, max_age_days=30, after=None, limit=10,
                              descending=False) == (["new"], False)  # fmt: skip
    assert "old" not in index.entries
    await asyncio.sleep(0.05)
