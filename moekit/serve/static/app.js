// moekit's chat and routing page. Plain JS, no dependencies; every request goes to this page's origin.
// Data: /v1/models, /v1/moekit/info, /v1/chat/completions and /v1/completions (SSE read from a
// fetch ReadableStream), /v1/moekit/route. The API key lives in sessionStorage only.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, info: null, messages: [], controller: null, route: null, selected: null,
  routeText: "", taskRoutes: {} };

// ---------------------------------------------------------------- requests
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem("moekit-api-key");
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (resp.status === 401) return "The server needs an API key: enter it at the top (" + body.error.message + ").";
    return body.error ? body.error.message : resp.statusText;
  } catch (e) {
    return resp.status + " " + resp.statusText;
  }
}

async function getJSON(path) {
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) throw new Error(await errorText(resp));
  return resp.json();
}

function status(text) { $("status").textContent = text; }

async function connect() {
  try {
    const models = await getJSON("/v1/models");
    state.model = models.data[0].id;
    $("model-name").textContent = state.model;
    state.info = await getJSON("/v1/moekit/info");
    const tasks = state.info.tasks || [];
    $("task-label").hidden = tasks.length === 0;
    const select = $("task");
    select.replaceChildren();
    if (!state.info.task_required) select.append(new Option("(none)", ""));
    for (const t of tasks) select.append(new Option(t, t));
    state.taskRoutes = {};
    showTasks();
    status(state.info.num_experts ? `${state.info.num_experts} experts, top-${state.info.top_k}, ` +
      `${state.info.moe_layers.length} MoE layers` : "a dense model: no routing to show");
  } catch (e) {
    status(e.message);
  }
}

// ---------------------------------------------------------------- chat and completion, streamed
function sampling() {
  const body = { model: state.model, stream: true, temperature: Number($("temperature").value),
    top_p: Number($("top-p").value), max_tokens: Number($("max-tokens").value) };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("task").value) body.task = $("task").value;
  return body;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("conversation").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

