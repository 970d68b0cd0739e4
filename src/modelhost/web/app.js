// The modelhost dashboard: a client of the HTTP API, nothing more. No request leaves this
// server; every number shown comes from it. Each panel is a module under panels/.

import { api, onKeyNeeded, useKey } from "./api.js";
import { $, badge, toast } from "./ui.js";
import { FINAL, state } from "./state.js";
import * as cache from "./panels/cache.js";
import * as catalog from "./panels/catalog.js";
import * as downloads from "./panels/downloads.js";
import * as models from "./panels/models.js";
import * as pull from "./panels/pull.js";
import * as speak from "./panels/speak.js";
import * as tryit from "./panels/tryit.js";

let refreshing = null;

async function health() {
  const box = $("health");
  try {
    const h = await api("/health");
    $("version").textContent = "v" + (h.version || "?");
    box.replaceChildren(badge(h.status === "ok" ? "healthy" : h.status, h.status === "ok" ? "loaded" : "failed"),
      ` ${h.downloads_running} running · ${h.downloads_pending} queued`);
  } catch (err) {
    box.replaceChildren(badge("unreachable", "failed"), " " + err.message);
  }
}

async function load() {
  const [info, managed, available, jobs] = await Promise.all([
    api("/models/cache/info"), api("/models/managed"), api("/models/available"), api("/models/downloads"),
  ]);
  state.cache = info;
  state.installed = info.installed_models;
  state.loaded = new Map(managed.downloaded_models.map((m) => [m.name, m]));
  state.catalog = available.available_models;
  downloads.setJobs(jobs.downloads);
  models.render();
  downloads.render();
  cache.render();
  catalog.render();
  pull.render();
  speak.render();
  tryit.render();
  document.body.dataset.ready = "true";
}

/** Read everything again (one read at a time; a call meanwhile waits for a fresh one). */
export function refresh() {
  if (!refreshing) {
    refreshing = Promise.all([load(), health()]).finally(() => { refreshing = null; });
    return refreshing;
  }
  return refreshing.then(() => refresh());
}

function onEvent(data) {
  downloads.update(data);
  downloads.render();
  if (FINAL.includes(data.status) || data.phase === "loading") refresh().catch(toast);
}

// GET /events read with fetch (EventSource cannot send the Authorization header).
async function followEvents() {
  for (;;) {
    try {
      const response = await api("/events", { raw: true });
      $("live").replaceChildren(badge("live", "loaded"));
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = /\r?\n\r?\n/.exec(buffer))) { // sse-starlette ends lines with \r\n
          const block = buffer.slice(0, end.index); buffer = buffer.slice(end.index + end[0].length);
          const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
          if (data) onEvent(JSON.parse(data));
        }
      }
    } catch (err) { /* dropped: reconnect below */ }
    $("live").replaceChildren(badge("reconnecting", "pending"));
    await new Promise((r) => setTimeout(r, 1000));
    refresh().catch(() => {});
  }
}

onKeyNeeded(() => { $("key-form").hidden = false; $("key-input").focus(); });
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  $("key-form").hidden = true;
  useKey($("key-input").value);
});
const options = { refresh };
models.init(options);
downloads.init(options);
pull.init(options);
speak.init();
tryit.init();
refresh().catch(toast);
followEvents();
setInterval(() => { if (!document.hidden) refresh().catch(() => {}); }, 15000);
