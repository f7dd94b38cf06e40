// Keel's live dashboard: incremental table subscriptions over GraphQL (graphql-transport-ws),
// drawn on canvases once a second, and a SQL console on POST /v1/sql. No dependencies.
"use strict";

const HISTORY = 120; // seconds of history in the line charts
const COLORS = ["#4fb3ff", "#6bdc8b", "#ffb74f", "#ff6b6b", "#c792ea", "#4fd6d0", "#f78fb3", "#d4d46b"];

const $ = (id) => document.getElementById(id);
const state = {
  token: sessionStorage.getItem("keel-token") || "",
  socket: null,
  acked: false,
  retry: 0,
  tables: { streams: new Map(), nodes: new Map(), viewers_by_country: new Map() },
  epoch: null,
  events: 0,
  rate: [],
  viewers: new Map(), // stream name -> [viewers per second]
};

function setStatus(text, kind) {
  const status = $("status");
  status.textContent = text;
  status.className = "status " + (kind || "");
}

// ---- sign-in ---------------------------------------------------------------------------

function signIn(token) {
  state.token = token.trim();
  if (!state.token) {
    $("signin-error").textContent = "Paste a token first.";
    return;
  }
  sessionStorage.setItem("keel-token", state.token);
  $("signin-error").textContent = "";
  connect();
}

function signOut() {
  sessionStorage.removeItem("keel-token");
  state.token = "";
  if (state.socket) state.socket.close(1000, "signed out");
  state.socket = null;
  $("board").hidden = true;
  $("signin-panel").hidden = false;
  $("signout").hidden = true;
  setStatus("signed out");
}

// ---- live tables over graphql-transport-ws ---------------------------------------------

const SUBSCRIPTIONS = {
  streams: 'subscription { liveTable(table: "streams") { epoch kind rows changes { diff row } } }',
  nodes: 'subscription { liveTable(table: "nodes") { epoch kind rows changes { diff row } } }',
  viewers_by_country:
    'subscription { liveTable(table: "viewers_by_country") { epoch kind rows changes { diff row } } }',
  firehose: "subscription { liveFirehose { type missed } }",
};

function connect() {
  if (state.socket) state.socket.close(1000, "reconnecting");
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/graphql";
  const socket = new WebSocket(url, "graphql-transport-ws");
  state.socket = socket;
  state.acked = false;
  setStatus("connecting…");
  socket.onopen = () => {
    socket.send(JSON.stringify({ type: "connection_init", payload: { Authorization: "Bearer " + state.token } }));
  };
  socket.onmessage = (message) => onMessage(socket, JSON.parse(message.data));
  socket.onclose = (close) => {
    if (state.socket !== socket) return;
    if (!state.acked) {
      // Refused at connection_init: the token is bad, expired or over its tenant's limit.
      $("board").hidden = true;
      $("signin-panel").hidden = false;
      $("signin-error").textContent = "Token refused: " + (close.reason || "code " + close.code);
      setStatus("token refused", "bad");
      return;
    }
    // The server went away after we were in: try again with backoff.
    state.retry = Math.min(state.retry + 1, 6);
    setStatus("disconnected; retrying…", "bad");
    setTimeout(() => state.token && state.socket === socket && connect(), 500 * 2 ** state.retry);
  };
}

function onMessage(socket, message) {
  switch (message.type) {
    case "connection_ack":
      state.acked = true;
      state.retry = 0;
      $("signin-panel").hidden = true;
      $("board").hidden = false;
      $("signout").hidden = false;
      setStatus("live", "live");
      for (const [id, query] of Object.entries(SUBSCRIPTIONS)) {
        socket.send(JSON.stringify({ id, type: "subscribe", payload: { query } }));
      }
      break;
    case "next":
      onNext(message.id, message.payload);
      break;
    case "error":
      setStatus("subscription " + message.id + " failed: " + JSON.stringify(message.payload), "bad");
      break;
    case "ping":
      socket.send(JSON.stringify({ type: "pong" }));
      break;
  }
}

