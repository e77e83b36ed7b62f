"""The server side of the web editor, through Litestar's test client: the pages and their
headers, the editing-help endpoints (parse, tokenize), fills with locked spans, title search,
and the refusal of cross-site writes."""

from __future__ import annotations

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from editor.models.base import DiffusionModel
from editor.server import create_app
from editor.server.worker import ModelWorker

pytest_plugins = ("tests.api_fixtures",)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

LETTER = "Dear [MASK 3 name=greeting],\nthank you for [MASK 4]. Kind regards, [MASK 2 name=sign]"
Client = TestClient[Litestar]


def new_document(client: Client, source: str = LETTER, title: str = "Letter") -> int:
    response = client.post("/api/v1/documents", json={"title": title, "source": source})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


# --------------------------------------------------------------------------- pages


def test_pages_are_served_with_a_strict_content_security_policy(client: Client) -> None:
    document_id = new_document(client, title="<script>alert(1)</script>")
    for path in ("/", f"/documents/{document_id}"):
        page = client.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "<script>alert" not in page.text  # the pages are shells; their scripts insert text safely
        assert "<script>" not in page.text.replace("<script type=", "")  # no inline script at all
    editor = client.get(f"/documents/{document_id}").text
    for hook in ("document-title", "source", "fill", "stop", "canvas", "step-counter", "parse-error", "regenerate"):
        assert f'data-testid="{hook}"' in editor
    for hook in ("lock", "revision-list", "diff", "restore", "replay", "export-txt", "mask-selection"):
        assert f'data-testid="{hook}"' in editor


def test_an_unknown_document_page_is_a_404_page(client: Client) -> None:
    page = client.get("/documents/999")
    assert page.status_code == 404 and "No such document" in page.text


def test_static_files_are_served(client: Client) -> None:
    for name, kind in (("editor.js", "javascript"), ("common.js", "javascript"), ("editor.css", "text/css")):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"], name
    assert client.get("/static/nope.js").status_code == 404


# --------------------------------------------------------------------------- parse and tokenize


def test_parse_lists_spans_and_literals(client: Client) -> None:
    body = client.post("/api/v1/parse", json={"source": LETTER}).json()
    assert body["valid"] is True and body["error"] is None
    assert [(s["name"], s["min_tokens"], s["max_tokens"], s["line"]) for s in body["spans"]] == [
        ("greeting", 3, 3, 1),
        (None, 4, 4, 2),
        ("sign", 2, 2, 2),
    ]
    assert body["literals"] == ["Dear ", ",\nthank you for ", ". Kind regards, ", ""]


def test_parse_reports_the_line_and_column_of_a_mistake(client: Client) -> None:
    body = client.post("/api/v1/parse", json={"source": "fine\nbad [MASK 3 colour=red]"}).json()
    assert body["valid"] is False and body["spans"] == []
    error = body["error"]
    assert (error["line"], error["column"], error["status_code"]) == (2, 13, 422)
    assert "unknown option" in error["message"]


def test_parse_reports_limits(tmp_path, api_model_dir, api_model) -> None:
    from tests.api_fixtures import make_settings

    settings = make_settings(tmp_path, api_model_dir, max_document_chars=20)
    with TestClient(create_app(settings, worker=ModelWorker(settings, loader=lambda: api_model))) as client:
        body = client.post("/api/v1/parse", json={"source": "x" * 21}).json()
        assert body["valid"] is False and body["error"]["status_code"] == 413
        response = client.post("/api/v1/tokenize", json={"text": "y" * 21})
        assert response.status_code == 413 and "limit is 20" in response.json()["detail"]


def test_tokenize_counts_with_the_model_tokenizer(client: Client, api_model: DiffusionModel) -> None:
    body = client.post("/api/v1/tokenize", json={"text": " quick brown"}).json()
    ids = api_model.tokenizer(" quick brown", add_special_tokens=False)["input_ids"]
    assert body["count"] == len(ids) and "".join(body["tokens"]) == " quick brown"
    assert body["model"] == api_model.name
    assert client.post("/api/v1/tokenize", json={"words": "x"}).status_code == 400


# --------------------------------------------------------------------------- locks


