"""The OpenAPI 3.1 document (`relay/openapi.json`, served at `GET /openapi.json`): a valid document, equal to
the routes the app registers, and true of a live relay, checked by schemathesis.

schemathesis drives the relay over real sockets with `requests` (its transport), so the relay and the dev
upstream run here on an event loop of their own in a thread, exactly as `conftest.make_relay` starts
them, for the whole module. Every operation gets the document's examples (a real request's dated path,
a real response and stored chat completion), then generated cases, valid and invalid (negative data),
bounded in number; each answer must not be a 5xx and must conform to the document: its status, its
content type, its required headers and its JSON schema.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from relay import devupstream
from relay.app import AccessLogger, make_app
from relay.config import Config
from relay.server import RelayRunner
from relay.site import OPENAPI

from .conftest import TEST_KEY, free_port, msg

# schemathesis 4.32.5 draws with `random` inside its strategies, which Hypothesis 6.170 warns about (its own)
pytestmark = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module:hypothesis.errors.HypothesisDeprecationWarning"
)
ADMIN_KEY = "admin-key-openapi-0123456789"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    unsupported_method,  # (a method the document does not list: 405 with Allow)
]
# Generated cases per operation (besides its examples and schemathesis' coverage cases), and scenarios of
# linked calls; more with RELAY_FUZZ_EXAMPLES / RELAY_FUZZ_SCENARIOS (300 of each run clean, ~3 minutes).
EXAMPLES = int(os.environ.get("RELAY_FUZZ_EXAMPLES", "50"))
SCENARIOS = int(os.environ.get("RELAY_FUZZ_SCENARIOS", "40"))


def document() -> dict[str, Any]:
    return json.loads(OPENAPI.read_text())


# ----- the document and the routes ---------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1.")
    schemathesis.openapi.from_dict(doc).validate()  # against the OpenAPI 3.1 meta-schema


def _sample(path: str, doc: dict[str, Any], item: dict[str, Any], op: dict[str, Any]) -> str:
    """`path` with each parameter replaced by its example (every path parameter of the document has one,
    or a value of its pattern's shape)."""
    declared = {}
    for p in item.get("parameters", []) + op.get("parameters", []):
        if "$ref" in p:
            p = doc["components"]["parameters"][p["$ref"].rsplit("/", 1)[1]]
        if p["in"] == "path":
            declared[p["name"]] = p.get("example", "x1")
    return re.sub(r"\{(\w+)\}", lambda m: str(declared[m[1]]), path)


def _route_of(app: web.Application, method: str, path: str) -> str | None:
    """The route (`<METHOD> <path as registered>`) that would answer `method path`, as the router matches
    (plain paths, dynamic ones by their pattern, static directories by their prefix)."""
    found = None
    for route in app.router.routes():
        if route.method not in (method, "*"):
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        if "path" in info:
            hit = info["path"] == path
        elif "pattern" in info:
            hit = info["pattern"].fullmatch(path) is not None
        elif "prefix" in info:
            hit = path.startswith(info["prefix"].rstrip("/") + "/")
        else:
            hit = False
        if hit:
            found = found or f"{route.method} {info.get('formatter') or info.get('path') or info.get('prefix')}"
    return found


def _registered(app: web.Application) -> set[str]:
    """Every route the app registers (aiohttp's HEAD twins of GET routes left out)."""
    out = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        out.add(f"{route.method} {info.get('formatter') or info.get('path') or info.get('prefix')}")
    return out


def test_the_document_and_the_routes_are_equal() -> None:
    """Each operation of the document is answered by a route of the app, and each route of the app is in
    the document: paths compared by routing the document's paths (with their parameters' examples)
    through the app's own router, so parameter names and the dated catch-all need no spelling rules."""
    app = make_app(Config())
    doc = document()
    answered: dict[str, list[str]] = {}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            concrete = _sample(path, doc, item, op)
            route = _route_of(app, method.upper(), concrete)
            assert route is not None, f"{method.upper()} {path} is in the document, but no route answers it"
            answered.setdefault(route, []).append(f"{method.upper()} {path}")
    missing = _registered(app) - set(answered)
    assert not missing, f"routes the document lacks: {sorted(missing)}"
    # the dated catch-all answers the status, event stream, raw and stop URLs, with the methods each takes
    dated = answered[r"* /{node}/r/{tail}"]
    assert sorted(dated) == sorted(
        f"{m} /{{node}}/r/{{access}}/{{year}}/{{month}}/{{day}}/{{hour}}/{{minute}}/{{second}}/{{request_id}}{s}"
        for m, s in (("GET", ".json"), ("GET", ".txt"), ("GET", ".raw"), ("GET", "/stop"), ("POST", "/stop"))
    )


def test_every_operation_documents_its_errors_in_its_face_shape() -> None:
    """The relay's own paths answer errors as `{"status": "error", "error": {code, message}}`, the OpenAI
    face's as `{"error": {message, type, param, code}}` (a malformed HTTP request, refused below the app,
    in the relay's shape everywhere)."""
    doc = document()
    responses = doc["components"]["responses"]
    for path, item in doc["paths"].items():
        openai = path.startswith(("/v1/responses", "/v1/chat/", "/v1/models"))
        for method, op in item.items():
            if method == "parameters":
                continue
            for status, answer in op["responses"].items():
                if not status.startswith(("4", "5")):
                    continue
                answer = responses[answer["$ref"].rsplit("/", 1)[1]] if "$ref" in answer else answer
                text = json.dumps(answer["content"])
                assert ("OpenAIError" in text) == openai, (method, path, status)
                assert ("#/components/schemas/Error" in text) == (not openai), (method, path, status)


# ----- against a live relay -------------------------------------------------------------------------


@dataclass
class Live:
    url: str
    loop: asyncio.AbstractEventLoop
    stop: asyncio.Event
    thread: threading.Thread


def _serve(data_dir: Path, started: list[Any], ready: threading.Event) -> None:
    """The thread: a dev upstream and a relay on a loop of their own, until `stop` is set."""

    async def main() -> None:
        up_runner, _, up_port = await devupstream.start("127.0.0.1", 0, required_key=TEST_KEY)
        port = free_port()
        config = Config(
            server_port=port,
            server_public_url=f"http://127.0.0.1:{port}",
            storage_data_dir=str(data_dir),
            upstream_base_url=f"http://127.0.0.1:{up_port}/v1",
            upstream_default_model="echo",
        ).with_overrides(auth_admin_keys=[ADMIN_KEY])
        runner = RelayRunner(make_app(config), config, shutdown_timeout=5, access_log_class=AccessLogger)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        stop = asyncio.Event()
        started.extend([f"http://127.0.0.1:{port}", asyncio.get_running_loop(), stop])
        ready.set()
        await stop.wait()
        await runner.cleanup()
        await up_runner.cleanup()

    asyncio.run(main())


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    started: list[Any] = []
    ready = threading.Event()
    thread = threading.Thread(target=_serve, args=(tmp_path_factory.mktemp("openapi"), started, ready), daemon=True)
    thread.start()
    assert ready.wait(30), "the relay did not start"
    url, loop, stop = started
    yield Live(url, loop, stop, thread)
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)


