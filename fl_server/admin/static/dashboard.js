// The dashboard page: one EventSource on /events; each message is the newest Status
// snapshot ({ok, error, status}). Everything the server sends is shown with
// textContent (a hospital's refusal reason is text from outside, never markup).
"use strict";

const QUALITY = ["eval_accuracy", "eval_auroc", "fed_accuracy", "fed_auroc"];
const LOSS = ["train_loss", "eval_loss", "fed_loss"];
const COLORS = ["#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2", "#65a30d",
                "#dc2626", "#4b5563", "#ca8a04"];
const charts = {};
const state = { snapshots: 0, last: null };
window.dashboard = { charts, state };

function $(id) { return document.getElementById(id); }

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function fmt(value, digits) {
  if (value === undefined || value === null || value === "" || Number.isNaN(Number(value))) return "-";
  return Number(value).toFixed(digits);
}

function lineChart(id, yTitle, type) {
  return new Chart($(id), {
    type: type || "line",
    data: { labels: [], datasets: [] },
    options: {
      animation: false, responsive: true, maintainAspectRatio: false, spanGaps: true,
      interaction: { mode: "index", intersect: false },
      plugins: { legend: { position: "bottom", labels: { boxWidth: 10, font: { size: 10 } } } },
      scales: { x: { title: { display: true, text: "round" } },
                y: { title: { display: !!yTitle, text: yTitle || "" }, beginAtZero: type === "bar" } },
    },
  });
}

function setSeries(chart, labels, series) {
  chart.data.labels = labels;
  chart.data.datasets = series.map((s, i) => ({
    label: s.label, data: s.data, borderColor: COLORS[i % COLORS.length],
    backgroundColor: COLORS[i % COLORS.length] + (chart.config.type === "bar" ? "99" : "33"),
    pointRadius: 3, borderWidth: 2, tension: 0.15,
  }));
  chart.update("none");
}

function completedRounds(status) {
  return (status.rounds || []).filter((r) => r.state === "completed");
}

function drawCharts(status) {
  const rounds = completedRounds(status);
  const labels = rounds.map((r) => String(r.round));
  const metric = (name) => rounds.map((r) => (name in (r.metrics || {}) ? r.metrics[name] : null));
  const present = (names) => names.filter((n) => rounds.some((r) => n in (r.metrics || {})));
  setSeries(charts.loss, labels, present(LOSS).map((n) => ({ label: n, data: metric(n) })));
  setSeries(charts.quality, labels, present(QUALITY).map((n) => ({ label: n, data: metric(n) })));
  setSeries(charts.time, labels, [{ label: "seconds", data: rounds.map((r) => r.seconds) }]);
  const hospitals = new Set();
  rounds.forEach((r) => Object.keys(r.client_epsilon || {}).forEach((h) => hospitals.add(h)));
  const series = [...hospitals].sort().map((h) => ({
    label: h, data: rounds.map((r) => (h in (r.client_epsilon || {}) ? r.client_epsilon[h] : null)),
  }));
  setSeries(charts.epsilon, labels, series);
}

function bar(fraction, text, extraClass) {
  const cell = el("td");
  const outer = el("span", null, "bar" + (extraClass ? " " + extraClass : ""));
  const inner = el("i");
  inner.style.width = Math.max(0, Math.min(100, fraction * 100)).toFixed(1) + "%";
  outer.appendChild(inner);
  cell.appendChild(outer);
  cell.appendChild(el("span", text, "bar-text"));
  return cell;
}

function ago(nowMs, thenMs) {
  const then = Number(thenMs || 0);
  if (!then) return "-";
  const s = Math.max(0, (nowMs - then) / 1000);
  return s < 90 ? s.toFixed(0) + " s ago" : (s / 60).toFixed(0) + " min ago";
}

