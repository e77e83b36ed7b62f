// The document list: search by title, create, rename in place, delete after confirmation.
import { absoluteTime, debounce, el, json, relativeTime, toast } from "./common.js";

const PAGE = 50;
const STARTER = `Dear [MASK 3 name=greeting],

Thank you for your letter about [MASK 6]. We will [MASK 8 name=promise] by Monday.

Kind regards,
[MASK 3 name=signature]
`;

const list = document.getElementById("document-list");
const status = document.getElementById("list-status");
const search = document.getElementById("search");
const more = document.getElementById("load-more");
const dialog = document.getElementById("confirm-delete");
let shown = 0;

async function load({ append = false } = {}) {
  const query = search.value.trim();
  const params = new URLSearchParams({ limit: String(PAGE), offset: String(append ? shown : 0) });
  if (query) params.set("q", query);
  try {
    const page = await json(`/api/v1/documents?${params}`);
    if (!append) {
      list.replaceChildren();
      shown = 0;
    }
    for (const item of page.items) list.append(row(item));
    shown += page.items.length;
    more.hidden = shown >= page.total;
    if (page.total === 0) {
      status.textContent = query ? `No document title contains “${query}”.` : "No documents yet. Create one to start writing.";
    } else {
      status.textContent = query ? `${page.total} matching` : `${page.total} document${page.total === 1 ? "" : "s"}`;
    }
  } catch (error) {
    status.textContent = `Could not load the documents: ${error.message}`;
  }
}

function row(item) {
  const revisions = item.revision_count === 1 ? "1 revision" : `${item.revision_count} revisions`;
  const link = el("a", { class: "doc-title", href: `/documents/${item.id}` }, item.title);
  const time = el("time", { datetime: item.updated_at, title: absoluteTime(item.updated_at) }, `Edited ${relativeTime(item.updated_at)}`);
  const meta = el("p", { class: "doc-meta" }, time, el("span", { "aria-hidden": "true" }, " · "), revisions);
  const rename = el("button", { type: "button", class: "button small subtle", "aria-label": `Rename ${item.title}` }, "Rename");
  const remove = el("button", { type: "button", class: "button small subtle danger-text", "aria-label": `Delete ${item.title}` }, "Delete");
  const entry = el("li", { class: "doc-row", "data-document-id": item.id }, el("div", { class: "doc-main" }, link, meta), el("div", { class: "doc-actions" }, rename, remove));
  rename.addEventListener("click", () => startRename(entry, item, link));
  remove.addEventListener("click", () => confirmDelete(item));
  return entry;
}

function startRename(entry, item, link) {
  const input = el("input", { class: "rename-input", value: item.title, maxlength: 200, "aria-label": "New title" });
  link.replaceWith(input);
  input.focus();
  input.select();
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (save && title && title !== item.title) {
      try {
        const updated = await json(`/api/v1/documents/${item.id}`, { method: "PATCH", body: { title }, version: item.version });
        item.title = updated.title;
        item.version = updated.version;
        link.textContent = updated.title;
        toast("Renamed");
      } catch (error) {
        if (error.status === 412) {
          toast("Not renamed: the document was changed elsewhere meanwhile. The list is up to date now: try again.", "error");
          await load();
          return;
        }
        toast(`Could not rename: ${error.message}`, "error");
      }
    }
    input.replaceWith(link);
    link.focus();
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") finish(true);
    if (event.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
}

function confirmDelete(item) {
  document.getElementById("confirm-delete-text").textContent = `“${item.title}” and all of its revisions will be deleted. This cannot be undone.`;
  dialog.returnValue = "";
  dialog.onclose = async () => {
    if (dialog.returnValue !== "delete") return;
    try {
      await json(`/api/v1/documents/${item.id}`, { method: "DELETE", version: item.version });
      toast(`Deleted “${item.title}”`);
      await load();
      search.focus();
    } catch (error) {
      if (error.status === 412) {
        toast(`Not deleted: “${item.title}” was changed elsewhere since the list was loaded. Look at it first.`, "error");
        await load();
        return;
      }
      toast(`Could not delete: ${error.message}`, "error");
    }
  };
  dialog.showModal();
}

async function create() {
  try {
    const created = await json("/api/v1/documents", { method: "POST", body: { title: "Untitled", source: STARTER } });
    window.location.assign(`/documents/${created.id}`);
  } catch (error) {
    toast(`Could not create a document: ${error.message}`, "error");
  }
}

document.getElementById("new-document").addEventListener("click", create);
document.getElementById("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  load();
});
search.value = new URLSearchParams(window.location.search).get("q") || "";
search.addEventListener("input", debounce(() => load(), 200));
more.addEventListener("click", () => load({ append: true }));
load();