function onNext(id, payload) {
  if (payload.errors && payload.errors.length) {
    const error = payload.errors[0];
    if (id === "firehose" && error.extensions && error.extensions.code === "LAGGED") return;
    setStatus(id + ": " + error.message, "bad");
    return;
  }
  if (id === "firehose") {
    const event = payload.data.liveFirehose;
    state.events += event.missed ? event.missed : 1;
    return;
  }
  const update = payload.data.liveTable;
  const rows = state.tables[id];
  if (update.kind === "SNAPSHOT") {
    rows.clear();
    for (const row of update.rows) add(rows, row, 1);
  } else {
    for (const change of update.changes) add(rows, change.row, change.diff);
  }
  if (update.epoch !== null && (state.epoch === null || update.epoch > state.epoch)) state.epoch = update.epoch;
}

// A multiset of rows keyed by their JSON text: a change removes or adds whole rows.
function add(rows, row, diff) {
  const key = JSON.stringify(row);
  const entry = rows.get(key) || { row, count: 0 };
  entry.count += diff;
  if (entry.count === 0) rows.delete(key);
  else rows.set(key, entry);
}

function rowsOf(name) {
  const out = [];
  for (const { row, count } of state.tables[name].values()) for (let i = 0; i < count; i++) out.push(row);
  return out;
}

// ---- drawing ---------------------------------------------------------------------------

function tick() {
  if (!state.acked) return;
  const streams = rowsOf("streams");
  const nodes = rowsOf("nodes");
  const countries = rowsOf("viewers_by_country");
  const viewersNow = streams.reduce((sum, s) => sum + (s.current_viewers || 0), 0);
  $("streams-live").textContent = streams.filter((s) => s.status === "live").length;
  $("viewers-now").textContent = viewersNow;
  $("node-count").textContent = nodes.length;
  $("epoch").textContent = state.epoch === null ? "–" : state.epoch;

  state.rate.push(state.events);
  state.events = 0;
  if (state.rate.length > HISTORY) state.rate.shift();
  $("event-rate").textContent = state.rate[state.rate.length - 1];

  const top = [...streams].sort((a, b) => b.current_viewers - a.current_viewers).slice(0, COLORS.length);
  const seen = new Set(top.map((s) => s.internal_name));
  for (const s of top) {
    if (!state.viewers.has(s.internal_name)) state.viewers.set(s.internal_name, []);
  }
  for (const [name, points] of state.viewers) {
    const stream = streams.find((s) => s.internal_name === name);
    points.push(stream ? stream.current_viewers : 0);
    if (points.length > HISTORY) points.shift();
    if (!seen.has(name) && points.every((p) => p === 0)) state.viewers.delete(name);
  }
  lineChart($("chart-viewers"), [...state.viewers].filter(([n]) => seen.has(n)).map(([name, points]) => ({ name, points })));
  lineChart($("chart-rate"), [{ name: "events/s", points: state.rate }]);
  barChart(
    $("chart-nodes"),
    nodes.map((n) => ({ label: n.node_id, value: n.cpu_percent || 0 })).sort((a, b) => b.value - a.value).slice(0, 12),
    100,
  );
  const byCountry = new Map();
  for (const c of countries) byCountry.set(c.country_code || "??", (byCountry.get(c.country_code || "??") || 0) + (c.current_viewers || 0));
  barChart(
    $("chart-countries"),
    [...byCountry].map(([label, value]) => ({ label, value })).sort((a, b) => b.value - a.value).slice(0, 10),
  );
}

function frame(canvas) {
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  g.font = "11px system-ui, sans-serif";
  return g;
}

function lineChart(canvas, series) {
  const g = frame(canvas);
  const left = 40, bottom = canvas.height - 18, top = 10, right = canvas.width - 110;
  const max = Math.max(1, ...series.flatMap((s) => s.points));
  g.strokeStyle = "#2a3442";
  g.fillStyle = "#8a96a6";
  for (let i = 0; i <= 4; i++) {
    const y = bottom - ((bottom - top) * i) / 4;
    g.beginPath(); g.moveTo(left, y); g.lineTo(right, y); g.stroke();
    g.fillText(String(Math.round((max * i) / 4)), 4, y + 4);
  }
  series.forEach((s, index) => {
    const color = COLORS[index % COLORS.length];
    g.strokeStyle = color;
    g.lineWidth = 2;
    g.beginPath();
    s.points.forEach((p, i) => {
      const x = right - ((s.points.length - 1 - i) * (right - left)) / (HISTORY - 1);
      const y = bottom - ((bottom - top) * p) / max;
      if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
    });
    g.stroke();
    g.lineWidth = 1;
    g.fillStyle = color;
    g.fillText(s.name.slice(0, 16), right + 8, top + 12 + index * 14);
  });
}

