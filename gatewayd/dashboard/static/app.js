// The gatewayd dashboard: sign-in, overview, agents, one agent, devices. Vanilla ES modules,
// everything from the daemon (no outside fetch). Data: ./api/* with the bearer token kept in
// sessionStorage; an agent's live state and chat: the browser client over the agent WebSocket.

import { AgentClient, ChatClient } from "./gatewayd.js";
import { barChart, lineChart } from "./chart.js";

const TOKEN_KEY = "gatewayd.dashboard.token";
const $ = (sel, root = document) => root.querySelector(sel);

let session = null;       // GET api/session: token name, ws host/port
let stopView = () => {};  // tears down the current view's timers and sockets

// -- helpers -------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) if (child != null) node.append(child);
  return node;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY) || "";
  const response = await fetch(`api/${path}`, {
    ...options,
    headers: { Authorization: `Bearer ${token}`, ...(options.body ? { "Content-Type": "application/json" } : {}) },
  });
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `HTTP ${response.status}`;
    if (response.status === 401) signOut(message);
    throw new ApiError(response.status, message);
  }
  return body;
}

const fmt = {
  num(v, digits = 1) {
    if (v === undefined || v === null) return "–";
    if (typeof v !== "number") return String(v);
    return Number.isInteger(v) ? v.toLocaleString() : v.toFixed(digits);
  },
  time(t) { return t ? new Date(t * 1000).toLocaleString() : "–"; },
  ago(t) {
    if (!t) return "never";
    const s = Math.max(0, Date.now() / 1000 - t);
    if (s < 60) return `${Math.round(s)} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86400)} d ago`;
  },
  uptime(s) {
    if (s === undefined) return "–";
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : `${m}m ${Math.floor(s % 60)}s`;
  },
};

function table(caption, columns, rows, empty = "None.") {
  if (!rows.length) return el("p", { class: "hint", text: empty });
  return el("div", { class: "table-wrap" },
    el("table", {},
      el("caption", { class: "sr-only", text: caption }),
      el("thead", {}, el("tr", {}, columns.map((c) => el("th", { scope: "col", text: c[0] })))),
      el("tbody", {}, rows.map((row) => el("tr", {}, columns.map((c) => {
        const value = c[1](row);
        return el("td", { class: c[2] || null }, value instanceof Node ? value : String(value ?? "–"));
      }))))));
}

function agentHref(cls, id) { return `#/agent/${encodeURIComponent(cls)}/${encodeURIComponent(id)}`; }

