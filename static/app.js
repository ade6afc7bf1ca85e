// The relay's web console: chat (stream, stop, continue, private), a stream viewer, and snippets.
// Plain JavaScript, no build step, nothing fetched from elsewhere; the charts are uPlot's, vendored in
// static/vendor/uplot/. Everything shown that came from the network goes through textContent, never innerHTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEYS = ["relay-key", "openai-key", "model"];

// ----- settings: kept in this tab's sessionStorage only ------------------------------------------
for (const id of KEYS) {
  const el = $(id);
  el.value = sessionStorage.getItem("relay." + id) || "";
  el.addEventListener("input", () => sessionStorage.setItem("relay." + id, el.value));
}
$("private").checked = sessionStorage.getItem("relay.private") === "1";

// Settings open by themselves only when the relay needs something typed in (GET /v1/info says what).
const relayInfo = { relay_key_required: false, upstream_key_configured: true };
fetch("/v1/info").then((r) => (r.ok ? r.json() : null)).then((info) => {
  if (!info) return;
  Object.assign(relayInfo, info);
  const missing = (info.relay_key_required && !$("relay-key").value) || (!info.upstream_key_configured && !$("openai-key").value);
  $("settings").open = missing || $("settings").open;
  if (info.default_model) $("model").placeholder = "relay default: " + info.default_model;
}).catch(() => { $("settings").open = true; });

function pointAtSetting(id, message) {
  $("settings").open = true;
  $(id).focus();
  return message;
}
$("private").addEventListener("change", () => sessionStorage.setItem("relay.private", $("private").checked ? "1" : "0"));

// ----- tabs -------------------------------------------------------------------------------------
for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
    document.querySelectorAll(".panel").forEach((p) => p.classList.toggle("active", p.id === tab.dataset.tab));
  });
}

// ----- helpers ----------------------------------------------------------------------------------
function apiHeaders() {
  const h = { "Content-Type": "application/json" };
  const relayKey = $("relay-key").value.trim();
  const openaiKey = $("openai-key").value.trim();
  if (relayKey) h["X-RapidAPI-Key"] = relayKey;
  if (openaiKey) h["X-OpenAI-API-Key"] = openaiKey;
  return h;
}

