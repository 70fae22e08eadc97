// moekit's training dashboard: polls /v1/moekit/runs and each run's metrics every 2 s (only the new
// records: each poll asks from the byte offset the last one returned) and draws the curves on canvases.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;
const runs = new Map(); // name -> { info, offset, records }

function colour(i, n) { return `hsl(${Math.round((i * 360) / Math.max(n, 1))}, 65%, 45%)`; }

async function getJSON(path) {
  const resp = await fetch(path);
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.error ? body.error.message : resp.statusText);
  return body;
}

async function poll() {
  try {
    const list = await getJSON("/v1/moekit/runs");
    $("root").textContent = list.root;
    for (const info of list.data) {
      if (!runs.has(info.name)) runs.set(info.name, { info, offset: 0, records: [] });
    }
    for (const run of runs.values()) {
      const page = await getJSON(`/v1/moekit/runs/${encodeURIComponent(run.info.name).replace(/%2F/g, "/")}/metrics?offset=${run.offset}`);
      if (page.reset) run.records = []; // a resumed run rewrote its log
      run.records.push(...page.records);
      run.offset = page.offset;
    }
    $("status").textContent = `${runs.size} run${runs.size === 1 ? "" : "s"}, updated ${new Date().toLocaleTimeString()}`;
    draw();
  } catch (e) {
    $("status").textContent = e.message;
  }
  setTimeout(poll, POLL_MS);
}

// Runs of the same model share a hue family; seeds are told apart by the line dash.
function styles() {
  const models = [...new Set([...runs.values()].map((r) => r.info.model))];
  const out = new Map();
  for (const run of runs.values()) {
    const m = models.indexOf(run.info.model);
    out.set(run.info.name, { colour: colour(m, models.length), dash: run.info.seed ? [6, 3 * run.info.seed] : [] });
  }
  return out;
}

function series(key) {
  const out = [];
  for (const run of runs.values()) {
    const points = [];
    for (const r of run.records) {
      let y = null;
      if (key === "tokens_per_s") {
        if (r.train_loss !== undefined && r.elapsed_s > 0) y = r.tokens / r.elapsed_s;
      } else if (typeof r[key] === "number") {
        y = r[key];
      }
      if (y !== null && Number.isFinite(y)) points.push([r.tokens, y]);
    }
    out.push({ name: run.info.name, points });
  }
  return out;
}

function loadSeries() {
  const run = runs.get($("load-run").value);
  if (!run) return [];
  const layer = Number($("load-layer").value || 0);
  const withLoad = run.records.filter((r) => Array.isArray(r.expert_load) && r.expert_load[layer]);
  const experts = withLoad.length ? withLoad[0].expert_load[layer].length : 0;
  const out = [];
  for (let e = 0; e < experts; e++) {
    out.push({ name: "expert " + e, colour: colour(e, experts), points: withLoad.map((r) => [r.tokens, r.expert_load[layer][e]]) });
  }
  return out;
}

function plot(canvas, lines, style) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 50;
  ctx.clearRect(0, 0, w, h);
  const all = lines.flatMap((l) => l.points);
  // what is drawn, for scripts and tests: the point count and the lines that have any
  canvas.dataset.points = String(all.length);
  canvas.dataset.lines = lines.filter((l) => l.points.length).map((l) => l.name).join("|");
  ctx.fillStyle = "#777";
  ctx.font = "20px system-ui, sans-serif";
  if (!all.length) { ctx.fillText("no data yet", pad, h / 2); return; }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = (x) => pad + ((x - x0) / (x1 - x0 || 1)) * (w - 2 * pad);
  const sy = (y) => h - pad - ((y - y0) / (y1 - y0 || 1)) * (h - 2 * pad);
  ctx.strokeStyle = "#ccc";
  ctx.strokeRect(pad, pad, w - 2 * pad, h - 2 * pad);
  ctx.fillText(y1.toPrecision(3), 2, pad + 6);
  ctx.fillText(y0.toPrecision(3), 2, h - pad);
  ctx.fillText(`${x0} .. ${x1} tokens`, pad, h - 12);
  for (const line of lines) {
    const s = style ? style.get(line.name) : { colour: line.colour, dash: [] };
    ctx.strokeStyle = s.colour;
    ctx.setLineDash(s.dash);
    ctx.lineWidth = 2;
    ctx.beginPath();
    line.points.forEach(([x, y], i) => (i ? ctx.lineTo(sx(x), sy(y)) : ctx.moveTo(sx(x), sy(y))));
    ctx.stroke();
    if (line.points.length === 1) ctx.fillRect(sx(line.points[0][0]) - 3, sy(line.points[0][1]) - 3, 6, 6);
  }
  ctx.setLineDash([]);
}

function syncSelectors() {
  const select = $("load-run");
  const names = [...runs.keys()];
  if (select.options.length !== names.length) {
    const keep = select.value;
    select.replaceChildren(...names.map((n) => new Option(n, n)));
    select.value = names.includes(keep) ? keep : (names.find((n) => runs.get(n).records.some((r) => r.expert_load)) || names[0] || "");
  }
  const run = runs.get(select.value);
  const rec = run && run.records.find((r) => Array.isArray(r.expert_load));
  const layers = rec ? rec.expert_load.length : 0;
  const layerSelect = $("load-layer");
  if (layerSelect.options.length !== layers) {
    layerSelect.replaceChildren(...Array.from({ length: layers }, (_, i) => new Option("MoE layer " + i, String(i))));
  }
}

function draw() {
  syncSelectors();
  const style = styles();
  const legend = $("legend");
  legend.replaceChildren();
  for (const [name, s] of style) {
    const item = document.createElement("span");
    item.dataset.run = name;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.backgroundColor = s.colour;
    item.append(swatch, name + (s.dash.length ? " (dashed)" : ""));
    legend.append(item);
  }
  for (const key of ["train_loss", "val_loss", "aux_loss", "tokens_per_s", "lr"]) plot($(key), series(key), style);
  plot($("expert_load"), loadSeries(), null);
}

document.addEventListener("DOMContentLoaded", () => {
  $("load-run").addEventListener("change", draw);
  $("load-layer").addEventListener("change", draw);
  poll();
});
