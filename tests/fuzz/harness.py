"""Runs schemathesis over every operation of a live server's OpenAPI document, in positive and
negative generation modes, calling the API and validating every answer against the document with
schemathesis' checks; and in stateful mode (`fuzz_stateful`), sequences of calls that follow the
document's links (create -> fill -> regenerate / choose / diff -> edit with If-Match -> delete,
batch jobs), checking at the end of each sequence that every acknowledged revision is still
stored. Shared by tests/test_fuzz.py (bounded) and run_schemathesis.py (long)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Flaky, Unsatisfiable
from hypothesis.stateful import run_state_machine_as_test
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from editor.models.base import DiffusionModel
from editor.server import create_app
from editor.server.worker import ModelWorker
from editor.settings import Settings
from tests.servers import free_port, wait_ready


@dataclass
class FuzzReport:
    calls: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)  # "METHOD path -> status"
    failures: list[str] = field(default_factory=list)  # conformance failures, one line each

    @property
    def server_error_count(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500)


def serve_in_thread(settings: Settings, model: DiffusionModel) -> Iterator[str]:
    """A live uvicorn server (the whole ASGI stack, lifespan included) on a free loopback port."""
    app = create_app(settings, worker=ModelWorker(settings, loader=lambda: model))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_ready(base)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(10)


def fuzz(base: str, *, examples: int, seed: int | None = 0) -> FuzzReport:
    """`examples` generated cases per operation and per mode (positive, negative)."""
    schema = schemathesis.openapi.from_url(f"{base}/schema/openapi.json")
    report = FuzzReport()
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz_operation(operation, mode, examples, seed, report)
    return report


def _fuzz_operation(operation: Any, mode: GenerationMode, examples: int, seed: int | None, report: FuzzReport) -> None:
    run_settings = settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=seed is not None,
        database=None,
    )

    @run_settings
    @given(operation.as_strategy(generation_mode=mode))
    def call(case: schemathesis.Case[Any]) -> None:
        response = case.call(timeout=60)
        report.calls += 1
        report.statuses[response.status_code] += 1
        where = f"{case.method} {case.formatted_path}"
        if response.status_code >= 500:
            report.server_errors.append(f"{where} -> {response.status_code}: {response.text[:300]}")
        if mode is GenerationMode.POSITIVE and response.status_code == 400:
            # 400 is the schema check: a schema-valid request must pass it (422, a document or
            # template mistake or a limit, is the server judging meaning, which a schema cannot).
            report.failures.append(f"[positive] {where} -> 400: {response.text[:1000]}")
        try:
            case.validate_response(response, excluded_checks=[positive_data_acceptance])
        except (Exception, BaseExceptionGroup) as failure:  # schemathesis raises a group of failed checks
            report.failures.append(f"[{mode.value}] {where} -> {response.status_code}: {str(failure)[:3000]}")

    with contextlib.suppress(Unsatisfiable):  # no negative cases exist for an operation without inputs
        call()


@dataclass
class StatefulReport(FuzzReport):
    scenarios: int = 0
    operations: Counter[str] = field(default_factory=Counter)  # "METHOD path template" -> calls
    lost: list[str] = field(default_factory=list)  # acknowledged documents or revisions not found
    restarts: list[str] = field(default_factory=list)  # batches of sequences hypothesis gave up on


def fuzz_stateful(base: str, *, scenarios: int, steps: int = 12, seed: int | None = 0) -> StatefulReport:
    """`scenarios` sequences of up to `steps` linked calls each (schemathesis' state machine)."""
    report = StatefulReport()
    run_stateful(base, report, scenarios=scenarios, steps=steps, seed=seed)
    return report


def run_stateful(base: str, report: StatefulReport, *, scenarios: int, steps: int, seed: int | None) -> None:
    schema = schemathesis.openapi.from_url(f"{base}/schema/openapi.json")
    machine = _recording_machine(schema.as_state_machine(), base, report)
    run_settings = settings(
        max_examples=scenarios,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=seed is not None,
        database=None,
    )
    run_state_machine_as_test(machine, settings=run_settings)


def _recording_machine(base_machine: Any, base: str, report: StatefulReport) -> Any:
    class Recording(base_machine):  # type: ignore[misc]
        """Records every answer instead of stopping at the first failure, and remembers what the
        server acknowledged (created documents, stored revisions) to look for it at the end."""

        def setup(self) -> None:
            super().setup()
            self.acknowledged: dict[int, set[int]] = {}  # document id -> revision numbers
            report.scenarios += 1

        def validate_response(self, response: Any, case: Any, additional_checks: Any = None, **kwargs: Any) -> None:
            report.calls += 1
            report.statuses[response.status_code] += 1
            report.operations[f"{case.method} {case.path}"] += 1
            where = f"{case.method} {case.formatted_path}"
            if response.status_code >= 500:
                report.server_errors.append(f"{where} -> {response.status_code}: {response.text[:300]}")
            try:
                case.validate_response(
                    response,
                    excluded_checks=[positive_data_acceptance],
                    transport_kwargs=kwargs or None,
                    recorder=self.recorder,
                )
            except (Exception, BaseExceptionGroup) as failure:
                report.failures.append(f"[stateful] {where} -> {response.status_code}: {str(failure)[:2000]}")
            self._remember(case, response)

        def _remember(self, case: Any, response: Any) -> None:
            status, path = response.status_code, case.path
            try:
                body = json.loads(response.text) if response.text.startswith("{") else None
            except ValueError:
                body = None
            if case.method == "POST" and path == "/api/v1/documents" and status == 201 and body:
                self.acknowledged[body["id"]] = set()
            elif case.method == "POST" and status == 201 and body and "number" in body:
                self.acknowledged.setdefault(body["document_id"], set()).add(body["number"])
            elif case.method == "DELETE" and status == 204:
                self.acknowledged.pop(int(case.path_parameters["document_id"]), None)

        def teardown(self) -> None:
            with httpx.Client(base_url=base, timeout=60) as client:
                for document_id, numbers in self.acknowledged.items():
                    listing = client.get(f"/api/v1/documents/{document_id}/revisions?limit=100")
                    if listing.status_code != 200:
                        report.lost.append(f"document {document_id}: {listing.status_code} after it was created")
                        continue
                    stored = {item["number"] for item in listing.json()["items"]}
                    if listing.json()["total"] <= 100 and not numbers <= stored:
                        report.lost.append(f"document {document_id}: revisions {sorted(numbers - stored)} missing")
            super().teardown()

    return Recording


def fuzz_stateful_for(base: str, *, minutes: float, batch: int = 25, steps: int = 12) -> tuple[StatefulReport, float]:
    """Random (not derandomized) stateful scenarios, `batch` at a time, until `minutes` have passed."""
    report = StatefulReport()
    started = time.perf_counter()
    while time.perf_counter() - started < minutes * 60:
        try:
            run_stateful(base, report, scenarios=batch, steps=steps, seed=None)
        except Flaky as error:
            # Hypothesis replays a sequence to shrink it; a live server's state (what the links
            # found) differs on replay, so its engine may give up. The calls made are recorded.
            report.restarts.append(type(error).__name__)
    return report, time.perf_counter() - started