function wsUrl() {
  const ws = session.ws;
  const host = ws.host || location.hostname;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${host.includes(":") ? `[${host}]` : host}:${ws.port}`;
}

function status(text) { $("#footer-status").textContent = text; }

// A group of gateways: lists name the member serving each row, and the members that did not
// answer (their agents and devices are missing from the list).
function memberColumn(data) { return data.missing_members ? [["Member", (r) => r.member]] : []; }
function missingMembers(data) {
  const missing = data.missing_members || [];
  if (!missing.length) return null;
  return el("p", { class: "error", role: "status", text: `Not listed (no answer): ${missing.map((m) => `${m.member} (${m.reason})`).join(", ")}` });
}

// -- sign-in -------------------------------------------------------------------------------

function showLogin(message = "") {
  stopView();
  $("#nav").hidden = true;
  $("#view").hidden = true;
  $("#login-view").hidden = false;
  $("#login-error").textContent = message;
  $("#token").focus();
}

function signOut(message = "") {
  sessionStorage.removeItem(TOKEN_KEY);
  session = null;
  showLogin(message);
}

async function signIn(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    session = await api("session");
  } catch (err) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(`Sign-in refused: ${err.message}`);
    return;
  }
  $("#login-view").hidden = true;
  $("#nav").hidden = false;
  $("#view").hidden = false;
  status(`signed in as ${session.token}${session.read_only ? " (read-only)" : ""} · gatewayd ${session.version}`);
  route();
}

// -- routing -------------------------------------------------------------------------------

function route() {
  if (!session) return;
  stopView();
  const [, name = "overview", ...rest] = (location.hash || "#/overview").split("/");
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.route === (name === "agent" ? "agents" : name)) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const view = $("#view");
  view.replaceChildren();
  const views = { overview: overviewView, agents: agentsView, agent: agentView, devices: devicesView };
  stopView = (views[name] || overviewView)(view, rest.map(decodeURIComponent)) || (() => {});
}

// -- overview ------------------------------------------------------------------------------

const TILES = [
  ["uptime_s", "Uptime", fmt.uptime],
  ["mqtt_state", "MQTT"],
  ["mqtt_broker", "Broker"],
  ["mqtt_in_per_s", "MQTT in /s"],
  ["mqtt_out_per_s", "MQTT out /s"],
  ["mqtt_in_total", "MQTT messages in"],
  ["mqtt_pending_acks", "Pending acks"],
  ["tcp_devices", "TCP devices"],
  ["ws_clients", "WebSocket clients"],
  ["agents_awake", "Agents awake"],
  ["agents_hibernated", "Agents hibernated"],
  ["commits_per_s", "Commits /s"],
  ["turns_per_s", "Turns /s"],
  ["turn_latency_ms", "Turn latency (ms)"],
  ["commit_latency_ms", "Commit latency (ms)"],
  ["engine_batches_per_s", "Engine batches /s"],
  ["gen_tokens_per_s", "Generation tokens /s"],
  ["gen_running", "Generating sequences"],
  ["gen_ttft_ms", "Time to first token (ms)"],
  ["kv_usage_pct", "KV cache used (%)"],
];
const CHARTS = [
  ["mqtt_in_per_s", "MQTT messages in /s"],
  ["mqtt_out_per_s", "MQTT messages out /s"],
  ["ws_in_per_s", "WebSocket frames in /s"],
  ["commits_per_s", "Commits /s"],
  ["turns_per_s", "Turns /s"],
  ["agents_awake", "Agents awake"],
  ["commit_latency_ms", "Commit latency (ms)"],
  ["turn_latency_ms", "Turn latency (ms)"],
  ["engine_batches_per_s", "Engine batches /s"],
  ["gen_tokens_per_s", "Generation tokens /s"],
  ["kv_usage_pct", "KV cache used (%)"],
];

function overviewView(view) {
  const tiles = el("dl", { class: "tiles", id: "tiles" });
  const charts = el("div", { class: "charts", id: "charts" });
  view.append(el("h2", { text: "Overview" }), tiles,
    el("h3", { text: "Last minutes" }), charts);
  let samples = [];
  let since = 0;
  let timer = null;
  let stopped = false;

  function render(data) {
    // Each tile shows its key's newest value (latencies exist only where something ran).
    const latest = {};
    for (const sample of samples) Object.assign(latest, sample);
    Object.assign(latest, data.latest, { agents_hibernated: data.agents.hibernated });
    tiles.replaceChildren(...TILES.filter(([key]) => latest[key] !== undefined && latest[key] !== null)
      .map(([key, label, format]) => {
        let value = format ? format(latest[key]) : fmt.num(latest[key]);
        let cls = null;
        if (key === "mqtt_state") cls = latest[key] === "connected" ? "status-ok" : "status-bad";
        if (typeof latest[key] === "string" && key !== "mqtt_state") cls = "text";
        return el("div", { class: "tile" }, el("dt", { text: label }),
          el("dd", { "data-metric": key, class: cls, text: value }));
      }));
    const span = samples.length > 1 ? samples[samples.length - 1].t - samples[0].t : 0;
    const windowS = Math.min(600, Math.max(10, span));
    const figures = CHARTS.filter(([key]) => samples.some((s) => typeof s[key] === "number")).map(([key, label]) => {
      const points = samples.map((s) => [s.t, s[key]]);
      const last = points[points.length - 1][1];
      return el("figure", { class: "chart", "data-chart": key },
        el("figcaption", {}, el("span", { text: label }), el("span", { text: fmt.num(last) })),
        lineChart(points, { windowS, label: `${label}, last ${windowS < 90 ? `${Math.round(windowS)} s` : `${Math.round(windowS / 60)} min`}` }));
    });
    const histogram = data.latest.batch_size_histogram;
    if (histogram && histogram.some((b) => b[1] > 0)) {
      figures.push(el("figure", { class: "chart", "data-chart": "batch_size_histogram" },
        el("figcaption", {}, el("span", { text: "Engine batch sizes (rows)" })),
        barChart(histogram, { label: "Engine batch size histogram" })));
    }
    charts.replaceChildren(...figures);
  }

  async function poll() {
    try {
      const data = await api(`overview?since=${since}`);
      samples = [...samples, ...data.samples].slice(-900);
      if (samples.length) since = samples[samples.length - 1].t;
      if (!stopped) render(data);
    } catch (err) {
      status(`overview: ${err.message}`);
    }
    if (!stopped) timer = setTimeout(poll, (session.sample_interval_s || 1) * 1000);
  }
  poll();
  return () => { stopped = true; clearTimeout(timer); };
}

// -- agents --------------------------------------------------------------------------------

function agentsView(view) {
  const search = el("input", { id: "agent-search", type: "search", placeholder: "part of an id" });
  const classSelect = el("select", { id: "agent-class" }, el("option", { value: "", text: "All classes" }));
  const results = el("div", { id: "agent-list" });
  const summary = el("p", { class: "hint", "aria-live": "polite" });
  const missing = el("div", { id: "agent-missing-members" });
  view.append(el("h2", { text: "Agents" }),
    el("div", { class: "filters", role: "search" },
      el("div", {}, el("label", { for: "agent-search", text: "Search agents" }), search),
      el("div", {}, el("label", { for: "agent-class", text: "Class" }), classSelect)),
    summary, missing, results);
  let timer = null;
  let stopped = false;

  async function load() {
    const params = new URLSearchParams({ q: search.value, class: classSelect.value });
    try {
      const data = await api(`agents?${params}`);
      if (classSelect.options.length === 1) {
        for (const cls of data.classes) classSelect.append(el("option", { value: cls, text: cls }));
      }
      const where = data.missing_members ? " in the group" : "";
      summary.textContent = `${data.agents.length} shown of ${data.total}${data.truncated ? "+" : ""} known${where} · ${data.awake} awake · ${data.hibernated} hibernated`;
      missing.replaceChildren(...[missingMembers(data)].filter(Boolean));
      results.replaceChildren(table("Agents", [
        ["Agent", (a) => el("a", { href: agentHref(a.class, a.id), text: a.id })],
        ["Class", (a) => a.class],
        ...memberColumn(data),
        ["Status", (a) => el("span", { class: a.awake ? "status-ok" : null, text: a.awake ? "awake" : "hibernated" })],
        ["Connections", (a) => a.connections, "num"],
        ["Last write", (a) => fmt.ago(a.last_write)],
      ], data.agents, "No agent matches."));
    } catch (err) {
      summary.textContent = `Could not list agents: ${err.message}`;
    }
  }
  const reload = () => { clearTimeout(timer); timer = setTimeout(load, 150); };
  search.addEventListener("input", reload);
  classSelect.addEventListener("change", load);
  load();
  const refresher = setInterval(() => { if (!stopped && document.activeElement !== search) load(); }, 5000);
  return () => { stopped = true; clearTimeout(timer); clearInterval(refresher); };
}

// -- one agent -----------------------------------------------------------------------------

function agentView(view, [agentClass, agentId]) {
  const stateBox = el("pre", { class: "state", id: "agent-state", tabindex: "0", "aria-label": "Agent state (live)" });
  const live = el("span", { id: "live-status", class: "badge", text: "connecting…" });
  const details = el("div", { id: "agent-details" });
  const chatBox = el("section", { class: "panel", id: "chat", hidden: true, "aria-labelledby": "chat-title" });
  const callForm = el("form", { class: "chat-form", id: "call-form" });
  view.append(
    el("p", {}, el("a", { href: "#/agents", text: "← Agents" })),
    el("h2", {}, `${agentClass} / `, el("span", { id: "agent-id", text: agentId })),
    el("section", { class: "panel", "aria-labelledby": "state-title" },
      el("h3", { id: "state-title" }, "State ", live), stateBox, callForm),
    chatBox, details);

  let client = null;
  let stopped = false;
  let timer = null;

  async function connect(isChat) {
    const Client = isChat ? ChatClient : AgentClient;
    client = new Client(wsUrl(), agentClass, agentId, { token: sessionStorage.getItem(TOKEN_KEY) });
    client.onState((state) => { stateBox.textContent = JSON.stringify(state, null, 2); });
    client.on("connection", (up) => {
      live.textContent = up ? "live" : "reconnecting…";
      live.className = `badge ${up ? "status-ok" : "status-warn"}`;
    });
    try {
      await client.connect();
      live.textContent = "live"; live.className = "badge status-ok";
    } catch (err) {
      live.textContent = `not connected: ${err.message}`; live.className = "badge status-bad";
      return;
    }
    if (isChat) setUpChat(client);
  }

  function setUpCalls(callables) {
    if (!callables.length) return;
    const method = el("select", { id: "call-method" }, callables.map((c) => el("option", { value: c.name, text: c.name })));
    const args = el("input", { id: "call-args", placeholder: "[22]", value: "[]" });
    const out = el("output", { id: "call-result", for: "call-method call-args", "aria-live": "polite" });
    callForm.replaceChildren(
      el("div", {}, el("label", { for: "call-method", text: "Method" }), method),
      el("div", { class: "grow" }, el("label", { for: "call-args", text: "Arguments (JSON array)" }), args),
      el("button", { type: "submit", text: "Call" }), out);
    callForm.onsubmit = async (event) => {
      event.preventDefault();
      let parsed;
      try { parsed = JSON.parse(args.value || "[]"); } catch { out.textContent = "Arguments must be a JSON array."; return; }
      if (!Array.isArray(parsed)) parsed = [parsed];
      out.textContent = "…";
      try {
        const call = client.stream(method.value, ...parsed);
        const chunks = [];
        for await (const chunk of call) chunks.push(chunk);
        const result = await call.result;
        out.textContent = `→ ${JSON.stringify(result)}${chunks.length ? ` (${chunks.length} chunks)` : ""}`;
      } catch (err) { out.textContent = `✗ ${err.message}`; }
    };
  }

  function setUpChat(chat) {
    chatBox.hidden = false;
    const log = el("ol", { class: "chat-log", id: "chat-log", "aria-live": "polite" });
    const input = el("input", { id: "chat-input", autocomplete: "off" });
    const form = el("form", { class: "chat-form" },
      el("div", { class: "grow" }, el("label", { for: "chat-input", text: "Message" }), input),
      el("button", { type: "submit", text: "Send" }));
    const note = el("p", { class: "error", role: "alert", id: "chat-error" });
    chatBox.replaceChildren(el("h3", { id: "chat-title", text: "Chat" }), log, form, note);
    let streaming = null;

    const render = () => {
      const items = chat.messages.map((m) => messageItem(m));
      if (streaming && !streaming.finished && streaming.chunks.length) {
        items.push(el("li", { "data-role": "assistant" }, el("div", { class: "role", text: "assistant (streaming)" }),
          el("div", { text: streaming.text })));
      }
      log.replaceChildren(...items);
    };
    const messageItem = (m) => el("li", { "data-role": m.role },
      el("div", { class: "role", text: m.role }),
      (m.parts || []).map((p) => partView(p)));
    const partView = (p) => {
      if (p.type === "text") return el("div", { text: p.text });
      if (p.type === "reasoning") return el("div", { class: "hint", text: p.text });
      if (p.type === "tool" || (typeof p.type === "string" && p.type.startsWith("tool-"))) {
        const name = p.toolName || p.type.replace(/^tool-/, "");
        const box = el("div", { class: "tool", "data-tool-call": p.toolCallId, "data-state": p.state },
          el("div", {}, el("strong", { text: name }), ` · ${p.state || ""}`),
          el("div", { class: "hint", text: `input: ${JSON.stringify(p.input ?? null)}` }));
        if (p.output !== undefined) box.append(el("div", { text: `output: ${JSON.stringify(p.output)}` }));
        if (p.errorText) box.append(el("div", { class: "error", text: p.errorText }));
        if (p.state === "approval-requested") {
          const answer = (approved) => () => {
            try {
              follow(chat.approve(p.toolCallId, approved));
              for (const b of box.querySelectorAll("button")) b.disabled = true;
            } catch (err) { note.textContent = err.message; }
          };
          box.append(el("div", { class: "actions" },
            el("button", { type: "button", onclick: answer(true), "aria-label": `Approve ${name}`, text: "Approve" }),
            el("button", { type: "button", class: "deny", onclick: answer(false), "aria-label": `Deny ${name}`, text: "Deny" })));
        }
        return box;
      }
      return el("div", { class: "hint", text: `[${p.type}]` });
    };
    const follow = (response) => {
      streaming = response;
      response.onChunk(render);
      response.done.then(render, render);
      render();
    };
    chat.on("messages", render);
    chat.on("response", follow);
    chat.on("error", (err) => { note.textContent = err.message; });
    form.onsubmit = (event) => {
      event.preventDefault();
      if (!input.value.trim()) return;
      note.textContent = "";
      try { follow(chat.send(input.value)); input.value = ""; } catch (err) { note.textContent = err.message; }
    };
    render();
  }

  async function loadDetails(first) {
    let data;
    try { data = await api(`agent?${new URLSearchParams({ class: agentClass, id: agentId })}`); }
    catch (err) { details.replaceChildren(el("p", { class: "error", text: err.message })); return null; }
    if (stopped) return data;
    if (stateBox.textContent === "") stateBox.textContent = JSON.stringify(data.state, null, 2);
    const replay = (item) => el("button", {
      type: "button", class: "quiet", "aria-label": `Replay dead letter ${item.id}`, disabled: session.read_only,
      onclick: async (event) => {
        event.target.disabled = true;
        try { await api("replay", { method: "POST", body: JSON.stringify({ class: agentClass, id: agentId, item: item.id }) }); status(`replayed ${item.id}`); }
        catch (err) { status(`replay failed: ${err.message}`); }
        loadDetails(false);
      },
    }, "Replay");
    details.replaceChildren(
      el("section", { class: "panel", "aria-labelledby": "sched-title" }, el("h3", { id: "sched-title", text: "Schedules" }),
        table("Schedules", [["Method", (s) => s.method], ["Kind", (s) => s.kind],
          ["Next", (s) => fmt.time(s.next_at)], ["Every / cron", (s) => s.every_s ? `${s.every_s} s` : s.cron || "–"],
          ["Status", (s) => s.status], ["Last error", (s) => s.last_error || "–"]], data.schedules, "No schedules.")),
      el("section", { class: "panel", "aria-labelledby": "queue-title" }, el("h3", { id: "queue-title", text: "Queue" }),
        table("Queued calls", [["Method", (q) => q.method], ["Payload", (q) => JSON.stringify(q.payload)],
          ["Attempts", (q) => q.attempts, "num"], ["Ready", (q) => fmt.time(q.ready_at)]], data.queue, "Nothing queued."),
        el("h3", { text: "Dead letters" }),
        el("div", { id: "dead-letters" }, table("Dead letters", [["Method", (q) => q.method], ["Payload", (q) => JSON.stringify(q.payload)],
          ["Attempts", (q) => q.attempts, "num"], ["Error", (q) => q.last_error || "–"], ["Died", (q) => fmt.ago(q.dead_at)],
          ["", (q) => replay(q)]], data.dead_letters, "No dead letters."))),
      el("section", { class: "panel", "aria-labelledby": "errors-title" }, el("h3", { id: "errors-title", text: "Recent errors" }),
        table("Recent errors", [["When", (e) => fmt.ago(e.at)], ["Level", (e) => e.level], ["Message", (e) => e.message]],
          data.errors, "No recent errors.")),
      el("section", { class: "panel", "aria-labelledby": "conn-title" }, el("h3", { id: "conn-title", text: "Connections" }),
        table("Connections", [["Id", (c) => c.id], ["Transport", (c) => c.transport], ["Remote", (c) => c.remote],
          ["Protocol", (c) => (c.protocol ? "yes" : "no")], ["Read-only", (c) => (c.readonly ? "yes" : "no")]],
        data.connections, "No open connections.")));
    if (first) setUpCalls(data.callables);
    return data;
  }

  (async () => {
    const data = await loadDetails(true);
    if (stopped) return;
    if (!data) {
      // Looking never creates an agent; connecting to it does (e.g. to start a new chat).
      live.textContent = "not found"; live.className = "badge status-bad";
      if (session.ws.enabled && !session.read_only) {
        details.append(el("button", {
          type: "button", id: "create-agent",
          onclick: async () => { await connect(false); route(); },
        }, `Connect (creates ${agentClass}/${agentId})`));
      }
      return;
    }
    if (session.ws.enabled) await connect(Boolean(data.chat));
    else live.textContent = "WebSocket listener off";
    const tick = async () => { if (stopped) return; await loadDetails(false); timer = setTimeout(tick, 3000); };
    timer = setTimeout(tick, 3000);
  })();
  return () => { stopped = true; clearTimeout(timer); if (client) client.close(); };
}

// -- devices -------------------------------------------------------------------------------

function devicesView(view) {
  const body = el("div", { id: "device-list" });
  const mqtt = el("p", { class: "hint" });
  const missing = el("div", { id: "device-missing-members" });
  view.append(el("h2", { text: "Devices" }), mqtt, missing, body);
  let stopped = false;
  async function load() {
    try {
      const data = await api("devices");
      if (data.mqtt) {
        mqtt.textContent = `MQTT: ${data.mqtt.state} (${data.mqtt.broker || "no broker"}) · ${data.mqtt.refused_not_allowed} messages refused by allow-lists`;
      } else mqtt.textContent = "MQTT is off.";
      missing.replaceChildren(...[missingMembers(data)].filter(Boolean));
      body.replaceChildren(table("Devices", [
        ["Device", (d) => el("a", { href: agentHref(d.class, d.id), text: d.id })],
        ["Class", (d) => d.class],
        ...memberColumn(data),
        ["Transport", (d) => d.transports.join(", ")],
        ["Connected", (d) => el("span", { class: d.connected ? "status-ok" : null, text: d.connected ? "yes" : "no" })],
        ["Last message", (d) => fmt.ago(d.last_message)],
        ["Allow-list", (d) => el("span", { class: d.allowed === "not allowed" ? "status-bad" : null, text: d.allowed })],
      ], data.devices, "No device seen yet."));
    } catch (err) { body.replaceChildren(el("p", { class: "error", text: err.message })); }
  }
  load();
  const timer = setInterval(() => { if (!stopped) load(); }, 3000);
  return () => { stopped = true; clearInterval(timer); };
}

// -- start ---------------------------------------------------------------------------------

$("#login").addEventListener("submit", (event) => {
  event.preventDefault();
  $("#login-error").textContent = "";
  signIn($("#token").value.trim());
});
$("#logout").addEventListener("click", () => signOut());
window.addEventListener("hashchange", route);
const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved) signIn(saved); else showLogin();
