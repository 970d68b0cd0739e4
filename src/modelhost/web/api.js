// The one way the dashboard talks to the server: fetch with the API key (when the server
// has one) as `Authorization: Bearer`, asked for once and kept in the tab's sessionStorage.
// Every failed answer becomes an ApiError carrying the server's own message, in either of
// the server's two error shapes: modelhost's {success, message, error} and OpenAI's
// {error: {message, type, param, code}} on /v1.

const KEY = "modelhost-api-key";
let keyWaiters = [];
let askKey = () => Promise.reject(new Error("no key form"));

export class ApiError extends Error {
  constructor(message, status, title) {
    super(message);
    this.status = status;
    this.title = title || "";
  }
}

/** The page hands its key form here: `ask()` shows it and resolves once a key is typed. */
export function onKeyNeeded(ask) { askKey = ask; }

export function useKey(key) {
  sessionStorage.setItem(KEY, key);
  const waiters = keyWaiters; keyWaiters = [];
  waiters.forEach((resolve) => resolve());
}

function waitForKey() {
  askKey();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = sessionStorage.getItem(KEY);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

/** The server's message in an error answer, whichever shape it has. */
export async function errorOf(response) {
  let message = `HTTP ${response.status}`, title = "";
  try {
    const body = await response.json();
    if (body && typeof body.error === "object" && body.error) { // OpenAI's shape (/v1)
      message = body.error.message || message; title = body.error.code || body.error.type || "";
    } else if (body) {
      message = body.message || (typeof body.detail === "string" ? body.detail : message);
      title = body.error || "";
    }
  } catch (e) { /* not JSON: the status says it */ }
  return new ApiError(message, response.status, title);
}

/**
 * fetch(path) on this server. options: method, json (a body sent as JSON), form (FormData),
 * raw (answer the Response itself instead of its JSON).
 */
export async function api(path, options = {}) {
  for (;;) {
    const init = { method: options.method || "GET", headers: headers(options.headers) };
    if (options.json !== undefined) {
      init.body = JSON.stringify(options.json);
      init.headers["Content-Type"] = "application/json";
    } else if (options.form !== undefined) {
      init.body = options.form; // the browser writes the multipart boundary
    }
    const response = await fetch(path, init);
    if (response.status === 401) { await waitForKey(); continue; }
    if (!response.ok) throw await errorOf(response);
    return options.raw ? response : response.json();
  }
}
