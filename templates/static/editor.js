// The editor page: source with live tag highlighting and parse checks, Fill with the canvas
// animated from server-sent events, revisions with diff/restore/replay, span regenerate, lock
// and alternatives (other judged candidates' texts), weak-word refill, masking a selection, copy
// and export. Every user text is inserted as text (textContent / text nodes), never as HTML.
import {
  ApiError,
  confidenceColour,
  debounce,
  download,
  el,
  escapeLiteral,
  events,
  json,
  relativeTime,
  request,
  toast,
} from "./common.js";

const docId = Number(document.body.dataset.documentId);
const CHECK_EVERY_MS = 15000; // how often a visible tab looks for changes made elsewhere
const api = `/api/v1/documents/${docId}`;
const $ = (id) => document.getElementById(id);
const ui = {
  title: $("title"),
  saveStatus: $("save-status"),
  source: $("source"),
  highlight: $("highlight"),
  parseError: $("parse-error"),
  parseOk: $("parse-ok"),
  fill: $("fill"),
  stop: $("stop"),
  canvas: $("canvas"),
  step: $("step-counter"),
  elapsed: $("elapsed"),
  fillState: $("fill-state"),
  progress: $("progress-bar"),
  resultLabel: $("result-label"),
  spanTools: $("span-tools"),
  spanLabel: $("span-label"),
  regenerate: $("regenerate"),
  lock: $("lock"),
  alternatives: $("alternatives"),
  revisionList: $("revision-list"),
  revisionCount: $("revision-count"),
  revisionTools: $("revision-tools"),
  compareWith: $("compare-with"),
  diff: $("diff"),
  showWeak: $("show-weak"),
  weakThreshold: $("weak-threshold"),
  weakValue: $("weak-value"),
  replaySpeed: $("replay-speed"),
  replaySpeedValue: $("replay-speed-value"),
  maskMode: $("mask-mode"),
  conflict: $("conflict"),
  conflictText: $("conflict-text"),
  conflictTheirs: $("conflict-theirs"),
};

const state = {
  doc: null, // the document as last read or written: its `version` goes with every write (If-Match)
  savedSource: null,
  conflict: null, // the other version while a conflict is shown: no autosave until the writer chooses
  parse: null, // the last /parse answer for the source box
  parseSeq: 0,
  revisions: [], // summaries, newest first
  current: null, // the revision shown (with its trace)
  locks: new Set(), // span indices locked on `lockBase`
  lockBase: null,
  selected: null, // selected span index
  menuFor: null, // the span element whose alternatives menu is open
  busy: null, // {controller, kind} while a fill or replay runs
  lastSelection: null, // {where: "source" | "canvas", start, end, at}
};

// ----------------------------------------------------------------------------- source box

