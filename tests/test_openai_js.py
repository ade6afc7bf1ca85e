"""The official OpenAI JavaScript SDK (npm `openai`, pinned in tests/js/package-lock.json, installed by
`make test`) in Node.js against the running relay: background + stream, drop, resume, poll."""

from __future__ import annotations

import asyncio
import os
import shutil

import orjson

from .conftest import ROOT, TEST_KEY, RelayFactory

KEY = "relay-key-for-node-0001"


async def test_the_javascript_sdk_resumes_a_background_stream(make_relay: RelayFactory) -> None:
    node = shutil.which("node")
    assert node is not None, "Node.js is installed by `make test` (deploy/install-system-packages.sh)"
    assert (ROOT / "tests/js/node_modules/openai/package.json").exists(), "run `make test` (it runs npm ci)"
    relay = await make_relay(auth_api_keys=[KEY])
    text = " ".join(f"word{i}" for i in range(40))
    env = {**os.environ, "RELAY_URL": relay.url, "RELAY_KEY": KEY, "UPSTREAM_KEY": TEST_KEY, "INPUT": text}
    proc = await asyncio.create_subprocess_exec(
        node, "resume.mjs", cwd=ROOT / "tests/js", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    result = orjson.loads(out.splitlines()[-1])
    assert result["seen"] == list(range(len(result["seen"]))), "nothing lost or doubled across the resume"
    assert result["last"] >= 6 and result["text"] == text
    assert result["status"] == "completed" and result["polled"] == text
    assert result["notFound"] is True
