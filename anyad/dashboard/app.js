// anyad's dashboard: reads /api/status, /v1/models and /api/conversations, and chats
// through /v1/chat/completions (streamed). No framework, no build step.
"use strict";

const $ = (sel) => document.querySelector(sel);
const STATUS_EVERY_MS = 2000;
const HISTORY_EVERY_MS = 5000;
let needsKey = false;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "style") node.style.cssText = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
  return node;
}

function headers(extra = {}) {
  const key = localStorage.getItem("anyad-key");
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// Every API call: a 401 shows the key box instead of failing quietly.
async function api(path, options = {}) {
  const resp = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (resp.status === 401) {
    needsKey = true;
    $("#key-box").hidden = false;
    throw new Error("this anyad needs an API key");
  }
  return resp;
}

function mib(bytes) {
  if (bytes == null) return "–";
  return bytes >= 1024 ** 3 ? `${(bytes / 1024 ** 3).toFixed(1)} GiB` : `${Math.round(bytes / 1024 ** 2)} MiB`;
}

function bar(used, total) {
  const pct = total ? Math.min(100, Math.round((100 * used) / total)) : 0;
  return el("div", { class: "bar", role: "meter", "aria-valuenow": pct, "aria-valuemin": 0, "aria-valuemax": 100 },
            el("span", { style: `width:${pct}%` }));
}

function renderDevices(devices) {
  const box = $("#devices");
  box.replaceChildren();
  if (!devices) { box.append(el("p", { class: "muted" }, "not read yet")); return; }
  for (const g of devices.gpus || []) {
    box.append(el("div", {}, `GPU ${g.index} ${g.name}: ${mib(g.used_bytes)} of ${mib(g.total_bytes)} used`
      + (g.utilization_pct != null ? `, ${g.utilization_pct} % busy` : "")), bar(g.used_bytes, g.total_bytes));
  }
  if (!(devices.gpus || []).length) box.append(el("div", { class: "muted" }, "no GPU: models run on the CPU"));
  const used = devices.ram_total_bytes - devices.ram_available_bytes;
  box.append(el("div", {}, `RAM: ${mib(used)} of ${mib(devices.ram_total_bytes)} used; `
    + `${devices.cpu_logical} CPU threads, load ${Number(devices.load_1m).toFixed(2)}`), bar(used, devices.ram_total_bytes));
}

function renderModels(status) {
  if (modelBusy.size) return;
  const body = $("#models tbody");
  body.replaceChildren();
  for (const [name, m] of Object.entries(status.models || {})) {
    const p = m.placement;
    const placement = p ? `${p.kind}${p.gpu_layers ? ` (${p.gpu_layers}/${p.n_layers} layers on GPU ${p.gpu})` : ""}` : "–";
    const mem = m.memory || {};
    const memory = `${mib(mem.rss_bytes ?? mem.estimated_ram_bytes)} RAM`
      + (mem.estimated_vram_bytes ? `, ${mib(mem.vram_bytes ?? mem.estimated_vram_bytes)} VRAM` : "");
    const expires = m.state !== "loaded" ? "–" : m.expires_in_s == null ? (m.keep_alive_s == null ? "never" : "in use")
      : `in ${Math.round(m.expires_in_s)} s`;
    const q = m.queue || {};
    // The status is an admin key's (or a keyless daemon's): so are these controls.
    const action = m.state === "loaded" ? "unload" : "load";
    const control = el("button", { class: `plain ${action}`, type: "button", "data-action": action }, action);
    control.addEventListener("click", () => modelAction(name, action, control));
    body.append(el("tr", { "data-model": name },
      el("td", {}, name), el("td", {}, m.state), el("td", { title: p ? p.reason : "" }, placement),
      el("td", {}, memory), el("td", {}, expires),
      el("td", {}, `${q.active ?? 0} running, ${q.waiting ?? 0} waiting (of ${q.parallel ?? 1})`),
      el("td", {}, m.state === "loading" ? "" : control)));
  }
  // A provider that cannot work as configured says why, whole; its targets' breakers say nothing more.
  const broken = Object.entries(status.providers || {}).filter(([, p]) => p.state === "misconfigured");
  const brokenNames = new Set(broken.map(([name]) => name));
  const breakers = Object.entries(status.breakers || {}).filter(([name]) => !brokenNames.has(name.split("/")[0]));
  $("#breakers").replaceChildren(
    ...broken.map(([name, p]) => el("div", { class: "pill warn", "data-provider": name }, `${name}: misconfigured: ${p.problem}`)),
    ...breakers.map(([name, b]) =>
      el("div", { class: b.state === "closed" ? "muted" : "pill warn" }, `${name}: circuit ${b.state}`)));
  const offline = status.offline || {};
  $("#offline").hidden = !offline.offline;
}

// Each pool's replicas: how loaded each is, how much of the traffic it took, and why one is down.
function renderPools(status) {
  const pools = Object.entries(status.pools || {});
  $("#pools-section").hidden = !pools.length;
  const body = $("#pools tbody");
  body.replaceChildren();
  for (const [pool, p] of pools) {
    for (const [label, r] of Object.entries(p.replicas)) {
      const why = r.health_error || (r.serves_model === false ? `does not list ${p.model}` : "");
      body.append(el("tr", { "data-replica": `${pool}@${label}` },
        el("td", {}, `${pool}@${label}`),
        el("td", { class: r.state === "up" ? "" : "warn", title: why }, r.state + (why ? `: ${why}` : "")),
        el("td", {}, r.outstanding), el("td", {}, r.served), el("td", {}, `${Math.round(100 * r.share)} %`),
        el("td", {}, r.capacity), el("td", {}, r.breaker)));
    }
  }
}

async function modelAction(name, action, button) {
  button.disabled = true;
  button.textContent = action === "load" ? "loading…" : "unloading…";
  modelBusy.add(name);
  try {
    const resp = await api(`/api/models/${encodeURIComponent(name)}/${action}`, { method: "POST" });
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({}));
      $("#reply-meta").textContent = `${action} ${name}: ${err.error ? err.error.message : resp.status}`;
    }
  } finally {
    modelBusy.delete(name);
    refreshStatus();
  }
}
const modelBusy = new Set();  // models with a load or unload under way (their row is not redrawn)