// Where the `[MASK ...]` tags are, as the parser reads them (odd backslashes escape a tag).
function scanTags(text) {
  const tags = [];
  const opener = /\[MASK(?!\w)/g;
  let match;
  while ((match = opener.exec(text))) {
    let slashes = 0;
    for (let i = match.index - 1; i >= 0 && text[i] === "\\"; i -= 1) slashes += 1;
    if (slashes % 2 === 1) continue;
    let j = match.index + 5;
    let quoted = false;
    while (j < text.length && text[j] !== "\n") {
      const c = text[j];
      if (quoted) {
        if (c === "\\") j += 1;
        else if (c === '"') quoted = false;
      } else if (c === '"') quoted = true;
      else if (c === "]") break;
      j += 1;
    }
    const end = text[j] === "]" ? j + 1 : j;
    tags.push({ start: match.index, end });
    opener.lastIndex = Math.max(end, match.index + 5);
  }
  return tags;
}

function offsetOf(text, line, column) {
  let offset = 0;
  const lines = text.split("\n");
  for (let i = 0; i < line - 1 && i < lines.length; i += 1) offset += lines[i].length + 1;
  return Math.min(text.length, offset + Math.max(0, column - 1));
}

function renderHighlight() {
  const text = ui.source.value;
  const tags = scanTags(text);
  const error = state.parse && !state.parse.valid && state.parse.error && state.parse.error.line ? state.parse.error : null;
  const errorAt = error ? offsetOf(text, error.line, error.column) : -1;
  const cuts = new Set([0, text.length]);
  for (const tag of tags) cuts.add(tag.start).add(tag.end);
  if (errorAt >= 0) cuts.add(errorAt).add(Math.min(text.length, errorAt + 1));
  const points = [...cuts].sort((a, b) => a - b);
  const fragment = document.createDocumentFragment();
  for (let i = 0; i < points.length - 1; i += 1) {
    const [start, end] = [points[i], points[i + 1]];
    const piece = text.slice(start, end);
    const inTag = tags.some((tag) => tag.start <= start && end <= tag.end);
    let node = document.createTextNode(piece);
    if (start === errorAt) node = el("span", { class: "error-mark" }, piece);
    if (inTag) node = el("mark", { class: "tag" }, node);
    fragment.append(node);
  }
  if (errorAt === text.length) fragment.append(el("span", { class: "error-mark at-end" }, " "));
  fragment.append("\n");
  ui.highlight.replaceChildren(fragment);
  ui.source.style.height = "auto";
  ui.source.style.height = `${ui.source.scrollHeight}px`; // grows with the text (CSS sets the minimum)
}

async function parseSource(source) {
  const seq = (state.parseSeq += 1);
  const result = await json("/api/v1/parse", { method: "POST", body: { source } });
  return seq === state.parseSeq ? result : null;
}

function showParse(result) {
  state.parse = result;
  if (result.valid) {
    ui.parseError.hidden = true;
    ui.parseError.textContent = "";
    const count = result.spans.length;
    ui.parseOk.textContent = count === 0 ? "No [MASK] tags yet: add one for the model to fill." : `${count} span${count === 1 ? "" : "s"} to fill`;
  } else {
    const e = result.error;
    const where = e.line ? `Line ${e.line}, column ${e.column}: ` : "";
    const expected = e.expected ? ` Expected ${e.expected}.` : "";
    ui.parseError.textContent = `${where}${e.message || e.detail}.${expected}`.replace(/\.\./g, ".");
    ui.parseError.hidden = false;
    ui.parseOk.textContent = "";
  }
  renderHighlight();
}

const checkSource = debounce(async () => {
  try {
    const result = await parseSource(ui.source.value);
    if (!result) return;
    showParse(result);
    if (result.valid) saveSource();
    else setSaveStatus("Not saved: fix the mistake", "warn");
  } catch (error) {
    setSaveStatus(`Check failed: ${error.message}`, "warn");
  }
}, 250);

const saveSource = debounce(async () => {
  const source = ui.source.value;
  if (state.conflict) return; // the writer chooses first (the banner says so)
  if (source === state.savedSource) {
    setSaveStatus("Saved");
    return;
  }
  setSaveStatus("Saving…");
  try {
    await writeDocument({ source });
    state.savedSource = source;
    setSaveStatus(ui.source.value === source ? "Saved" : "Unsaved changes");
  } catch (error) {
    if (error instanceof ApiError && error.status === 412) return; // the conflict banner explains
    setSaveStatus("Not saved", "warn");
    if (error instanceof ApiError && error.body.line) showParse({ valid: false, spans: [], literals: [], error: error.body });
    else toast(`Could not save: ${error.message}`, "error");
  }
}, 500);

// ----------------------------------------------------------------------------- versions

class ConflictPending extends Error {
  constructor() {
    super("this document was changed elsewhere: choose which version to keep first");
    this.status = 412;
  }
}

// Every write names the version it is based on (If-Match). A 412 means another tab or person
// saved in between: say so and let the writer choose; never overwrite their text unseen.
async function writeDocument(body) {
  if (state.conflict) throw new ConflictPending();
  try {
    state.doc = await json(api, { method: "PATCH", body, version: state.doc.version });
    return state.doc;
  } catch (error) {
    if (error instanceof ApiError && error.status === 412) await showConflict();
    throw error;
  }
}

function hasLocalChanges() {
  return ui.source.value !== state.savedSource || ui.title.value.trim() !== state.doc.title;
}

async function showConflict() {
  let theirs;
  try {
    theirs = await json(api);
  } catch (error) {
    toast(`This document was changed elsewhere, and reading it failed: ${error.message}`, "error");
    return;
  }
  state.conflict = theirs;
  ui.conflictText.textContent =
    `This document was changed in another tab or by someone else (it is now at version ${theirs.version}) ` +
    "while you were editing it here. Your text below is not saved yet.";
  ui.conflictTheirs.textContent = theirs.source;
  ui.conflict.hidden = false;
  setSaveStatus("Not saved: changed elsewhere", "warn");
}

function showDocument(doc) {
  state.doc = doc;
  state.savedSource = doc.source;
  ui.title.value = doc.title;
  document.title = `${doc.title} · editor`;
  ui.source.value = doc.source;
  renderHighlight();
}

async function loadTheirs() {
  showDocument(state.conflict);
  state.conflict = null;
  ui.conflict.hidden = true;
  state.locks.clear();
  setSaveStatus("Saved");
  const parsed = await parseSource(state.doc.source);
  if (parsed) showParse(parsed);
  await loadRevisions();
  toast(`Loaded version ${state.doc.version}`);
}

async function keepMine() {
  // Mine becomes the next version, written on top of theirs knowingly (If-Match: their version).
  state.doc = state.conflict;
  state.conflict = null;
  ui.conflict.hidden = true;
  const source = ui.source.value;
  const title = ui.title.value.trim() || state.doc.title;
  try {
    await writeDocument({ source, title });
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 412)) toast(`Could not save: ${error.message}`, "error");
    return;
  }
  state.savedSource = source;
  setSaveStatus("Saved");
  toast(`Your text is saved as version ${state.doc.version}`);
}

// When this tab comes back to the front (and now and then while it is), look for changes made
// elsewhere: with nothing unsaved here they are simply loaded; with unsaved text, the writer chooses.
async function checkForChanges() {
  if (document.hidden || state.conflict || state.busy || !state.doc) return;
  let current;
  try {
    current = await json(api);
  } catch {
    return; // offline or restarting: the next save will tell
  }
  if (current.version === state.doc.version || state.conflict) return;
  if (hasLocalChanges()) {
    await showConflict();
    return;
  }
  showDocument(current);
  setSaveStatus("Saved");
  const parsed = await parseSource(current.source);
  if (parsed) showParse(parsed);
  await loadRevisions();
  toast(`Updated to version ${current.version}: it was changed in another tab or by someone else`);
}

function setSaveStatus(text, kind = "") {
  ui.saveStatus.textContent = text;
  ui.saveStatus.dataset.kind = kind;
}

// Save the source now (a fill always fills what is stored); returns the parse, or null if wrong.
async function ensureSaved() {
  const source = ui.source.value;
  const result = await parseSource(source);
  if (!result) return null;
  showParse(result);
  if (!result.valid) {
    ui.parseError.focus();
    return null;
  }
  if (source !== state.savedSource || state.conflict) {
    await writeDocument({ source });
    state.savedSource = source;
    setSaveStatus("Saved");
  }
  return result;
}

function onSourceInput() {
  renderHighlight();
  setSaveStatus("Editing…");
  if (state.locks.size) {
    state.locks.clear();
    toast("Locks cleared: the source changed");
    if (state.current) renderResult(state.current);
  }
  checkSource();
}

// ----------------------------------------------------------------------------- settings