function bearerHeaders(token) {
  return token ? { Authorization: "Bearer " + token } : {};
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function errorBox(code, message) {
  const box = el("div", "error");
  box.append(el("code", "", String(code)), document.createTextNode(": " + message));
  return box;
}

function setStatus(text) {
  $("status-line").textContent = text;
}

async function readError(res) {
  try {
    const doc = await res.json();
    if (doc && doc.error) return [doc.error.code, doc.error.message];
  } catch (_) { /* not JSON */ }
  return ["http_" + res.status, res.statusText || "request failed"];
}

function choiceText(chunk) {
  const choice = (chunk.choices || []).find((c) => (c.index || 0) === 0);
  return (choice && choice.delta && choice.delta.content) || "";
}

// ----- charts: uPlot (static/vendor/uplot/), made once per box and fed new data on each refresh ------
const charts = {}; // uPlot instances by the id of the box each is drawn in
const hhmm = uPlot.fmtDate("{HH}:{mm}");
const clock = (t) => hhmm(new Date(t * 1000));
const compact = new Intl.NumberFormat(undefined, { notation: "compact" });
const INTS = Array.from({ length: 27 }, (_, i) => [1, 2, 5][i % 3] * 10 ** Math.floor(i / 3)); // 1, 2, 5, 10, 20…

// x: {time, step, tick, value}, where `step` is the distance between two bars or points, `tick` formats
// an axis label and `value` the legend's; y: {label, tick, value, ints}; lines: [{label, color}].
function plot(id, data, { x, y, lines, bars = true }) {
  if (charts[id]) {
    charts[id].setData(data);
    return;
  }
  const box = $(id);
  const shown = (fmt) => (u, v) => (v === null || v === undefined ? "–" : fmt(v));
  charts[id] = new uPlot({
    width: box.clientWidth || 400,
    height: 150,
    cursor: { drag: { x: false } }, // no zoom: the next refresh would undo it
    scales: {
      // from the first to the last x, and half a step more on each side: every bar shown whole
      x: { time: x.time, range: ({ data: [xs] }) => (xs.length ? [xs[0] - x.step / 2, xs.at(-1) + x.step / 2] : [0, 1]) },
      y: { range: (u, lo, hi) => uPlot.rangeNum(0, hi > 0 ? hi : 1, 0.1, true) },
    },
    axes: [
      { values: (u, ticks) => ticks.map(x.tick), incrs: x.time ? undefined : INTS },
      { label: y.label, size: 64, values: (u, ticks) => ticks.map(y.tick), incrs: y.ints ? INTS : undefined },
    ],
    series: [
      { label: x.label, value: shown(x.value) },
      ...lines.map((s) => ({
        label: s.label,
        stroke: s.color,
        fill: bars ? s.color + "b0" : undefined,
        width: bars ? 0 : 2, // no outline: a bar of 0 is no line
        paths: bars ? uPlot.paths.bars({ size: [0.8, 40] }) : undefined,
        points: { show: !bars },
        spanGaps: true,
        value: shown(y.value),
      })),
    ],
  }, data, box);
  resized.observe(box);
}

const resized = new ResizeObserver((entries) => {
  for (const { target } of entries) {
    const u = charts[target.id];
    if (u && target.clientWidth && target.clientWidth !== u.width) u.setSize({ width: target.clientWidth, height: u.height });
  }
});

const COUNTS = { tick: (v) => compact.format(v), value: (v) => v.toLocaleString(), ints: true };
const MINUTES = { time: true, step: 60, label: "minute", tick: clock, value: clock };
const QUARTERS = { time: true, step: 900, label: "15 minutes", tick: clock, value: (t) => clock(t) + "–" + clock(t + 900) };

// ----- chat -------------------------------------------------------------------------------------
const chat = {
  parent: null, // {statusUrl, bearer} of the last finished turn, to continue from
  current: null, // the turn that is streaming
  last: null, // answer of the last POST, for the snippets
};

function addBubble(role, text) {
  const bubble = el("div", "bubble " + role);
  const body = el("span", "text", text);
  bubble.append(body);
  $("conversation").append(bubble);
  bubble.scrollIntoView({ block: "end" });
  return bubble;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(text) {
  const body = { messages: [{ role: "user", content: text }] };
  const model = $("model").value.trim();
  if (model) body.model = model;
  if (chat.parent) {
    body.from_status_url = chat.parent.statusUrl;
    if (chat.parent.bearer) body.from_bearer_token = chat.parent.bearer;
  } else if ($("private").checked) {
    body.access = "private";
  }
  addBubble("user", text);
  setBusy(true);
  setStatus("Sending…");
  let res;
  try {
    res = await fetch("/v1/stream-chatgpt", { method: "POST", headers: apiHeaders(), body: JSON.stringify(body) });
  } catch (err) {
    $("conversation").append(errorBox("network_error", "could not reach the relay (" + err.message + ")"));
    setBusy(false);
    setStatus("Failed.");
    return;
  }
  if (!res.ok) {
    let [code, message] = await readError(res);
    if (res.status === 401) {
      message = pointAtSetting("relay-key", "This relay needs an access key: type it under Settings → Relay access key, then send again.");
    } else if (code === "missing_api_key") {
      message = pointAtSetting("openai-key", "This relay has no OpenAI key of its own: type yours under Settings → OpenAI key, then send again.");
    }
    $("conversation").append(errorBox(code, message));
    setBusy(false);
    setStatus("Refused with HTTP " + res.status + ".");
    return;
  }
  const answer = await res.json();
  chat.last = answer;
  $("private-marker").hidden = (answer.authorization || {}).access !== "private";
  renderSnippets(answer);
  const ep = answer.endpoints;
  const auth = answer.authorization || {};
  const bearer = auth.bearer_token || ep.bearer_token || null;
  const streamUrl = ep.stream_events_url + (auth.stream_url_arg ? "?" + auth.stream_url_arg : "");
  follow(streamUrl, ep, bearer);
}

function follow(streamUrl, ep, bearer) {
  const bubble = addBubble("assistant", "");
  bubble.classList.add("streaming");
  const textNode = bubble.querySelector(".text");
  const es = new EventSource(streamUrl);
  const turn = { es, ep, bearer, bubble, textNode, serverError: null, events: 0, done: false };
  chat.current = turn;
  bubble.dataset.statusUrl = ep.status_url;
  es.onopen = () => setStatus("Streaming… (" + turn.events + " events so far)");
  es.onmessage = (e) => {
    if (e.data === "[DONE]") {
      es.close();
      finishTurn(turn);
      return;
    }
    turn.events += 1;
    setStatus("Streaming… (" + turn.events + (turn.events === 1 ? " event" : " events") + " so far)");
    try {
      textNode.textContent += choiceText(JSON.parse(e.data));
    } catch (_) { /* a chunk that is not JSON: nothing to show */ }
  };
  es.addEventListener("error", (e) => {
    if (e.data) { // the relay's named `error` event: what went wrong upstream
      try { turn.serverError = JSON.parse(e.data).error; } catch (_) { /* ignore */ }
      return;
    }
    if (turn.done) return;
    if (es.readyState === EventSource.CONNECTING) {
      setStatus("Connection lost; reconnecting (the relay resumes after the last event received)…");
    } else {
      setStatus("The stream could not be opened.");
      finishTurn(turn);
    }
  });
  es.addEventListener("stop", () => { turn.stopped = true; });
}

async function finishTurn(turn) {
  if (turn.done) return;
  turn.done = true;
  turn.es.close();
  turn.bubble.classList.remove("streaming");
  setBusy(false);
  let status = null;
  try {
    const res = await fetch(turn.ep.status_url, { headers: bearerHeaders(turn.bearer) });
    status = res.ok ? await res.json() : null;
  } catch (_) { /* shown below as unknown */ }
  const meta = el("span", "meta");
  if (!status) {
    meta.textContent = "status unknown";
  } else {
    const body = (status.response && status.response.body) || {};
    const choice = (body.choices || [])[0] || {};
    const usage = body.usage ? " · " + body.usage.total_tokens + " tokens" : "";
    meta.textContent = status.status + (choice.finish_reason ? " · finish_reason " + choice.finish_reason : "") + usage;
    turn.bubble.dataset.status = status.status;
    if (status.status === "stop") turn.bubble.classList.add("stopped");
    if (status.status === "error") {
      const err = status.error || turn.serverError || { code: "error", message: "the request failed" };
      turn.bubble.classList.add("failed");
      turn.bubble.append(errorBox(err.code, err.message)); // in the answer's own bubble, text so far above it
    } else {
      chat.parent = { statusUrl: turn.ep.status_url, bearer: turn.bearer };
    }
  }
  turn.bubble.append(meta);
  setStatus("Finished: " + (status ? status.status : "unknown") + ". " + turn.events + " events.");
  chat.current = null;
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || chat.current) return;
  $("prompt").value = "";
  send(text);
});

