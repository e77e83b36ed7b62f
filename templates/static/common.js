// Shared helpers for the editor's pages: API calls (JSON, same origin, bearer token when the
// server asks for one), server-sent events over fetch, safe DOM building, small formatting.

const TOKEN_KEY = "editor-api-token";

export class ApiError extends Error {
  constructor(status, body) {
    super(body && body.detail ? body.detail : `request failed (${status})`);
    this.status = status;
    this.body = body || {};
  }
}

function headers(accept, version) {
  const result = { "Content-Type": "application/json", Accept: accept || "application/json" };
  // The document version this write is based on: the server refuses it (412) if it is stale.
  if (version !== undefined && version !== null) result["If-Match"] = `"${version}"`;
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) result.Authorization = `Bearer ${token}`;
  return result;
}

// fetch() on our own API. Writes always send JSON, which a cross-site form cannot.
// `version`: the document version (ETag) the write is based on, sent as If-Match.
export async function request(path, { method = "GET", body, signal, accept, version } = {}) {
  for (let attempt = 0; attempt < 2; attempt += 1) {
    const response = await fetch(path, {
      method,
      headers: headers(accept, version),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      credentials: "same-origin",
    });
    if (response.status === 401 && attempt === 0 && askForToken()) continue;
    if (!response.ok) {
      let detail = null;
      try {
        detail = await response.json();
      } catch {
        detail = { detail: `${response.status} ${response.statusText}` };
      }
      throw new ApiError(response.status, detail);
    }
    return response;
  }
  throw new ApiError(401, { detail: "this server needs an API token" });
}

export async function json(path, options) {
  const response = await request(path, options);
  return response.status === 204 ? null : response.json();
}

function askForToken() {
  const token = window.prompt("This server needs its API token (EDITOR_API_TOKEN):");
  if (!token) return false;
  sessionStorage.setItem(TOKEN_KEY, token.trim());
  return true;
}

// Server-sent events from a fetch() response body (EventSource cannot POST).
export async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

// Build an element; children are nodes or strings (always inserted as text, never as HTML).
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

let toastTimer = null;
export function toast(message, kind = "info") {
  const box = document.getElementById("toast");
  box.textContent = message;
  box.dataset.kind = kind;
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    box.hidden = true;
  }, kind === "error" ? 7000 : 3500);
}

export function relativeTime(iso) {
  const then = new Date(iso.endsWith("Z") || iso.includes("+") ? iso : `${iso}Z`);
  const seconds = Math.round((Date.now() - then.getTime()) / 1000);
  if (seconds < 45) return "just now";
  const units = [
    ["year", 31536000],
    ["month", 2592000],
    ["day", 86400],
    ["hour", 3600],
    ["minute", 60],
  ];
  const format = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
  for (const [unit, size] of units) {
    if (seconds >= size) return format.format(-Math.round(seconds / size), unit);
  }
  return format.format(-seconds, "second");
}

export function absoluteTime(iso) {
  const then = new Date(iso.endsWith("Z") || iso.includes("+") ? iso : `${iso}Z`);
  return then.toLocaleString();
}

// Literal text as document source: a `[MASK` opener gets a backslash (backslashes right before
// it are doubled), and trailing backslashes before a following tag are doubled, as the parser
// reads them (editor/parser.py).
export function escapeLiteral(text, beforeSpan) {
  let out = text.replace(/(\\*)\[MASK(?!\w)/g, (_match, slashes) => `${slashes}${slashes}\\[MASK`);
  if (beforeSpan) out = out.replace(/(\\+)$/, (slashes) => slashes + slashes);
  return out;
}

export function download(filename, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type: `${type};charset=utf-8` }));
  const link = el("a", { href: url, download: filename, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

export function debounce(fn, ms) {
  let timer = null;
  const wrapped = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
  wrapped.flush = (...args) => {
    clearTimeout(timer);
    return fn(...args);
  };
  return wrapped;
}

// hsl colour for a confidence in [0, 1]: red (unsure) through amber to green (sure).
export function confidenceColour(confidence) {
  const hue = Math.round(Math.max(0, Math.min(1, confidence)) * 130);
  return `hsl(${hue} 75% 88%)`;
}
