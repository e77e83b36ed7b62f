"""The server side of the web editor, through Litestar's test client: the pages and their
headers, the editing-help endpoints (parse, tokenize), fills with locked spans, title search,
the refusal of cross-site writes, choosing a span's alternative, and the word diff."""

from __future__ import annotations

from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from editor.canvas import SpanAlternative, SpanFill
from editor.db.services import NewRevision, Store
from editor.models.base import DiffusionModel
from editor.server import create_app
from editor.server.revisions import word_diff
from editor.server.streaming import FillService
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


# --------------------------------------------------------------------------- alternatives


LITERALS = ["Dear ", ",\nthank you for ", ". Kind regards, ", ""]
NAMES = ["greeting", None, "sign"]


def store_fill(client: Client, document_id: int, fills: list[tuple[str, list[SpanAlternative]]]) -> int:
    """Store a fill of LETTER with these span texts and alternatives, as judged candidates leave
    it (through the services layer: the tiny model runs one candidate); returns its number."""
    text, spans = "", []
    for index, (fill, alternatives) in enumerate(fills):
        text += LITERALS[index]
        spans.append(
            SpanFill(
                index=index,
                name=NAMES[index],
                start=len(text),
                end=len(text) + len(fill),
                text=fill,
                token_ids=[100 + index, len(fill)],
                confidence=0.25 * (index + 1),
                alternatives=alternatives,
            )
        )
        text += fill
    text += LITERALS[-1]
    new = NewRevision(
        source=LETTER,
        text=text,
        spans=spans,
        model="judged",
        seed=42,
        options={"seed": 42, "temperature": 0.8},
        steps=12,
        queued_s=0.0,
        fill_s=1.0,
        total_s=1.0,
        instruction="be kind",
    )
    store: Store = client.app.state.store
    return store.add_revision(document_id, new).number


QUICK = [
    SpanAlternative(text="your letter", token_ids=[1, 2], score=-1.5),
    SpanAlternative(text="it", token_ids=[3], score=-2.0),
]


def choose(client: Client, document_id: int, number: int, key: str, alternative: object) -> Any:
    path = f"/api/v1/documents/{document_id}/revisions/{number}/spans/{key}/choose"
    return client.post(path, json={"alternative": alternative})


