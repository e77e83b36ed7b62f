"""Hardening of the HTTP service (issue 10): bounded work per request, no 500s for any input,
cross-site safety, request ids, security headers, an offline API page and an OpenAPI document
that tells the truth. Graceful shutdown is in test_shutdown.py, fuzzing in test_fuzz.py."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from litestar import Litestar
from litestar.testing import TestClient

from editor.document import Document, MaskSpan
from editor.filling import best_choice, prepare_canvas
from editor.models.base import DiffusionModel
from editor.server.schemas import _Request
from tests.api_fixtures import SlowModel, app_for, make_settings

pytest_plugins = ("tests.api_fixtures",)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

Client = TestClient[Litestar]
BIG = 2**63  # one past SQLite's largest integer


def client_with(tmp_path: Path, model_dir: Path, model: Any, **overrides: Any) -> TestClient[Litestar]:
    app = app_for(make_settings(tmp_path, model_dir, **overrides), model)
    return TestClient(app)


def new_document(client: Client, source: str) -> int:
    response = client.post("/api/v1/documents", json={"title": "t", "source": source})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


class ShapeRecorder(SlowModel):
    """Records the [B, L] shape of every forward pass."""

    def __init__(self, model: DiffusionModel) -> None:
        super().__init__(model, delay=0.0)
        self.shapes: list[tuple[int, int]] = []

    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.shapes.append((int(input_ids.shape[0]), int(input_ids.shape[1])))
        return super().forward_logits(input_ids, attention_mask)

    def score(self, ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:  # the cached sampler's full pass
        self.shapes.append((int(ids.shape[0]), int(ids.shape[1])))
        return super().score(ids, *args, **kwargs)


class NaNModel(SlowModel):
    """A model whose logits are NaN everywhere (as a float16 overflow would make them)."""

    def __init__(self, model: DiffusionModel) -> None:
        super().__init__(model, delay=0.0)

    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = super().forward_logits(input_ids, attention_mask)
        return torch.full_like(logits, float("nan"))

    def score(self, *args: Any, **kwargs: Any) -> Any:
        logits, cache = super().score(*args, **kwargs)
        return torch.full_like(logits, float("nan")), cache

    def score_window(self, *args: Any, **kwargs: Any) -> Any:
        return torch.full_like(super().score_window(*args, **kwargs), float("nan"))


class BrokenModel(SlowModel):
    def __init__(self, model: DiffusionModel) -> None:
        super().__init__(model, delay=0.0)

    def _forward(self) -> None:
        raise RuntimeError("the GPU caught fire")


# --------------------------------------------------------------------------- limits on work


@pytest.mark.parametrize(
    ("limits", "document", "options", "phrase"),
    [
        ({"max_choice_options": 3}, 'a [MASK choice="w|x|y|z"]', {}, "max_choice_options"),
        ({"max_choice_tokens": 4}, 'a [MASK choice="yes|' + "word " * 20 + '"]', {}, "max_choice_tokens"),
        ({"max_steps": 10}, "a [MASK 20]", {}, "max_steps"),  # the default: one step per mask
        ({"max_steps": 10}, "a [MASK 20]", {"schedule": "blocks", "block_length": 1, "steps": 5}, "max_steps"),
        ({"max_batch_tokens": 16}, "a [MASK 30] b", {}, "max_batch_tokens"),
    ],
)
def test_work_limits_answer_422_naming_the_limit(
    tmp_path: Path,
    api_model_dir: Path,
    api_model: DiffusionModel,
    limits: dict[str, int],
    document: str,
    options: dict[str, Any],
    phrase: str,
) -> None:
    with client_with(tmp_path, api_model_dir, api_model, **limits) as client:
        response = client.post("/api/v1/fill", json={"document": document, "options": options})
        assert response.status_code == 422, response.text
        assert phrase in response.json()["detail"]
        streamed = client.post("/api/v1/fill", json={"document": document, "options": options, "stream": True})
        assert streamed.status_code == 422 and phrase in streamed.json()["detail"]  # before any event
        created = client.post("/api/v1/documents", json={"title": "t", "source": document})
        if created.status_code != 201:  # limits the parser knows refuse the document itself
            assert created.status_code == 422 and phrase in created.json()["detail"]
            return
        doc_id = created.json()["id"]
        assert client.post(f"/api/v1/documents/{doc_id}/fill", json={"options": options}).status_code == 422
        assert client.get(f"/api/v1/documents/{doc_id}/revisions").json()["total"] == 0


def test_default_steps_within_the_limit_still_fill(tmp_path: Path, api_model_dir: Path, api_model: Any) -> None:
    with client_with(tmp_path, api_model_dir, api_model, max_steps=10) as client:
        assert client.post("/api/v1/fill", json={"document": "a [MASK 10]"}).status_code == 200
        assert (
            client.post("/api/v1/fill", json={"document": "a [MASK 20]", "options": {"steps": 10}}).json()["steps"]
            == 10
        )


def test_jobs_over_the_batch_token_budget_run_in_separate_passes(
    tmp_path: Path, api_model_dir: Path, api_model: DiffusionModel
) -> None:
    recorder = ShapeRecorder(api_model)
    settings = make_settings(tmp_path, api_model_dir, max_batch_tokens=64, max_batch_rows=8, batch_window_ms=200)
    app = app_for(settings, recorder)
    with TestClient(app) as client:
        assert app.state.worker.wait_ready(10)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(4) as pool:
            bodies = list(
                pool.map(lambda _: client.post("/api/v1/fill", json={"document": "a b [MASK 30] c"}), range(4))
            )
    assert [b.status_code for b in bodies] == [200] * 4
    assert recorder.shapes and all(rows * width <= 64 for rows, width in recorder.shapes)


def test_a_fill_over_its_time_budget_is_cancelled_with_a_clear_error(
    tmp_path: Path, api_model_dir: Path, api_model: DiffusionModel
) -> None:
    slow = SlowModel(api_model, delay=0.05)
    settings = make_settings(tmp_path, api_model_dir, fill_timeout_s=0.3)
    app = app_for(settings, slow)
    with TestClient(app) as client:
        assert app.state.worker.wait_ready(10)
        doc_id = new_document(client, "Start [MASK 60] end.")
        response = client.post(f"/api/v1/documents/{doc_id}/fill")
        assert response.status_code == 504, response.text
        assert "fill_timeout_s" in response.json()["detail"] and "0.3" in response.json()["detail"]
        summary = app.state.worker.recent[-1]
        assert summary.state == "failed" and summary.steps_done < 60
        assert client.get(f"/api/v1/documents/{doc_id}/revisions").json()["total"] == 0
        streamed = client.post(f"/api/v1/documents/{doc_id}/fill", json={"stream": True})
        last = streamed.text.strip().split("\n\n")[-1]
        assert "event: error" in last and "fill_timeout_s" in last
        assert client.get(f"/api/v1/documents/{doc_id}/revisions").json()["total"] == 0


def test_choice_scoring_runs_in_bounded_chunks_with_the_same_answer(api_model: DiffusionModel) -> None:
    options = tuple(f"option number {n} of the list" for n in range(6))
    document = Document(("We pick ", MaskSpan(index=0, min_tokens=0, max_tokens=0, choices=options), " today."))
    whole = prepare_canvas(api_model, document)
    recorder = ShapeRecorder(api_model)
    canvas = prepare_canvas(recorder, document, max_batch_tokens=64)
    assert canvas.spans[0].choice == whole.spans[0].choice
    assert len(recorder.shapes) > 1 and all(rows * width <= 64 or rows == 1 for rows, width in recorder.shapes)
    assert best_choice(api_model, canvas, canvas.spans[0]) in options


# --------------------------------------------------------------------------- no 500s


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", f"/api/v1/documents/{BIG}"),
        ("put", f"/api/v1/documents/{BIG}"),
        ("patch", f"/api/v1/documents/{BIG}"),
        ("delete", f"/api/v1/documents/{BIG}"),
        ("post", f"/api/v1/documents/{BIG}/fill"),
        ("get", f"/api/v1/documents/{BIG}/revisions"),
        ("get", f"/api/v1/documents/1/revisions/{BIG}"),
        ("get", f"/api/v1/documents/{BIG}/diff?from=1&to=2"),
        ("get", f"/api/v1/documents/1/diff?from={BIG}&to=2"),
        ("post", f"/api/v1/documents/1/revisions/{BIG}/spans/0/regenerate"),
        ("get", "/api/v1/documents/0"),
        ("get", f"/api/v1/documents?offset={BIG}"),
    ],
)
def test_ids_out_of_range_are_400_not_500(client: Client, method: str, path: str) -> None:
    body = {"title": "t", "source": "a"} if method in ("put", "patch") else None
    response = client.request(method, path, json=body)
    assert response.status_code == 400, response.text


def test_a_lock_revision_out_of_range_is_400_not_500(client: Client) -> None:
    """Found by the stateful fuzzing (issue 22): a body's revision number past 2**63 - 1 reached
    the database and overflowed there."""
    document = client.post("/api/v1/documents", json={"title": "t", "source": "a [MASK 2] b [MASK 2]"}).json()
    response = client.post(f"/api/v1/documents/{document['id']}/fill", json={"lock": ["0"], "revision": BIG})
    assert response.status_code == 400, response.text
    assert "revision" in response.text


def test_largest_id_is_a_plain_404(client: Client) -> None:
    assert client.get(f"/api/v1/documents/{BIG - 1}").status_code == 404


@pytest.mark.parametrize("key", ["³", "١", "１", "1٠"])
def test_span_keys_are_ascii_digits_only(client: Client, key: str) -> None:
    doc_id = new_document(client, "a [MASK 2] b [MASK 2]")
    assert client.post(f"/api/v1/documents/{doc_id}/fill").status_code == 201
    response = client.post(f"/api/v1/documents/{doc_id}/revisions/1/spans/{key}/regenerate")
    assert response.status_code in (400, 404), response.text
    two_spans = Document((MaskSpan(index=0, min_tokens=1, max_tokens=1), MaskSpan(index=1, min_tokens=1, max_tokens=1)))
    with pytest.raises(KeyError):
        two_spans.span(key)
    assert two_spans.span("1").index == 1


@pytest.mark.parametrize(
    "options",
    [
        {"block_length": 10**30},
        {"temperature": 1e-300},
        {"temperature": 1e-5},
        {"top_p": 1e-300},
        {"alg_temp": 1e-300},
        {"threshold": 1e-300},
    ],
)
def test_float_options_have_floors_that_cannot_underflow(client: Client, options: dict[str, Any]) -> None:
    response = client.post("/api/v1/fill", json={"document": "n = [MASK 3 as=int]", "options": options})
    assert response.status_code == 400, response.text
    assert response.json()["extra"]


@pytest.mark.parametrize("raw", ['{"document": "a [MASK 2]", "options": {"alg_temp": 1e999}}', '{"document": NaN}'])
def test_non_finite_numbers_are_400(client: Client, raw: str) -> None:
    response = client.post("/api/v1/fill", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text


def test_smallest_allowed_floats_fill_cleanly(client: Client) -> None:
    options = {"temperature": 0.01, "top_p": 0.001, "alg_temp": 0.01, "seed": 1}
    response = client.post("/api/v1/fill", json={"document": "n = [MASK 3 as=int]", "options": options})
    assert response.status_code == 200, response.text
    span = response.json()["spans"][0]
    assert re.fullmatch(r" ?-?[0-9]+", span["text"]) and span["confidence"] is not None


def test_nan_logits_never_pick_a_special_token(tmp_path: Path, api_model_dir: Path, api_model: DiffusionModel) -> None:
    with client_with(tmp_path, api_model_dir, NaNModel(api_model)) as client:
        for schedule in ("confidence", "entropy", "margin"):
            body = {"document": "n = [MASK 4 as=int]", "options": {"schedule": schedule}}
            response = client.post("/api/v1/fill", json=body)
            assert response.status_code == 200, response.text
            span = response.json()["spans"][0]
            assert re.fullmatch(r" ?-?[0-9]+", span["text"]), span
            assert isinstance(span["confidence"], float)


def test_an_unexpected_error_is_logged_with_its_request_id(
    tmp_path: Path, api_model_dir: Path, api_model: DiffusionModel, caplog: pytest.LogCaptureFixture
) -> None:
    with client_with(tmp_path, api_model_dir, BrokenModel(api_model)) as client:
        # Litestar's logging set-up replaces the root handlers, so listen on our own logger.
        logging.getLogger("editor").addHandler(caplog.handler)
        try:
            response = client.post("/api/v1/fill", json={"document": "a [MASK 2]"})
        finally:
            logging.getLogger("editor").removeHandler(caplog.handler)
        assert response.status_code == 503  # the model failing is not a 500 (issue 22): the server goes on
        body = response.json()
        assert "the model failed during this fill" in body["detail"]
        request_id = body["request_id"]
        assert request_id and response.headers["x-request-id"] == request_id
        assert "GPU caught fire" not in body["detail"]  # internals stay in the log
        logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
        assert request_id in logged and "GPU caught fire" in logged and "Traceback" in logged


def test_every_response_carries_a_request_id_and_echoes_a_sane_one(client: Client) -> None:
    ours = client.get("/health")
    assert re.fullmatch(r"[0-9a-f]{32}", ours.headers["x-request-id"])
    assert client.get("/health", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    hostile = client.get("/health", headers={"X-Request-ID": "x" * 500})
    assert re.fullmatch(r"[0-9a-f]{32}", hostile.headers["x-request-id"])
    missing = client.get("/api/v1/documents/12345")
    assert missing.json()["request_id"] == missing.headers["x-request-id"]


# --------------------------------------------------------------------------- cross-site


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.2"])
def test_foreign_host_headers_are_refused(client: Client, host: str) -> None:
    assert client.get("/api/v1/documents", headers={"host": host}).status_code == 400


@pytest.mark.parametrize("host", ["localhost:8000", "127.0.0.1:8000", "[::1]:8000", "localhost"])
def test_loopback_host_headers_are_served(client: Client, host: str) -> None:
    assert client.get("/api/v1/documents", headers={"host": host}).status_code == 200


def test_allowed_hosts_are_a_setting_and_a_bound_host_is_allowed(
    tmp_path: Path, api_model_dir: Path, api_model: DiffusionModel
) -> None:
    with client_with(tmp_path, api_model_dir, api_model, allowed_hosts=["editor.internal"]) as client:
        assert client.get("/health", headers={"host": "editor.internal"}).status_code == 200
        assert client.get("/health", headers={"host": "localhost"}).status_code == 400
    bound = make_settings(tmp_path, api_model_dir, host="10.1.2.3", api_token="t")
    assert "10.1.2.3" in bound.hosts_allowed()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"content-type": "text/plain"}, 415),
        ({"content-type": "application/x-www-form-urlencoded"}, 415),
        ({"content-type": "application/json", "origin": "http://evil.example"}, 403),
        ({"content-type": "application/json", "origin": "null"}, 403),
        ({"content-type": "application/json", "origin": "http://testserver.local.evil.example"}, 403),
        ({"content-type": "application/json", "origin": "http://testserver.local"}, 201),
        ({"content-type": "application/json; charset=utf-8"}, 201),
    ],
)
def test_state_changing_requests_need_json_and_a_same_origin(
    client: Client, headers: dict[str, str], status: int
) -> None:
    body = b'{"title": "t", "source": "a [MASK 2]"}'
    response = client.post("/api/v1/documents", content=body, headers=headers)
    assert response.status_code == status, response.text
    if status != 201:
        assert response.json()["detail"]
        assert client.get("/api/v1/documents").json()["total"] == 0


def test_a_bodiless_post_needs_no_content_type_but_a_foreign_origin_is_refused(client: Client) -> None:
    doc_id = new_document(client, "a [MASK 2]")
    assert client.post(f"/api/v1/documents/{doc_id}/fill").status_code == 201
    refused = client.post(f"/api/v1/documents/{doc_id}/fill", headers={"origin": "https://evil.example"})
    assert refused.status_code == 403
    assert client.delete(f"/api/v1/documents/{doc_id}", headers={"origin": "https://evil.example"}).status_code == 403
    assert client.get(f"/api/v1/documents/{doc_id}").status_code == 200


def test_reads_from_another_origin_get_no_cors_grant(client: Client) -> None:
    response = client.get("/api/v1/documents", headers={"origin": "http://evil.example"})
    assert "access-control-allow-origin" not in response.headers


# --------------------------------------------------------------------------- headers and the API page


@pytest.mark.parametrize("path", ["/", "/health", "/api/v1/documents", "/schema", "/api/v1/documents/999", "/nope"])
def test_security_headers_on_every_response(client: Client, path: str) -> None:
    response = client.get(path)
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "same-origin"
    assert response.headers["x-frame-options"] == "DENY"
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "'unsafe-inline'" not in policy.split("script-src", 1)[1].split(";")[0]


def test_the_api_page_needs_nothing_from_the_network(client: Client) -> None:
    page = client.get("/schema")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not re.search(r"(?i)\b(https?:)?//[a-z0-9]", page.text), "the page references another host"
    assert "<script>" not in page.text.replace(" ", "")  # no inline script: the CSP forbids it
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets)
    for asset in assets:
        served = client.get(asset)
        assert served.status_code == 200 and served.content, asset


# --------------------------------------------------------------------------- OpenAPI truth


@pytest.fixture
def openapi(client: Client) -> dict[str, Any]:
    schema: dict[str, Any] = client.get("/schema/openapi.json").json()
    return schema


def test_openapi_describes_the_event_streams(openapi: dict[str, Any]) -> None:
    for path, status in (
        ("/api/v1/fill", "200"),
        ("/api/v1/documents/{document_id}/fill", "201"),
        ("/api/v1/documents/{document_id}/revisions/{number}/spans/{key}/regenerate", "201"),
    ):
        content = openapi["paths"][path]["post"]["responses"][status]["content"]
        assert "application/json" in content and "text/event-stream" in content
        events = content["text/event-stream"]["schema"]["oneOf"]
        assert [e["properties"]["event"]["const"] for e in events] == ["step", "result", "error"]
        result = events[1]["properties"]["data"]
        assert result["contentMediaType"] == "application/json"
        assert result["contentSchema"] == content["application/json"]["schema"]
    assert "StepEvent" in openapi["components"]["schemas"]


def test_openapi_forbids_extra_keys_where_the_server_does(openapi: dict[str, Any]) -> None:
    schemas = openapi["components"]["schemas"]
    for name in ("FillRequest", "DocumentCreate", "DocumentReplace", "DocumentPatch"):
        assert schemas[name]["additionalProperties"] is False, name
    for model in _Request.__subclasses__():  # every request body model forbids extra keys
        if model.__name__ in schemas:
            assert schemas[model.__name__]["additionalProperties"] is False, model.__name__
    assert schemas["SamplerOptions"]["additionalProperties"] is False
    assert schemas["FillOut"].get("additionalProperties") is not False  # responses may grow


def test_openapi_ids_are_bounded(openapi: dict[str, Any]) -> None:
    parameters = openapi["paths"]["/api/v1/documents/{document_id}"]["get"]["parameters"]
    schema = next(p for p in parameters if p["name"] == "document_id")["schema"]
    assert schema["minimum"] == 1 and schema["maximum"] == 2**63 - 1


def test_patch_with_null_fields_matches_the_schema(client: Client, openapi: dict[str, Any]) -> None:
    patch = openapi["components"]["schemas"]["DocumentPatch"]
    for field in ("title", "source"):
        assert "null" not in str(patch["properties"][field])
    assert patch.get("minProperties") == 1
    doc_id = new_document(client, "a [MASK 2]")
    for body in ({"title": None}, {"source": None, "title": "x"}, {}):
        assert client.patch(f"/api/v1/documents/{doc_id}", json=body).status_code == 400, body
    assert client.patch(f"/api/v1/documents/{doc_id}", json={"title": "new"}).json()["title"] == "new"


def test_bearer_scheme_is_described_only_when_a_token_is_set(
    tmp_path: Path, api_model_dir: Path, api_model: DiffusionModel, openapi: dict[str, Any]
) -> None:
    assert "securitySchemes" not in openapi.get("components", {})
    with client_with(tmp_path, api_model_dir, api_model, api_token="s3cret") as client:
        guarded = client.get("/schema/openapi.json").json()
    schemes = guarded["components"]["securitySchemes"]
    (name,) = schemes
    assert schemes[name] == {"type": "http", "scheme": "bearer"}
    assert guarded["paths"]["/api/v1/fill"]["post"]["security"] == [{name: []}]
    assert "security" not in guarded["paths"]["/health"]["get"]


def test_413_states_the_body_limit(tmp_path: Path, api_model_dir: Path, api_model: DiffusionModel) -> None:
    with client_with(tmp_path, api_model_dir, api_model, max_document_chars=1000) as client:
        response = client.post("/api/v1/fill", json={"document": "x" * 200_000})
    assert response.status_code == 413
    limit = 4 * 1000 + 64 * 1024
    assert str(limit) in response.json()["detail"]
