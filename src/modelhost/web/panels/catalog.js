// The catalog (GET /models/available), an Install button per entry.

import { $, badge, button, el, mb } from "../ui.js";
import { state } from "../state.js";
import { pull } from "./pull.js";

export function render() {
  const body = $("catalog").tBodies[0];
  body.replaceChildren();
  for (const [name, entry] of Object.entries(state.catalog)) {
    const row = body.insertRow();
    row.dataset.name = name;
    const actions = el("td", { className: "actions" });
    if (entry.installed) actions.append(badge("installed", "loaded"));
    else actions.append(button("Install", () => pull(Object.assign({}, entry.download_request)), { className: "primary" }));
    row.append(
      el("td", {}, el("strong", {}, name)),
      el("td", {}, el("code", {}, `${entry.source}:${entry.model_id}`)),
      el("td", {}, entry.task || ""),
      el("td", { className: "num" }, entry.size_mb != null ? mb(entry.size_mb * 1e6) : "—"),
      el("td", { className: "description" }, entry.description || ""),
      actions,
    );
  }
}