const SETTINGS_KEY = "editor-sampler-settings";
const optionFields = {
  schedule: $("opt-schedule"),
  steps: $("opt-steps"),
  temperature: $("opt-temperature"),
  block_length: $("opt-block-length"),
  threshold: $("opt-threshold"),
  candidates: $("opt-candidates"),
  seed: $("opt-seed"),
  instruction: $("opt-instruction"),
};

function loadSettings() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}");
  } catch {
    saved = {};
  }
  for (const [key, field] of Object.entries(optionFields)) {
    if (saved[key] !== undefined) field.value = saved[key];
    field.addEventListener("change", () => {
      const values = Object.fromEntries(Object.entries(optionFields).map(([k, f]) => [k, f.value]));
      localStorage.setItem(SETTINGS_KEY, JSON.stringify(values));
    });
  }
}

function readOptions() {
  const options = { schedule: optionFields.schedule.value };
  const number = (field, parse) => (field.value.trim() === "" ? undefined : parse(field.value));
  const steps = number(optionFields.steps, (v) => parseInt(v, 10));
  if (steps !== undefined) options.steps = steps;
  options.temperature = number(optionFields.temperature, parseFloat) ?? 0;
  options.block_length = number(optionFields.block_length, (v) => parseInt(v, 10)) ?? 32;
  options.threshold = number(optionFields.threshold, parseFloat) ?? 0.9;
  const candidates = number(optionFields.candidates, (v) => parseInt(v, 10));
  if (candidates !== undefined) options.candidates = candidates; // else the model's default
  const seed = number(optionFields.seed, (v) => parseInt(v, 10));
  if (seed !== undefined) options.seed = seed;
  const instruction = optionFields.instruction.value.trim() || undefined;
  return { options, instruction };
}

// ----------------------------------------------------------------------------- canvas

// Per span, each token's text and confidence from a step trace (when the pieces add up to the
// span's text; otherwise the span is shown whole).
function tokensBySpan(revision) {
  const bySpan = new Map();
  for (const step of revision.trace || []) {
    for (const commit of step.commits) {
      if (!bySpan.has(commit.span)) bySpan.set(commit.span, []);
      bySpan.get(commit.span)[commit.offset] = { text: commit.token, confidence: commit.confidence };
    }
  }
  const result = new Map();
  for (const span of revision.spans) {
    const tokens = bySpan.get(span.index);
    if (tokens && !tokens.includes(undefined) && tokens.map((t) => t.text).join("") === span.text) result.set(span.index, tokens);
  }
  return result;
}

function spanTitle(span) {
  return span.name || `span ${span.index + 1}`;
}

function spanElement(span, extraClass = "") {
  const label = span.name ? `span ${span.name}` : `span ${span.index + 1}`;
  const others = (span.alternatives || []).length;
  return el("span", {
    class: `fill ${others ? "has-alternatives" : ""} ${extraClass}`.replace(/\s+/g, " ").trim(),
    "data-testid": "span",
    "data-span-index": span.index,
    "data-span-name": span.name || "",
    tabindex: 0,
    role: "button",
    "aria-label": label,
    "aria-haspopup": others ? "menu" : null,
  });
}

// A padlock drawn in SVG (an emoji needs an emoji font, which many systems lack).
function lockMark() {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  for (const [key, value] of Object.entries({ class: "lock-mark", viewBox: "0 0 10 12", role: "img", "aria-label": "locked", "data-testid": "lock-mark" })) svg.setAttribute(key, value);
  const shackle = document.createElementNS(ns, "path");
  shackle.setAttribute("d", "M2.5 5.5V3.6a2.5 2.5 0 0 1 5 0v1.9");
  shackle.setAttribute("class", "lock-shackle");
  const body = document.createElementNS(ns, "rect");
  for (const [key, value] of Object.entries({ x: 1, y: 5, width: 8, height: 6.5, rx: 1.2, class: "lock-body" })) body.setAttribute(key, value);
  svg.append(shackle, body);
  return svg;
}

function renderResult(revision) {
  closeAlternatives(false);
  const tokens = tokensBySpan(revision);
  const threshold = Number(ui.weakThreshold.value);
  const underline = ui.showWeak.checked;
  const fragment = document.createDocumentFragment();
  let at = 0;
  for (const span of [...revision.spans].sort((a, b) => a.start - b.start)) {
    fragment.append(revision.text.slice(at, span.start));
    const locked = state.lockBase === revision.number && state.locks.has(span.index);
    const node = spanElement(span, `${locked ? "locked" : ""} ${state.selected === span.index ? "selected" : ""}`);
    const others = (span.alternatives || []).length;
    const offer = others ? `, ${others} alternative${others === 1 ? "" : "s"}` : "";
    node.setAttribute("aria-label", `${node.getAttribute("aria-label")}: ${span.text}, ${Math.round(span.confidence * 100)}% sure${locked ? ", locked" : ""}${offer}`);
    const pieces = tokens.get(span.index);
    if (pieces) {
      for (const piece of pieces) {
        const weak = underline && piece.confidence < threshold;
        const token = el("span", { class: `tok${weak ? " weak" : ""}`, title: `${Math.round(piece.confidence * 100)}%` }, piece.text);
        token.style.backgroundColor = confidenceColour(piece.confidence);
        node.append(token);
      }
    } else {
      node.append(span.text);
      node.style.backgroundColor = confidenceColour(span.confidence);
      if (underline && span.confidence < threshold) node.classList.add("weak");
    }
    if (locked) node.append(lockMark());
    fragment.append(node);
    at = span.end;
  }
  fragment.append(revision.text.slice(at));
  ui.canvas.replaceChildren(fragment);
  ui.canvas.classList.remove("live");
  ui.resultLabel.textContent = `· revision ${revision.number}`;
  updateSpanTools();
}

