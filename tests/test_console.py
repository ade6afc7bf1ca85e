"""The web console in a real headless Chromium (Debian's package, driven by Playwright) against a real
relay and the dev upstream. Screenshots go to test-output/screenshots/."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from .conftest import TEST_KEY, Relay, RelayFactory, free_port
from .tcpproxy import CuttableProxy

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "test-output" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
LONG = " ".join(f"word{i}" for i in range(60))


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        await b.close()


async def open_console(browser: Browser, url: str, test_name: str, openai_key: str | None = TEST_KEY) -> Page:
    page = await browser.new_page(viewport={"width": 1100, "height": 900})
    page.set_default_timeout(20_000)
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    # JavaScript errors only: the browser also logs every non-2xx answer, which some tests cause on purpose
    page.on(
        "console",
        lambda m: problems.append(m.text) if m.type == "error" and "Failed to load resource" not in m.text else None,
    )
    await page.goto(url + "/")
    if openai_key:
        await page.fill("#openai-key", openai_key)
    page.problems = problems  # type: ignore[attr-defined]
    page.test_name = test_name  # type: ignore[attr-defined]
    return page


async def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{page.test_name}-{name}.png"), full_page=True)  # type: ignore[attr-defined]


async def say(page: Page, text: str, model: str = "echo"):  # noqa: ANN201 - a Playwright locator
    """Send a message; returns the locator of the assistant bubble that answers it."""
    bubbles = page.locator("#conversation .bubble.assistant")
    before = await bubbles.count()
    await page.fill("#model", model)
    await page.fill("#prompt", text)
    await page.click("#send")
    return bubbles.nth(before)


async def status_of(relay: Relay, bubble, headers: dict[str, str] | None = None) -> dict:  # noqa: ANN001
    """The status document behind an assistant bubble."""
    url = await bubble.get_attribute("data-status-url")
    assert url
    code, doc = await relay.get_json(url, headers)
    assert code == 200
    return doc


async def test_send_stream_chain_and_stop(browser: Browser, relay: Relay) -> None:
    page = await open_console(browser, relay.url, "chat")
    bubble = await say(page, LONG, "echo:pace=0.04")
    await expect(bubble).to_have_class(re.compile(r"\bstreaming\b"))
    await expect(bubble.locator(".text")).to_contain_text("word5")
    partial = await bubble.locator(".text").text_content()
    assert partial and len(partial) < len(LONG)  # it arrives piece by piece
    await shot(page, "1-streaming")
    await expect(bubble.locator(".meta")).to_contain_text("done")
    assert await bubble.locator(".text").text_content() == LONG

    # a second turn continues the conversation
    bubble = await say(page, "second turn")
    await expect(bubble.locator(".meta")).to_contain_text("done")
    assert await bubble.locator(".text").text_content() == "second turn"
    doc = await status_of(relay, bubble)
    assert [m["content"] for m in doc["parameters"]["messages"]] == [LONG, LONG, "second turn"]
    assert doc["endpoints"]["from_status_url"]
    await shot(page, "2-chained")

    # stop one: the partial text stays
    await page.click("#new-conversation")
    bubble = await say(page, LONG, "echo:pace=0.1")
    await expect(bubble.locator(".text")).to_contain_text("word3")
    await page.click("#stop")
    await expect(bubble.locator(".meta")).to_contain_text("stop")
    await expect(bubble).to_have_class(re.compile(r"\bstopped\b"))
    text = await bubble.locator(".text").text_content()
    assert text and LONG.startswith(text) and len(text) < len(LONG)
    doc = await status_of(relay, bubble)
    assert doc["status"] == "stop" and doc["response"]["body"]["choices"][0]["message"]["content"] == text
    await shot(page, "3-stopped")
    assert page.problems == []  # type: ignore[attr-defined]


async def test_private_conversation_with_keys_in_session_storage(browser: Browser, make_relay: RelayFactory) -> None:
    relay = await make_relay(auth_api_keys=["console-relay-key"])
    page = await open_console(browser, relay.url, "private", openai_key=None)
    # the relay needs a key: Settings are open; without the key, the error points at the field
    await expect(page.locator("#settings")).to_have_attribute("open", "")
    await say(page, "refused")
    await expect(page.locator(".error")).to_contain_text("unauthorized")
    await expect(page.locator(".error")).to_contain_text("Settings → Relay access key")
    await expect(page.locator("#relay-key")).to_be_focused()
    await shot(page, "1-error")
    await page.click("#new-conversation")
    await page.fill("#relay-key", "console-relay-key")
    await page.fill("#openai-key", TEST_KEY)
    await page.check("#private")
    bubble = await say(page, "a private hello")
    await expect(bubble.locator(".meta")).to_contain_text("done")
    await expect(page.locator("#private-marker")).to_be_visible()  # a private conversation says so
    assert await bubble.locator(".text").text_content() == "a private hello"
    status_url = await bubble.get_attribute("data-status-url")
    assert status_url and "/1/r/prv/" in status_url
    async with relay.session.get(status_url) as r:
        assert r.status == 401  # the page read it with its bearer token; without one it is closed
    bubble = await say(page, "and a second private turn")
    await expect(bubble.locator(".meta")).to_contain_text("done")
    assert "/1/r/prv/" in (await bubble.get_attribute("data-status-url") or "")
    storage = await page.evaluate("() => [JSON.stringify(sessionStorage), localStorage.length, location.href]")
    assert "console-relay-key" in storage[0] and "UPSTREAMKEY" in storage[0]
    assert storage[1] == 0 and "key" not in storage[2]
    await shot(page, "2-private")
    # the snippets are filled in with the last request's URLs and its token
    await page.click("#tab-snippets")
    curl = await page.text_content("#snippet-curl")
    assert curl and "/1/r/prv/" in curl and "Authorization: Bearer" in curl and "stream_token=" in curl
    await shot(page, "3-snippets")
    assert page.problems == []  # type: ignore[attr-defined]


async def test_dropped_connection_mid_stream_keeps_the_text_whole(browser: Browser, make_relay: RelayFactory) -> None:
    port = free_port()
    relay = await make_relay(server_public_url=f"http://127.0.0.1:{port}")
    proxy = CuttableProxy(relay.config.server_port)
    await proxy.start(port)
    try:
        page = await open_console(browser, proxy_url := f"http://127.0.0.1:{port}", "reconnect")
        assert proxy_url
        bubble = await say(page, LONG, "echo:pace=0.05")
        await expect(bubble.locator(".text")).to_contain_text("word10")
        assert proxy.cut() >= 1  # the network drops mid-stream
        await expect(page.locator("#status-line")).to_contain_text("reconnecting")
        await shot(page, "1-reconnecting")
        await expect(bubble.locator(".meta")).to_contain_text("done", timeout=30_000)
        assert await bubble.locator(".text").text_content() == LONG  # nothing lost, nothing twice
        resumed = [h for h in proxy.heads if b".txt" in h.split(b"\r\n", 1)[0] and b"last-event-id" in h.lower()]
        assert resumed, "the browser did not resume with Last-Event-ID"
        await shot(page, "2-whole")
        assert page.problems == []  # type: ignore[attr-defined]
    finally:
        await proxy.stop()


async def test_viewer_shows_events_with_their_ids(browser: Browser, relay: Relay) -> None:
    doc = await relay.start({"model": "echo:pace=0.05", "messages": [{"role": "user", "content": "watch me stream"}]})
    page = await open_console(browser, relay.url, "viewer")
    await page.click("#tab-viewer")
    await page.fill("#viewer-url", doc["endpoints"]["status_url"])
    await page.click("#viewer-open")
    await expect(page.locator("#viewer-state")).to_contain_text("Finished")
    await expect(page.locator("#viewer-text")).to_have_text("watch me stream")
    rows = page.locator("#viewer-events tbody tr")
    count = await rows.count()
    assert count >= 5
    # a chart of the time between events, rather than a wall of JSON to read
    await expect(page.locator("#viewer-timing")).to_be_visible()
    assert int(await page.locator("#viewer-chart").get_attribute("data-bars") or 0) >= 4
    await expect(page.locator("#viewer-chart-caption")).to_contain_text("median")
    await page.click("#viewer-raw-summary")  # the raw events with their ids, one click away
    first_id = await rows.nth(0).locator("td").nth(0).text_content()
    assert first_id == "0"
    assert await rows.nth(count - 1).locator("td").nth(2).text_content() == "[DONE]"
    await expect(page.locator("#viewer-status")).to_contain_text('"status": "done"')
    await shot(page, "1-viewer")
    # an async request has no stream: the viewer says so and shows its status
    a = await relay.start({"messages": [{"role": "user", "content": "async one"}]}, endpoint="/v1/async-chatgpt")
    await relay.wait_status(a["endpoints"]["status_url"])
    await page.fill("#viewer-url", a["endpoints"]["status_url"])
    await page.click("#viewer-open")
    await expect(page.locator("#viewer-state")).to_contain_text("An async request")
    await expect(page.locator("#viewer-state")).to_contain_text("finished with status done")
    await expect(page.locator("#viewer-status")).to_contain_text("async one")
    await expect(page.locator("#viewer-state")).not_to_contain_text("could not")
    await asyncio.sleep(0)


async def test_the_stop_answer_reaches_the_client_while_its_stream_is_still_open(
    browser: Browser, relay: Relay
) -> None:
    """The OffloadGPT author's client marks an answer as stopped only when the stop URL's answer arrives
    while its EventSource is still open. A browser records the order of what arrives."""
    doc = await relay.start({"model": "echo:pace=0.05", "messages": [{"role": "user", "content": LONG}]})
    page = await open_console(browser, relay.url, "stop-order", openai_key=None)
    order = await page.evaluate(
        """async ([streamUrl, stopUrl, statusUrl]) => {
            const order = [];
            const es = new EventSource(streamUrl);
            await new Promise((ok) => { es.onmessage = () => ok(); });
            order.push("first event");
            const ended = new Promise((ok) => {
                es.addEventListener("stop", () => order.push("event: stop"));
                es.onmessage = (e) => { if (e.data === "[DONE]") { order.push("[DONE]"); es.close(); ok(); } };
            });
            const answer = await (await fetch(stopUrl, {method: "POST"})).json();
            order.push(`stop answer ${answer.status}, stream ${es.readyState === 1 ? "open" : "closed"}`);
            const status = await (await fetch(statusUrl)).json();
            order.push(`status ${status.status}`);
            await ended;
            return order;
        }""",
        [doc["endpoints"]["stream_events_url"], doc["endpoints"]["stop_url"], doc["endpoints"]["status_url"]],
    )
    assert order[:2] == ["first event", "stop answer success, stream open"]  # what the author's client needs
    # the status read after the answer says stop; whether it returns before the held-back `event: stop`
    # (50 ms after the answer) is up to a second request's timing on a loaded machine
    assert sorted(order[2:]) == sorted(["status stop", "event: stop", "[DONE]"])
    assert order.index("event: stop") < order.index("[DONE]")
    assert not page.problems  # type: ignore[attr-defined]


async def test_enter_sends_shift_enter_breaks_the_line_and_the_status_line_counts(
    browser: Browser, relay: Relay
) -> None:
    page = await open_console(browser, relay.url, "enter")
    await page.fill("#model", "echo:pace=0.05")
    await page.click("#prompt")
    await page.keyboard.type("first line")
    await page.keyboard.press("Shift+Enter")
    await page.keyboard.type(LONG)
    assert "first line\n" in await page.input_value("#prompt")  # Shift+Enter: a new line, nothing sent
    assert await page.locator("#conversation .bubble").count() == 0
    await page.keyboard.press("Enter")
    bubble = page.locator("#conversation .bubble.assistant").first
    await expect(page.locator("#status-line")).to_contain_text(
        re.compile(r"Streaming… \((1[0-9]|[2-9][0-9]) events so far\)")
    )
    await expect(bubble.locator(".meta")).to_contain_text("done")
    assert (await bubble.locator(".text").text_content() or "").startswith("first line\n")
    assert not page.problems  # type: ignore[attr-defined]


async def test_an_upstream_error_is_shown_in_the_answer_bubble(browser: Browser, relay: Relay) -> None:
    page = await open_console(browser, relay.url, "upstream-error")
    bubble = await say(page, "this will fail", "echo:fail=500")
    await expect(bubble).to_have_class(re.compile(r"\bfailed\b"))
    await expect(bubble.locator(".error")).to_contain_text("upstream_error")
    assert await page.locator("#conversation > .error").count() == 0  # no second, separate box
    await shot(page, "1-in-bubble")


async def test_settings_stay_closed_when_the_relay_needs_nothing(browser: Browser, make_relay: RelayFactory) -> None:
    relay = await make_relay(upstream_api_key=TEST_KEY)
    async with relay.session.get(relay.url + "/v1/info") as r:
        assert (await r.json()) == {
            "relay_key_required": False,
            "upstream_key_configured": True,
            "default_model": "echo",
            "node_id": 1,
            "operator_enabled": False,
        }
    page = await open_console(browser, relay.url, "settings-closed", openai_key=None)
    await expect(page.locator("#model")).to_have_attribute("placeholder", "relay default: echo")
    await expect(page.locator("#settings")).not_to_have_attribute("open", "")
    await page.fill("#prompt", "no settings needed")
    await page.press("#prompt", "Enter")
    bubble = page.locator("#conversation .bubble.assistant").first
    await expect(bubble.locator(".meta")).to_contain_text("done")


@pytest.mark.parametrize("width", [320, 390])
async def test_narrow_screens_do_not_overflow(browser: Browser, relay: Relay, width: int) -> None:
    page = await browser.new_page(viewport={"width": width, "height": 700})
    await page.goto(relay.url + "/")
    for tab in ("#tab-chat", "#tab-viewer", "#tab-snippets"):
        await page.click(tab)
        overflow = await page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, (tab, overflow)
    await page.click("#tab-chat")
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"narrow-{width}.png"), full_page=True)
    await page.close()


ADMIN_KEY = "console-admin-key-0123456789"


async def test_operator_page_running_stop_finished_and_charts(browser: Browser, make_relay: RelayFactory) -> None:
    relay = await make_relay(auth_admin_keys=[ADMIN_KEY])
    for body in ({"messages": [{"role": "user", "content": "short one"}]},
                 {"model": "echo:fail=500", "messages": [{"role": "user", "content": "x"}]}):  # fmt: skip
        await relay.start(body)
    running = await relay.start({"model": "echo:pace=0.05", "messages": [{"role": "user", "content": LONG}]})
    running_id = running["endpoints"]["status_url"].rsplit("/", 1)[1][:-5]
    page = await open_console(browser, relay.url, "operator", openai_key=None)
    await page.click("#tab-operator")
    await page.fill("#op-key", ADMIN_KEY)
    await page.click("#op-connect")
    row = page.locator(f'#op-running tr[data-id="{running_id}"]')
    await expect(row).to_be_visible()
    await expect(page.locator("#op-finished tbody tr")).to_have_count(2)
    await expect(page.locator("#op-finished")).to_contain_text("upstream_error")
    for chart in CHARTS:
        await expect(page.locator(f"#{chart}")).to_have_attribute("data-filled", re.compile(r"^[1-9]"))
    # the chart's canvas really has colored pixels, not just an attribute
    painted = await page.evaluate(
        """() => { const c = document.querySelector('#op-chart-requests canvas');
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }"""
    )
    assert painted > 50
    await expect(page.locator("#op-latency")).to_contain_text("p50")
    await shot(page, "live")
    await row.locator("button", has_text="Stop").click()
    await expect(row).to_have_count(0)
    await expect(page.locator("#op-finished tbody tr").first).to_contain_text("stop")
    _, doc = await relay.get_json(running["endpoints"]["status_url"])
    assert doc["status"] == "stop"
    await page.locator("#op-finished tbody tr").first.locator("button", has_text="Open").click()
    await expect(page.locator("#viewer")).to_be_visible()
    await expect(page.locator("#viewer-url")).to_have_value(running["endpoints"]["status_url"])
    await page.click("#tab-operator")
    await shot(page, "after-stop")
    assert page.problems == []  # type: ignore[attr-defined]


async def test_operator_page_without_admin_keys_says_how_to_enable_it(browser: Browser, relay: Relay) -> None:
    page = await open_console(browser, relay.url, "operator-off", openai_key=None)
    await page.click("#tab-operator")
    await expect(page.locator("#op-disabled")).to_be_visible()
    await expect(page.locator("#op-disabled")).to_contain_text("[auth] admin_keys")
    await expect(page.locator("#op-form")).to_be_hidden()
    await shot(page, "off")


# ----- the charts (uPlot): axes with tick labels, and a point's value in the legend on hover ---------

CHARTS = (
    "op-chart-requests",
    "op-chart-tokens",
    "op-chart-day",
    "op-chart-day-tokens",
    "op-chart-ttft",
    "op-chart-errors",
)
CLOCK = re.compile(r"^\d\d:\d\d$")  # a time tick: 24-hour HH:MM, in the browser's time zone (this machine's)
COUNT = re.compile(r"^\d+(\.\d+)?[KMB]?$")  # a count tick: 0, 5, 1.5K…
DURATION = re.compile(r"^\d+(\.\d+)? m?s$")  # 120 ms, 1.50 s


def hhmm(t: float) -> str:
    return time.strftime("%H:%M", time.localtime(t))


def same_duration(shown: str, seconds: float) -> bool:
    """`shown` ("12 ms", "1.50 s", as the page writes a duration) is `seconds` to its last digit (half a
    digit either way, the half included: the page rounds 59.5 ms to "60 ms"; 1e-9 absorbs the float error
    of that exact half, which made 0.0595 s against "60 ms" fail)."""
    number, unit = shown.split()
    return abs(float(number) / (1000 if unit == "ms" else 1) - seconds) <= (0.0005 if unit == "ms" else 0.005) + 1e-9


def points_to_hover(s: dict) -> list[tuple[str, float, float, list[str | float]]]:
    """From a GET /v1/admin/stats answer: for each chart, points as (chart, x, y) and what the legend must
    then show, x first: a time or an error code, then counts (as text) or durations (in seconds)."""
    now = int(s["now"] // 60)
    minutes = {m["t"] // 60: m for m in s["minutes"]}
    busy = max(m for m, v in minutes.items() if v["requests"] and m > now - 60)
    timed = max(m for m, v in minutes.items() if v["ttft_p50"] is not None and m > now - 60)
    start = now - (now - busy) // 15 * 15 - 14  # the 15 minutes the page sums `busy` into
    quarter = [minutes.get(m, {"requests": 0, "tokens": 0}) for m in range(start, start + 15)]
    day = {k: sum(m[k] for m in quarter) for k in ("requests", "tokens")}
    t, q, m, p = busy * 60, start * 60, minutes[busy], minutes[timed]
    out: list[tuple[str, float, float, list[str | float]]] = [
        ("op-chart-requests", t, m["requests"] / 2, [hhmm(t), str(m["requests"])]),
        ("op-chart-tokens", t, m["tokens"] / 2, [hhmm(t), str(m["tokens"])]),
        ("op-chart-day", q, day["requests"] / 2, [f"{hhmm(q)}–{hhmm(q + 900)}", str(day["requests"])]),
        ("op-chart-day-tokens", q, day["tokens"] / 2, [f"{hhmm(q)}–{hhmm(q + 900)}", str(day["tokens"])]),
        # (a line chart's legend shows every series at the pointer's time: the pointer mid-height, well inside)
        (
            "op-chart-ttft",
            timed * 60,
            (p["ttft_p50"] + p["ttft_p99"]) / 2,
            [hhmm(timed * 60), p["ttft_p50"], p["ttft_p99"]],
        ),
    ]
    for i, (code, n) in enumerate(s["day"]["errors_by_code"].items()):
        out.append(("op-chart-errors", i, n / 2, [code, str(n)]))
    return out


async def hover(page: Page, chart: str, x: float, y: float) -> list[str]:
    """Move the mouse onto the point (x, y) of a chart, in its data's units (uPlot says where that is on
    the screen); returns the values its legend then shows, x first."""
    await page.locator(f"#{chart}").scroll_into_view_if_needed()
    where = await page.evaluate(  # (syncRect: uPlot keeps the plot's place on the page, which a scroll moves)
        """([id, x, y]) => { const u = charts[id]; u.syncRect(); const box = u.over.getBoundingClientRect();
                             return [box.left + u.valToPos(x, "x"), box.top + u.valToPos(y, "y")]; }""",
        [chart, x, y],
    )
    await page.mouse.move(where[0] + 7, where[1] + 7)  # (a move, so that the one below is one too)
    await page.mouse.move(*where)
    return [v.strip() for v in await page.locator(f"#{chart} .u-legend .u-series .u-value").all_text_contents()]


def legend_is(shown: list[str], expected: list[str | float]) -> bool:
    if len(shown) != len(expected):
        return False
    for s, e in zip(shown, expected, strict=True):
        if isinstance(e, float):
            if not same_duration(s, e):
                return False
        elif re.sub(r"[^\w:–]", "", s) != e:  # 1,234 (as the browser's locale writes it) is 1234
            return False
    return True


async def test_operator_charts_have_axes_and_show_values_on_hover(browser: Browser, make_relay: RelayFactory) -> None:
    relay = await make_relay(auth_admin_keys=[ADMIN_KEY])
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    traffic = (("echo", "one two three"), ("echo", "four five"), ("echo:delay=0.3", "a slow first token"),
               ("echo:fail=500", "x"), ("echo:fail=500", "y"), ("echo:drop_after=1", "cut short now"))  # fmt: skip
    for model, text in traffic:
        doc = await relay.start({"model": model, "messages": [{"role": "user", "content": text}]})
        await relay.wait_status(doc["endpoints"]["status_url"])
    page = await open_console(browser, relay.url, "charts", openai_key=None)
    await page.click("#tab-operator")
    await page.fill("#op-key", ADMIN_KEY)
    await page.click("#op-connect")
    for chart in CHARTS:
        await expect(page.locator(f"#{chart}")).to_have_attribute("data-filled", re.compile(r"^[1-9]"))
    _, stats = await relay.get_json(relay.url + "/v1/admin/stats", admin)
    codes = list(stats["day"]["errors_by_code"])
    assert len(codes) == 2 and stats["hour"]["ttft_p99"] > stats["hour"]["ttft_p50"]  # two bars, two lines

    # every chart has both axes with tick labels: times (or the error codes) below, values on the left
    ticks = await page.evaluate("(ids) => ids.map((id) => charts[id].axes.map((a) => a._values))", list(CHARTS))
    for chart, (xs, ys) in zip(CHARTS, ticks, strict=True):
        assert len(ys) >= 2 and all((DURATION if chart == "op-chart-ttft" else COUNT).match(y) for y in ys), (chart, ys)
        if chart == "op-chart-errors":
            assert set(codes) <= set(xs), xs
        else:
            assert len(xs) >= 3 and all(CLOCK.match(x) for x in xs), (chart, xs)

    # hovering a point shows its value in the legend: the number GET /v1/admin/stats has for it
    SHOTS.mkdir(parents=True, exist_ok=True)
    for j, (chart, x, y, expected) in enumerate(points_to_hover(stats)):
        for _ in range(20):  # the page and this test may read the stats either side of a new minute: again
            shown = await hover(page, chart, x, y)
            if legend_is(shown, expected):
                break
            await asyncio.sleep(0.25)
            _, stats = await relay.get_json(relay.url + "/v1/admin/stats", admin)
            _, x, y, expected = points_to_hover(stats)[j]
        assert legend_is(shown, expected), (chart, shown, expected)
        await page.locator(f"#{chart}").locator("xpath=..").screenshot(path=str(SHOTS / f"charts-{chart}-{j}.png"))
    await shot(page, "operator")
    assert page.problems == []  # type: ignore[attr-defined]


async def test_viewer_chart_has_axes_and_shows_a_gap_on_hover(browser: Browser, relay: Relay) -> None:
    doc = await relay.start({"model": "echo:pace=0.05", "messages": [{"role": "user", "content": LONG}]})
    page = await open_console(browser, relay.url, "viewer-chart")
    await page.click("#tab-viewer")
    await page.fill("#viewer-url", doc["endpoints"]["status_url"])
    await page.click("#viewer-open")
    await expect(page.locator("#viewer-state")).to_contain_text("Finished")
    bars = int(await page.locator("#viewer-chart").get_attribute("data-bars") or 0)
    assert bars >= 4
    xs, ys = await page.evaluate("() => charts['viewer-chart'].axes.map((a) => a._values)")
    assert len(xs) >= 2 and all(x.isdigit() and 1 <= int(x) <= bars for x in xs), xs  # gap numbers
    assert len(ys) >= 2 and all(COUNT.match(y) for y in ys), ys
    gaps = await page.evaluate("() => charts['viewer-chart'].data[1]")
    k = max(range(len(gaps)), key=lambda i: gaps[i]) + 1  # the longest gap: it streams live, 50 ms apart
    shown = await hover(page, "viewer-chart", k, gaps[k - 1] / 2)
    assert shown[0] == f"#{k}" and same_duration(shown[1], gaps[k - 1] / 1000) and gaps[k - 1] >= 25, (shown, gaps)
    await page.locator("#viewer-timing").screenshot(path=str(SHOTS / "charts-viewer-chart.png"))
    assert page.problems == []  # type: ignore[attr-defined]
