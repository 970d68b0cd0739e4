// The modelhost dashboard: a client of the HTTP API, nothing more. No request leaves this
// server. The API key (when the server has one) is asked for once and kept in sessionStorage.
"use strict";

const KEY = "modelhost-api-key";
const COLORS = ["#3b6ea8", "#c0713b", "#4c9a5f", "#8a5aa8", "#b8a23a", "#3aa8a0", "#a83b5a"];
const jobs = new Map(); // download_id -> the job's latest event data
let keyWaiters = [];

function $(id) { return document.getElementById(id); }
function mb(bytes) { return bytes == null ? "?" : (bytes / 1e6).toFixed(1) + " MB"; }
function cell(row, text) { const td = row.insertCell(); td.textContent = text; return td; }
function button(td, label, action) {
  const b = document.createElement("button");
  b.textContent = label;
  b.addEventListener("click", () => action().catch(showError));
  td.appendChild(b);
  return b;
}
function showError(err) { const box = $("error"); box.textContent = err.message || String(err); box.hidden = false; }
function clearError() { $("error").hidden = true; }

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = sessionStorage.getItem(KEY);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// Resolves once the user has typed a key into the in-page form.
function askForKey() {
  $("key-form").hidden = false;
  $("key-input").focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

async function api(path, options) {
  options = options || {};
  for (;;) {
    const init = { method: options.method || "GET", headers: headers(options.headers) };
    if (options.json !== undefined) {
      init.body = JSON.stringify(options.json);
      init.headers["Content-Type"] = "application/json";
    }
    const response = await fetch(path, init);
    if (response.status === 401) { await askForKey(); continue; }
    if (!response.ok) {
      let message = "HTTP " + response.status;
      try { const body = await response.json(); message = body.message || message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    return options.raw ? response : response.json();
  }
}

async function refresh() {
  const [cache, managed, catalog] = await Promise.all([
    api("/models/cache/info"), api("/models/managed"), api("/models/available"),
  ]);
  const loaded = new Map(managed.downloaded_models.map((m) => [m.name, m]));
  renderInstalled(cache.installed_models, loaded);
  renderLoaded(managed.downloaded_models);
  renderCache(cache);
  renderSpeak(cache.installed_models);
  renderCatalog(catalog.available_models);
}

function renderInstalled(models, loaded) {
  const body = $("installed").tBodies[0];
  body.replaceChildren();
  for (const m of models) {
    const row = body.insertRow();
    row.dataset.name = m.name;
    cell(row, m.name);
    cell(row, m.source + ": " + m.model_id);
    cell(row, mb(m.size_bytes)).className = "size";
    cell(row, (m.revision || "").slice(0, 12));
    cell(row, loaded.has(m.name) ? "yes (" + loaded.get(m.name).device + ")" : "no").className = "loaded";
    const actions = row.insertCell();
    if (loaded.has(m.name)) {
      button(actions, "Unload", () => api(`/models/${m.name}/unload`, { method: "POST" }).then(refresh));
    } else {
      button(actions, "Load", () => api(`/models/${m.name}/load`, { method: "POST", json: {} }).then(refresh));
    }
    button(actions, "Delete", () => api(`/models/download/${m.name}`, { method: "DELETE" }).then(refresh));
  }
}

function renderLoaded(models) {
  const body = $("loaded").tBodies[0];
  body.replaceChildren();
  for (const m of models) {
    const row = body.insertRow();
    cell(row, m.name);
    cell(row, m.device);
    cell(row, m.memory_usage.allocated_mb.toFixed(1));
    cell(row, m.pinned ? "yes" : "no");
  }
}

// One bar: each model's share of the disk, then the free space.
function renderCache(cache) {
  const svg = $("cache-chart"), legend = $("cache-legend");
  svg.replaceChildren(); legend.replaceChildren();
  const parts = cache.installed_models.map((m, i) => [m.name, m.size_bytes, COLORS[i % COLORS.length]]);
  parts.push(["free disk", cache.disk_free_bytes, "#d8dce2"]);
  const total = parts.reduce((sum, p) => sum + p[1], 0) || 1;
  let x = 0;
  for (const [name, bytes, color] of parts) {
    const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    const width = (100 * bytes) / total;
    rect.setAttribute("x", x + "%"); rect.setAttribute("width", Math.max(width, 0.2) + "%");
    rect.setAttribute("y", 0); rect.setAttribute("height", 40); rect.setAttribute("fill", color);
    const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
    title.textContent = name + ": " + mb(bytes);
    rect.appendChild(title); svg.appendChild(rect);
    x += width;
    const item = document.createElement("li");
    const swatch = document.createElement("span"); swatch.style.background = color;
    item.append(swatch, name + " " + mb(bytes));
    legend.appendChild(item);
  }
  $("cache-summary").textContent = `${cache.total_models} models, ${mb(cache.total_size_bytes)} in ${cache.cache_directory}; ${mb(cache.disk_free_bytes)} free`;
}

function renderSpeak(models) {
  const select = $("speak-model"), chosen = select.value;
  select.replaceChildren();
  for (const m of models.filter((m) => m.is_tts)) {
    const option = document.createElement("option");
    option.value = option.textContent = m.name;
    select.appendChild(option);
  }
  if (chosen) select.value = chosen;
}

function renderCatalog(entries) {
  const body = $("catalog").tBodies[0];
  body.replaceChildren();
  for (const [name, entry] of Object.entries(entries)) {
    const row = body.insertRow();
    row.dataset.name = name;
    cell(row, name);
    cell(row, entry.source + ": " + entry.model_id);
    cell(row, entry.task || "");
    cell(row, entry.description || "");
    const actions = row.insertCell();
    if (entry.installed) { actions.textContent = "installed"; continue; }
    button(actions, "Install", async () => {
      const answer = await api("/models/download", { method: "POST", json: entry.download_request });
      if (answer.download_id && answer.status !== "already_exists") {
        jobs.set(answer.download_id, Object.assign({ download_id: answer.download_id, phase: "pending", files: [] }, answer));
        renderDownloads();
      }
      await refresh();
    });
  }
}

function renderDownloads() {
  const box = $("downloads");
  box.replaceChildren();
  if (!jobs.size) { box.innerHTML = '<p class="empty">No download running.</p>'; return; }
  for (const job of jobs.values()) {
    const div = document.createElement("div");
    div.className = "job"; div.dataset.id = job.download_id; div.dataset.status = job.status;
    const head = document.createElement("div");
    const speed = job.speed_bytes_per_s ? ` · ${mb(job.speed_bytes_per_s)}/s` : "";
    const eta = job.eta != null ? ` · ETA ${Math.round(job.eta)} s` : "";
    head.textContent = `${job.model_name} — ${job.phase || job.status} · ${mb(job.bytes_downloaded)} of ${mb(job.bytes_total)}${speed}${eta}`;
    const bar = document.createElement("progress");
    bar.max = 100; bar.value = job.progress || 0; bar.className = "total";
    div.append(head, bar);
    if (!["completed", "failed", "cancelled"].includes(job.status)) {
      button(div, "Cancel", () => api(`/models/download/${job.download_id}/cancel`, { method: "POST" }));
    } else {
      const end = document.createElement("div"); end.className = "message"; end.textContent = job.message;
      div.appendChild(end);
    }
    for (const f of job.files || []) {
      const line = document.createElement("div"); line.className = "file";
      const fileBar = document.createElement("progress");
      fileBar.max = f.bytes_total || 1; fileBar.value = f.bytes_downloaded;
      line.append(f.path + " (" + f.status + ") ", fileBar);
      div.appendChild(line);
    }
    box.appendChild(div);
  }
}

function onEvent(data) {
  jobs.set(data.download_id, data);
  renderDownloads();
  if (["completed", "failed", "cancelled"].includes(data.status)) refresh().catch(showError);
}

// GET /events read with fetch (EventSource cannot send the Authorization header).
async function followEvents() {
  for (;;) {
    try {
      const response = await api("/events", { raw: true });
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0 || (end = buffer.indexOf("\r\n\r\n")) >= 0) {
          const block = buffer.slice(0, end); buffer = buffer.slice(end + 2).replace(/^\n/, "");
          const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
          if (data) onEvent(JSON.parse(data));
        }
      }
    } catch (err) { /* dropped: reconnect below */ }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

async function speak(event) {
  event.preventDefault();
  clearError();
  const response = await api("/synthesize", {
    method: "POST", raw: true, json: { model_name: $("speak-model").value, text: $("speak-text").value },
  });
  const blob = await response.blob();
  const audio = $("speak-audio");
  audio.src = URL.createObjectURL(blob);
  audio.play().catch(() => { /* no sound device: the audio stays playable by hand */ });
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("key-input").value);
  $("key-form").hidden = true;
  const waiters = keyWaiters; keyWaiters = [];
  waiters.forEach((resolve) => resolve());
});
$("speak-form").addEventListener("submit", (event) => speak(event).catch(showError));
api("/health").then((h) => { $("version").textContent = "v" + (h.version || ""); }).catch(() => {});
refresh().catch(showError);
followEvents();
