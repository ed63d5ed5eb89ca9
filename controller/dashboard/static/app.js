// The live page of one run: polls the JSON endpoints every 2 s and draws plain SVG.
// No libraries and nothing fetched from elsewhere: the page must work offline.
"use strict";

const POLL_MS = 2000;
const SVG_NS = "http://www.w3.org/2000/svg";
const COLORS = ["#155eef", "#e04f16", "#079455", "#7a5af8", "#dd2590", "#0e9384", "#ca8504"];

const state = { run: null, rows: new Map(), decisions: [], nextStep: 0, lastData: null, polls: 0 };

// ---------------------------------------------------------------------------------------------
// data

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  const payload = await response.json();
  if (!response.ok) throw new Error(payload.error || response.statusText);
  return payload;
}

async function poll() {
  try {
    if (!state.run) state.run = await getJSON("/api/run");
    const [metrics, timeline] = await Promise.all([
      getJSON(`/api/metrics?since=${state.nextStep}`),
      getJSON("/api/timeline"),
    ]);
    for (const row of metrics.rows) state.rows.set(row.step, row);
    if (metrics.rows.length || timeline.decisions.length !== state.decisions.length) state.lastData = Date.now();
    if (metrics.last_step !== null) state.nextStep = metrics.last_step + 1;
    state.decisions = timeline.decisions;
    state.polls += 1;
    render();
    setStatus();
  } catch (err) {
    setStatus(err);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

function num(value) {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

function stepSeries(key) {
  const out = [];
  for (const row of [...state.rows.values()].sort((a, b) => a.step - b.step)) {
    const y = num(row[key]);
    if (y !== null) out.push([row.step, y]);
  }
  return out;
}

function fmt(value, digits = 4) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return String(value);
  return Math.abs(value) >= 1e4 || (Math.abs(value) < 1e-3 && value !== 0) ? value.toExponential(2) : value.toPrecision(digits);
}

// ---------------------------------------------------------------------------------------------
// drawing

function el(name, attrs = {}, parent = null, text = null) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function niceTicks(lo, hi, count) {
  const span = hi - lo || Math.abs(hi) || 1;
  const raw = span / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

function tickLabel(t, step) {
  let decimals = 0;
  while (decimals < 12 && Math.abs(Math.round(step * 10 ** decimals) - step * 10 ** decimals) > 1e-6) decimals += 1;
  if (t !== 0 && (Math.abs(t) >= 1e5 || decimals > 6)) return t.toExponential(2);
  return t.toFixed(decimals);
}

function domain(values, fixed) {
  if (fixed) return fixed;
  let lo = Math.min(...values), hi = Math.max(...values);
  if (lo === hi) { lo -= Math.abs(lo) * 0.1 || 0.5; hi += Math.abs(hi) * 0.1 || 0.5; }
  const pad = (hi - lo) * 0.05;
  return [lo - pad, hi + pad];
}

// opts: {series: [{name, points: [[x, y]], color, bars, dots}], bands: [{x0, x1, label}],
//        x: [lo, hi] | null, y: [lo, hi] | null, xLabel, yLabel, empty, vlines: [{x, label}]}
function chart(svg, opts) {
  svg.replaceChildren();
  const [W, H] = [svg.viewBox.baseVal.width, svg.viewBox.baseVal.height];
  const points = opts.series.flatMap((s) => s.points);
  svg.dataset.points = opts.series.length ? opts.series[0].points.length : 0;
  if (!points.length) {
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, svg, opts.empty || "no data yet");
    return;
  }
  const bars = opts.series.some((s) => s.bars);
  const xs = points.map((p) => p[0]).concat(opts.bands ? opts.bands.flatMap((b) => [b.x0, b.x1]) : []);
  const [x0, x1] = opts.x || domain(xs.concat(bars ? [Math.min(...xs) - 0.5, Math.max(...xs) + 0.5] : []), null);
  const [y0, y1] = opts.y || domain(points.map((p) => p[1]).concat(bars ? [0] : []), null);
  const yTicks = niceTicks(y0, y1, 4);
  const yLabels = yTicks.map((t) => tickLabel(t, yTicks[1] - yTicks[0] || 1));
  // the left margin fits the longest y label (about 6.5 px per character at 11 px)
  const m = { left: 24 + 6.5 * Math.max(...yLabels.map((l) => l.length)), right: 12, top: 18, bottom: 34 };
  const pw = W - m.left - m.right, ph = H - m.top - m.bottom;
  const sx = (x) => m.left + ((x - x0) / (x1 - x0 || 1)) * pw;
  const sy = (y) => m.top + ph - ((y - y0) / (y1 - y0 || 1)) * ph;

  (opts.bands || []).forEach((b, i) => {
    el("rect", { x: sx(b.x0), y: m.top, width: Math.max(1, sx(b.x1) - sx(b.x0)), height: ph,
      fill: i % 2 ? "#e0eaff" : "#ebe9fe", class: "band" }, svg);
    if (b.label) el("text", { x: (sx(b.x0) + sx(b.x1)) / 2, y: m.top + 12, "text-anchor": "middle", class: "band-label" }, svg, b.label);
  });
  yTicks.forEach((t, i) => {
    el("line", { x1: m.left, x2: m.left + pw, y1: sy(t), y2: sy(t), class: "grid" }, svg);
    el("text", { x: m.left - 6, y: sy(t) + 4, "text-anchor": "end" }, svg, yLabels[i]);
  });
  const xTicks = niceTicks(x0, x1, 8).filter((t) => !opts.integerX || Number.isInteger(t));
  for (const t of xTicks) {
    el("line", { x1: sx(t), x2: sx(t), y1: m.top + ph, y2: m.top + ph + 4, class: "axis" }, svg);
    el("text", { x: sx(t), y: m.top + ph + 16, "text-anchor": "middle" }, svg, tickLabel(t, xTicks[1] - xTicks[0] || 1));
  }
  el("line", { x1: m.left, x2: m.left + pw, y1: m.top + ph, y2: m.top + ph, class: "axis" }, svg);
  el("line", { x1: m.left, x2: m.left, y1: m.top, y2: m.top + ph, class: "axis" }, svg);
  if (opts.xLabel) el("text", { x: m.left + pw / 2, y: H - 4, "text-anchor": "middle" }, svg, opts.xLabel);
  if (opts.yLabel) el("text", { x: 12, y: m.top + ph / 2, transform: `rotate(-90 12 ${m.top + ph / 2})`, "text-anchor": "middle" }, svg, opts.yLabel);
  for (const v of opts.vlines || []) {
    el("line", { x1: sx(v.x), x2: sx(v.x), y1: m.top, y2: m.top + ph, stroke: v.color || "#f04438", "stroke-dasharray": "4 3" }, svg);
    if (v.label) el("text", { x: sx(v.x) + 4, y: m.top + 10, class: "legend" }, svg, v.label);
  }

  const clip = `clip-${svg.id}`;
  el("rect", { x: m.left, y: m.top, width: pw, height: ph }, el("clipPath", { id: clip }, el("defs", {}, svg)));
  const plot = el("g", { "clip-path": `url(#${clip})` }, svg);
  const nBars = opts.series.filter((s) => s.bars).length;
  let barIndex = 0;
  opts.series.forEach((s, i) => {
    const color = s.color || COLORS[i % COLORS.length];
    const g = el("g", { class: `series series-${i}`, "data-name": s.name, "data-points": s.points.length }, plot);
    if (s.bars) {
      const slot = Math.min(40, (pw / Math.max(1, x1 - x0)) * 0.8);
      const w = slot / nBars;
      for (const [x, y] of s.points) {
        const top = sy(Math.max(0, y)), bottom = sy(Math.min(0, y));
        el("rect", { x: sx(x) - slot / 2 + barIndex * w, y: top, width: w - 1, height: Math.max(1, bottom - top), fill: color, opacity: 0.8 }, g);
      }
      barIndex += 1;
      return;
    }
    const d = s.points.map(([x, y], j) => `${j ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
    if (s.fill) {
      const base = sy(Math.max(y0, Math.min(0, y1)));
      const area = `${d}L${sx(s.points[s.points.length - 1][0]).toFixed(1)},${base}L${sx(s.points[0][0]).toFixed(1)},${base}Z`;
      el("path", { d: area, fill: color, "fill-opacity": 0.15, stroke: "none" }, g);
    }
    el("path", { d, fill: "none", stroke: color, "stroke-width": 2 }, g);
    if (s.dots !== false && s.points.length <= 300) {
      for (const [x, y] of s.points) el("circle", { cx: sx(x), cy: sy(y), r: 3, fill: color, class: "point" }, g);
    }
  });

  let lx = m.left + 8;
  opts.series.forEach((s, i) => {
    if (!s.name) return;
    const color = s.color || COLORS[i % COLORS.length];
    el("rect", { x: lx, y: 4, width: 10, height: 10, fill: color }, svg);
    const label = el("text", { x: lx + 14, y: 13, class: "legend" }, svg, s.name);
    lx += 24 + label.getComputedTextLength();
  });
}

// log Γ by Lanczos (g = 7, n = 9), for the Beta density
const LANCZOS = [0.99999999999980993, 676.5203681218851, -1259.1392167224028, 771.32342877765313,
  -176.61502916214059, 12.507343278686905, -0.13857109526572012, 9.9843695780195716e-6, 1.5056327351493116e-7];
function lgamma(x) {
  if (x < 0.5) return Math.log(Math.PI / Math.abs(Math.sin(Math.PI * x))) - lgamma(1 - x);
  x -= 1;
  let a = LANCZOS[0];
  const t = x + 7.5;
  for (let i = 1; i < 9; i++) a += LANCZOS[i] / (x + i);
  return 0.5 * Math.log(2 * Math.PI) + (x + 0.5) * Math.log(t) - t + Math.log(a);
}
function betaPdf(x, a, b) {
  return Math.exp((a - 1) * Math.log(x) + (b - 1) * Math.log(1 - x) + lgamma(a + b) - lgamma(a) - lgamma(b));
}

// ---------------------------------------------------------------------------------------------
// panels

function holdBands() {
  return state.decisions
    .filter((d) => num(d.first_step) !== null && num(d.last_step) !== null)
    .map((d) => ({ x0: d.first_step - 0.5, x1: d.last_step + 0.5, label: `#${d.decision}` }));
}

function renderAlpha() {
  const run = state.run || {};
  const lo = Math.min(0, num(run.alpha_min) ?? 0), hi = Math.max(1, num(run.alpha_max) ?? 1);
  const total = num(run.total_steps);
  const alpha = stepSeries("alpha");
  chart(document.getElementById("alpha-chart"), {
    series: [{ name: "α", points: alpha }],
    bands: holdBands(),
    x: total ? [-0.5, total - 0.5] : null,
    y: [lo, hi],
    integerX: true,
    xLabel: "step",
    yLabel: "α",
    empty: "waiting for the first step",
  });
  document.body.dataset.alphaPoints = alpha.length;
}

function renderBeta() {
  const svg = document.getElementById("beta-chart");
  const note = document.getElementById("beta-note");
  const current = state.decisions.length ? state.decisions[state.decisions.length - 1] : null;
  const a = current ? num(current.a) : null, b = current ? num(current.b) : null;
  if (a === null || b === null) {
    chart(svg, { series: [], empty: current ? "this controller draws no Beta policy" : "no decision yet" });
    note.textContent = state.run && state.run.controller ? `controller.kind=${state.run.controller}` : "";
    return;
  }
  const pts = [];
  for (let i = 1; i < 200; i++) pts.push([i / 200, betaPdf(i / 200, a, b)]);
  const top = Math.max(...pts.map((p) => p[1]));
  const run = state.run || {};
  const bands = num(run.alpha_min) !== null ? [{ x0: run.alpha_min, x1: run.alpha_max }] : [];
  chart(svg, {
    series: [{ name: `Beta(${fmt(a, 3)}, ${fmt(b, 3)})`, points: pts, fill: true, dots: false }],
    bands,
    x: [0, 1],
    y: [0, top * 1.1],
    xLabel: "α",
    yLabel: "density",
    vlines: num(current.alpha) !== null ? [{ x: current.alpha, label: `α = ${fmt(current.alpha, 3)}` }] : [],
  });
  const mean = a / (a + b), sd = Math.sqrt((a * b) / ((a + b) ** 2 * (a + b + 1)));
  note.textContent = `decision #${current.decision}: mean ${fmt(mean, 3)}, std ${fmt(sd, 3)}; shaded: [α_min, α_max]`;
}

function renderReward() {
  const scored = state.decisions.filter((d) => num(d.reward) !== null);
  const pick = (key) => scored.filter((d) => num(d[key]) !== null).map((d) => [d.decision, d[key]]);
  chart(document.getElementById("reward-chart"), {
    series: [
      { name: "R", points: pick("reward"), bars: true, color: COLORS[0] },
      { name: "G_lp", points: pick("g_lp"), color: COLORS[1] },
      { name: "G_gt", points: pick("g_gt"), color: COLORS[2] },
    ],
    integerX: true,
    xLabel: "decision",
    empty: state.decisions.length ? "no decision scored yet" : "no decision yet",
  });
}

function row(table, cells, tag = "td") {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement(tag);
    if (cell instanceof Node) td.appendChild(cell); else td.textContent = cell;
    tr.appendChild(td);
  }
  table.appendChild(tr);
  return tr;
}

function renderDecision() {
  const table = document.getElementById("decision");
  table.replaceChildren();
  const d = state.decisions.length ? state.decisions[state.decisions.length - 1] : null;
  const last = [...state.rows.values()].sort((x, y) => x.step - y.step).pop();
  const run = state.run || {};
  row(table, ["steps done", last ? `${last.step + 1} of ${run.total_steps ?? "?"}` : "–"]);
  if (!d) {
    row(table, ["decision", "none recorded (fixed exposure writes no timeline)"]);
    return;
  }
  const scored = [...state.decisions].reverse().find((x) => num(x.reward) !== null);
  const used = [...state.decisions].reverse().find((x) => num(x.advantage) !== null);
  row(table, ["decision", `#${d.decision}, steps ${d.first_step}–${d.last_step} (${d.status ?? ""})`]);
  row(table, ["α", fmt(d.alpha)]);
  row(table, ["Beta a, b", num(d.a) === null ? "–" : `${fmt(d.a)}, ${fmt(d.b)}`]);
  row(table, ["decisions taken", String(state.decisions.length)]);
  row(table, ["last reward R", scored ? `${fmt(scored.reward)} (decision #${scored.decision})` : "–"]);
  row(table, ["  G_lp, G_gt", scored ? `${fmt(scored.g_lp)}, ${fmt(scored.g_gt)}` : "–"]);
  row(table, ["last advantage", used ? `${fmt(used.advantage)} (decision #${used.decision})` : "–"]);
}

function sparkline(values) {
  const svg = el("svg", { viewBox: "0 0 160 22", preserveAspectRatio: "none" });
  const ys = values.filter((v) => v !== null);
  if (ys.length < 2) return svg;
  const lo = Math.min(...ys), hi = Math.max(...ys);
  const d = values.map((v, i) => (v === null ? null : [2 + (i / (values.length - 1)) * 156, 19 - ((v - lo) / (hi - lo || 1)) * 16]))
    .filter(Boolean).map(([x, y], i) => `${i ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`).join("");
  el("path", { d, fill: "none", stroke: COLORS[0], "stroke-width": 1.5 }, svg);
  return svg;
}

function renderFeatures() {
  const table = document.getElementById("features");
  table.replaceChildren();
  const withFeatures = state.decisions.filter((d) => d.features && typeof d.features === "object");
  if (!withFeatures.length) {
    row(table, ["no state features recorded"]);
    return;
  }
  row(table, ["feature", "value", "history"], "th");
  const names = Object.keys(withFeatures[withFeatures.length - 1].features);
  for (const name of names) {
    const history = withFeatures.map((d) => num(d.features[name]));
    const tr = row(table, [name, fmt(history[history.length - 1]), sparkline(history)]);
    tr.children[1].className = "num";
  }
  table.dataset.features = names.length;
}

function renderSteps() {
  chart(document.getElementById("loss-chart"), {
    series: [{ name: "loss", points: stepSeries("loss") }], integerX: true, xLabel: "step",
  });
  chart(document.getElementById("mismatch-chart"), {
    series: [
      { name: "token-mean KL", points: stepSeries("mismatch_kl"), color: COLORS[1] },
      { name: "top-1 disagreement", points: stepSeries("top1_disagree"), color: COLORS[3] },
    ],
    integerX: true, xLabel: "step",
  });
  const atK = (prefix) => {  // the eval/avg@k or eval/pass@j key of the largest k the rows hold
    const keys = new Set();
    for (const r of state.rows.values()) for (const key of Object.keys(r)) if (key.startsWith(prefix) && !key.endsWith("_ci95")) keys.add(key);
    return [...keys].sort((a, b) => Number(b.split("@")[1]) - Number(a.split("@")[1]))[0];
  };
  const avg = atK("eval/avg@"), pass = atK("eval/pass@");
  chart(document.getElementById("accuracy-chart"), {
    series: [
      { name: "rollout accuracy", points: stepSeries("accuracy"), color: COLORS[2] },
      avg && { name: `held-out ${avg.slice(5)}`, points: stepSeries(avg), color: COLORS[0] },
      pass && Number(pass.slice(10)) > 1 && { name: `held-out ${pass.slice(5)}`, points: stepSeries(pass), color: COLORS[3] },
    ].filter(Boolean),
    y: [0, 1], integerX: true, xLabel: "step",
  });
  chart(document.getElementById("guardrail-chart"), {
    series: [
      { name: "fork rate", points: stepSeries("fork_rate"), color: COLORS[3] },
      { name: "entropy", points: stepSeries("entropy"), color: COLORS[0] },
      { name: "entropy at forks", points: stepSeries("fork_entropy"), color: COLORS[1] },
    ].filter((s) => s.points.length),
    integerX: true, xLabel: "step",
  });
  chart(document.getElementById("length-chart"), {
    series: [
      { name: "rollouts", points: stepSeries("response_len"), color: COLORS[2] },
      { name: "held-out", points: stepSeries("eval/response_len"), color: COLORS[0] },
    ].filter((s) => s.points.length),
    integerX: true, xLabel: "step",
  });
  chart(document.getElementById("probe-chart"), {
    series: [
      { name: "probe NLL", points: stepSeries("probe_nll"), color: COLORS[4] },
      { name: "probe KL (α = 1 teacher)", points: stepSeries("probe_kl"), color: COLORS[0] },
    ].filter((s) => s.points.length),
    integerX: true, xLabel: "step",
  });
  chart(document.getElementById("gap-chart"), {
    series: [
      { name: "mean", points: stepSeries("rollout_logprob_gap_mean"), color: COLORS[0] },
      { name: "max", points: stepSeries("rollout_logprob_gap_max"), color: COLORS[3] },
      { name: "sync check", points: stepSeries("sync_logprob_gap"), color: COLORS[2] },
    ],
    integerX: true, xLabel: "step",
  });
}

function renderHeader() {
  const run = state.run || {};
  document.getElementById("run-name").textContent = run.run || "";
  const learned = run.controller && run.controller !== "fixed";
  const parts = [run.algorithm, run.model, run.controller && `controller ${run.controller}`, learned && `hold ${run.hold}`];
  document.getElementById("run-meta").textContent = parts.filter(Boolean).join(" · ");
  document.title = `atesd-ray · ${run.run || "run"}`;
}

function setStatus(err) {
  const status = document.getElementById("status");
  if (err) {
    status.className = "status stale";
    status.textContent = `disconnected: ${err.message} (the run may have finished)`;
    return;
  }
  const steps = state.rows.size;
  const age = state.lastData ? Math.round((Date.now() - state.lastData) / 1000) : null;
  status.className = steps ? "status live" : "status waiting";
  status.textContent = steps ? `${steps} steps · ${state.decisions.length} decisions · new data ${age} s ago` : "waiting for the first step";
}

function render() {
  renderHeader();
  renderAlpha();
  renderBeta();
  renderReward();
  renderDecision();
  renderFeatures();
  renderSteps();
  document.body.dataset.metricRows = state.rows.size;
  document.body.dataset.decisions = state.decisions.length;
  document.body.dataset.polls = state.polls;
}

poll();