function barChart(canvas, bars, fixedMax) {
  const g = frame(canvas);
  const max = fixedMax || Math.max(1, ...bars.map((b) => b.value));
  const rowHeight = Math.min(22, (canvas.height - 10) / Math.max(1, bars.length));
  bars.forEach((b, i) => {
    const y = 5 + i * rowHeight;
    const width = ((canvas.width - 190) * Math.min(b.value, max)) / max;
    g.fillStyle = "#8a96a6";
    g.fillText(String(b.label).slice(0, 18), 4, y + rowHeight * 0.7);
    g.fillStyle = COLORS[0];
    g.fillRect(120, y + 2, Math.max(1, width), rowHeight - 5);
    g.fillStyle = "#dde3ea";
    g.fillText(Number.isInteger(b.value) ? String(b.value) : b.value.toFixed(1), 126 + width, y + rowHeight * 0.7);
  });
}

// ---- routing scores (GraphQL nodes, polled) ----------------------------------------------

const SCORES =
  "{ nodes { nodeId score { cpu ram bw staticTotal pendingViewers eligible reason } } }";

async function pollScores() {
  if (!state.token) return;
  try {
    const response = await fetch("/graphql", {
      method: "POST",
      headers: { Authorization: "Bearer " + state.token, "Content-Type": "application/json" },
      body: JSON.stringify({ query: SCORES }),
    });
    const body = await response.json();
    const nodes = (body.data && body.data.nodes) || [];
    const rows = nodes
      .filter((n) => n.score)
      .map((n) => ({
        node: n.nodeId,
        score: n.score.staticTotal,
        cpu: n.score.cpu,
        ram: n.score.ram,
        bw: n.score.bw,
        pending: n.score.pendingViewers,
        routable: n.score.eligible ? "yes" : "no (" + n.score.reason + ")",
      }))
      .sort((a, b) => b.score - a.score);
    $("scores").replaceChildren(table(rows));
  } catch (error) {
    $("scores").textContent = String(error);
  }
}

// ---- SQL console -----------------------------------------------------------------------

async function runSql() {
  $("sql-error").textContent = "";
  const result = $("sql-result");
  result.textContent = "running…";
  try {
    const response = await fetch("/v1/sql", {
      method: "POST",
      headers: { Authorization: "Bearer " + state.token, "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify({ sql: $("sql").value }),
    });
    const body = await response.json();
    if (!response.ok) {
      result.textContent = "";
      $("sql-error").textContent = (body.error && body.error.message) || response.statusText;
      return;
    }
    result.replaceChildren(table(body));
  } catch (error) {
    result.textContent = "";
    $("sql-error").textContent = String(error);
  }
}

function table(rows) {
  const element = document.createElement("table");
  element.dataset.rows = rows.length;
  if (rows.length === 0) {
    element.textContent = "(no rows)";
    return element;
  }
  const columns = Object.keys(rows[0]);
  const head = element.createTHead().insertRow();
  for (const c of columns) head.appendChild(document.createElement("th")).textContent = c;
  const body = element.createTBody();
  for (const row of rows) {
    const tr = body.insertRow();
    for (const c of columns) tr.insertCell().textContent = row[c] === null ? "" : String(row[c]);
  }
  return element;
}

// ---- wiring ----------------------------------------------------------------------------

$("signin").addEventListener("click", () => signIn($("token").value));
$("signout").addEventListener("click", signOut);
$("run-sql").addEventListener("click", runSql);
setInterval(tick, 1000);
setInterval(pollScores, 2000);
if (state.token) connect();