HEADERS = {"X-OpenAI-API-Key": TEST_KEY, "Authorization": f"Bearer {ADMIN_KEY}"}  # (open mode: any relay key)


def _post(live: Live, path: str, body: dict[str, Any]) -> requests.Response:
    r = requests.post(live.url + path, json=body, headers=HEADERS, timeout=30)
    assert r.status_code == 200, r.text
    return r


def _finished(live: Live, status_url: str) -> None:
    deadline = time.monotonic() + 20
    while requests.get(status_url, timeout=10).json()["status"] not in ("done", "error", "stop"):
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.fixture(scope="module")
def objects(live: Live) -> dict[str, Any]:
    """Real objects of the live relay that the document's examples stand for: a finished public request
    (status, event stream, raw, stop), a response and a stored chat completion (and another of each for
    the DELETE operations, so that deleting does not take the others' away)."""
    started = _post(live, "/v1/stream-chatgpt", msg("the example request")).json()
    status_url = started["endpoints"]["status_url"]
    _finished(live, status_url)
    names = ("node", "access", "year", "month", "day", "hour", "minute", "second", "request_id")
    dated = dict(zip(names, status_url[len(live.url) + 1 : -len(".json")].replace("/r/", "/").split("/"), strict=True))
    return {
        "dated": dated,
        "response_id": _post(live, "/v1/responses", {"model": "echo", "input": "an example"}).json()["id"],
        "doomed_response_id": _post(live, "/v1/responses", {"model": "echo", "input": "to delete"}).json()["id"],
        "completion_id": _post(live, "/v1/chat/completions", {**msg("an example"), "store": True}).json()["id"],
        "doomed_completion_id": _post(live, "/v1/chat/completions", {**msg("to delete"), "store": True}).json()["id"],
    }


