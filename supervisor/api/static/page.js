// modeld's status page: every model, live download progress, and the commands people use.
// Plain JS against modeld's own API (same origin); the token, when the daemon needs one, is
// asked once and kept in this tab's sessionStorage only.
"use strict";

const TOKEN_KEY = "modeld.token";
const REFRESH_MS = 2000;
const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELED"]);
const SUBPROTOCOL_SAFE = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/; // RFC 9110's token characters
const needsToken = document.documentElement.dataset.token === "required";
let token = sessionStorage.getItem(TOKEN_KEY);
const sockets = new Map(); // model id -> its progress WebSocket
const progress = new Map(); // model id -> its last progress message
let models = [];
let loadedById = new Map();
let refreshing = null;
let failures = 0; // refreshes in a row the daemon did not answer: polls back off up to 30 s

class NeedsToken extends Error {}

function $(id) { return document.getElementById(id); }

function formatBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 2 : 1)) + " " + units[i];
}

function formatDuration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  seconds = Math.max(0, Math.round(seconds));
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600);
  const m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s}s`;
  return `${s}s`;
}

function showMessage(text, isError) {
  const el = $("message");
  el.textContent = text;
  el.classList.toggle("error", Boolean(isError));
  el.hidden = !text;
}

function askToken(why) {
  // Polls keep coming while the question is open: they neither wipe its reason nor refocus.
  if (why !== undefined) $("token-error").textContent = why;
  if ($("token-form").hidden) {
    $("token-form").hidden = false;
    $("token").focus();
  }
  setConnection("token needed", "warn");
}

async function api(method, path, body) {
  if (needsToken && !token) {
    askToken();
    throw new NeedsToken();
  }
  const headers = {};
  if (token) headers.Authorization = "Bearer " + token;
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    askToken("That token was not accepted.");
    throw new NeedsToken();
  }
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  if (!response.ok) {
    throw new Error((data && data.message) || `${method} ${path}: HTTP ${response.status}`);
  }
  return data;
}

function setConnection(text, kind) {
  const el = $("connection");
  el.textContent = text;
  el.className = "pill " + (kind || "");
}

async function refresh() {
  if (refreshing) return refreshing;
  refreshing = (async () => {
    try {
      const [list, status] = await Promise.all([api("GET", "/models"), api("GET", "/status")]);
      models = list.iterable || [];
      loadedById = new Map((status.loaded || []).map((m) => [m.id, m]));
      renderSummary(status);
      renderModels();
      setConnection("connected", "ok");
      failures = 0;
    } catch (e) {
      if (!(e instanceof NeedsToken)) {
        setConnection("not answering", "bad");
        failures++;
      }
    } finally {
      refreshing = null;
    }
  })();
  return refreshing;
}

function renderSummary(status) {
  $("version").textContent = status.version ? "v" + status.version : "";
  $("uptime").textContent = formatDuration(status.uptimeSeconds);
  const loaded = status.loaded || [];
  const downloads = (status.downloads || []).length;
  $("loaded-count").textContent = String(loaded.length);
  $("loaded-names").textContent = [loaded.map((m) => m.id).join(", "),
    downloads ? `${downloads} downloading` : ""].filter(Boolean).join(" · ");
  const memory = status.memory || {};
  $("memory").textContent = formatBytes(memory.availableBytes);
  $("memory-total").textContent = memory.totalBytes ? `of ${formatBytes(memory.totalBytes)}` : "";
  const storage = status.storage || {};
  $("disk").textContent = formatBytes(storage.usedBytes);
  $("disk-free").textContent = storage.freeBytes !== undefined
    ? `${formatBytes(storage.freeBytes)} free` : "";
}

function stateOf(model) {
  const p = progress.get(model.id);
  if (p && !TERMINAL.has(p.status) && model.state === "absent") return "downloading";
  return model.state || (model.loaded ? "loaded" : model.downloaded ? "downloaded" : "absent");
}

function renderModels() {
  const container = $("models");
  const seen = new Set();
  for (const model of models) {
    seen.add(model.id);
    let row = container.querySelector(`[data-model="${CSS.escape(model.id)}"]`);
    if (!row) {
      row = $("model-row").content.firstElementChild.cloneNode(true);
      row.dataset.model = model.id;
      for (const button of row.querySelectorAll("button")) {
        button.addEventListener("click", () => command(model.id, button.dataset.action, button));
      }
      container.appendChild(row);
    }
    renderModel(row, model);
  }
  for (const row of [...container.children]) {
    if (!seen.has(row.dataset.model)) row.remove();
  }
  $("empty").hidden = models.length > 0;
}

function renderModel(row, model) {
  const state = stateOf(model);
  const loaded = loadedById.get(model.id);
  row.querySelector(".name").textContent = model.name || model.id;
  row.querySelector(".id").textContent = model.id;
  const partial = state === "absent" && model.partialBytes ? model.partialBytes : 0;
  const badge = row.querySelector(".state");
  badge.textContent = partial ? "partial" : state;
  badge.className = "state " + (partial ? "partial" : state);
  row.dataset.state = state;
  const size = model.bytes && model.bytes.value;
  row.querySelector(".size").textContent = formatBytes(size);
  row.querySelector(".runtime").textContent =
    [model.runtime, model.architecture].filter(Boolean).join(" · ") || "–";
  const rss = loaded ? loaded.rssBytes : model.residentBytes;
  row.querySelector(".memory").textContent = rss ? formatBytes(rss)
    : model.memoryEstimate ? "~" + formatBytes(model.memoryEstimate) : "–";
  row.querySelector(".expires").textContent = state !== "loaded" ? "–"
    : model.expiresAt ? "idle until " + new Date(model.expiresAt).toLocaleTimeString()
    : "only when asked";
  row.querySelector(".context").textContent = !loaded || !loaded.contextLength ? "–"
    : `${loaded.contextLength} · ${loaded.slotsBusy || 0}/${loaded.slots || 1} busy`;
  const error = row.querySelector(".error-text");
  error.textContent = model.error || "";
  error.hidden = !model.error;
  const note = row.querySelector(".note");
  note.textContent = partial ? `${formatBytes(partial)} downloaded so far; Resume goes on from there.` : "";
  note.hidden = !partial;
  row.querySelector('button[data-action="download"]').textContent = partial ? "Resume" : "Download";
  renderProgress(row, model, state);
  const can = {
    download: state === "absent",
    cancel: state === "downloading",
    load: state === "downloaded",
    unload: state === "loaded",
    delete: true,
  };
  for (const button of row.querySelectorAll("button")) {
    button.hidden = !can[button.dataset.action];
  }
  if (state === "downloading") watch(model.id);
}

function renderProgress(row, model, state) {
  const box = row.querySelector(".progress");
  const p = progress.get(model.id);
  const show = state === "downloading" || (p && p.status === "COMPLETED" && state === "downloaded");
  box.hidden = !p || !show;
  if (!p) return;
  const pct = Math.max(0, Math.min(100, p.percentage || 0));
  const bar = row.querySelector(".bar");
  bar.setAttribute("aria-valuenow", pct.toFixed(1));
  row.querySelector(".fill").style.width = pct + "%";
  const parts = [`${pct.toFixed(1)} %`];
  if (p.bytes !== undefined) parts.push(`${formatBytes(p.bytes)} of ${formatBytes(p.total)}`);
  if (p.bytesPerSecond) parts.push(formatBytes(p.bytesPerSecond) + "/s");
  if (p.etaSeconds && !TERMINAL.has(p.status)) parts.push(formatDuration(p.etaSeconds) + " left");
  if (p.retrying) parts.push(p.retrying);
  row.querySelector(".progress-text").textContent = parts.join(" · ");
}

function watch(id) {
  if (sockets.has(id)) return;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  let url = `${scheme}//${location.host}/model/${encodeURIComponent(id)}/download/progress`;
  // A browser cannot set headers on a WebSocket: the token goes as the `bearer.<token>`
  // subprotocol, or, when it holds characters a subprotocol may not (base64's "/" and "="),
  // as the `token` query parameter (modeld never logs query strings).
  const protocols = [];
  if (token && SUBPROTOCOL_SAFE.test(token)) protocols.push("bearer." + token);
  else if (token) url += "?token=" + encodeURIComponent(token);
  const socket = new WebSocket(url, protocols);
  sockets.set(id, socket);
  socket.onmessage = (event) => {
    let message;
    try { message = JSON.parse(event.data); } catch (e) { return; }
    progress.set(id, message);
    const row = document.querySelector(`[data-model="${CSS.escape(id)}"]`);
    const model = models.find((m) => m.id === id);
    if (row && model) renderProgress(row, model, TERMINAL.has(message.status) ? "downloaded" : "downloading");
    if (TERMINAL.has(message.status)) refresh();
  };
  socket.onclose = () => {
    sockets.delete(id);
    refresh();
  };
}

