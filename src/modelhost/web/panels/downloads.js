// Downloads: every job GET /models/downloads lists (running, completed, failed, cancelled,
// with the server's message), the running ones moving with GET /events.

import { api } from "../api.js";
import { $, badge, bar, button, el, mb, when } from "../ui.js";
import { FINAL, state } from "../state.js";

const STATUS_BADGE = {
  completed: "completed", failed: "failed", cancelled: "cancelled",
  pending: "pending", downloading: "downloading", loading: "downloading",
};

let refresh = async () => {};

export function init(options) { refresh = options.refresh; }

/** Replace the jobs with the server's list (keeps live data of jobs the list lacks). */
export function setJobs(list) {
  const next = new Map();
  for (const job of list) {
    const seen = state.jobs.get(job.download_id);
    // The SSE copy of a running job has its files; the list's has not.
    next.set(job.download_id, seen && !FINAL.includes(job.status) ? Object.assign({}, seen, job, { files: seen.files }) : job);
  }
  for (const [id, job] of state.jobs) if (!next.has(id) && !FINAL.includes(job.status)) next.set(id, job);
  state.jobs = next;
}

export function update(job) {
  const before = state.jobs.get(job.download_id);
  state.jobs.set(job.download_id, Object.assign({}, before || {}, job));
}

/** Whether Retry applies: the model's latest job, ended without installing it. */
function retryable(job) {
  if (job.status === "completed" || state.installed.some((m) => m.name === job.model_name)) return false;
  return ![...state.jobs.values()].some((other) => other.model_name === job.model_name &&
    (other.created_at || "") > (job.created_at || ""));
}

function jobCard(job) {
  const live = !FINAL.includes(job.status);
  const card = el("div", { className: "job " + (live ? "live" : "ended"), dataset: { id: job.download_id, status: job.status } });
  const head = el("div", { className: "job-head" },
    el("strong", { className: "job-name" }, job.model_name || "?"),
    badge(job.status, STATUS_BADGE[job.status] || "pending"),
    live && job.phase && job.phase !== job.status ? badge(job.phase, "pending") : null,
    el("code", { className: "job-id" }, `${job.source || ""}:${job.model_id || ""}`),
  );
  const meta = [];
  if (job.status === "completed") meta.push(mb(job.bytes_total));
  else if (job.bytes_total != null) meta.push(`${mb(job.bytes_downloaded)} of ${mb(job.bytes_total)}`);
  else meta.push(job.bytes_downloaded ? `${mb(job.bytes_downloaded)} (size unknown)` : live ? "size unknown" : "nothing downloaded");
  if (live && job.speed_bytes_per_s) meta.push(`${mb(job.speed_bytes_per_s)}/s`);
  if (live && job.eta != null) meta.push(`ETA ${Math.round(job.eta)} s`);
  meta.push((job.finished_at ? "ended " + when(job.finished_at) : "started " + when(job.created_at)));
  card.append(head, el("div", { className: "job-meta" }, meta.join(" · ")));
  if (live) {
    card.append(bar(job.progress, "total"));
    const actions = el("div", { className: "job-actions" },
      button("Cancel", () => api(`/models/download/${job.download_id}/cancel`, { method: "POST" }), { className: "danger" }));
    card.append(actions);
    for (const f of job.files || []) {
      const percent = f.bytes_total ? (100 * f.bytes_downloaded) / f.bytes_total : 0;
      card.append(el("div", { className: "file" },
        el("span", { className: "file-path" }, f.path),
        el("span", { className: "file-status" }, f.status),
        bar(percent, "file-bar")));
    }
  } else {
    card.append(el("div", { className: "message " + job.status }, job.message || ""));
    if (retryable(job)) {
      card.append(el("div", { className: "job-actions" }, button("Retry", async () => {
        await api(`/models/manage?action=retry_download&model_name=${encodeURIComponent(job.model_name)}`, { method: "POST" });
        await refresh();
      })));
    }
  }
  return card;
}

export function render() {
  const box = $("downloads");
  const jobs = [...state.jobs.values()].sort((a, b) => {
    const live = Number(FINAL.includes(a.status)) - Number(FINAL.includes(b.status));
    return live || (b.created_at || "").localeCompare(a.created_at || "");
  });
  const running = jobs.filter((j) => !FINAL.includes(j.status)).length;
  $("downloads-count").textContent = jobs.length ? `${running} running · ${jobs.length} in all` : "";
  if (!jobs.length) {
    box.replaceChildren(el("p", { className: "empty" }, "No downloads yet."));
    return;
  }
  box.replaceChildren(...jobs.map(jobCard));
}