// The charts: plain SVG from /api/timeline's steps. Each chart's points are in its
// data-points attribute too (what a test, or a curious person, can read back).
const SVG = "http://www.w3.org/2000/svg";
const CHARTS = [
  { id: "tokens", title: "tokens/s", series: [(p) => p.tokens_per_s] },
  { id: "requests", title: "requests/s (errors in orange)",
    series: [(p) => p.requests_per_s["2xx"] || 0,
             (p) => (p.requests_per_s["4xx"] || 0) + (p.requests_per_s["5xx"] || 0)] },
  { id: "ttft", title: "first token ms, p50 (p95 in orange)", series: [(p) => p.ttft_p50_ms, (p) => p.ttft_p95_ms] },
  { id: "queue", title: "requests waiting", series: [(p) => p.queue] },
  { id: "ram", title: "RAM used, GiB", series: [(p) => p.ram_used_bytes == null ? null : p.ram_used_bytes / 1024 ** 3] },
  { id: "cache", title: "cache hit rate", series: [(p) => p.cache_hit_rate] },
];

function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function drawChart(spec, timeline, gpuIndex) {
  const points = timeline.points;
  const series = spec.series.map((f) => points.map((p) => ({ t: p.t, v: f(p) })));
  const values = series.flat().map((d) => d.v).filter((v) => v != null);
  const top = Math.max(1e-9, ...values);
  const t1 = timeline.now, t0 = t1 - 3600;
  const svg = svgEl("svg", { viewBox: "0 0 300 60", preserveAspectRatio: "none", role: "img", "aria-label": spec.title });
  const x = (t) => ((t - t0) / (t1 - t0)) * 300;
  const y = (v) => 58 - (v / top) * 54;
  series.forEach((data, i) => {
    const d = data.filter((p) => p.v != null).map((p, j) => `${j ? "L" : "M"}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`);
    if (d.length) svg.append(svgEl("path", { d: d.join(""), class: i ? "line second" : "line" }));
    const last = data.filter((p) => p.v != null).slice(-1)[0];  // a line of one step is a dot
    if (last) svg.append(svgEl("circle", { cx: x(last.t).toFixed(1), cy: y(last.v).toFixed(1), r: 2,
                                           class: i ? "dot second" : "dot" }));
  });
  for (const m of timeline.marks) {
    const mx = x(m.t).toFixed(1);
    const line = svgEl("line", { x1: mx, x2: mx, y1: 0, y2: 60, class: "mark" });
    line.append(svgEl("title", {}));
    line.firstChild.textContent = `${m.kind}: ${m.text}`;
    svg.append(line);
  }
  const latest = series[0].filter((d) => d.v != null).slice(-1)[0];
  const box = el("div", { class: "chart", id: `chart-${spec.id}`,
                          "data-points": JSON.stringify(series.map((s) => s.map((d) => d.v))) },
                 el("h3", {}, spec.title),
                 el("div", { class: "now" }, latest ? (Math.round(latest.v * 100) / 100).toString() : "–"), svg);
  return box;
}

