// Pull: a catalog name, `source:model_id`, or a bare Hub id `org/name` (huggingface), with
// the install options, sent to POST /models/download. The job then shows in Downloads.

import { api } from "../api.js";
import { $, busy, el, inlineError, toast } from "../ui.js";
import { state } from "../state.js";
import * as downloads from "./downloads.js";

const SOURCES = ["huggingface", "pytorch_hub", "torchvision", "url", "tts_auto", "torchaudio", "local"];
let refresh = async () => {};

/** A model name the server accepts, from an id's last part: "org/Tiny-BERT" -> "Tiny-BERT". */
function nameFrom(modelId) {
  const last = modelId.replace(/[/:]+$/, "").split(/[/:]/).pop() || "model";
  return last.replace(/[^A-Za-z0-9._-]+/g, "-").replace(/^[^A-Za-z0-9]+/, "").slice(0, 128) || "model";
}

/** The POST /models/download body for what was typed, or throws saying what is wrong. */
export function requestFor(text, options) {
  text = text.trim();
  let body;
  if (Object.prototype.hasOwnProperty.call(state.catalog, text)) {
    body = Object.assign({}, state.catalog[text].download_request);
  } else {
    const colon = text.indexOf(":");
    const source = colon > 0 ? text.slice(0, colon) : "";
    if (SOURCES.includes(source)) {
      body = { source, model_id: text.slice(colon + 1) };
    } else if (/^[A-Za-z0-9][\w.-]*\/[\w.-]+$/.test(text)) {
      body = { source: "huggingface", model_id: text };
    } else {
      throw new Error(`"${text}" is not a catalog name, a source:model_id (sources: ${SOURCES.join(", ")}) or a Hub id org/name`);
    }
    if (!body.model_id) throw new Error("the model id after the source is empty");
  }
  body.name = options.name || body.name || nameFrom(body.model_id);
  if (options.task) body.task = options.task;
  if (options.revision) body.revision = options.revision;
  if (options.device) body.device = options.device;
  body.load = options.load;
  if (options.pin) body.pin = true;
  if (options.allowPickle) body.allow_pickle = true;
  return body;
}

/** Send a download request; the job joins the Downloads panel at once. */
export async function pull(body) {
  const answer = await api("/models/download", { method: "POST", json: body });
  if (answer.status === "already_exists") {
    toast({ message: answer.message }, "info");
  } else if (answer.download_id) {
    downloads.update({
      download_id: answer.download_id, status: answer.status, model_name: answer.model_name,
      source: answer.source, model_id: answer.model_id, progress: 0, message: answer.message,
      bytes_total: answer.download_info ? answer.download_info.size_bytes : null,
      created_at: new Date().toISOString(), files: [],
    });
    downloads.render();
  }
  refresh().catch(toast); // the new model's row comes with the job's end (GET /events)
  return answer;
}

async function submit(event) {
  event.preventDefault();
  const note = $("pull-error"), result = $("pull-result");
  inlineError(note, null);
  result.textContent = "";
  await busy($("pull-submit"), async () => {
    try {
      const body = requestFor($("pull-id").value, {
        name: $("pull-name").value.trim(), task: $("pull-task").value,
        revision: $("pull-revision").value.trim(), device: $("pull-device").value,
        load: $("pull-load").checked, pin: $("pull-pin").checked, allowPickle: $("pull-pickle").checked,
      });
      const answer = await pull(body);
      result.textContent = answer.message;
    } catch (err) {
      inlineError(note, err);
    }
  });
}

export function init(options) {
  refresh = options.refresh;
  $("pull-form").addEventListener("submit", (event) => submit(event).catch(toast));
}

/** The catalog's names as suggestions for the id box. */
export function render() {
  const list = $("catalog-names");
  list.replaceChildren(...Object.entries(state.catalog).map(([name, entry]) =>
    el("option", { value: name, label: `${entry.source}:${entry.model_id}` })));
}
