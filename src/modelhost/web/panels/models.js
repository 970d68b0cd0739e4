// Installed models with their state (loaded on a device, not loaded, failed to load and
// why), and the loaded models' measured memory.

import { api } from "../api.js";
import { $, badge, button, el, mb, toast } from "../ui.js";
import { loadFailure, state } from "../state.js";

const COMPACT = new Intl.NumberFormat("en", { notation: "compact", maximumFractionDigits: 1 });
let refresh = async () => {};

export function init(options) { refresh = options.refresh; }

function stateCell(m) {
  const td = el("td", { className: "state" });
  const loaded = state.loaded.get(m.name);
  if (loaded) {
    td.append(badge("loaded", "loaded"), el("span", { className: "device" }, " on " + loaded.device));
    if (loaded.operation) td.append(" ", badge(loaded.operation, "downloading"));
    return td;
  }
  const reason = loadFailure(m.name);
  if (reason) {
    td.append(badge("failed to load", "failed"), el("div", { className: "reason" }, reason));
    return td;
  }
  td.append(badge("not loaded", "installed"));
  return td;
}

async function load(name) {
  try {
    await api(`/models/${encodeURIComponent(name)}/load`, { method: "POST", json: {} });
    state.loadErrors.delete(name);
    state.loadedHere.add(name);
  } catch (err) {
    state.loadErrors.set(name, err.message);
    toast(err);
  }
  await refresh();
}

async function unload(name) {
  await api(`/models/${encodeURIComponent(name)}/unload`, { method: "POST" });
  await refresh();
}

async function remove(name) {
  await api(`/models/download/${encodeURIComponent(name)}`, { method: "DELETE" });
  state.loadErrors.delete(name);
  await refresh();
}

export function render() {
  const body = $("installed").tBodies[0];
  body.replaceChildren();
  $("installed-empty").hidden = state.installed.length > 0;
  for (const m of state.installed) {
    const loaded = state.loaded.get(m.name);
    const row = body.insertRow();
    row.dataset.name = m.name;
    row.append(
      el("td", { className: "name" }, el("strong", {}, m.name)),
      el("td", { className: "source" }, el("code", {}, `${m.source}:${m.model_id}`)),
      el("td", { className: "task" }, m.task || (loaded && loaded.task) || "—"),
      el("td", { className: "size num" }, mb(m.size_bytes)),
      el("td", { className: "revision" }, el("code", {}, (m.revision || "").slice(0, 12))),
      stateCell(m),
    );
    const actions = el("td", { className: "actions" });
    if (loaded) actions.append(button("Unload", () => unload(m.name)));
    else actions.append(button("Load", () => load(m.name), { className: "primary" }));
    actions.append(button("Delete", () => remove(m.name), { className: "danger" }));
    row.append(actions);
  }
  renderLoaded();
}

function renderLoaded() {
  const body = $("loaded").tBodies[0];
  body.replaceChildren();
  $("loaded-empty").hidden = state.loaded.size > 0;
  for (const m of state.loaded.values()) {
    const row = body.insertRow();
    row.dataset.name = m.name;
    row.append(
      el("td", {}, el("strong", {}, m.name)),
      el("td", {}, m.family || ""),
      el("td", {}, m.device),
      el("td", { className: "num memory" }, m.memory_usage.allocated_mb.toFixed(1) + " MB"),
      el("td", { className: "num", title: (m.parameters || 0).toLocaleString() },
        COMPACT.format(m.parameters || 0)),
      el("td", {}, m.pinned ? badge("pinned", "loaded") : ""),
    );
  }
}