async function refreshCharts() {
  try {
    const resp = await api("/api/timeline");
    if (!resp.ok) return;
    const timeline = await resp.json();
    const specs = [...CHARTS];
    const gpus = (timeline.points.slice(-1)[0] || {}).gpus || [];
    gpus.forEach((g, i) => specs.push(
      { id: `gpu${g.index}-memory`, title: `GPU ${g.index} memory used, GiB`,
        series: [(p) => (p.gpus[i] ? p.gpus[i].used_bytes / 1024 ** 3 : null)] },
      { id: `gpu${g.index}-busy`, title: `GPU ${g.index} busy, %`,
        series: [(p) => (p.gpus[i] ? p.gpus[i].utilization_pct : null)] }));
    $("#charts").replaceChildren(...specs.map((s) => drawChart(s, timeline)));
  } catch (err) { /* the status line says why */ }
}

async function refreshStatus() {
  try {
    const [health, status] = await Promise.all([api("/health").then((r) => r.json()), api("/api/status").then((r) => r.json())]);
    $("#version").textContent = `v${health.version}`;
    $("#health").textContent = health.status;
    $("#health").className = `pill ${health.status === "ok" ? "ok" : "warn"}`;
    renderDevices(status.devices);
    renderModels(status);
    renderPools(status);
    refreshCharts();
  } catch (err) {
    $("#health").textContent = needsKey ? "API key needed" : "unreachable";
    $("#health").className = "pill warn";
  }
}

async function refreshModels() {
  try {
    const data = await (await api("/v1/models")).json();
    const picker = $("#model-picker");
    const current = picker.value;
    picker.replaceChildren(...data.data.map((m) => el("option", { value: m.id }, m.id)));
    if (current) picker.value = current;
  } catch (err) { /* the status line says why */ }
}

async function refreshHistory() {
  const q = $("#search").value.trim();
  const list = $("#conversations");
  try {
    const resp = await api(`/api/conversations?limit=20${q ? `&q=${encodeURIComponent(q)}` : ""}`);
    if (resp.status === 404) { list.replaceChildren(el("li", { class: "muted" }, "the history is off")); return; }
    const page = await resp.json();
    list.replaceChildren(...page.data.map((c) => {
      const open = el("button", { class: "plain open", type: "button", title: "open and continue it" },
                      c.title || "(no text)");
      open.addEventListener("click", () => openConversation(c.id));
      const exp = el("button", { class: "plain export", type: "button", title: "download it as JSON" }, "export");
      exp.addEventListener("click", () => exportConversation(c.id));
      const del = el("button", { class: "plain delete", type: "button", title: "delete it" }, "delete");
      del.addEventListener("click", () => deleteConversation(c.id));
      return el("li", { "data-id": c.id }, el("span", { class: "when" }, new Date(c.updated * 1000).toLocaleString()),
                open, el("span", { class: "muted" }, ` · ${c.model} `), exp, del);
    }));
    if (!page.data.length) list.append(el("li", { class: "muted" }, q ? "nothing matches" : "no conversations yet"));
  } catch (err) { /* the status line says why */ }
}

// The conversation the chat box continues: its id (X-Anyad-Conversation-Id, from the
// first reply) and its messages as sent; "New chat" starts another.
const chat = { id: null, messages: [], last: null };
let inFlight = null;  // the AbortController of the reply being streamed

function turn(role, text, metaText) {
  const node = el("div", { class: `turn ${role}` }, text);
  if (metaText) node.append(el("span", { class: "meta" }, metaText));
  $("#transcript").append(node);
}

// A conversation from the history, opened in the chat: its turns in the transcript, and
// the next message continues it.
async function openConversation(id) {
  if (inFlight) return;
  const resp = await api(`/api/conversations/${encodeURIComponent(id)}`);
  if (!resp.ok) { $("#reply-meta").textContent = `cannot open it: ${resp.status}`; return; }
  const conv = await resp.json();
  newChat();
  chat.id = conv.id;
  const said = conv.messages.filter((m) => m.role === "user" || m.role === "assistant");
  chat.messages = said.map((m) => ({ role: m.role, content: m.content || "" }));
  const system = conv.messages.find((m) => m.role === "system");
  if (system) $("#system").value = system.content || "";
  for (const m of said) turn(m.role, m.content || "");
  if ([...$("#model-picker").options].some((o) => o.value === conv.model)) $("#model-picker").value = conv.model;
  $("#reply-meta").textContent = `conversation ${conv.id} · ${said.length} messages`;
  $("#prompt").focus();
}

