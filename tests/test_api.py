"""The REST API through Litestar's test client: every endpoint's success and error paths, SSE,
load (429s), cancellation, auth, and the `serve` command's start-up checks."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from litestar import Litestar
from litestar.testing import TestClient

from editor.db import migrate
from editor.models.base import DiffusionModel
from editor.models.native import NativeDiffusionModel
from editor.server import commands, create_app
from editor.server.commands import prepare_database, serve
from editor.server.worker import ModelWorker
from editor.settings import Settings
from tests.api_fixtures import SlowModel, app_for, make_settings

pytest_plugins = ("tests.api_fixtures",)  # its fixtures; conftest.py belongs to the core tests
pytestmark = pytest.mark.usefixtures("one_torch_thread")

LETTER = "Dear [MASK 3 name=greeting],\nthank you for [MASK 4]. Kind regards, [MASK 2 name=sign]"
Client = TestClient[Litestar]


def events(body: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse a server-sent event stream into (event, data) pairs."""
    parsed = []
    for block in body.strip().split("\r\n\r\n" if "\r\n" in body else "\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        parsed.append((fields["event"], json.loads(fields["data"])))
    return parsed


def new_document(client: Client, source: str = LETTER, title: str = "Letter") -> int:
    response = client.post("/api/v1/documents", json={"title": title, "source": source})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def assert_spans_line_up(body: dict[str, Any]) -> None:
    for span in body["spans"]:
        assert body["text"][span["start"] : span["end"]] == span["text"]


# --------------------------------------------------------------------------- health


def test_health_and_ready(client: Client, api_model: DiffusionModel) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json() | {"queued": 0} == {
        "ready": True,
        "model": api_model.name,
        "model_note": None,
        "model_placement": f"cpu, float32, weights {stored_megabytes(api_model):,.1f} MB",
        "model_error": None,
        "database": "ok",
        "queued": 0,
    }


def stored_megabytes(model: DiffusionModel) -> float:
    """The model's tensors in memory, each stored tensor once (the tied head is the embedding)."""
    assert isinstance(model, NativeDiffusionModel)
    network = model.network
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in network.state_dict().values()}
    return sum(tensors.values()) / 1e6


def test_not_ready_while_the_model_fails(settings: Settings) -> None:
    def broken() -> DiffusionModel:
        raise OSError("weights missing")

    app = create_app(settings, worker=ModelWorker(settings, loader=broken))
    with TestClient(app) as client:
        app.state.worker.wait_ready(10)
        response = client.get("/ready")
        assert response.status_code == 503 and "weights missing" in response.json()["model_error"]
        assert client.get("/health").status_code == 200
        fill = client.post("/api/v1/fill", json={"document": "a [MASK 2]"})
        assert fill.status_code == 503 and "failed to load" in fill.json()["detail"]


def test_not_ready_when_the_database_is_unreachable(
    tmp_path: Path, api_model_dir: Path, api_model: DiffusionModel
) -> None:
    settings = make_settings(tmp_path, api_model_dir)
    broken = settings.model_copy(update={"database_url": f"sqlite:///{tmp_path}"})  # a directory, not a file
    app = app_for(broken, api_model)
    with TestClient(app) as client:
        assert app.state.worker.wait_ready(10)
        response = client.get("/ready")
        assert response.status_code == 503
        assert response.json()["database"] == "unreachable" and response.json()["model"] == api_model.name