EXAMPLE_IDS = {name: document()["components"]["parameters"][name]["example"]
               for name in ("request_id", "response_id", "completion_id")}  # fmt: skip


def _real(case: Any, objects: dict[str, Any]) -> None:
    """A case made from the document's examples asks for the live relay's real objects instead."""
    params = case.path_parameters
    if not params:
        return
    if params.get("request_id") == EXAMPLE_IDS["request_id"]:
        params.update(objects["dated"])
    for name in ("response_id", "completion_id"):
        if params.get(name) == EXAMPLE_IDS[name]:
            params[name] = objects[("doomed_" if case.method.upper() == "DELETE" else "") + name]


def _sendable(case: Any) -> None:
    """What the dev upstream must get to answer at once: model `echo` (a generated model name may hold
    dev-upstream options such as `hang`), no `dev` object; and no webhook URL (the relay would deliver to
    whatever host was generated; webhook URLs have tests of their own, tests/test_webhooks.py)."""
    if isinstance(case.body, dict):
        if "model" in case.body or "messages" in case.body or "input" in case.body:
            case.body["model"] = "echo"
        case.body.pop("dev", None)
        case.body.pop("webhook_url", None)


schema = schemathesis.openapi.from_dict(document())


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],
    database=None,
)
def test_schemathesis(case: Any, live: Live, objects: dict[str, Any]) -> None:
    _real(case, objects)
    _sendable(case)
    case.call_and_validate(
        base_url=live.url,
        headers=HEADERS,
        checks=CHECKS,
        timeout=30,
    )


# ----- what schemathesis found, each by name -------------------------------------------------------


def test_a_missing_console_file_is_a_json_404(live: Live) -> None:
    """aiohttp's static route answered a file it does not have with an empty `application/octet-stream`
    404, not the relay's JSON error (found by content_type_conformance on `GET /static/%C2%84`)."""
    for name in ("nope.js", "%C2%84", "%2E%2E", "app.js%00", "%2E%2E%2Frelay.py"):
        r = requests.get(f"{live.url}/static/{name}", timeout=10)
        assert r.status_code == 404 and r.headers["Content-Type"] == "application/json", (name, r.headers)
        assert r.json()["error"]["code"] == "not_found"
    r = requests.get(live.url + "/static/app.js", timeout=10)
    assert r.status_code == 200 and "javascript" in r.headers["Content-Type"]


def test_a_method_a_request_url_does_not_answer_is_405_with_allow(live: Live, objects: dict[str, Any]) -> None:
    """The status, event-stream and raw URLs answered TRACE (or PUT, DELETE) with 405 but no `Allow`, which
    RFC 9110 requires (found by unsupported_method)."""
    d = objects["dated"]
    stem = f"{live.url}/{d['node']}/r/{d['access']}/{d['year']}/{d['month']}/{d['day']}/{d['hour']}/{d['minute']}/" \
           f"{d['second']}/{d['request_id']}"  # fmt: skip
    for url, allow in ((stem + ".json", "GET, HEAD"), (stem + ".txt", "GET, HEAD"), (stem + ".raw", "GET, HEAD"),
                       (stem + "/stop", "GET, POST")):  # fmt: skip
        for method in ("TRACE", "PUT", "DELETE", "PATCH"):
            r = requests.request(method, url, timeout=10)
            assert (r.status_code, r.headers.get("Allow")) == (405, allow), (method, url, r.status_code, r.text)
            assert r.json()["error"]["code"] == "method_not_allowed"


def test_the_relay_serves_the_document(live: Live) -> None:
    r = requests.get(live.url + "/openapi.json", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    assert orjson.loads(r.content) == document()


class Scenarios(schema.as_state_machine()):  # type: ignore[misc]
    """schemathesis' stateful phase: sequences of calls that follow the document's links (a response or a
    stored chat completion created, then fetched, listed, updated, cancelled, deleted), each answer checked
    as above: what the relay makes of generated requests is itself checked against the document."""

    url = ""

    def before_call(self, case: Any) -> None:
        _sendable(case)

    def get_call_kwargs(self, case: Any) -> dict[str, Any]:
        return {"base_url": self.url, "headers": HEADERS, "timeout": 30}

    def validate_response(self, response: Any, case: Any, additional_checks: Any = None, **kwargs: Any) -> None:
        case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)


def test_schemathesis_scenarios(live: Live) -> None:
    Scenarios.url = live.url
    Scenarios.run(settings=settings(max_examples=SCENARIOS, stateful_step_count=6, deadline=None,
                                    suppress_health_check=list(HealthCheck), database=None))  # fmt: skip