function drawHospitals(status) {
  const body = $("hospitals").querySelector("tbody");
  const now = Number(status.now_unix_ms || Date.now());
  const rows = (status.clients || []).map((c) => {
    const tr = el("tr");
    tr.dataset.hospital = c.client_id;
    tr.appendChild(el("td", c.client_id));
    tr.appendChild(el("td", c.connected ? "yes" : "no", c.connected ? "yes" : "no"));
    tr.appendChild(el("td", ago(now, c.last_seen_unix_ms)));
    tr.appendChild(el("td", c.phase || "-"));
    const total = Number(c.upload_chunks_total || 0);
    const done = Number(c.upload_chunks_done || 0);
    tr.appendChild(total ? bar(done / total, done + "/" + total) : el("td", "-"));
    tr.appendChild(el("td", c.updates_accepted, "num"));
    tr.appendChild(el("td", c.refusals, "num"));
    const spent = Number(c.epsilon_total || 0);
    const budget = Number(c.epsilon_budget || 0);
    if (budget > 0) {
      const f = spent / budget;
      tr.appendChild(bar(f, fmt(spent, 2) + " / " + fmt(budget, 2), f >= 1 ? "full" : f >= 0.8 ? "warn" : ""));
    } else {
      tr.appendChild(el("td", fmt(spent, 2) + " / -"));
    }
    tr.appendChild(el("td", c.last_report_status || "-"));
    return tr;
  });
  body.replaceChildren(...rows);
}

function drawRounds(status) {
  const body = $("rounds").querySelector("tbody");
  const rows = [...(status.rounds || [])].reverse().map((r) => {
    const tr = el("tr");
    tr.dataset.round = r.round;
    tr.dataset.state = r.state;
    const m = r.metrics || {};
    [r.round, r.state, r.selected, r.reported, r.failed].forEach((v) => tr.appendChild(el("td", v)));
    tr.appendChild(el("td", fmt(r.seconds, 2), "num"));
    tr.appendChild(el("td", fmt(m.train_loss, 4), "num"));
    tr.appendChild(el("td", fmt(m.eval_accuracy ?? m.fed_accuracy, 4), "num"));
    tr.appendChild(el("td", fmt(m.eval_auroc ?? m.fed_auroc, 4), "num"));
    return tr;
  });
  body.replaceChildren(...rows);
}

function drawEvents(status) {
  const items = (status.events || []).map((e) => {
    const li = el("li");
    const when = new Date(Number(e.unix_ms || 0));
    li.appendChild(el("span", when.toLocaleTimeString(), "when"));
    li.appendChild(el("span", e.kind, "kind " + e.kind));
    if (e.client_id) li.appendChild(el("span", e.client_id + ": "));
    li.appendChild(el("span", e.message));
    return li;
  });
  $("events").replaceChildren(...items);
}

function draw(snapshot) {
  state.snapshots += 1;
  state.last = snapshot;
  const link = $("link");
  link.textContent = snapshot.ok ? "live" : "server unreachable";
  link.className = "link " + (snapshot.ok ? "ok" : "bad");
  const error = $("error");
  error.hidden = snapshot.ok;
  error.textContent = snapshot.ok ? "" : "Status failed: " + snapshot.error;
  const status = snapshot.status;
  if (!status) return;
  $("job-id").textContent = status.job_id;
  $("model-type").textContent = status.model_type;
  $("strategy").textContent = status.strategy;
  $("job-state").textContent = status.job_state;
  $("round").textContent = status.round + " / " + status.total_rounds;
  $("phase").textContent = status.phase + " (" + fmt(status.phase_seconds, 0) + " s)";
  const done = completedRounds(status);
  $("rounds-completed").textContent = String(done.length);
  document.body.dataset.roundsCompleted = String(done.length);
  drawCharts(status);
  drawHospitals(status);
  drawRounds(status);
  drawEvents(status);
}

function connect() {
  const source = new EventSource("events");
  source.onmessage = (event) => draw(JSON.parse(event.data));
  source.onerror = () => {
    const link = $("link");
    link.textContent = "reconnecting";
    link.className = "link bad";
  };
}

document.addEventListener("DOMContentLoaded", () => {
  Chart.defaults.font.size = 11;
  charts.loss = lineChart("chart-loss", "loss");
  charts.quality = lineChart("chart-quality", "");
  charts.time = lineChart("chart-time", "seconds", "bar");
  charts.epsilon = lineChart("chart-epsilon", "epsilon");
  connect();
});