const COMMANDS = {
  download: (id) => api("POST", `/model/${encodeURIComponent(id)}/download`),
  cancel: (id) => api("POST", `/model/${encodeURIComponent(id)}/download/cancel`),
  load: (id) => api("POST", `/model/${encodeURIComponent(id)}/load`),
  unload: (id) => api("POST", `/model/${encodeURIComponent(id)}/unload`),
  delete: (id) => api("POST", `/models/${encodeURIComponent(id)}/delete`),
};

async function command(id, action, button) {
  if (action === "delete" && !confirm(`Delete ${id}? Its files are removed` +
      " (and its record, if it is a custom model).")) return;
  button.disabled = true;
  showMessage("");
  try {
    if (action === "download") progress.delete(id);
    await COMMANDS[action](id);
    if (action === "download") watch(id);
  } catch (e) {
    if (!(e instanceof NeedsToken)) showMessage(`${action} ${id}: ${e.message}`, true);
  } finally {
    button.disabled = false;
    refresh();
  }
}

$("token-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const value = $("token").value.trim();
  if (!value) return;
  token = value;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  $("token-error").textContent = "";
  $("token-form").hidden = true;
  await refresh();
});

async function poll() {
  await refresh();
  setTimeout(poll, Math.min(30000, REFRESH_MS * 2 ** failures));
}

poll();
