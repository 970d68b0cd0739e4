// Try a model: embeddings (POST /v1/embeddings), classification (POST
// /models/{name}/predict) and transcription (POST /v1/audio/transcriptions, multipart).

import { api } from "../api.js";
import { $, bar, busy, el, fillSelect, inlineError, toast } from "../ui.js";
import { modelsFor } from "../state.js";

function norm(v) { return Math.sqrt(v.reduce((sum, x) => sum + x * x, 0)); }
function cosine(a, b) { return a.reduce((sum, x, i) => sum + x * b[i], 0) / (norm(a) * norm(b)); }

/** Run a panel's request with its button busy and its errors inline. */
function wire(form, submitId, errorId, run) {
  $(form).addEventListener("submit", (event) => {
    event.preventDefault();
    inlineError($(errorId), null);
    busy($(submitId), () => run().catch((err) => inlineError($(errorId), err))).catch(toast);
  });
}

async function embed() {
  const a = $("embed-a").value, b = $("embed-b").value;
  const input = b ? [a, b] : [a];
  const answer = await api("/v1/embeddings", { method: "POST", json: { model: $("embed-model").value, input } });
  const first = answer.data[0].embedding;
  $("embed-dim").textContent = String(first.length);
  $("embed-norm").textContent = norm(first).toFixed(4);
  $("embed-tokens").textContent = String(answer.usage.prompt_tokens);
  $("embed-first").textContent = first.slice(0, 8).map((x) => x.toFixed(4)).join(", ") + (first.length > 8 ? ", …" : "");
  $("embed-cosine").textContent = answer.data.length > 1 ? cosine(first, answer.data[1].embedding).toFixed(3) : "—";
  $("embed-result").hidden = false;
}

async function classify() {
  const name = $("classify-model").value;
  const answer = await api(`/models/${encodeURIComponent(name)}/predict`, {
    method: "POST", json: { inputs: $("classify-text").value },
  });
  const rows = answer.predictions.map((p) => el("div", { className: "score-row", dataset: { label: p.label } },
    el("span", { className: "label" }, p.label),
    bar(100 * p.score, "score-bar"),
    el("span", { className: "score num" }, p.score.toFixed(3))));
  $("classify-result").replaceChildren(...rows);
}

async function transcribe() {
  const file = $("transcribe-file").files[0];
  if (!file) throw new Error("choose an audio file first");
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("model", $("transcribe-model").value);
  form.append("response_format", "json");
  const answer = await api("/v1/audio/transcriptions", { method: "POST", form });
  $("transcribe-text").value = answer.text;
  $("transcribe-info").textContent = answer.usage && answer.usage.seconds != null ? `${answer.usage.seconds.toFixed(2)} s of audio` : "";
}

export function init() {
  wire("embed-form", "embed-submit", "embed-error", embed);
  wire("classify-form", "classify-submit", "classify-error", classify);
  wire("transcribe-form", "transcribe-submit", "transcribe-error", transcribe);
}

export function render() {
  fillSelect($("embed-model"), modelsFor("feature-extraction"), "no embedding model installed");
  fillSelect($("classify-model"), modelsFor("text-classification"), "no classifier installed");
  fillSelect($("transcribe-model"), modelsFor("automatic-speech-recognition"), "no Whisper model installed");
}