$("prompt").addEventListener("keydown", (e) => {
  // Enter sends, like every chat; Shift+Enter is a new line (and an IME composition is left alone)
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", async () => {
  const turn = chat.current;
  if (!turn) return;
  $("stop").disabled = true;
  setStatus("Stopping…");
  try {
    const res = await fetch(turn.ep.stop_url, { method: "POST", headers: bearerHeaders(turn.bearer) });
    if (!res.ok) {
      const [code, message] = await readError(res);
      $("conversation").append(errorBox(code, message));
    }
  } catch (err) {
    $("conversation").append(errorBox("network_error", err.message));
  }
  // the stream itself ends with `event: stop` and [DONE], which finishes the turn
});

$("new-conversation").addEventListener("click", () => {
  if (chat.current) chat.current.es.close();
  chat.current = null;
  chat.parent = null;
  $("conversation").replaceChildren();
  $("private-marker").hidden = true;
  setBusy(false);
  setStatus("New conversation.");
});

// ----- viewer -----------------------------------------------------------------------------------
const viewer = { es: null, asyncUrl: null };

function viewerUrls(input, token) {
  const url = new URL(input, location.href);
  const base = url.origin + url.pathname.replace(/\.(json|txt|raw)$/, "");
  const params = new URLSearchParams(url.search);
  if (token && !params.has("stream_token")) params.set("stream_token", token);
  const query = params.toString();
  return { status: base + ".json", stream: base + ".txt" + (query ? "?" + query : "") };
}