// Calls onData with each parsed `data:` event of a server-sent event stream until [DONE].
async function readSSE(resp, onData) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send() {
  const text = $("prompt").value;
  const mode = $("mode").value;
  const body = sampling();
  let path;
  if (mode === "chat") {
    state.messages.push({ role: "user", content: text });
    body.messages = state.messages;
    path = "/v1/chat/completions";
    addMessage("user", text);
  } else {
    body.prompt = text;
    path = "/v1/completions";
    state.messages = [{ role: "user", content: text }];
    $("conversation").replaceChildren();
    addMessage("user", text);
  }
  $("prompt").value = "";
  const out = addMessage("assistant", "");
  let answer = "";
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  try {
    const resp = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body),
      signal: state.controller.signal });
    if (!resp.ok) throw new Error(await errorText(resp));
    await readSSE(resp, (event) => {
      if (event.error) throw new Error(event.error.message);
      const choice = event.choices[0];
      if (!choice) return;
      answer += mode === "chat" ? (choice.delta.content || "") : (choice.text || "");
      out.textContent = answer;
    });
  } catch (e) {
    if (e.name !== "AbortError") addMessage("error", e.message);
  } finally {
    state.messages.push({ role: "assistant", content: answer });  // a stopped answer stays in the conversation
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

// ---------------------------------------------------------------- routing
async function postRoute(text, task) {
  const body = { prompt: text };
  if (task) body.task = task;
  const resp = await fetch("/v1/moekit/route", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!resp.ok) throw new Error(await errorText(resp));
  return resp.json();
}

async function route(text) {
  try {
    state.route = await postRoute(text, $("task").value);
    state.routeText = text;
    state.taskRoutes = {};
    state.selected = null;
    const select = $("layer");
    select.replaceChildren();
    state.route.layers.forEach((layer, i) => select.append(new Option("layer " + layer, String(i))));
    draw();
  } catch (e) {
    status(e.message);
  }
}

function expertColour(e, n) {
  return `hsl(${Math.round((e * 360) / n)}, 70%, 78%)`;
}

function draw() {
  const r = state.route;
  if (!r) return;
  const li = Number($("layer").value || 0);
  const tokens = $("tokens");
  tokens.replaceChildren();
  r.tokens.forEach((t, i) => {
    const span = document.createElement("span");
    span.className = "tok";
    span.textContent = t.text;
    span.dataset.index = String(i);
    span.dataset.expert = String(t.experts[li][0]);
    span.style.backgroundColor = expertColour(t.experts[li][0], r.num_experts);
    span.tabIndex = 0;
    if (state.selected === i) span.classList.add("selected");
    tokens.append(span);
  });
  drawBars(li);
  drawHeatmap();
  drawTasks();
  if (state.selected !== null) detail(state.selected);
}

function detail(i) {
  const r = state.route;
  const t = r.tokens[i];
  const lines = [`token ${i}: id ${t.id} ${JSON.stringify(t.text)}`];
  r.layers.forEach((layer, li) => {
    const pairs = t.experts[li].map((e, k) => `expert ${e} (${t.gates[li][k].toFixed(3)})`);
    lines.push(`layer ${layer}: ${pairs.join(", ")}`);
  });
  $("detail").textContent = lines.join("\n");
}

function drawBars(li) {
  const r = state.route;
  const load = r.load[li];
  const most = Math.max(1, ...load);
  const bars = $("bars");
  bars.replaceChildren();
  load.forEach((n, e) => {
    const row = document.createElement("div");
    row.className = "bar";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = "expert " + e;
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = (240 * n) / most + "px";
    fill.style.backgroundColor = expertColour(e, r.num_experts);
    const count = document.createElement("span");
    count.textContent = String(n);
    row.append(label, fill, count);
    bars.append(row);
  });
}

function drawHeatmap() {
  const r = state.route;
  const map = $("heatmap");
  map.replaceChildren();
  map.style.gridTemplateColumns = `5em repeat(${r.num_experts}, 1fr)`;
  map.append(Object.assign(document.createElement("span"), { className: "head", textContent: "" }));
  for (let e = 0; e < r.num_experts; e++) {
    map.append(Object.assign(document.createElement("span"), { className: "head", textContent: String(e) }));
  }
  r.load.forEach((row, li) => {
    map.append(Object.assign(document.createElement("span"), { className: "head", textContent: "layer " + r.layers[li] }));
    const total = row.reduce((a, b) => a + b, 0) || 1;
    row.forEach((n, e) => {
      const cell = document.createElement("span");
      cell.className = "cell";
      const share = n / total;
      cell.style.backgroundColor = `rgba(40, 90, 200, ${Math.min(1, share * r.num_experts / 2)})`;
      cell.title = `layer ${r.layers[li]}, expert ${e}: ${n} (${(100 * share).toFixed(1)}%)`;
      map.append(cell);
    });
  });
}

// ---------------------------------------------------------------- experts per task (models trained with tasks)
function showTasks() {
  const info = state.info;
  const tasks = (info && info.num_experts && info.tasks) || [];
  $("tasks-view").hidden = tasks.length === 0;
  if (!tasks.length) return;
  $("tasks-note").textContent = info.task_routing === "task"
    ? "Each task routes only to its own experts (outlined); shading: the share of the task's assignments when the text is routed under it."
    : `Routing is shared (task routing: ${info.task_routing}); shading: the share of each task's assignments when the text is routed under it.`;
  drawTasks();
}

async function routeTasks() {
  const text = state.routeText || $("prompt").value;
  if (!text) { status("route some text first"); return; }
  try {
    const out = {};
    for (const task of state.info.tasks) out[task] = await postRoute(text, task);
    state.taskRoutes = out;
    if (!state.route) await route(text);
    drawTasks();
  } catch (e) {
    status(e.message);
  }
}

function drawTasks() {
  const info = state.info;
  if (!info || !info.num_experts || !(info.tasks || []).length) return;
  const li = Number($("layer").value || 0);
  const E = info.num_experts;
  const table = $("task-table");
  table.replaceChildren();
  table.style.gridTemplateColumns = `6em repeat(${E}, 1fr)`;
  table.append(Object.assign(document.createElement("span"), { className: "head", textContent: "" }));
  for (let e = 0; e < E; e++) table.append(Object.assign(document.createElement("span"), { className: "head", textContent: String(e) }));
  for (const task of info.tasks) {
    table.append(Object.assign(document.createElement("span"), { className: "head", textContent: task }));
    const own = info.task_experts ? new Set(info.task_experts[task]) : null;
    const r = state.taskRoutes[task];
    const load = r ? r.load[li] : null;
    const total = load ? load.reduce((a, b) => a + b, 0) || 1 : 1;
    for (let e = 0; e < E; e++) {
      const cell = document.createElement("span");
      cell.className = "cell" + (own && own.has(e) ? " own" : "");
      cell.dataset.task = task;
      cell.dataset.expert = String(e);
      const share = load ? load[e] / total : 0;
      cell.dataset.share = share.toFixed(4);
      cell.style.backgroundColor = `rgba(40, 90, 200, ${Math.min(1, share * E / 2)})`;
      cell.title = `${task}, expert ${e}` + (own ? (own.has(e) ? " (its own)" : " (another task's)") : "") +
        (load ? `: ${load[e]} (${(100 * share).toFixed(1)}%)` : "");
      table.append(cell);
    }
  }
}

function selectToken(event) {
  const span = event.target.closest(".tok");
  if (!span) return;
  state.selected = Number(span.dataset.index);
  for (const s of document.querySelectorAll(".tok.selected")) s.classList.remove("selected");
  span.classList.add("selected");
  detail(state.selected);
}

// ---------------------------------------------------------------- wiring (no inline handlers: the CSP forbids them)
document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = sessionStorage.getItem("moekit-api-key") || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("moekit-api-key", $("api-key").value);
    connect();
  });
  $("send").addEventListener("click", send);
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", () => { state.messages = []; $("conversation").replaceChildren(); });
  $("route-answer").addEventListener("click", () => route(state.messages.map((m) => m.content).join("\n")));
  $("route-prompt").addEventListener("click", () => route($("prompt").value));
  $("layer").addEventListener("change", draw);
  $("route-tasks").addEventListener("click", routeTasks);
  $("tokens").addEventListener("mouseover", selectToken);
  $("tokens").addEventListener("click", selectToken);
  $("tokens").addEventListener("focusin", selectToken);
  connect();
});