// The canvas before a fill: literal text, masked slots for the spans being filled, the kept
// text of the others. Returns a function that applies one step event.
function renderLive(layout) {
  const { literals, spans, targets, keep } = layout;
  const slots = new Map();
  const fragment = document.createDocumentFragment();
  spans.forEach((span, i) => {
    fragment.append(literals[i]);
    const node = spanElement(span, targets.has(span.index) ? "live-span" : "kept");
    if (targets.has(span.index)) {
      const list = [];
      for (let k = 0; k < Math.max(1, span.max_tokens); k += 1) {
        const slot = el("span", { class: "tok mask" }, "\u2009\u2009\u2009");
        list.push(slot);
        node.append(slot);
      }
      slots.set(span.index, { node, list });
    } else {
      const kept = keep && keep.spans.find((s) => s.index === span.index);
      node.append(kept ? kept.text : "");
    }
    fragment.append(node);
  });
  fragment.append(literals[literals.length - 1] || "");
  ui.canvas.replaceChildren(fragment);
  ui.canvas.classList.add("live");
  let total = 0;
  for (const entry of slots.values()) total += entry.list.length;
  return (step) => {
    for (const commit of step.commits) {
      const entry = slots.get(commit.span);
      if (!entry) continue;
      while (entry.list.length <= commit.offset) {
        const slot = el("span", { class: "tok mask" }, "\u2009\u2009\u2009");
        entry.list.push(slot);
        entry.node.append(slot);
      }
      const slot = entry.list[commit.offset];
      slot.textContent = commit.token;
      slot.className = "tok fresh";
      slot.title = `${Math.round(commit.confidence * 100)}%`;
      slot.style.backgroundColor = confidenceColour(commit.confidence);
    }
    total = Math.max(total, step.remaining + step.commits.length);
    ui.step.textContent = `Step ${step.step + 1}`;
    ui.progress.style.width = `${total ? Math.round((100 * (total - step.remaining)) / total) : 100}%`;
  };
}

// ----------------------------------------------------------------------------- fills

function startBusy(kind) {
  const controller = new AbortController();
  const started = performance.now();
  const timer = setInterval(() => {
    ui.elapsed.textContent = `${((performance.now() - started) / 1000).toFixed(1)} s`;
  }, 100);
  state.busy = { controller, kind, timer, started };
  closeAlternatives(false);
  ui.fill.disabled = true;
  ui.regenerate.disabled = true;
  ui.stop.disabled = false;
  ui.step.textContent = "Step 0";
  ui.elapsed.textContent = "0.0 s";
  ui.progress.style.width = "0%";
  ui.fillState.textContent = kind === "replay" ? "Replaying…" : "Filling…";
  document.body.classList.add("busy");
  return controller;
}

function endBusy(message) {
  if (!state.busy) return;
  clearInterval(state.busy.timer);
  ui.elapsed.textContent = `${((performance.now() - state.busy.started) / 1000).toFixed(1)} s`;
  state.busy = null;
  ui.fill.disabled = false;
  ui.regenerate.disabled = false;
  ui.stop.disabled = true;
  ui.fillState.textContent = message;
  document.body.classList.remove("busy");
}

async function streamFill(path, body, layout, kind) {
  const controller = startBusy(kind);
  const apply = renderLive(layout);
  try {
    // A fill of the document's source names the version it was saved as: if another tab changed
    // the source meanwhile, the server refuses (412) rather than fill text this tab never showed.
    const version = kind === "fill" ? state.doc.version : undefined;
    const response = await request(path, { method: "POST", body: { ...body, stream: true, trace: true }, signal: controller.signal, accept: "text/event-stream", version });
    let result = null;
    for await (const message of events(response)) {
      if (message.event === "step") apply(message.data);
      else if (message.event === "result") result = message.data;
      else if (message.event === "error") throw new ApiError(message.data.status_code, message.data);
    }
    if (!result) throw new Error("the stream ended without a result");
    ui.progress.style.width = "100%";
    endBusy(`Done · ${result.steps} steps · revision ${result.number}`);
    state.current = result;
    renderResult(result);
    await loadRevisions();
    showRevisionTools();
    toast(`Saved as revision ${result.number}`);
  } catch (error) {
    if (error.name === "AbortError") {
      endBusy("Stopped · nothing was saved");
      toast("Fill stopped");
      return;
    }
    endBusy("Failed");
    if (state.current) renderResult(state.current);
    if (error instanceof ApiError && error.status === 412) {
      await showConflict();
      return;
    }
    if (error instanceof ApiError && error.body.line) showParse({ valid: false, spans: [], literals: [], error: error.body });
    const wait = error.status === 429 ? " The model is busy: try again in a few seconds." : "";
    toast(`Fill failed: ${error.message}.${wait}`, "error");
  }
}

async function fill() {
  if (state.busy) return;
  let parsed;
  try {
    parsed = await ensureSaved();
  } catch (error) {
    if (error.status !== 412) toast(`Could not save: ${error.message}`, "error");
    return;
  }
  if (!parsed) return;
  if (parsed.spans.length === 0) {
    toast("Nothing to fill: add a [MASK n] tag", "error");
    return;
  }
  const { options, instruction } = readOptions();
  const body = { options, instruction };
  const all = new Set(parsed.spans.map((s) => s.index));
  let targets = all;
  const base = state.revisions.length ? state.current : null;
  if (state.locks.size && base && base.number === state.lockBase && base.source === ui.source.value) {
    body.lock = [...state.locks].map(String);
    body.revision = base.number;
    targets = new Set([...all].filter((i) => !state.locks.has(i)));
    if (targets.size === 0) {
      toast("Every span is locked: unlock one to fill it", "error");
      return;
    }
  }
  await streamFill(`${api}/fill`, body, { literals: parsed.literals, spans: parsed.spans, targets, keep: base }, "fill");
}