def test_choosing_an_alternative_stores_a_revision_without_running_the_model(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_fill(*args: object, **kwargs: object) -> None:
        raise AssertionError("choosing an alternative ran the model")

    monkeypatch.setattr(FillService, "submit", no_fill)
    document_id = new_document(client)
    first = store_fill(client, document_id, [("Ms Novak", []), ("the quick reply", QUICK), ("Jan", [])])
    response = choose(client, document_id, first, "1", 0)
    assert response.status_code == 201, response.text
    new = response.json()
    assert response.headers["location"] == f"/api/v1/documents/{document_id}/revisions/{new['number']}"
    assert new["text"] == "Dear Ms Novak,\nthank you for your letter. Kind regards, Jan"
    assert (new["kind"], new["parent"], new["regenerated_span"], new["steps"]) == ("choose", first, 1, 0)
    assert (new["model"], new["seed"], new["options"], new["instruction"]) == (
        "judged",
        42,
        {"seed": 42, "temperature": 0.8},
        "be kind",
    )
    for span in new["spans"]:  # the sign moved with the longer text
        assert new["text"][span["start"] : span["end"]] == span["text"]
    greeting, chosen, sign = new["spans"]
    assert (greeting["text"], sign["text"], sign["confidence"]) == ("Ms Novak", "Jan", 0.75)
    assert (chosen["text"], chosen["token_ids"]) == ("your letter", [1, 2])
    # The replaced winner takes the chosen one's place; its own score was not reported by the
    # fill, so it is listed with the best score it beat.
    assert chosen["alternatives"] == [
        {"text": "the quick reply", "token_ids": [101, 15], "score": -1.5},
        {"text": "it", "token_ids": [3], "score": -2.0},
    ]
    back = choose(client, document_id, new["number"], "1", 0).json()  # and back again
    assert back["text"] == "Dear Ms Novak,\nthank you for the quick reply. Kind regards, Jan"
    assert back["parent"] == new["number"]
    assert back["spans"][1]["alternatives"][0] == {"text": "your letter", "token_ids": [1, 2], "score": -1.5}
    listed = client.get(f"/api/v1/documents/{document_id}/revisions").json()["items"]
    assert [(r["kind"], r["regenerated_span"]) for r in listed] == [("choose", 1), ("choose", 1), ("fill", None)]


def test_a_chosen_text_keeps_its_score_when_it_is_replaced(client: Client) -> None:
    document_id = new_document(client)
    first = store_fill(client, document_id, [("Ms Novak", []), ("the quick reply", QUICK), ("Jan", [])])
    second = choose(client, document_id, first, "1", 1).json()  # "it", scored -2.0
    third = choose(client, document_id, second["number"], "1", 0).json()  # "your letter" replaces "it"
    assert third["spans"][1]["text"] == "your letter"
    assert third["spans"][1]["alternatives"] == [
        {"text": "it", "token_ids": [3], "score": -2.0},
        {"text": "the quick reply", "token_ids": [101, 15], "score": -1.5},
    ]


def test_revisions_name_the_span_that_changed(client: Client) -> None:
    document_id = new_document(client)
    signs = [SpanAlternative(text="Jan Kowalski", token_ids=[9, 9], score=-3.0)]
    first = store_fill(client, document_id, [("Ms Novak", []), ("the quick reply", QUICK), ("Jan", signs)])
    choose(client, document_id, first, "sign", 0)
    choose(client, document_id, first, "1", 1)
    listed = client.get(f"/api/v1/documents/{document_id}/revisions").json()["items"]
    assert [(r["regenerated_span"], r["span_name"]) for r in listed] == [(1, None), (2, "sign"), (None, None)]
    one = client.get(f"/api/v1/documents/{document_id}/revisions/2").json()
    assert one["span_name"] == "sign" and one["text"].endswith("Kind regards, Jan Kowalski")


def test_choose_errors_are_clear_and_store_nothing(client: Client) -> None:
    document_id = new_document(client)
    first = store_fill(client, document_id, [("Ms Novak", []), ("the quick reply", QUICK), ("Jan", [])])
    for alternative in (2, -1, 10**30):
        bad = choose(client, document_id, first, "1", alternative)
        assert bad.status_code == 422, bad.text
        assert bad.json()["detail"] == (
            f"span 1 of revision 1 of document {document_id} has 2 alternatives: "
            f"give an alternative from 0 to 1, not {alternative}"
        )
    none = choose(client, document_id, first, "greeting", 0)
    assert none.status_code == 422 and "has no alternatives: one candidate filled it" in none.json()["detail"]
    for key in ("nope", "3", "0042"):
        missing = choose(client, document_id, first, key, 0)
        assert missing.status_code == 404 and f"span '{key}' of revision 1" in missing.json()["detail"]
    assert choose(client, document_id, 9, "1", 0).status_code == 404
    assert choose(client, 999, 1, "1", 0).status_code == 404
    for body in ({}, {"alternative": 0.5}, {"alternative": None}, {"alternative": [0]}, {"alternative": 0, "extra": 1}):
        path = f"/api/v1/documents/{document_id}/revisions/{first}/spans/1/choose"
        assert client.post(path, json=body).status_code == 400, body
    assert client.post(path, content=b"[", headers={"content-type": "application/json"}).status_code == 400
    evil = client.post(path, json={"alternative": 0}, headers={"Origin": "https://evil.example"})
    assert evil.status_code == 403
    assert client.get(f"/api/v1/documents/{document_id}/revisions").json()["total"] == 1


def test_a_refill_keeps_the_other_spans_alternatives(client: Client) -> None:
    document_id = new_document(client)
    first = store_fill(client, document_id, [("Ms Novak", []), ("the quick reply", QUICK), ("Jan", [])])
    second = choose(client, document_id, first, "1", 1).json()
    path = f"/api/v1/documents/{document_id}/revisions/{second['number']}/spans/sign/regenerate"
    regenerated = client.post(path, json={"options": {"seed": 3}})
    assert regenerated.status_code == 201, regenerated.text
    body = regenerated.json()
    assert body["span_name"] == "sign" and body["spans"][1]["text"] == "it"
    assert body["spans"][1]["alternatives"] == second["spans"][1]["alternatives"]
    third = choose(client, document_id, body["number"], "1", 1).json()  # the score of "it" survived the refill
    assert third["spans"][1]["alternatives"][1] == {"text": "it", "token_ids": [3], "score": -2.0}


# --------------------------------------------------------------------------- word diff


def test_the_word_diff_keeps_a_replacement_of_several_words_together() -> None:
    chunks = word_diff("The quick brown fox jumps.", "The slow red fox jumps.")
    assert [(c.op, c.before, c.after) for c in chunks] == [
        ("equal", "The ", "The "),
        ("replace", "quick brown", "slow red"),
        ("equal", " fox jumps.", " fox jumps."),
    ]
    deleted = word_diff("keep one two three keep", "keep keep")
    assert "".join(c.before for c in deleted) == "keep one two three keep"
    assert "".join(c.after for c in deleted) == "keep keep" and "replace" not in {c.op for c in deleted}


def test_the_choose_route_is_in_the_schema(client: Client) -> None:
    schema = client.get("/schema/openapi.json").json()
    route = schema["paths"]["/api/v1/documents/{document_id}/revisions/{number}/spans/{key}/choose"]["post"]
    assert {"201", "401", "403", "404", "415", "422"} <= set(route["responses"])
    assert "choose" in str(schema["components"]["schemas"]["RevisionOut"]["properties"]["kind"])