function addEventRow(id, type, data) {
  const row = el("tr");
  row.append(el("td", "", id || ""), el("td", "", type), el("td", "", data));
  $("viewer-events").querySelector("tbody").append(row);
}

async function showViewerStatus(statusUrl, token) {
  try {
    const res = await fetch(statusUrl, { headers: bearerHeaders(token) });
    const text = await res.text();
    try {
      $("viewer-status").textContent = JSON.stringify(JSON.parse(text), null, 2);
    } catch (_) {
      $("viewer-status").textContent = text;
    }
  } catch (err) {
    $("viewer-status").textContent = "could not fetch the status: " + err.message;
  }
}

function closeViewer() {
  if (viewer.es) viewer.es.close();
  viewer.es = null;
  viewer.asyncUrl = null;
}

function drawTiming(times) {
  // One bar per gap between two events as they arrived here: a person sees pauses at a glance.
  const gaps = times.slice(1).map((t, i) => t - times[i]);
  $("viewer-timing").hidden = gaps.length === 0;
  if (!gaps.length) return;
  const ms = (v) => v.toFixed(v < 10 ? 1 : 0) + " ms";
  const gap = (i) => `#${i}`;
  plot("viewer-chart", [gaps.map((_, i) => i + 1), gaps], {
    x: { time: false, step: 1, label: "gap", tick: String, value: gap },
    y: { label: "ms", tick: (v) => compact.format(v), value: ms },
    lines: [{ label: "time since the event before", color: "#2f6fed" }],
  });
  const sorted = [...gaps].sort((a, b) => a - b);
  const median = sorted[Math.floor(sorted.length / 2)];
  $("viewer-chart").dataset.bars = String(gaps.length);
  $("viewer-chart-caption").textContent =
    `Time between events as they arrived: ${gaps.length} gaps, median ${median.toFixed(0)} ms, longest ${sorted.at(-1).toFixed(0)} ms.`;
}

async function fetchStatus(statusUrl, token) {
  try {
    const res = await fetch(statusUrl, { headers: bearerHeaders(token) });
    return res.ok ? await res.json() : null;
  } catch (_) {
    return null;
  }
}

async function watchAsync(statusUrl, token, status) {
  // An async request has no event stream: its status document is the whole story, polled until it ends.
  $("viewer-state").textContent = "An async request (no event stream): its status document, updated until it ends.";
  while (status) {
    $("viewer-status").textContent = JSON.stringify(status, null, 2);
    if (["done", "error", "stop"].includes(status.status) || viewer.asyncUrl !== statusUrl) break;
    await new Promise((ok) => setTimeout(ok, 1000));
    status = await fetchStatus(statusUrl, token);
  }
  if (status && viewer.asyncUrl === statusUrl) {
    $("viewer-state").textContent = "An async request (no event stream): finished with status " + status.status + ".";
  }
}