async function regenerateSelected() {
  const revision = state.current;
  if (state.busy || !revision || state.selected === null) return;
  const index = state.selected;
  const parsed = await parseSource(revision.source);
  if (!parsed || !parsed.valid) return;
  const { options, instruction } = readOptions();
  delete options.seed; // a fresh seed, and some temperature, so the span can say something new
  options.temperature = Math.max(options.temperature, 0.7);
  await streamFill(
    `${api}/revisions/${revision.number}/spans/${index}/regenerate`,
    { options, instruction },
    { literals: parsed.literals, spans: parsed.spans, targets: new Set([index]), keep: revision },
    "regenerate",
  );
}

function stop() {
  if (state.busy) state.busy.controller.abort();
}

// ----------------------------------------------------------------------------- spans

function selectSpan(index) {
  state.selected = index;
  for (const node of ui.canvas.querySelectorAll('[data-testid="span"]')) node.classList.toggle("selected", Number(node.dataset.spanIndex) === index);
  updateSpanTools();
}

function updateSpanTools() {
  const revision = state.current;
  const span = revision && state.selected !== null ? revision.spans.find((s) => s.index === state.selected) : null;
  if (!span || ui.canvas.classList.contains("live")) {
    ui.spanTools.hidden = true;
    return;
  }
  const locked = state.lockBase === revision.number && state.locks.has(span.index);
  ui.spanLabel.textContent = `${span.name || `span ${span.index + 1}`} · ${span.token_ids.length} tokens · ${Math.round(span.confidence * 100)}% sure`;
  ui.lock.textContent = locked ? "Unlock" : "Lock";
  ui.lock.setAttribute("aria-pressed", String(locked));
  ui.spanTools.hidden = false;
}

function toggleLock() {
  const revision = state.current;
  if (!revision || state.selected === null) return;
  if (state.lockBase !== revision.number) {
    state.locks.clear();
    state.lockBase = revision.number;
  }
  if (revision.source !== ui.source.value) {
    toast("This revision filled a different source: restore it first to lock its spans", "error");
    return;
  }
  if (state.locks.has(state.selected)) state.locks.delete(state.selected);
  else state.locks.add(state.selected);
  renderResult(revision);
  toast(state.locks.has(state.selected) ? "Locked: the next Fill keeps this span" : "Unlocked");
}

// ----------------------------------------------------------------------------- alternatives

// The menu of a span's alternatives (other judged candidates' texts), under the span.
function openAlternatives(node, span) {
  const items = span.alternatives.map((alternative, i) =>
    el(
      "button",
      { type: "button", role: "menuitem", class: "alternative", "data-testid": "alternative", "data-alternative": i, tabindex: -1, onclick: () => chooseAlternative(span, i) },
      alternative.text.trim() ? alternative.text : el("em", { class: "muted" }, "(empty)"),
    ),
  );
  const heading = el("p", { class: "alternatives-head", id: "alternatives-head" }, `Other candidates for ${spanTitle(span)}`);
  ui.alternatives.replaceChildren(heading, ...items);
  ui.alternatives.setAttribute("aria-labelledby", "alternatives-head");
  ui.alternatives.hidden = false;
  state.menuFor = node;
  node.setAttribute("aria-expanded", "true");
  placeAlternatives(node);
  items[0].focus();
}

function placeAlternatives(node) {
  const panel = ui.alternatives.offsetParent || document.body;
  const box = panel.getBoundingClientRect();
  const at = node.getClientRects()[0] || node.getBoundingClientRect(); // a wrapped span: its first line
  const width = ui.alternatives.offsetWidth;
  ui.alternatives.style.top = `${Math.round(at.bottom - box.top + 6)}px`;
  ui.alternatives.style.left = `${Math.round(Math.max(8, Math.min(at.left - box.left, box.width - width - 8)))}px`;
}

function closeAlternatives(refocus = true) {
  if (ui.alternatives.hidden) return;
  ui.alternatives.hidden = true;
  ui.alternatives.replaceChildren();
  const node = state.menuFor;
  state.menuFor = null;
  if (!node) return;
  node.removeAttribute("aria-expanded");
  if (refocus && node.isConnected) node.focus();
}

function onAlternativesKey(event) {
  const items = [...ui.alternatives.querySelectorAll('[role="menuitem"]')];
  const at = items.indexOf(document.activeElement);
  const moves = { ArrowDown: at + 1, ArrowUp: at - 1, Home: 0, End: items.length - 1 };
  if (event.key in moves) {
    event.preventDefault();
    items[(moves[event.key] + items.length) % items.length].focus();
  } else if (event.key === "Escape" || event.key === "Tab") {
    if (event.key === "Escape") event.preventDefault();
    event.stopPropagation(); // Escape here closes the menu; it does not stop a fill
    closeAlternatives(event.key === "Escape");
  }
}

async function chooseAlternative(span, alternative) {
  const revision = state.current;
  if (!revision || state.busy) return;
  closeAlternatives();
  let chosen;
  try {
    chosen = await json(`${api}/revisions/${revision.number}/spans/${span.index}/choose`, { method: "POST", body: { alternative } });
  } catch (error) {
    toast(`Could not choose the alternative: ${error.message}`, "error");
    return;
  }
  await loadRevisions();
  await openRevision(chosen.number);
  selectSpan(span.index);
  const node = ui.canvas.querySelector(`[data-testid="span"][data-span-index="${span.index}"]`);
  if (node) node.focus(); // keyboard users stay where they were
  toast(`Saved as revision ${chosen.number}: ${spanTitle(span)} took another candidate's text`);
}

// ----------------------------------------------------------------------------- revisions

