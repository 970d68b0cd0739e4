// What the page knows, all of it read from the server: panels render from here.

export const state = {
  installed: [],         // GET /models/cache/info installed_models
  cache: null,           // GET /models/cache/info
  loaded: new Map(),     // name -> GET /models/managed row
  catalog: {},           // GET /models/available available_models
  jobs: new Map(),       // download_id -> GET /models/downloads row, updated by GET /events
  loadErrors: new Map(), // name -> the server's message when a Load click failed
  loadedHere: new Set(), // names loaded by a click since: older job failures no longer apply
};

// The server's task names and their aliases (runtime/families TASK_ALIASES).
const TASKS = {
  "text-to-speech": "text-to-speech", "text-to-audio": "text-to-speech", tts: "text-to-speech",
  "text-classification": "text-classification", "sentiment-analysis": "text-classification",
  "feature-extraction": "feature-extraction", "sentence-similarity": "feature-extraction",
  embeddings: "feature-extraction",
  "automatic-speech-recognition": "automatic-speech-recognition",
  "speech-to-text": "automatic-speech-recognition", asr: "automatic-speech-recognition",
};

/** The installed models' names whose task is `task` (TTS also by the server's is_tts). */
export function modelsFor(task) {
  return state.installed
    .filter((m) => {
      const loaded = state.loaded.get(m.name);
      const own = TASKS[(m.task || (loaded && loaded.task) || "").toLowerCase()];
      return own === task || (task === "text-to-speech" && (m.is_tts || (loaded && loaded.is_tts)));
    })
    .map((m) => m.name);
}

export const FINAL = ["completed", "failed", "cancelled"];

/** The reason in a job's message when the load it asked for failed, else null. */
export function loadFailureIn(message) {
  const match = /(?:loading failed|could not be loaded):\s*([\s\S]+)$/.exec(message || "");
  // The reason, without the hint that may follow it ("; retry with: modelhost load NAME").
  return match ? match[1].replace(/;\s*retry with:[\s\S]*$/, "").trim() : null;
}

/** Why `name` failed to load, when it did: a Load click's error, else its latest job's. */
export function loadFailure(name) {
  if (state.loaded.has(name)) return null;
  if (state.loadErrors.has(name)) return state.loadErrors.get(name);
  if (state.loadedHere.has(name)) return null;
  const latest = [...state.jobs.values()]
    .filter((j) => j.model_name === name && FINAL.includes(j.status))
    .sort((a, b) => (b.created_at || "").localeCompare(a.created_at || ""))[0];
  return latest ? loadFailureIn(latest.message) : null;
}