$("viewer-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  closeViewer();
  const token = $("viewer-token").value.trim();
  let urls;
  try {
    urls = viewerUrls($("viewer-url").value.trim(), token);
  } catch (_) {
    $("viewer-state").textContent = "That is not a URL.";
    return;
  }
  $("viewer-events").querySelector("tbody").replaceChildren();
  $("viewer-text").textContent = "";
  $("viewer-status").textContent = "";
  drawTiming([]);
  const status = await fetchStatus(urls.status, token);
  if (status && !(status.endpoints || {}).stream_events_url) {
    viewer.asyncUrl = urls.status;
    watchAsync(urls.status, token, status);
    return;
  }
  $("viewer-state").textContent = "Connecting to " + urls.stream.split("?")[0] + " …";
  const es = new EventSource(urls.stream);
  viewer.es = es;
  let count = 0;
  const times = [];
  let drawing = false;
  const redraw = () => {
    if (drawing) return;
    drawing = true;
    requestAnimationFrame(() => { drawing = false; drawTiming(times); });
  };
  es.onopen = () => { $("viewer-state").textContent = "Connected; live events below."; };
  es.onmessage = (ev) => {
    addEventRow(ev.lastEventId, "message", ev.data);
    times.push(performance.now());
    redraw();
    if (ev.data === "[DONE]") {
      closeViewer();
      $("viewer-state").textContent = "Finished: " + count + " events, then [DONE].";
      $("viewer-raw-summary").textContent = "Raw events (" + (count + 1) + ", with their ids)";
      showViewerStatus(urls.status, token);
      return;
    }
    count += 1;
    try { $("viewer-text").textContent += choiceText(JSON.parse(ev.data)); } catch (_) { /* not JSON */ }
  };
  for (const name of ["error", "stop"]) {
    es.addEventListener(name, (ev) => {
      if (ev.data) { addEventRow(ev.lastEventId, name, ev.data); return; }
      if (name === "error" && es.readyState === EventSource.CLOSED) {
        $("viewer-state").textContent = "The stream could not be opened (a wrong URL, or a private request without its token). Its status:";
        closeViewer();
        showViewerStatus(urls.status, token);
      } else if (name === "error") {
        $("viewer-state").textContent = "Connection lost; reconnecting with Last-Event-ID…";
      }
    });
  }
});

$("viewer-close").addEventListener("click", () => {
  closeViewer();
  $("viewer-state").textContent = "Closed.";
});

// ----- snippets ---------------------------------------------------------------------------------
function renderSnippets(answer) {
  const ep = answer.endpoints;
  const auth = answer.authorization || {};
  const bearer = auth.bearer_token;
  const stream = ep.stream_events_url + (auth.stream_url_arg ? "?" + auth.stream_url_arg : "");
  const authHeader = bearer ? ` \\\n  -H 'Authorization: Bearer ${bearer}'` : "";
  $("snippets-hint").textContent = "Filled in with the URLs of the last request.";
  $("snippet-curl").textContent =
    `# watch the answer stream in\ncurl -N '${stream}'\n\n` +
    `# the status document (final answer in response.body)\ncurl -s '${ep.status_url}'${authHeader}\n\n` +
    `# stop it\ncurl -s -X POST '${ep.stop_url}'${authHeader}\n\n` +
    `# continue the conversation\ncurl -s '${location.origin}/v1/stream-chatgpt' -H 'Content-Type: application/json' \\\n` +
    `  -d '{"messages": [{"role": "user", "content": "And then?"}], "from_status_url": "${ep.status_url}"` +
    (bearer ? `, "from_bearer_token": "${bearer}"` : "") + `}'`;
  $("snippet-js").textContent =
    `const es = new EventSource(${JSON.stringify(stream)});\nlet text = "";\n` +
    `es.onmessage = (e) => {\n  if (e.data === "[DONE]") { es.close(); return; }\n` +
    `  const chunk = JSON.parse(e.data);\n  text += chunk.choices[0]?.delta?.content ?? "";\n};\n` +
    `es.addEventListener("error", (e) => { if (e.data) console.error(JSON.parse(e.data).error); });\n` +
    `// after a dropped connection, EventSource reconnects with Last-Event-ID and the relay resumes`;
  $("snippet-python").textContent =
    `import json, urllib.request\n\n` +
    `text = ""\nwith urllib.request.urlopen(${JSON.stringify(stream)}) as stream:\n` +
    `    for raw in stream:\n        line = raw.decode().rstrip("\\n")\n` +
    `        if not line.startswith("data: "):\n            continue\n` +
    `        data = line[len("data: "):]\n        if data == "[DONE]":\n            break\n` +
    `        chunk = json.loads(data)\n        if "choices" in chunk and chunk["choices"]:\n` +
    `            text += chunk["choices"][0].get("delta", {}).get("content") or ""\nprint(text)\n\n` +
    `status = urllib.request.Request(${JSON.stringify(ep.status_url)}` +
    (bearer ? `, headers={"Authorization": "Bearer ${bearer}"}` : "") + `)\n` +
    `print(json.load(urllib.request.urlopen(status))["status"])`;
}