def test_index_page_is_the_document_list_and_schema_is_served(client: Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'data-testid="document-list"' in page.text and 'href="/schema"' in page.text
    schema = client.get("/schema/openapi.json").json()
    assert {
        "/api/v1/fill",
        "/api/v1/documents",
        "/api/v1/documents/{document_id}/fill",
        "/api/v1/documents/{document_id}/revisions/{number}/spans/{key}/regenerate",
        "/api/v1/documents/{document_id}/diff",
        "/health",
        "/ready",
    } <= set(schema["paths"])
    assert client.get("/schema").status_code == 200


# --------------------------------------------------------------------------- stateless fill


def test_fill_returns_text_spans_parameters_seed_and_timings(client: Client) -> None:
    response = client.post("/api/v1/fill", json={"document": LETTER, "options": {"seed": 5, "steps": 3}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"].startswith("Dear") and ",\nthank you for" in body["text"]
    assert [s["name"] for s in body["spans"]] == ["greeting", None, "sign"]
    assert [len(s["token_ids"]) for s in body["spans"]] == [3, 4, 2]
    assert_spans_line_up(body)
    assert body["seed"] == 5 and body["options"]["seed"] == 5 and body["options"]["steps"] == 3
    assert body["steps"] == 3 and body["model"]
    assert set(body["timings"]) == {"queued_s", "fill_s", "total_s"}
    assert body["trace"] is None


def test_same_seed_same_text_and_a_fresh_seed_is_reported(client: Client) -> None:
    request = {"document": LETTER, "options": {"temperature": 1.0, "seed": 99}}
    first, second = (client.post("/api/v1/fill", json=request).json() for _ in range(2))
    assert first["text"] == second["text"]
    unseeded = client.post("/api/v1/fill", json={"document": LETTER, "options": {"temperature": 1.0}}).json()
    replay = client.post(
        "/api/v1/fill", json={"document": LETTER, "options": {"temperature": 1.0, "seed": unseeded["seed"]}}
    ).json()
    assert replay["text"] == unseeded["text"]


def test_fill_with_trace_returns_every_step(client: Client) -> None:
    body = client.post("/api/v1/fill", json={"document": "a [MASK 4]", "trace": True}).json()
    assert [step["step"] for step in body["trace"]] == list(range(body["steps"]))
    assert sum(len(step["commits"]) for step in body["trace"]) == 4


def test_parse_error_is_422_with_line_and_column(client: Client) -> None:
    response = client.post("/api/v1/fill", json={"document": "fine line\nbad [MASK 3 colour=red]"})
    assert response.status_code == 422
    body = response.json()
    assert (body["line"], body["column"]) == (2, 13)
    assert "unknown option" in body["message"] and "name=" in body["expected"]
    assert body["detail"].startswith("line 2, column 13")


@pytest.mark.parametrize(
    ("limits", "document", "options", "status", "phrase"),
    [
        ({"max_document_chars": 50}, "x" * 51 + "[MASK 2]", {}, 413, "characters long"),
        ({"max_spans": 2}, "[MASK 1] [MASK 1] [MASK 1]", {}, 422, "at most 2 spans"),
        ({"max_span_tokens": 8}, "a [MASK 9]", {}, 422, "from 1 to 8"),
        ({"max_canvas_tokens": 16}, "a [MASK 8] b [MASK 8]", {}, 422, "16 canvas tokens"),
        ({"max_steps": 10}, "a [MASK 2]", {"steps": 11}, 422, "limit of 10"),
    ],
)
def test_limits_are_settings_and_answer_4xx(
    tmp_path: Path,
    api_model_dir: Path,
    api_model: DiffusionModel,
    limits: dict[str, int],
    document: str,
    options: dict[str, int],
    status: int,
    phrase: str,
) -> None:
    settings = make_settings(tmp_path, api_model_dir, **limits)
    with TestClient(app_for(settings, api_model)) as client:
        response = client.post("/api/v1/fill", json={"document": document, "options": options})
    assert response.status_code == status, response.text
    assert phrase in response.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"document": "a [MASK 2]", "options": {"temperature": -1}},
        {"document": "a [MASK 2]", "options": {"schedule": "sideways"}},
        {"document": "a [MASK 2]", "colour": "red"},
        {"options": {}},
    ],
)
def test_malformed_requests_are_400_with_details(client: Client, body: dict[str, Any]) -> None:
    response = client.post("/api/v1/fill", json=body)
    assert response.status_code == 400
    assert response.json()["detail"] and response.json()["extra"]


# --------------------------------------------------------------------------- streaming


def test_stream_sends_steps_in_order_then_the_result(client: Client) -> None:
    response = client.post("/api/v1/fill", json={"document": LETTER, "stream": True, "options": {"seed": 3}})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    stream = events(response.text)
    kinds = [kind for kind, _ in stream]
    assert kinds[-1] == "result" and set(kinds[:-1]) == {"step"}
    steps = [data for kind, data in stream if kind == "step"]
    assert [s["step"] for s in steps] == list(range(len(steps)))
    assert [s["remaining"] for s in steps] == sorted((s["remaining"] for s in steps), reverse=True)
    assert steps[-1]["remaining"] == 0
    result = stream[-1][1]
    assert result["steps"] == len(steps) and result["seed"] == 3
    # The commits spell out every span's tokens, and name the span they belong to.
    committed = {(c["span"], c["offset"]): c for s in steps for c in s["commits"]}
    for span in result["spans"]:
        assert [committed[(span["index"], k)]["token_id"] for k in range(len(span["token_ids"]))] == span["token_ids"]
        assert {committed[(span["index"], k)]["name"] for k in range(len(span["token_ids"]))} == {span["name"]}
    # The same request without streaming gives the same result.
    plain = client.post("/api/v1/fill", json={"document": LETTER, "options": {"seed": 3}}).json()
    assert plain["text"] == result["text"]


