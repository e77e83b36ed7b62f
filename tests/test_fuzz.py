"""Property-based fuzzing of the whole API from its own OpenAPI document (schemathesis), against a
real uvicorn server on loopback with the tiny model: no input may cause a 5xx, and every answer
must conform to the document (status codes, content types, headers, bodies). Bounded to about a
minute and derandomized (the same cases every run); `tests/fuzz/run_schemathesis.py` is the long
run whose figures are in results/fuzz.md."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from editor.models.base import DiffusionModel
from tests.api_fixtures import make_settings
from tests.fuzz.harness import fuzz, fuzz_stateful, serve_in_thread

pytest_plugins = ("tests.api_fixtures",)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLES = 25  # per operation and generation mode
STATEFUL_SCENARIOS = 30  # sequences of up to 10 linked calls


@pytest.fixture(scope="module")
def live_server(
    tmp_path_factory: pytest.TempPathFactory, api_model_dir: Path, api_model: DiffusionModel
) -> Iterator[str]:
    settings = make_settings(tmp_path_factory.mktemp("fuzz"), api_model_dir, max_steps=64, fill_timeout_s=30)
    yield from serve_in_thread(settings, api_model)


def test_no_input_causes_a_server_error_and_every_answer_conforms(live_server: str) -> None:
    report = fuzz(live_server, examples=EXAMPLES)
    print(f"{report.calls} calls; statuses {sorted(report.statuses.items())}")
    assert report.calls >= 200
    assert report.server_errors == []
    assert report.failures == [], "\n".join(report.failures)


def test_sequences_of_linked_calls_cause_no_server_error_and_lose_nothing(live_server: str) -> None:
    """Stateful mode: create -> fill -> regenerate / choose / diff -> edit (If-Match from the ETag)
    -> delete, and batch jobs, in generated orders; every acknowledged revision is still stored."""
    report = fuzz_stateful(live_server, scenarios=STATEFUL_SCENARIOS, steps=10)
    print(f"{report.scenarios} scenarios, {report.calls} calls; statuses {sorted(report.statuses.items())}")
    assert report.calls >= 100
    followed = {operation for operation in report.operations if "{document_id}" in operation}
    assert {
        "POST /api/v1/documents/{document_id}/fill",
        "PATCH /api/v1/documents/{document_id}",
        "DELETE /api/v1/documents/{document_id}",
    } <= followed, report.operations  # the links were followed, not only single calls made
    assert report.server_errors == []
    assert report.failures == [], "\n".join(report.failures)
    assert report.lost == []