async function exportConversation(id) {
  const resp = await api(`/api/conversations/${encodeURIComponent(id)}`);
  if (!resp.ok) return;
  const url = URL.createObjectURL(new Blob([JSON.stringify(await resp.json(), null, 2)], { type: "application/json" }));
  const a = el("a", { href: url, download: `conversation-${id}.json` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

async function deleteConversation(id) {
  if (!confirm("Delete this conversation?")) return;
  const resp = await api(`/api/conversations/${encodeURIComponent(id)}`, { method: "DELETE" });
  if (resp.ok && chat.id === id) newChat();
  refreshHistory();
}

function newChat() {
  if (inFlight) inFlight.abort();
  chat.id = null; chat.messages = []; chat.last = null;
  $("#transcript").replaceChildren();
  $("#asked").textContent = "";
  $("#reply").textContent = "";
  delete $("#reply").dataset.done;
  $("#reply-meta").textContent = "";
}

async function sendChat(event) {
  event.preventDefault();
  const prompt = $("#prompt").value.trim();
  const model = $("#model-picker").value;
  // Bounded: a small local model may otherwise run on to the end of its context.
  const box = $("#max-tokens");
  const maxTokens = Math.max(1, Math.round(Number(box.value) || Number(box.defaultValue)));
  if (!prompt || !model || inFlight) return;
  const reply = $("#reply");
  const meta = $("#reply-meta");
  if (chat.last) {  // the previous turn moves up into the transcript
    turn("user", chat.last.prompt);
    turn("assistant", chat.last.reply, chat.last.meta);
    chat.last = null;
  }
  reply.textContent = "";
  delete reply.dataset.done;
  meta.textContent = "…";
  $("#asked").textContent = prompt;
  $("#prompt").value = "";
  const system = $("#system").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...chat.messages,
                    { role: "user", content: prompt }];
  const body = { model, stream: true, stream_options: { include_usage: true }, max_tokens: maxTokens, messages };
  const temperature = $("#temperature").value.trim();
  if (temperature !== "") body.temperature = Number(temperature);
  const controller = new AbortController();
  inFlight = controller;
  $("#send").disabled = true;
  $("#stop").disabled = false;
  const t0 = performance.now();
  let first = null, usage = null, backend = null, outcome = "done";
  try {
    const resp = await api("/v1/chat/completions", {
      method: "POST", signal: controller.signal,
      headers: { "Content-Type": "application/json", ...(chat.id ? { "X-Anyad-Conversation-Id": chat.id } : {}) },
      body: JSON.stringify(body),
    });
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({}));
      meta.textContent = `error ${resp.status}: ${err.error ? err.error.message : resp.statusText}`;
      return;
    }
    backend = resp.headers.get("X-Anyad-Backend");
    chat.id = resp.headers.get("X-Anyad-Conversation-Id") || chat.id;
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        const data = JSON.parse(event.slice(6));
        if (data.error) { meta.textContent = `error: ${data.error.message}`; return; }
        if (data.usage) usage = data.usage;
        const delta = data.choices && data.choices[0] && data.choices[0].delta;
        const piece = delta && (delta.content || delta.reasoning_content);
        if (piece) {
          if (first === null) first = performance.now();
          reply.textContent += delta.content || "";
        }
      }
    }
  } catch (err) {
    if (err.name !== "AbortError") { meta.textContent = `error: ${err.message}`; return; }
    outcome = "stopped";
  } finally {
    inFlight = null;
    $("#send").disabled = false;
    $("#stop").disabled = true;
  }
  const end = performance.now();
  const parts = [outcome];
  if (backend) parts.push(backend);
  if (usage) parts.push(`${usage.completion_tokens} tokens`);
  if (first !== null) {
    parts.push(`first token ${Math.round(first - t0)} ms`);
    if (usage && usage.completion_tokens > 1 && end > first) {
      parts.push(`${((usage.completion_tokens - 1) / ((end - first) / 1000)).toFixed(1)} tokens/s`);
    }
  }
  meta.textContent = parts.join(" · ");
  // What was said goes on with the conversation (a stopped reply as far as it came).
  chat.messages.push({ role: "user", content: prompt }, { role: "assistant", content: reply.textContent });
  chat.last = { prompt, reply: reply.textContent, meta: meta.textContent };
  reply.dataset.done = outcome === "done" ? "true" : outcome;
  refreshHistory();
}

function start() {
  $("#api-key").value = localStorage.getItem("anyad-key") || "";
  $("#api-key").addEventListener("change", (e) => {
    localStorage.setItem("anyad-key", e.target.value);
    needsKey = false;
    refreshStatus(); refreshModels(); refreshHistory();
  });
  $("#chat-form").addEventListener("submit", sendChat);
  $("#stop").addEventListener("click", () => { if (inFlight) inFlight.abort(); });
  $("#new-chat").addEventListener("click", newChat);
  // Enter sends, Shift+Enter is a new line.
  $("#prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#chat-form").requestSubmit(); }
  });
  let searchTimer = null;
  $("#search").addEventListener("input", () => { clearTimeout(searchTimer); searchTimer = setTimeout(refreshHistory, 250); });
  refreshStatus(); refreshModels(); refreshHistory();
  setInterval(refreshStatus, STATUS_EVERY_MS);
  setInterval(refreshHistory, HISTORY_EVERY_MS);
}

start();
