"""Runs schemathesis over every operation of a live server's OpenAPI document, in positive and
negative generation modes, calling the API and validating every answer against the document with
schemathesis' checks. Shared by tests/test_fuzz.py (bounded) and run_schemathesis.py (long)."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
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