@pytest.mark.parametrize("how", ["accept", "query"])
def test_stream_by_accept_header_or_query(client: Client, how: str) -> None:
    if how == "accept":
        response = client.post("/api/v1/fill", json={"document": "a [MASK 3]"}, headers={"Accept": "text/event-stream"})
    else:
        response = client.post("/api/v1/fill?stream=true", json={"document": "a [MASK 3]"})
    kinds = [kind for kind, _ in events(response.text)]
    assert kinds == ["step", "step", "step", "result"]


def test_stream_errors_before_the_fill_starts_are_plain_http_errors(client: Client) -> None:
    response = client.post("/api/v1/fill", json={"document": "bad [MASK 0]", "stream": True})
    assert response.status_code == 422 and response.json()["line"] == 1


# --------------------------------------------------------------------------- documents


def test_document_crud(client: Client) -> None:
    created = client.post("/api/v1/documents", json={"title": "Letter", "source": LETTER})
    assert created.status_code == 201
    document = created.json()
    assert document["source"] == LETTER and document["revision_count"] == 0 and document["latest_revision"] is None
    doc_id = document["id"]
    assert client.get(f"/api/v1/documents/{doc_id}").json() == document

    replaced = client.put(f"/api/v1/documents/{doc_id}", json={"title": "New", "source": "Hi [MASK 2]"})
    assert replaced.status_code == 200 and replaced.json()["title"] == "New"
    patched = client.patch(f"/api/v1/documents/{doc_id}", json={"title": "Newer"})
    assert patched.json()["title"] == "Newer" and patched.json()["source"] == "Hi [MASK 2]"
    assert patched.json()["updated_at"] >= document["updated_at"]

    assert client.delete(f"/api/v1/documents/{doc_id}").status_code == 204
    assert client.get(f"/api/v1/documents/{doc_id}").status_code == 404
    assert client.delete(f"/api/v1/documents/{doc_id}").status_code == 404


def test_document_list_is_paged_newest_first(client: Client) -> None:
    ids = [new_document(client, f"n{i} [MASK 1]", title=f"doc {i}") for i in range(5)]
    page = client.get("/api/v1/documents?limit=2&offset=0").json()
    assert page["total"] == 5 and page["limit"] == 2 and page["offset"] == 0
    assert [d["id"] for d in page["items"]] == ids[::-1][:2]
    rest = client.get("/api/v1/documents?limit=2&offset=4").json()
    assert [d["id"] for d in rest["items"]] == [ids[0]]
    assert "source" not in page["items"][0]
    assert client.get("/api/v1/documents?limit=0").status_code == 400
    assert client.get("/api/v1/documents?limit=101").status_code == 400


def test_document_errors_store_nothing(client: Client) -> None:
    bad = client.post("/api/v1/documents", json={"title": "t", "source": "x [MASK 2 must=]"})
    assert bad.status_code == 422 and (bad.json()["line"], bad.json()["column"]) == (1, 16)
    assert client.post("/api/v1/documents", json={"title": "", "source": "x"}).status_code == 400
    assert client.get("/api/v1/documents").json()["total"] == 0
    doc_id = new_document(client)
    assert client.patch(f"/api/v1/documents/{doc_id}", json={"source": "[MASK"}).status_code == 422
    assert client.patch(f"/api/v1/documents/{doc_id}", json={}).status_code == 400
    assert client.get(f"/api/v1/documents/{doc_id}").json()["source"] == LETTER
    assert client.put("/api/v1/documents/999", json={"title": "x", "source": "y"}).status_code == 404
    assert client.patch("/api/v1/documents/999", json={"title": "x"}).status_code == 404


# --------------------------------------------------------------------------- revisions