for (const button of document.querySelectorAll(".copy")) {
  button.addEventListener("click", async () => {
    const text = $(button.dataset.copy).textContent;
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch (_) {
      const range = document.createRange();
      range.selectNodeContents($(button.dataset.copy));
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      button.textContent = "Selected: press Ctrl+C";
    }
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
}

// ----- operator page: running requests, finished ones, charts (polls /v1/admin/… every second) ----
const op = { timer: null, stats: null, codes: [] };

function opHeaders() {
  return { Authorization: "Bearer " + $("op-key").value.trim() };
}

$("op-key").value = sessionStorage.getItem("relay.op-key") || "";
$("op-key").addEventListener("input", () => sessionStorage.setItem("relay.op-key", $("op-key").value));

function seconds(s) {
  if (s === null || s === undefined) return "–";
  return s < 1 ? (s * 1000).toFixed(0) + " ms" : s.toFixed(s < 10 ? 2 : 0) + " s";
}

function opAction(text, onClick) {
  const b = el("button", "small", text);
  b.type = "button";
  b.addEventListener("click", onClick);
  return b;
}

function openInViewer(url) {
  document.querySelector('.tab[data-tab="viewer"]').click();
  $("viewer-url").value = url;
  $("viewer-token").value = "";
  $("viewer-form").requestSubmit();
}

function renderRunning(doc) {
  const body = $("op-running").querySelector("tbody");
  body.replaceChildren();
  for (const r of doc.running) {
    const row = el("tr");
    row.dataset.id = r.id;
    for (const v of [r.id.slice(0, 8), r.model, r.key, r.access, r.status, seconds(r.elapsed), String(r.tokens_so_far)]) row.append(el("td", "", v));
    const cell = el("td");
    cell.append(opAction("Stop", async (ev) => {
      ev.target.disabled = true;
      const res = await fetch(`/v1/admin/running/${encodeURIComponent(r.id)}/stop`, { method: "POST", headers: opHeaders() });
      $("op-state").textContent = res.ok ? `Stopping ${r.id}…` : `Could not stop ${r.id}: HTTP ${res.status}`;
      pollOperator();
    }));
    if (r.status_url) cell.append(opAction("View", () => openInViewer(r.status_url.replace(/\.json$/, ".txt"))));
    row.append(cell);
    body.append(row);
  }
  $("op-running-count").textContent = `(${doc.count})`;
}

function renderFinished(doc) {
  const body = $("op-finished").querySelector("tbody");
  body.replaceChildren();
  for (const f of doc.finished) {
    const row = el("tr");
    const when = new Date(f.t * 1000).toLocaleTimeString();
    const tokens = `${f.prompt_tokens ?? "?"} / ${f.completion_tokens ?? "?"}${f.estimated ? " (est.)" : ""}`;
    const outcome = f.code ? `${f.outcome} (${f.code})` : f.outcome;
    for (const v of [f.id.slice(0, 8), when, outcome, f.model, f.key, tokens, seconds(f.ttft), seconds(f.duration)]) row.append(el("td", "", v));
    const cell = el("td");
    if (f.status_url) cell.append(opAction("Open", () => openInViewer(f.status_url)));
    else cell.append(el("span", "hint", f.access === "private" ? "private: metadata only" : ""));
    row.append(cell);
    body.append(row);
  }
  $("op-finished-count").textContent = `(${doc.count} shown)`;
}

function counts(id, data, x, label, color) {
  // bars of a count; the box's dataset says how many had any
  plot(id, data, { x, y: { label, ...COUNTS }, lines: [{ label, color }] });
  $(id).dataset.filled = String(data[1].filter((v) => v > 0).length);
}

function renderArchive(a) {
  // The archive tier's backlog ([archive] enabled): what waits to be uploaded, and what failed.
  $("op-archive").hidden = !a;
  if (!a) return;
  const mb = (a.pending_bytes / 1048576).toFixed(1);
  const waiting = a.pending ? `${a.pending} waiting (${mb} MB, oldest ${seconds(a.oldest_pending_seconds)})` : "nothing waiting";
  const failing = a.failing ? `, ${a.failing} failing: ${a.last_error || "see the log"}` : "";
  $("op-archive").textContent = `Archive: ${waiting}${failing}; ${a.archived} archived since start, ${a.integrity_failures} integrity failures.`;
}

function renderStats(s) {
  renderArchive(s.archive);
  const now = Math.floor(s.now / 60);
  const byMinute = new Map(s.minutes.map((m) => [Math.floor(m.t / 60), m]));
  const minute = (m) => byMinute.get(m) || { requests: 0, tokens: 0 };
  const hourT = Array.from({ length: 60 }, (_, i) => (now - 59 + i) * 60); // unix seconds of each minute
  const hour = hourT.map((t) => minute(t / 60));
  counts("op-chart-requests", [hourT, hour.map((m) => m.requests)], MINUTES, "requests", "#2f6fed");
  $("op-cap-requests").textContent = `Requests per minute, last hour: ${s.hour.requests} in all, ${s.hour.errors} errors.`;
  counts("op-chart-tokens", [hourT, hour.map((m) => m.tokens)], MINUTES, "tokens", "#067647");
  $("op-cap-tokens").textContent = `Tokens per minute, last hour: ${s.hour.tokens.toLocaleString()} in all.`;
  const dayT = Array.from({ length: 96 }, (_, i) => (now - (95 - i) * 15 - 14) * 60); // 15 minutes from each
  const day = dayT.map((t) => {
    const sum = { requests: 0, tokens: 0 };
    for (let m = t / 60; m < t / 60 + 15; m++) { sum.requests += minute(m).requests; sum.tokens += minute(m).tokens; }
    return sum;
  });
  counts("op-chart-day", [dayT, day.map((d) => d.requests)], QUARTERS, "requests", "#6941c6");
  $("op-cap-day").textContent = `Requests per 15 minutes, last 24 hours: ${s.day.requests} in all.`;
  counts("op-chart-day-tokens", [dayT, day.map((d) => d.tokens)], QUARTERS, "tokens", "#0e9384");
  $("op-cap-day-tokens").textContent = `Tokens per 15 minutes, last 24 hours: ${s.day.tokens.toLocaleString()} in all.`;
  // p50 and p99 of first-token latency, a point per minute that had any, as two lines
  const p50 = hour.map((m) => m.ttft_p50 ?? null);
  const p99 = hour.map((m) => m.ttft_p99 ?? null);
  plot("op-chart-ttft", [hourT, p50, p99], {
    x: MINUTES, bars: false, y: { label: "first token", tick: seconds, value: seconds },
    lines: [{ label: "p50", color: "#2f6fed" }, { label: "p99", color: "#b42318" }],
  });
  $("op-chart-ttft").dataset.filled = String([...p50, ...p99].filter((v) => v !== null).length);
  $("op-cap-ttft").textContent =
    `First-token latency per minute, last hour: p50 (blue) ${seconds(s.hour.ttft_p50)}, p99 (red) ${seconds(s.hour.ttft_p99)}.`;
  const codes = op.codes = Object.entries(s.day.errors_by_code);
  const code = (i) => (op.codes[i] || [""])[0]; // read when drawn: the codes change between refreshes
  const categories = { time: false, step: 1, label: "code", tick: code, value: code };
  counts("op-chart-errors", [codes.map((_, i) => i), codes.map(([, n]) => n)], categories, "errors", "#b42318");
  $("op-cap-errors").textContent = codes.length
    ? "Errors by code, last 24 hours: " + codes.map(([c, n]) => `${c} ${n}`).join(", ") + "."
    : "No errors in the last 24 hours.";
  $("op-latency").textContent =
    `First-token latency: last hour p50 ${seconds(s.hour.ttft_p50)}, p99 ${seconds(s.hour.ttft_p99)}; ` +
    `last day p50 ${seconds(s.day.ttft_p50)}, p99 ${seconds(s.day.ttft_p99)}.`;
}

async function pollOperator() {
  const filters = new URLSearchParams({ limit: "300" });
  for (const f of ["outcome", "model", "key", "code"]) {
    const v = $("op-f-" + f).value.trim();
    if (v) filters.set(f, v);
  }
  try {
    const [running, finished, stats] = await Promise.all([
      fetch("/v1/admin/running", { headers: opHeaders() }),
      fetch("/v1/admin/finished?" + filters, { headers: opHeaders() }),
      fetch("/v1/admin/stats", { headers: opHeaders() }),
    ]);
    for (const res of [running, finished, stats]) {
      if (!res.ok) {
        const [code, message] = await readError(res);
        $("op-state").replaceChildren(errorBox(code, message));
        $("op-body").hidden = true;
        clearInterval(op.timer);
        op.timer = null;
        return;
      }
    }
    renderRunning(await running.json());
    renderFinished(await finished.json());
    $("op-body").hidden = false; // before the charts, which take the width they are shown at
    renderStats(await stats.json());
    $("op-state").textContent = "Live: refreshed every second at " + new Date().toLocaleTimeString() + ".";
  } catch (err) {
    $("op-state").textContent = "The relay did not answer: " + err;
  }
}

$("op-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  if (op.timer) clearInterval(op.timer);
  pollOperator();
  op.timer = setInterval(() => { if (!document.hidden) pollOperator(); }, 1000);
});

// `serve --demo` prints the page's URL with its one-time admin key as `#operator?key=…`: the key goes to
// the form (and this tab's session storage), out of the address bar and history, and the page opens live.
(function keyFromFragment() {
  const m = /^#operator\?key=([A-Za-z0-9_-]{16,256})$/.exec(location.hash);
  if (!m) return;
  history.replaceState(null, "", location.pathname + location.search);
  $("op-key").value = m[1];
  sessionStorage.setItem("relay.op-key", m[1]);
  document.querySelector('.tab[data-tab="operator"]').click();
  $("op-form").requestSubmit();
})();

fetch("/v1/info").then((r) => (r.ok ? r.json() : null)).then((info) => {
  if (info && info.operator_enabled === false) {
    $("op-disabled").hidden = false;
    $("op-form").hidden = true;
    $("op-state").textContent = "";
  }
}).catch(() => {});