function revisionKind(revision) {
  if (revision.kind === "fill") return ["fill"];
  const span = revision.span_name ? el("code", {}, revision.span_name) : `span ${revision.regenerated_span + 1}`;
  return revision.kind === "choose" ? ["alternative for ", span] : ["regenerated ", span];
}

async function loadRevisions() {
  const page = await json(`${api}/revisions?limit=100`);
  state.revisions = page.items;
  ui.revisionCount.textContent = page.total ? String(page.total) : "";
  const items = page.items.map((revision) => {
    const what = revisionKind(revision);
    const current = state.current && state.current.number === revision.number;
    const button = el(
      "button",
      { type: "button", class: "revision-entry", "data-testid": "revision", "data-number": revision.number, "aria-current": current ? "true" : null },
      el("span", { class: "revision-number" }, `#${revision.number}`),
      el("span", { class: "revision-kind", "data-testid": "revision-kind" }, ...what),
      el("time", { datetime: revision.created_at, class: "muted" }, relativeTime(revision.created_at)),
    );
    button.addEventListener("click", () => openRevision(revision.number));
    return el("li", {}, button);
  });
  if (!items.length) items.push(el("li", { class: "muted empty" }, "No fills yet. Press Fill to make the first revision."));
  ui.revisionList.replaceChildren(...items);
}

async function openRevision(number) {
  if (state.busy) return;
  try {
    state.current = await json(`${api}/revisions/${number}?trace=true`);
  } catch (error) {
    toast(`Could not open revision ${number}: ${error.message}`, "error");
    return;
  }
  state.selected = null;
  renderResult(state.current);
  for (const node of ui.revisionList.querySelectorAll('[data-testid="revision"]')) {
    if (Number(node.dataset.number) === number) node.setAttribute("aria-current", "true");
    else node.removeAttribute("aria-current");
  }
  ui.step.textContent = `Step ${state.current.steps}`;
  ui.elapsed.textContent = `${state.current.timings.fill_s.toFixed(1)} s`;
  ui.progress.style.width = "100%";
  // Seeds above 2^53 do not survive JSON.parse exactly; show only what is exact.
  const seed = Number.isSafeInteger(state.current.seed) ? ` · seed ${state.current.seed}` : "";
  ui.fillState.textContent = `Revision ${number}${seed}`;
  showRevisionTools();
}

function showRevisionTools() {
  const revision = state.current;
  if (!revision) return;
  ui.revisionTools.hidden = false;
  const options = state.revisions
    .filter((r) => r.number !== revision.number)
    .map((r) => el("option", { value: r.number, selected: r.number === revision.parent ? true : null }, `#${r.number}${r.number === revision.parent ? " (parent)" : ""}`));
  ui.compareWith.replaceChildren(el("option", { value: "" }, "nothing"), ...options);
  if (revision.parent) ui.compareWith.value = String(revision.parent);
  showDiff();
}

async function showDiff() {
  const revision = state.current;
  const other = Number(ui.compareWith.value);
  if (!revision || !other) {
    ui.diff.replaceChildren(el("p", { class: "muted" }, revision && !revision.parent ? "The first revision: nothing to compare with." : ""));
    return;
  }
  const [from, to] = other < revision.number ? [other, revision.number] : [revision.number, other];
  try {
    const diff = await json(`${api}/diff?from=${from}&to=${to}`);
    const summary = `#${from} → #${to}: ${spanSummary(diff.spans)}${diff.source_changed ? " · different source" : ""}`;
    ui.diff.replaceChildren(el("p", { class: "diff-summary", "data-testid": "diff-summary" }, summary), diffText(diff.chunks));
  } catch (error) {
    ui.diff.replaceChildren(el("p", { class: "muted" }, `No diff: ${error.message}`));
  }
}

const plural = (count, word) => `${count} ${word}${count === 1 ? "" : "s"}`;

// "1 of 3 spans changed · 1 added · 2 removed": a span in only one of the two revisions is added
// or removed, not one more changed span of the newer one.
function spanSummary(changes) {
  const both = changes.filter((c) => c.before !== null && c.after !== null);
  const added = changes.filter((c) => c.before === null).length;
  const removed = changes.filter((c) => c.after === null).length;
  const parts = both.length ? [`${both.filter((c) => c.changed).length} of ${plural(both.length, "span")} changed`] : [];
  if (added) parts.push(both.length ? `${added} added` : `${plural(added, "span")} added`);
  if (removed) parts.push(both.length || added ? `${removed} removed` : `${plural(removed, "span")} removed`);
  return parts.join(" · ") || "no spans";
}

// The word diff as text with <del> and <ins>; a replacement's old and new words get a space
// between them where neither brings one, so they do not read as one word.
function diffText(chunks) {
  const text = el("p", { class: "diff-text" });
  for (const chunk of chunks) {
    if (chunk.op === "equal") text.append(chunk.after);
    if (chunk.op === "delete" || chunk.op === "replace") text.append(el("del", { "aria-label": "removed" }, chunk.before));
    if (chunk.op === "replace" && !/\s$/.test(chunk.before) && !/^\s/.test(chunk.after)) text.append(" ");
    if (chunk.op === "insert" || chunk.op === "replace") text.append(el("ins", { "aria-label": "added" }, chunk.after));
  }
  return text;
}

async function restore() {
  const revision = state.current;
  if (!revision || state.busy) return;
  try {
    await writeDocument({ source: revision.source });
  } catch (error) {
    if (error.status !== 412) toast(`Could not restore: ${error.message}`, "error");
    return;
  }
  ui.source.value = revision.source;
  state.savedSource = revision.source;
  state.locks.clear();
  state.lockBase = revision.number;
  setSaveStatus("Saved");
  const parsed = await parseSource(revision.source);
  if (parsed) showParse(parsed);
  renderResult(revision);
  toast(`Revision ${revision.number} restored as the draft`);
}