def test_document_fill_stores_a_revision(client: Client) -> None:
    doc_id = new_document(client)
    response = client.post(f"/api/v1/documents/{doc_id}/fill", json={"options": {"seed": 4}})
    assert response.status_code == 201
    first = response.json()
    assert response.headers["location"] == f"/api/v1/documents/{doc_id}/revisions/1"
    assert first["number"] == 1 and first["parent"] is None and first["kind"] == "fill"
    assert first["source"] == LETTER and first["seed"] == 4 and first["options"]["seed"] == 4
    assert_spans_line_up(first)
    second = client.post(f"/api/v1/documents/{doc_id}/fill").json()  # no body: default options
    assert second["number"] == 2 and second["parent"] == 1

    stored = client.get(f"/api/v1/documents/{doc_id}/revisions/1").json()
    kept = ("text", "spans", "seed", "options")
    assert {k: stored[k] for k in kept} == {k: first[k] for k in kept}
    assert stored["trace"] is None
    traced = client.get(f"/api/v1/documents/{doc_id}/revisions/1?trace=true").json()
    assert sum(len(step["commits"]) for step in traced["trace"]) == 9  # 3 + 4 + 2 tokens
    listing = client.get(f"/api/v1/documents/{doc_id}/revisions").json()
    assert [r["number"] for r in listing["items"]] == [2, 1] and listing["total"] == 2
    document = client.get(f"/api/v1/documents/{doc_id}").json()
    assert (document["revision_count"], document["latest_revision"]) == (2, 2)


def test_document_fill_streams_and_the_result_is_the_revision(client: Client) -> None:
    doc_id = new_document(client)
    stream = events(client.post(f"/api/v1/documents/{doc_id}/fill?stream=true").text)
    kind, revision = stream[-1]
    assert kind == "result" and revision["number"] == 1
    assert client.get(f"/api/v1/documents/{doc_id}/revisions/1").json()["text"] == revision["text"]


def test_revision_errors(client: Client) -> None:
    doc_id = new_document(client)
    assert client.post("/api/v1/documents/999/fill").status_code == 404
    assert client.get(f"/api/v1/documents/{doc_id}/revisions/1").status_code == 404
    assert client.get("/api/v1/documents/999/revisions").status_code == 404
    assert client.get(f"/api/v1/documents/{doc_id}/diff?from=1&to=2").status_code == 404
    assert client.post(f"/api/v1/documents/{doc_id}/revisions/1/spans/0/regenerate").status_code == 404
    too_many = client.post(f"/api/v1/documents/{doc_id}/fill", json={"options": {"steps": 5000}})
    assert too_many.status_code == 422
    assert client.get(f"/api/v1/documents/{doc_id}/revisions").json()["total"] == 0


def test_a_failed_document_fill_stores_nothing(tmp_path: Path, api_model_dir: Path, api_model: DiffusionModel) -> None:
    settings = make_settings(tmp_path, api_model_dir)
    with TestClient(app_for(settings, api_model)) as client:
        doc_id = new_document(client, "a [MASK 30]")
    smaller = settings.model_copy(update={"max_canvas_tokens": 16})  # the limit went down since
    with TestClient(app_for(smaller, api_model)) as client:
        response = client.post(f"/api/v1/documents/{doc_id}/fill")
        assert response.status_code == 422 and "canvas tokens" in response.json()["detail"]
        assert client.get(f"/api/v1/documents/{doc_id}/revisions").json()["total"] == 0


def test_regenerate_refills_one_span_and_pins_the_rest(client: Client) -> None:
    source = "Start \\[MASK kept. [MASK 3 name=a] middle [MASK 4 name=b] and [MASK 2]."
    doc_id = new_document(client, source)
    base = client.post(f"/api/v1/documents/{doc_id}/fill", json={"options": {"seed": 1}}).json()
    for key, index in (("b", 1), ("0", 0), ("2", 2)):
        response = client.post(
            f"/api/v1/documents/{doc_id}/revisions/1/spans/{key}/regenerate",
            json={"options": {"temperature": 1.5, "seed": 77}},
        )
        assert response.status_code == 201, response.text
        new = response.json()
        assert new["kind"] == "regenerate" and new["regenerated_span"] == index and new["parent"] == 1
        assert new["source"] == source and len(new["spans"]) == 3
        assert_spans_line_up(new)
        for old, now in zip(base["spans"], new["spans"], strict=True):
            if old["index"] != index:
                assert (now["text"], now["token_ids"]) == (old["text"], old["token_ids"])
        target = new["spans"][index]
        before = base["text"][: base["spans"][index]["start"]].rstrip(" ")
        assert new["text"].startswith(before) and "Start [MASK kept." in new["text"]
        assert len(target["token_ids"]) == [3, 4, 2][index]