def test_fill_with_locked_spans_keeps_them_and_refills_the_rest(client: Client) -> None:
    document_id = new_document(client)
    first = client.post(f"/api/v1/documents/{document_id}/fill", json={"options": {"seed": 1}}).json()
    body = {"lock": ["greeting", "2"], "options": {"temperature": 1.5, "seed": 9}, "trace": True}
    response = client.post(f"/api/v1/documents/{document_id}/fill", json=body)
    assert response.status_code == 201, response.text
    second = response.json()
    assert second["kind"] == "fill" and second["parent"] == 1 and second["source"] == LETTER
    assert [s["token_ids"] for s in second["spans"]][0::2] == [s["token_ids"] for s in first["spans"]][0::2]
    assert second["spans"][1]["token_ids"] != first["spans"][1]["token_ids"]
    for span in second["spans"]:
        assert second["text"][span["start"] : span["end"]] == span["text"]
    assert {c["span"] for step in second["trace"] for c in step["commits"]} == {1}


def test_locks_stream_only_the_unlocked_spans(client: Client) -> None:
    document_id = new_document(client)
    client.post(f"/api/v1/documents/{document_id}/fill")
    response = client.post(f"/api/v1/documents/{document_id}/fill", json={"lock": ["0", "1"], "stream": True})
    steps = [line for line in response.text.splitlines() if line.startswith("data:") and '"commits"' in line]
    assert steps and all('"span": 2' in line and '"span": 0' not in line for line in steps)


def test_lock_errors(client: Client) -> None:
    document_id = new_document(client)
    path = f"/api/v1/documents/{document_id}/fill"
    none_yet = client.post(path, json={"lock": ["greeting"]})
    assert none_yet.status_code == 409 and "fill the document first" in none_yet.json()["detail"]
    client.post(path)
    unknown = client.post(path, json={"lock": ["nope"]})
    assert unknown.status_code == 404 and "nope" in unknown.json()["detail"]
    every = client.post(path, json={"lock": ["0", "1", "2"]})
    assert every.status_code == 422 and "every span is locked" in every.json()["detail"]
    client.patch(f"/api/v1/documents/{document_id}", json={"source": "Hi [MASK 2 name=greeting]"})
    changed = client.post(path, json={"lock": ["greeting"], "revision": 1})
    assert changed.status_code == 409 and "different source" in changed.json()["detail"]
    assert client.get(f"/api/v1/documents/{document_id}/revisions").json()["total"] == 1


# --------------------------------------------------------------------------- search


def test_documents_can_be_searched_by_title(client: Client) -> None:
    for title in ("Quarterly report", "Shopping list", "report_100%"):
        new_document(client, title=title)
    found = client.get("/api/v1/documents", params={"q": "REPORT"}).json()
    assert found["total"] == 2 and {d["title"] for d in found["items"]} == {"Quarterly report", "report_100%"}
    literal = client.get("/api/v1/documents", params={"q": "_100%"}).json()  # LIKE wildcards are literal
    assert [d["title"] for d in literal["items"]] == ["report_100%"]
    assert client.get("/api/v1/documents", params={"q": "zzz"}).json()["total"] == 0


# --------------------------------------------------------------------------- cross-site writes


def test_cross_site_writes_are_refused(client: Client) -> None:
    body = {"title": "t", "source": "a [MASK 1]"}
    evil = client.post("/api/v1/documents", json=body, headers={"Origin": "https://evil.example"})
    assert evil.status_code == 403 and "cross-site" in evil.json()["detail"]
    sneaky = client.post("/api/v1/documents", json=body, headers={"Sec-Fetch-Site": "cross-site"})
    assert sneaky.status_code == 403
    assert client.get("/api/v1/documents").json()["total"] == 0
    same = client.post("/api/v1/documents", json=body, headers={"Origin": "http://testserver.local"})
    assert same.status_code == 201, same.text
    document_id = same.json()["id"]
    assert client.delete(f"/api/v1/documents/{document_id}", headers={"Origin": "null"}).status_code == 403
    reads = client.get("/api/v1/documents", headers={"Origin": "https://evil.example"})
    assert reads.status_code == 200  # reads are not writes (and CORS keeps their answers from other sites)
    assert client.post("/api/v1/documents", json=body).status_code == 201  # programs send no Origin
