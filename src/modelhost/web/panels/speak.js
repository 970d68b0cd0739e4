// Speak: text, a TTS model, one of its voices (GET /v1/audio/voices?model=), a format and a
// speed, sent to POST /v1/audio/speech; the answer plays in the page and can be saved.

import { api } from "../api.js";
import { $, busy, fillSelect, inlineError, mb, toast } from "../ui.js";
import { modelsFor, state } from "../state.js";

let voicesFor = null; // the model whose voices the select shows
let audioUrl = null;

async function loadVoices() {
  const model = $("speak-model").value, select = $("speak-voice"), note = $("speak-error");
  // Asked again when the model changes, or is loaded or unloaded (voices need it loaded).
  const loaded = state.loaded.get(model);
  const key = model + "|" + (loaded ? loaded.device : "");
  if (key === voicesFor) return;
  voicesFor = key;
  inlineError(note, null);
  if (!model) { fillSelect(select, [], "no model"); return; }
  try {
    const answer = await api(`/v1/audio/voices?model=${encodeURIComponent(model)}`);
    if (voicesFor !== key) return;
    fillSelect(select, answer.voices);
    select.value = answer.default;
    select.dataset.model = model;
  } catch (err) {
    // e.g. not loaded: the server says so; speaking then uses the model's default voice.
    fillSelect(select, [], "model's default");
    select.dataset.model = "";
    inlineError(note, err);
  }
}

async function speak(event) {
  event.preventDefault();
  const note = $("speak-error");
  inlineError(note, null);
  const format = $("speak-format").value;
  const body = {
    model: $("speak-model").value, input: $("speak-text").value,
    response_format: format, speed: Number($("speak-speed").value),
  };
  if ($("speak-voice").value) body.voice = $("speak-voice").value;
  await busy($("speak-submit"), async () => {
    try {
      const response = await api("/v1/audio/speech", { method: "POST", json: body, raw: true });
      const blob = await response.blob();
      if (audioUrl) URL.revokeObjectURL(audioUrl);
      audioUrl = URL.createObjectURL(blob);
      const audio = $("speak-audio"), link = $("speak-download");
      link.href = audioUrl;
      link.download = `speech.${format}`;
      link.hidden = false;
      $("speak-info").textContent = `${response.headers.get("content-type") || format} · ${mb(blob.size)} (${blob.size.toLocaleString()} bytes)`;
      if (format === "pcm") { // raw samples: no container a browser plays; saved as they are
        audio.removeAttribute("src");
        $("speak-info").textContent += " · raw 16-bit 24 kHz mono: download to use";
        return;
      }
      audio.src = audioUrl;
      audio.play().catch(() => { /* no sound device: playable by hand */ });
    } catch (err) {
      inlineError(note, err);
    }
  });
}

export function init() {
  $("speak-form").addEventListener("submit", (event) => speak(event).catch(toast));
  $("speak-model").addEventListener("change", () => loadVoices().catch(toast));
}

export function render() {
  fillSelect($("speak-model"), modelsFor("text-to-speech"), "no TTS model installed");
  loadVoices().catch(toast);
}