def test_regenerate_defaults_to_the_revision_options_with_a_fresh_seed(client: Client) -> None:
    doc_id = new_document(client)
    client.post(f"/api/v1/documents/{doc_id}/fill", json={"options": {"schedule": "left-to-right", "seed": 1}})
    new = client.post(f"/api/v1/documents/{doc_id}/revisions/1/spans/greeting/regenerate").json()
    assert new["options"]["schedule"] == "left-to-right" and new["number"] == 2
    missing = client.post(f"/api/v1/documents/{doc_id}/revisions/1/spans/nope/regenerate")
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    assert client.post(f"/api/v1/documents/{doc_id}/revisions/1/spans/7/regenerate").status_code == 404


def test_regenerate_streams(client: Client) -> None:
    doc_id = new_document(client)
    client.post(f"/api/v1/documents/{doc_id}/fill")
    stream = events(
        client.post(f"/api/v1/documents/{doc_id}/revisions/1/spans/sign/regenerate", json={"stream": True}).text
    )
    steps = [data for kind, data in stream if kind == "step"]
    assert {c["name"] for s in steps for c in s["commits"]} == {"sign"}  # only the target span is filled
    assert stream[-1][0] == "result" and stream[-1][1]["regenerated_span"] == 2


def test_diff_between_revisions(client: Client) -> None:
    doc_id = new_document(client)
    client.post(f"/api/v1/documents/{doc_id}/fill", json={"options": {"seed": 1}})
    client.post(
        f"/api/v1/documents/{doc_id}/revisions/1/spans/greeting/regenerate",
        json={"options": {"temperature": 2.0, "seed": 5}},
    )
    diff = client.get(f"/api/v1/documents/{doc_id}/diff?from=1&to=2").json()
    one, two = (client.get(f"/api/v1/documents/{doc_id}/revisions/{n}").json() for n in (1, 2))
    assert (diff["from_revision"], diff["to_revision"], diff["source_changed"]) == (1, 2, False)
    assert [c["key"] for c in diff["spans"]] == ["greeting", "1", "sign"]
    assert [c["changed"] for c in diff["spans"]][1:] == [False, False]
    assert diff["spans"][0]["before"] == one["spans"][0]["text"]
    assert diff["spans"][0]["after"] == two["spans"][0]["text"]
    assert "".join(c["before"] for c in diff["chunks"]) == one["text"]
    assert "".join(c["after"] for c in diff["chunks"]) == two["text"]
    assert diff["unified"].startswith("--- revision 1\n+++ revision 2\n") or one["text"] == two["text"]
    same = client.get(f"/api/v1/documents/{doc_id}/diff?from=1&to=1").json()
    assert [c["op"] for c in same["chunks"]] == ["equal"] and same["unified"] == ""
    assert client.get(f"/api/v1/documents/{doc_id}/diff?from=1").status_code == 400


# --------------------------------------------------------------------------- auth


def test_off_loopback_every_api_route_needs_the_token(
    tmp_path: Path, api_model_dir: Path, api_model: DiffusionModel
) -> None:
    settings = make_settings(tmp_path, api_model_dir, host="0.0.0.0", api_token="s3cret")
    with TestClient(app_for(settings, api_model)) as client:
        assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200
        for method, path in (
            ("get", "/api/v1/documents"),
            ("post", "/api/v1/fill"),
            ("get", "/api/v1/documents/1/revisions"),
        ):
            response = client.request(method, path, json={"document": "a [MASK 1]"})
            assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")
        wrong = client.get("/api/v1/documents", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert client.get("/api/v1/documents", headers=good).status_code == 200
        assert client.post("/api/v1/fill", json={"document": "a [MASK 1]"}, headers=good).status_code == 200


def test_on_loopback_without_a_token_the_api_is_open(client: Client) -> None:
    assert client.get("/api/v1/documents").status_code == 200


def test_an_open_api_off_loopback_is_refused(tmp_path: Path, api_model_dir: Path) -> None:
    settings = make_settings(tmp_path, api_model_dir, host="0.0.0.0")
    with pytest.raises(ValueError, match="EDITOR_API_TOKEN"):
        create_app(settings)


# --------------------------------------------------------------------------- load and cancellation


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["batched", "unbatched"])
def test_concurrent_fills_succeed_or_get_429_and_leave_one_revision_each(
    tmp_path: Path, api_model_dir: Path, api_model: DiffusionModel, temperature: float
) -> None:
    settings = make_settings(tmp_path, api_model_dir, queue_size=2, max_batch_rows=4)
    app = app_for(settings, SlowModel(api_model, delay=0.01))
    with TestClient(app) as client:
        assert app.state.worker.wait_ready(10)
        doc_id = new_document(client)

        def fill(_: int) -> Any:
            return client.post(f"/api/v1/documents/{doc_id}/fill", json={"options": {"temperature": temperature}})

        with ThreadPoolExecutor(max_workers=20) as pool:
            responses = list(pool.map(fill, range(20)))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {201, 429}
        assert 429 in statuses and 201 in statuses
        for refused in (r for r in responses if r.status_code == 429):
            assert int(refused.headers["retry-after"]) >= 1 and "queue is full" in refused.json()["detail"]
        numbers = sorted(r.json()["number"] for r in responses if r.status_code == 201)
        stored = client.get(f"/api/v1/documents/{doc_id}/revisions?limit=100").json()
        assert stored["total"] == len(numbers) == statuses.count(201)
        assert sorted(r["number"] for r in stored["items"]) == numbers == list(range(1, len(numbers) + 1))