async function replay() {
  const revision = state.current;
  if (!revision || state.busy) return;
  if (!revision.trace || !revision.trace.length) {
    toast("This revision has no step trace to replay", "error");
    return;
  }
  const parsed = await parseSource(revision.source);
  if (!parsed || !parsed.valid) return;
  const targets = new Set(revision.trace.flatMap((step) => step.commits.map((c) => c.span)));
  const controller = startBusy("replay");
  const apply = renderLive({ literals: parsed.literals, spans: parsed.spans, targets, keep: revision });
  for (const step of revision.trace) {
    if (controller.signal.aborted) break;
    apply(step);
    await new Promise((resolve) => setTimeout(resolve, 1000 / Number(ui.replaySpeed.value)));
  }
  const stopped = controller.signal.aborted;
  endBusy(stopped ? "Replay stopped" : `Replayed ${revision.trace.length} steps`);
  renderResult(revision);
}

// ----------------------------------------------------------------------------- weak words

async function refillWeak() {
  const revision = state.current;
  if (!revision || state.busy) return;
  const threshold = Number(ui.weakThreshold.value);
  const tokens = tokensBySpan(revision);
  let source = "";
  let at = 0;
  let masked = 0;
  const pending = []; // literal pieces waiting to be written
  const flushLiteral = (beforeSpan) => {
    source += escapeLiteral(pending.join(""), beforeSpan);
    pending.length = 0;
  };
  for (const span of [...revision.spans].sort((a, b) => a.start - b.start)) {
    pending.push(revision.text.slice(at, span.start));
    at = span.end;
    const pieces = tokens.get(span.index);
    if (!pieces) {
      pending.push(span.text);
      continue;
    }
    let run = 0;
    for (const piece of pieces) {
      if (piece.confidence < threshold) {
        run += 1;
        continue;
      }
      if (run) {
        flushLiteral(true);
        source += `[MASK ${run}]`;
        masked += run;
        run = 0;
      }
      pending.push(piece.text);
    }
    if (run) {
      flushLiteral(true);
      source += `[MASK ${run}]`;
      masked += run;
    }
  }
  pending.push(revision.text.slice(at));
  flushLiteral(false);
  if (!masked) {
    toast(`No words under ${Math.round(threshold * 100)}% confidence`, "error");
    return;
  }
  ui.source.value = source;
  state.locks.clear();
  renderHighlight();
  toast(`${masked} weak token${masked === 1 ? "" : "s"} masked; filling them`);
  await fill();
}

// ----------------------------------------------------------------------------- mask selection

function canvasOffset(node, offset) {
  const range = document.createRange();
  range.selectNodeContents(ui.canvas);
  range.setEnd(node, offset);
  return range.toString().length;
}

function rememberCanvasSelection() {
  const selection = window.getSelection();
  if (!selection.rangeCount || selection.isCollapsed) return;
  const range = selection.getRangeAt(0);
  if (!ui.canvas.contains(range.startContainer) || !ui.canvas.contains(range.endContainer)) return;
  if (ui.canvas.classList.contains("live") || !state.current) return;
  state.lastSelection = { where: "canvas", start: canvasOffset(range.startContainer, range.startOffset), end: canvasOffset(range.endContainer, range.endOffset) };
}

function rememberSourceSelection() {
  const { selectionStart: start, selectionEnd: end } = ui.source;
  if (end > start) state.lastSelection = { where: "source", start, end };
}

async function maskSelection() {
  if (state.busy) return;
  // The source's own selection wins while it has the focus: its "select" event may not have run yet.
  if (document.activeElement === ui.source) rememberSourceSelection();
  rememberCanvasSelection();
  const chosen = state.lastSelection;
  if (!chosen) {
    toast("Select some text in the source or the result first", "error");
    return;
  }
  const base = chosen.where === "source" ? ui.source.value : state.current.text;
  let { start, end } = chosen;
  while (start < end && /\s/.test(base[start])) start += 1;
  while (end > start && /\s/.test(base[end - 1])) end -= 1;
  if (start === end) {
    toast("The selection is only spaces", "error");
    return;
  }
  if (chosen.where === "source" && scanTags(base).some((tag) => tag.start < end && start < tag.end)) {
    toast("The selection overlaps a [MASK] tag: select plain text", "error");
    return;
  }
  const selected = base.slice(start, end);
  const lead = start > 0 && base[start - 1] === " " ? " " : ""; // the fill's first token carries that space
  let count;
  try {
    count = (await json("/api/v1/tokenize", { method: "POST", body: { text: lead + selected } })).count;
  } catch (error) {
    toast(`Could not count the tokens: ${error.message}`, "error");
    return;
  }
  const tag = ui.maskMode.value === "range" ? `[MASK ${Math.max(1, Math.floor(count * 0.6))}-${Math.max(count + 1, Math.ceil(count * 1.5))}]` : `[MASK ${count}]`;
  const source =
    chosen.where === "source"
      ? base.slice(0, start) + tag + base.slice(end)
      : escapeLiteral(base.slice(0, start), true) + tag + escapeLiteral(base.slice(end), false);
  const tagStart = chosen.where === "source" ? start : escapeLiteral(base.slice(0, start), true).length;
  state.lastSelection = null;
  if (chosen.where === "source") replaceUndoably(start, end, tag);
  else replaceUndoably(0, ui.source.value.length, source);
  ui.source.focus();
  ui.source.setSelectionRange(tagStart, tagStart + tag.length);
  toast(`“${selected.length > 40 ? `${selected.slice(0, 40)}…` : selected}” is now ${tag}: press Fill`);
}

