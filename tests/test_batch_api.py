"""Batch jobs through the REST API: create (JSON and JSONL upload), progress, results, cancel,
a restart in the middle of a job, and an interactive fill that finishes while a batch runs."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from editor.db import migrate
from editor.db.batches import BatchStore, NewRecord
from editor.db.engine import make_engine, make_session_factory
from editor.models.base import DiffusionModel
from editor.options import SamplerOptions
from editor.parser import parse_document
from editor.server.worker import FillJob, ModelWorker
from editor.settings import Settings
from tests.api_fixtures import SlowModel, app_for, results, wait_for

pytest_plugins = ("tests.api_fixtures",)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

Client = TestClient[Litestar]
TEMPLATE = {"id": "{id}", "text": "[MASK 3]", "n": "[MASK 2 as=int]"}
OPTIONS = {"schedule": "threshold", "steps": 2}


def test_job_lifecycle_from_json_body(settings: Settings, api_model: DiffusionModel) -> None:
    records = [{"id": f"r{n}"} for n in range(5)] + [[1]]
    with TestClient(app_for(settings, api_model)) as client:
        response = client.post("/api/v1/batches", json={"template": TEMPLATE, "records": records, "options": OPTIONS})
        assert response.status_code == 202, response.text
        job = response.json()
        assert response.headers["location"] == f"/api/v1/batches/{job['id']}"
        assert (job["total"], job["failed"]) == (6, 1)
        final = wait_for(client, job["id"], lambda body: body["status"] == "done")
        assert (final["status"], final["completed"], final["failed"], final["pending"]) == ("done", 5, 1, 0)
        lines = results(client, job["id"])
        assert [line["custom_id"] for line in lines] == [f"r{n}" for n in range(5)] + ["6"]
        assert all(type(line["output"]["n"]) is int for line in lines[:5])
        assert lines[5]["error"]["code"] == "invalid_record"
        assert client.get("/api/v1/batches/999").status_code == 404


def test_jsonl_upload_with_a_schema(settings: Settings, api_model: DiffusionModel) -> None:
    properties = {"ok": {"type": "boolean"}, "size": {"enum": ["S", "L"]}, "price": {"type": "number"}}
    schema = {"type": "object", "properties": properties}
    jsonl = '{"id": "a"}\n\nnot json\n{"id": "b"}\n'
    with TestClient(app_for(settings, api_model)) as client:
        response = client.post(
            "/api/v1/batches",
            files={"records": ("records.jsonl", jsonl.encode(), "application/jsonl")},
            data={"schema": json.dumps(schema), "options": json.dumps(OPTIONS)},
        )
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["input_name"] == "records.jsonl"
        wait_for(client, job["id"], lambda body: body["status"] == "done")
        lines = results(client, job["id"])
        assert [line["custom_id"] for line in lines] == ["a", "3", "b"]
        assert type(lines[0]["output"]["ok"]) is bool and lines[0]["output"]["size"] in ("S", "L")
        assert [type(lines[n]["output"]["price"]) in (int, float) for n in (0, 2)] == [True, True]


def test_bad_requests_are_422_with_the_place(settings: Settings, api_model: DiffusionModel) -> None:
    with TestClient(app_for(settings, api_model)) as client:
        bad_template = client.post("/api/v1/batches", json={"template": {"a": ["[MASK x]"]}, "records": [{}]})
        assert bad_template.status_code == 422
        assert bad_template.json()["extra"]["path"] == "$.a[0]"
        bad_schema = client.post(
            "/api/v1/batches", json={"schema": {"type": "string", "uniqueItems": True}, "records": [{}]}
        )
        assert bad_schema.status_code == 422 and "uniqueItems at #" in bad_schema.json()["detail"]
        bad_pattern = client.post(
            "/api/v1/batches", json={"schema": {"type": "string", "pattern": "(a)\\1"}, "records": [{}]}
        )
        assert bad_pattern.status_code == 422 and "back-references" in bad_pattern.json()["detail"]
        assert bad_pattern.json()["extra"]["path"] == "#/pattern"
        both = client.post("/api/v1/batches", json={"template": TEMPLATE, "schema": {}, "records": [{}]})
        assert both.status_code == 422
        none = client.post("/api/v1/batches", json={"template": TEMPLATE, "records": []})
        assert none.status_code == 422
        unknown = client.post("/api/v1/batches", json={"template": TEMPLATE, "records": [{}], "colour": 1})
        assert unknown.status_code == 422


def test_a_job_continues_after_a_restart_and_can_be_cancelled(settings: Settings, api_model: DiffusionModel) -> None:
    records = [{"id": f"r{n}"} for n in range(12)]
    slow = SlowModel(api_model, delay=0.05)
    with TestClient(app_for(settings, slow)) as client:
        job = client.post("/api/v1/batches", json={"template": TEMPLATE, "records": records, "options": OPTIONS}).json()
        partway = wait_for(client, job["id"], lambda body: body["completed"] >= 4)
        assert partway["status"] == "running" and partway["completed"] < 12
    # A new app on the same database (a restarted server) finishes the job.
    with TestClient(app_for(settings, api_model)) as client:
        final = wait_for(client, job["id"], lambda body: body["status"] == "done")
        assert (final["completed"], final["pending"]) == (12, 0)
        assert [line["custom_id"] for line in results(client, job["id"])] == [r["id"] for r in records]
        other = client.post("/api/v1/batches", json={"template": TEMPLATE, "records": records}).json()
        cancelled = client.post(f"/api/v1/batches/{other['id']}/cancel")
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] in ("cancelled", "done")


def test_two_fronts_on_one_database_run_a_job_once(settings: Settings, api_model: DiffusionModel) -> None:
    """Two `editor serve` processes share a database: the job is claimed by one of them, the other
    leaves it alone, and when the first stops the other takes over what is left."""
    records = [{"id": f"r{n}"} for n in range(12)]
    first, second = SlowModel(api_model, delay=0.2), SlowModel(api_model, delay=0.0)
    with TestClient(app_for(settings, second)) as other:
        runner = other.app.state.batch_runner
        refused: list[int] = []
        claim = runner._claim

        async def counting_claim(job_id: int) -> bool:
            won = await claim(job_id)
            if not won:
                refused.append(job_id)
            return won

        runner._claim = counting_claim
        with TestClient(app_for(settings, first)) as client:
            job_id = client.post("/api/v1/batches", json={"template": TEMPLATE, "records": records}).json()["id"]
            wait_for(client, job_id, lambda body: body["completed"] >= 1)
            other.blocking_portal.call(runner.notify)  # the second front looks now (on its own loop)
            partway = wait_for(client, job_id, lambda body: body["completed"] >= 8)
            assert partway["status"] == "running" and refused == [job_id]
            assert second.forwards == 0
        # The first front stopped and released its claim: the second finishes the job.
        final = wait_for(other, job_id, lambda body: body["status"] == "done")
        assert (final["completed"], final["pending"]) == (12, 0) and second.forwards > 0
        assert [line["custom_id"] for line in results(other, job_id)] == [r["id"] for r in records]


def test_a_claim_holds_until_it_expires_and_ends_with_the_job(settings: Settings) -> None:
    migrate.upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    store = BatchStore(make_session_factory(engine))
    job = store.create_job(
        template="{}", options={}, instruction=None, model=None, input_name=None, records=[NewRecord(1, "a", {})]
    )
    now = datetime.now(UTC)
    assert store.claim(job.id, "front a", 60, now=now)
    assert store.claim(job.id, "front a", 60, now=now + timedelta(seconds=30))  # renewed by its holder
    assert not store.claim(job.id, "front b", 60, now=now + timedelta(seconds=89))  # and nobody else's
    assert store.claim(job.id, "front b", 60, now=now + timedelta(seconds=91))  # unless it expires unrenewed
    store.set_status(job.id, "cancelled")
    assert not store.claim(job.id, "front c", 60, now=now + timedelta(seconds=500))  # ended jobs stay ended
    engine.dispose()


def test_an_interactive_fill_finishes_while_a_batch_runs(settings: Settings, api_model: DiffusionModel) -> None:
    slow = SlowModel(api_model, delay=0.02)
    records = [{"id": f"r{n}"} for n in range(200)]
    with TestClient(app_for(settings, slow)) as client:
        job = client.post("/api/v1/batches", json={"template": TEMPLATE, "records": records, "options": OPTIONS}).json()
        wait_for(client, job["id"], lambda body: body["completed"] >= 1)
        fill = client.post("/api/v1/fill", json={"document": "Hello [MASK 2] world", "options": OPTIONS})
        assert fill.status_code == 200, fill.text
        during = client.get(f"/api/v1/batches/{job['id']}").json()
        assert during["status"] == "running" and during["pending"] > 0
        client.post(f"/api/v1/batches/{job['id']}/cancel")


def test_the_worker_runs_queued_interactive_fills_before_more_background_work(
    settings: Settings, api_model: DiffusionModel
) -> None:
    worker = ModelWorker(settings, loader=lambda: api_model)
    worker.start()
    assert worker.wait_ready(10)
    seen: list[str] = []  # written in the worker thread, in the order the work ran there
    release = threading.Event()
    jobs: list[FillJob] = []

    def piece(number: int) -> Callable[[DiffusionModel], None]:
        def work(model: DiffusionModel) -> None:
            if number == 1:
                release.wait(10)
            fill_state = jobs[0].state if jobs else "not submitted"
            seen.append(f"background {number}, fill {fill_state}")

        return work

    async def scenario() -> None:
        futures = [worker.submit_background(piece(1))]
        time.sleep(0.2)  # the worker is now inside the first piece
        futures += [worker.submit_background(piece(n)) for n in (2, 3)]
        jobs.append(worker.submit([parse_document("Hi [MASK 2]")], SamplerOptions(steps=2)))
        release.set()
        await jobs[0].result()
        for future in futures:
            await asyncio.wrap_future(future)

    try:
        asyncio.run(scenario())
    finally:
        worker.stop()
    assert seen == ["background 1, fill queued", "background 2, fill done", "background 3, fill done"]


def test_a_batch_job_is_not_starved_by_a_steady_stream_of_fills(settings: Settings, api_model: DiffusionModel) -> None:
    """With fills running back to back, background work still gets a turn every `batch_max_wait_s`."""
    patient = settings.model_copy(update={"batch_max_wait_s": 0.3})
    worker = ModelWorker(patient, loader=lambda: SlowModel(api_model, delay=0.05))
    worker.start()
    assert worker.wait_ready(10)
    seen: list[str] = []

    async def scenario() -> None:
        long = worker.submit([parse_document("Once upon a time [MASK 40] the end.")], SamplerOptions())
        await long.wait_started()
        piece = worker.submit_background(lambda model: seen.append(f"background while the fill is {long.state}"))
        await asyncio.wrap_future(piece)
        await long.result()

    try:
        asyncio.run(scenario())
    finally:
        worker.stop()
    assert seen == ["background while the fill is running"]