def test_a_client_that_disconnects_mid_stream_stops_the_worker(
    tmp_path: Path, api_model_dir: Path, api_model: DiffusionModel
) -> None:
    settings = make_settings(tmp_path, api_model_dir)
    slow = SlowModel(api_model, delay=0.02)
    app = app_for(settings, slow)
    with TestClient(app) as client:
        assert app.state.worker.wait_ready(10)
        doc_id = new_document(client, "Start [MASK 60] end.")
        chunks = client.blocking_portal.call(stream_then_disconnect, app, f"/api/v1/documents/{doc_id}/fill")
        worker: ModelWorker = app.state.worker
        summary = worker.recent[-1]
        assert summary.state == "cancelled"
        assert 1 <= summary.steps_done < 60  # stopped at a step before the end
        forwards = slow.forwards
        assert forwards <= summary.steps_done + 1
        assert any(b"event: step" in chunk for chunk in chunks)
        assert not any(b"event: result" in chunk for chunk in chunks)
        assert client.get(f"/api/v1/documents/{doc_id}/revisions").json()["total"] == 0  # nothing stored
        assert slow.forwards == forwards  # and nothing ran afterwards


async def stream_then_disconnect(app: Litestar, path: str) -> list[bytes]:
    """Drive the ASGI app as a server would: read the stream until the first step event, then
    report that the client has gone, and wait for the handler to finish."""
    body = json.dumps({"stream": True}).encode()
    gone = asyncio.Event()
    sent_body = False
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if b"event: step" in message.get("body", b""):
                gone.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"localhost"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "extensions": {},
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=30)  # type: ignore[arg-type]
    await asyncio.sleep(0.2)  # give the worker time to see the cancel flag and stop
    return chunks


# --------------------------------------------------------------------------- serve


def test_serve_refuses_off_loopback_without_a_token(
    tmp_path: Path, api_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDITOR_DATABASE_URL", f"sqlite:///{tmp_path / 'x.db'}")
    monkeypatch.delenv("EDITOR_API_TOKEN", raising=False)
    result = CliRunner().invoke(serve, ["--host", "0.0.0.0", "--model", str(api_model_dir)])
    assert result.exit_code != 0 and "EDITOR_API_TOKEN" in result.output
    assert not (tmp_path / "x.db").exists()


def test_serve_upgrades_the_database_and_prints_the_urls(
    tmp_path: Path, api_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    ran: dict[str, Any] = {}

    def run(config: uvicorn.Config, *, on_exit: Any) -> None:
        ran.update(host=config.host, port=config.port, app=config.app, on_exit=on_exit)

    monkeypatch.setattr(commands, "run_server", run)
    monkeypatch.setenv("EDITOR_DATABASE_URL", f"sqlite:///{tmp_path / 'new' / 'editor.db'}")
    result = CliRunner().invoke(serve, ["--port", "8123", "--model", str(api_model_dir), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "applied 0001" in result.output
    assert "http://127.0.0.1:8123/\n" in result.output and "http://127.0.0.1:8123/schema" in result.output
    assert ran["host"] == "127.0.0.1" and ran["port"] == 8123 and isinstance(ran["app"], Litestar)
    again = CliRunner().invoke(serve, ["--model", str(api_model_dir)])
    assert "up to date" in again.output


def test_serve_no_migrate_refuses_a_database_that_is_behind(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, database_url=f"sqlite:///{tmp_path / 'old.db'}")
    with pytest.raises(click.ClickException, match="editor db upgrade"):
        prepare_database(settings, migrate_it=False)
    migrate.upgrade(settings.database_url)
    assert "at revision" in prepare_database(settings, migrate_it=False)