// Replace source[start, end) as typing would, so that Ctrl+Z in the source takes it back
// (assigning .value clears the browser's undo history). Its input event runs onSourceInput.
function replaceUndoably(start, end, text) {
  ui.source.focus();
  ui.source.setSelectionRange(start, end);
  if (document.execCommand("insertText", false, text)) return;
  ui.source.value = ui.source.value.slice(0, start) + text + ui.source.value.slice(end);
  onSourceInput();
}

// ----------------------------------------------------------------------------- copy, export

function currentText() {
  return state.current ? state.current.text : "";
}

function fileName(extension) {
  const base = (ui.title.value || "document").trim().replace(/[^\w\- ]+/g, "").replace(/\s+/g, "-").toLowerCase() || "document";
  return `${base}.${extension}`;
}

async function copyText() {
  if (!state.current) return toast("Nothing to copy yet", "error");
  try {
    await navigator.clipboard.writeText(currentText());
    toast("Copied");
  } catch {
    toast("The browser refused the clipboard", "error");
  }
}

// ----------------------------------------------------------------------------- wiring

async function saveTitle() {
  const title = ui.title.value.trim();
  if (!title) {
    ui.title.value = state.doc.title;
    return;
  }
  if (title === state.doc.title) return;
  try {
    await writeDocument({ title });
    document.title = `${state.doc.title} · editor`;
    setSaveStatus("Saved");
  } catch (error) {
    if (error.status !== 412) toast(`Could not rename: ${error.message}`, "error");
  }
}

function onCanvasActivate(event) {
  const span = event.target.closest('[data-testid="span"]');
  if (!span || ui.canvas.classList.contains("live")) return;
  if (event.type === "keydown" && event.key !== "Enter" && event.key !== " ") return;
  if (event.type === "click" && !window.getSelection().isCollapsed) return; // selecting text, not clicking
  event.preventDefault();
  const index = Number(span.dataset.spanIndex);
  selectSpan(index);
  const fill = state.current && state.current.spans.find((s) => s.index === index);
  if (fill && (fill.alternatives || []).length && !state.busy) openAlternatives(span, fill);
}

function onKey(event) {
  const mod = event.ctrlKey || event.metaKey;
  if (mod && event.key === "Enter") {
    event.preventDefault();
    fill();
  } else if (event.key === "Escape" && state.busy) {
    event.preventDefault();
    stop();
  } else if (event.altKey && event.code === "KeyM") {
    event.preventDefault();
    maskSelection();
  }
}

async function init() {
  loadSettings();
  ui.source.addEventListener("input", onSourceInput);
  for (const type of ["select", "keyup", "mouseup"]) ui.source.addEventListener(type, rememberSourceSelection);
  document.addEventListener("selectionchange", rememberCanvasSelection);
  ui.title.addEventListener("change", saveTitle);
  ui.title.addEventListener("keydown", (event) => {
    if (event.key === "Enter") ui.title.blur();
  });
  ui.fill.addEventListener("click", fill);
  ui.stop.addEventListener("click", stop);
  ui.canvas.addEventListener("click", onCanvasActivate);
  ui.canvas.addEventListener("keydown", onCanvasActivate);
  ui.regenerate.addEventListener("click", regenerateSelected);
  ui.lock.addEventListener("click", toggleLock);
  ui.alternatives.addEventListener("keydown", onAlternativesKey);
  document.addEventListener("click", (event) => {
    const inside = ui.alternatives.contains(event.target) || (state.menuFor && state.menuFor.contains(event.target));
    if (!inside) closeAlternatives(false);
  });
  $("span-close").addEventListener("click", () => selectSpan(null));
  ui.compareWith.addEventListener("change", showDiff);
  $("restore").addEventListener("click", restore);
  $("replay").addEventListener("click", replay);
  $("refill-weak").addEventListener("click", refillWeak);
  $("mask-selection").addEventListener("mousedown", rememberCanvasSelection);
  $("mask-selection").addEventListener("click", maskSelection);
  $("copy").addEventListener("click", copyText);
  $("export-txt").addEventListener("click", () => (state.current ? download(fileName("txt"), currentText(), "text/plain") : toast("Nothing to export yet", "error")));
  $("export-md").addEventListener("click", () => (state.current ? download(fileName("md"), `# ${ui.title.value}\n\n${currentText()}\n`, "text/markdown") : toast("Nothing to export yet", "error")));
  const weakChanged = () => {
    ui.weakValue.textContent = `${Math.round(Number(ui.weakThreshold.value) * 100)}%`;
    if (state.current && !state.busy) renderResult(state.current);
  };
  ui.showWeak.addEventListener("change", weakChanged);
  ui.weakThreshold.addEventListener("input", weakChanged);
  ui.replaySpeed.addEventListener("input", () => {
    ui.replaySpeedValue.textContent = `${ui.replaySpeed.value} steps/s`;
  });
  document.addEventListener("keydown", onKey);
  $("conflict-reload").addEventListener("click", loadTheirs);
  $("conflict-keep").addEventListener("click", keepMine);
  document.addEventListener("visibilitychange", checkForChanges);
  window.addEventListener("focus", checkForChanges);
  setInterval(checkForChanges, CHECK_EVERY_MS);

  try {
    state.doc = await json(api);
  } catch (error) {
    toast(`Could not load the document: ${error.message}`, "error");
    return;
  }
  ui.title.value = state.doc.title;
  document.title = `${state.doc.title} · editor`;
  ui.source.value = state.doc.source;
  state.savedSource = state.doc.source;
  setSaveStatus("Saved");
  renderHighlight();
  const parsed = await parseSource(state.doc.source);
  if (parsed) showParse(parsed);
  await loadRevisions();
  if (state.doc.latest_revision) await openRevision(state.doc.latest_revision);
  document.body.dataset.ready = "true"; // for tests and tools: the document and its latest revision are shown
}

init();
