// Small DOM helpers shared by the panels: elements, formatting, badges, busy buttons, toasts.

export function $(id) { return document.getElementById(id); }

/** el("td", {className: "x", dataset: {name}}, "text", child, ...) */
export function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value == null) continue;
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

export function mb(bytes) {
  if (bytes == null) return "?";
  if (bytes >= 1e9) return (bytes / 1e9).toFixed(2) + " GB";
  return (bytes / 1e6).toFixed(1) + " MB";
}

export function when(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return isNaN(date) ? iso : date.toLocaleString();
}

/** A status badge: its class names the state (loaded, installed, failed, downloading ...). */
export function badge(text, kind) {
  return el("span", { className: "badge badge-" + (kind || text).replace(/[^a-z]/g, "") }, text);
}

/** A progress bar (a styled <progress>), `percent` of 100. */
export function bar(percent, className) {
  const node = el("progress", { className: className || "", max: 100 });
  node.value = Math.max(0, Math.min(100, percent || 0));
  return node;
}

/** Runs `action` with `button` marked busy (disabled, spinner) until it settles. */
export async function busy(button, action) {
  button.disabled = true;
  button.classList.add("busy");
  button.setAttribute("aria-busy", "true");
  try {
    return await action();
  } finally {
    button.disabled = false;
    button.classList.remove("busy");
    button.removeAttribute("aria-busy");
  }
}

/** A button whose click runs `action` busy; a failure is shown as a toast (or `onError`). */
export function button(label, action, options = {}) {
  const b = el("button", { type: "button", className: options.className || "" }, label);
  b.addEventListener("click", () => busy(b, action).catch(options.onError || toast));
  return b;
}

/** An error (or a note) at the top right, with the server's message; closes by itself. */
export function toast(err, kind) {
  const text = err && err.message ? err.message : String(err);
  const box = el("div", { className: "toast toast-" + (kind || "error"), role: "alert" });
  box.append(el("strong", {}, kind === "info" ? "" : (err && err.title) || "Error"), el("span", {}, text));
  const close = el("button", { type: "button", className: "toast-close", title: "Close" }, "×");
  close.addEventListener("click", () => box.remove());
  box.append(close);
  $("toasts").append(box);
  setTimeout(() => box.remove(), kind === "info" ? 4000 : 12000);
}

/** Show (or clear, with null) an inline error under a panel's form. */
export function inlineError(node, err) {
  node.replaceChildren();
  node.hidden = !err;
  if (err) node.append(el("strong", {}, (err.title || "Error") + ": "), err.message || String(err));
}

/** Fill a <select> with option values, keeping the current choice when still there. */
export function fillSelect(select, values, emptyText) {
  const chosen = select.value;
  select.replaceChildren();
  if (!values.length) {
    select.append(el("option", { value: "", disabled: true, selected: true }, emptyText || "none"));
    return;
  }
  for (const value of values) select.append(el("option", { value }, value));
  if (values.includes(chosen)) select.value = chosen;
}
