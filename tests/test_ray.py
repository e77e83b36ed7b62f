"""`editor serve --replicas` and `editor batch --ray` on a local Ray instance (CPU, the tiny
model): fills land on both replicas, SSE streams from a replica, a full front answers 429, a
killed replica fails its fill with a 503 (nothing stored) and is restarted, API batch jobs run on
the replicas, and a Ray Data batch gives the local run's outputs (also when resumed).

Starting Ray and two replicas takes seconds, so the module shares one Ray instance and one app."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import ray
import torch
from click.testing import CliRunner
from litestar import Litestar
from litestar.testing import TestClient

from editor.batch.ray_data import RayDataFiller
from editor.batch.runner import BatchFiller, ResultWriter, read_input, run_records
from editor.batch.template import Template
from editor.cli import main
from editor.models.base import DiffusionModel
from editor.models.loading import load_model
from editor.options import SamplerOptions
from editor.server import create_app
from editor.server.ray_serve import RayBackend
from tests import test_api as api_tests
from tests.api_fixtures import load_slow_model, make_settings, results, wait_for
from tests.servers import free_port, wait_ready

pytest_plugins = ("tests.api_fixtures",)
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_torch_thread")]

Client = TestClient[Litestar]
SHORT = "Dear [MASK 3 name=who], thank you for [MASK 4]."
MEDIUM = "Dear [MASK 3 name=who], [MASK 40] Kind regards."  # 40 steps: 4 fills at once overlap
LONG = "Once upon a time [MASK 120] the end."  # 120 steps of 10 ms or more: seconds on a replica
DELAY = 0.01  # seconds per forward pass on the replicas (room to cancel or kill a fill mid-way)
APP_NAME = "editor-tests"  # not the default: the replicas must be this server's own application
READY_TIMEOUT_S = 300  # replicas start in seconds on a quiet machine, minutes on a loaded one; ready ends the wait


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def served(
    ray_instance: None, tmp_path_factory: pytest.TempPathFactory, api_model_dir: Path
) -> Iterator[tuple[Client, RayBackend]]:
    """An app with two replicas of the tiny model (slowed); each takes 2 fills (queue_size) and
    the front holds as many again, so 8 fills at once fit and the 9th is a 429."""
    settings = make_settings(
        tmp_path_factory.mktemp("ray_app"), api_model_dir, replicas=2, queue_size=2, ray_app_name=APP_NAME
    )
    backend = RayBackend(settings, loader=partial(load_slow_model, api_model_dir, DELAY))
    app = create_app(settings, worker=backend)
    with TestClient(app, timeout=120) as client:
        assert backend.wait_ready(READY_TIMEOUT_S), backend.load_error
        yield client, backend


def new_document(client: Client, source: str = SHORT) -> int:
    response = client.post("/api/v1/documents", json={"title": "ray", "source": source})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def revisions(client: Client, document_id: int) -> int:
    return int(client.get(f"/api/v1/documents/{document_id}/revisions").json()["total"])


def replica_actors() -> list[Any]:
    return [
        ray.get_actor(actor["name"], namespace=actor["namespace"])
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if f"::{APP_NAME}#FillReplica#" in actor["name"]
    ]


def fill_in_parallel(client: Client, document_id: int, count: int) -> list[httpx.Response]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: client.post(f"/api/v1/documents/{document_id}/fill", json={}), range(count)))


def wait_until_running(backend: RayBackend, timeout: float = 60) -> None:
    """Until a fill has started on a replica (its canvases are laid out there)."""
    deadline = time.monotonic() + timeout
    while not any(job.state == "running" for job in backend.jobs):
        assert time.monotonic() < deadline, "no fill started on a replica"
        time.sleep(0.02)


def marked_processes(mark: str) -> dict[int, str]:
    """pid -> command line of every process whose environment holds `TEST_PROCESS_MARK=mark`:
    a process started with it and everything it started (Ray's processes inherit the driver's
    environment), however they were re-parented; other tests' processes never match."""
    found: dict[int, str] = {}
    needle = f"TEST_PROCESS_MARK={mark}".encode()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def test_editor_serve_replicas_serves_and_stops_on_sigterm_leaving_no_ray_process(
    tmp_path: Path, api_model_dir: Path
) -> None:
    """The command as users run it: Ray starts with the server, the fill runs on the replica, and
    SIGTERM stops the server, the replica and the local Ray with every process it started (Ray's
    dashboard and runtime env agents outlived the server before, orphaned)."""
    port = free_port()
    mark = uuid.uuid4().hex
    env = {key: value for key, value in os.environ.items() if not key.startswith("EDITOR_")}
    env |= {"EDITOR_DATABASE_URL": f"sqlite:///{tmp_path / 'serve.db'}", "TEST_PROCESS_MARK": mark}
    command = [sys.executable, "-m", "editor", "serve", "--port", str(port), "--device", "cpu"]
    command += ["--model", str(api_model_dir), "--replicas", "1", "--log-level", "warning"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}", server, timeout=180)
        answer = httpx.post(f"http://127.0.0.1:{port}/api/v1/fill", json={"document": SHORT}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-editor-replica"]
        serving = list(marked_processes(mark).values())  # the mark reaches Ray's processes, agents included
        assert any("raylet" in line for line in serving) and any("agent" in line.lower() for line in serving), serving
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=90)[0].decode(errors="replace")
    assert server.returncode in (0, -signal.SIGTERM), output  # as without Ray (tests/test_shutdown.py)
    assert "1 Ray Serve replica(s)" in output
    assert "Deleting app ['editor']" in output  # the app's shutdown removed the replica
    deadline = time.monotonic() + 10  # a process that has been told to stop may take a moment
    while (left := marked_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == {}, f"Ray processes outlived the server: {left}"


def test_fills_land_on_both_replicas_and_each_stores_one_revision(served: tuple[Client, RayBackend]) -> None:
    client, _ = served
    document_id = new_document(client, MEDIUM)
    answers = fill_in_parallel(client, document_id, 4)  # 4 at once: one replica takes only 2 (queue_size)
    assert [answer.status_code for answer in answers] == [201] * 4
    assert len({answer.headers["x-editor-replica"] for answer in answers}) == 2
    assert sorted(answer.json()["number"] for answer in answers) == [1, 2, 3, 4]
    assert revisions(client, document_id) == 4
    ready = client.get("/ready").json()
    assert (
        ready["ready"] is True
        and ready["model"].endswith("tiny")
        and ready["model_placement"].startswith("cpu, float32, weights ")
    )
    assert client.post("/api/v1/tokenize", json={"text": "Dear customer"}).json()["count"] >= 2


def test_openai_chat_with_a_json_schema_runs_on_the_replicas(served: tuple[Client, RayBackend]) -> None:
    """The /v1 API reaches the replicas too: the schema's number rules and the conversation travel
    pickled with the fill, and the answer validates; a stream adds up to the same answer."""
    client, _ = served
    schema = {"type": "object", "properties": {"count": {"type": "integer"}, "size": {"enum": ["S", "M", "L"]}}}
    model = client.get("/v1/models").json()["data"][0]["id"]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "An order."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "order", "schema": schema}},
        "seed": 5,
    }
    answer = client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    value = json.loads(answer.json()["choices"][0]["message"]["content"])
    jsonschema.validate(value, schema)
    assert answer.json()["usage"]["prompt_tokens"] > 0
    with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as stream:
        lines = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    deltas = [c["delta"].get("content") or "" for chunk in lines[:-1] for c in json.loads(chunk)["choices"]]
    assert "".join(deltas) == answer.json()["choices"][0]["message"]["content"]


def test_a_fill_with_a_seed_matches_the_in_process_worker(
    served: tuple[Client, RayBackend], tmp_path: Path, api_model_dir: Path, api_model: DiffusionModel
) -> None:
    client, _ = served
    body = {"document": SHORT, "options": {"seed": 11, "temperature": 1.0}}
    remote = client.post("/api/v1/fill", json=body)
    local_app = create_app(make_settings(tmp_path, api_model_dir))
    with TestClient(local_app) as local_client:
        assert local_app.state.worker.wait_ready(30)
        local = local_client.post("/api/v1/fill", json=body)
    assert remote.status_code == local.status_code == 200
    assert "x-editor-replica" in remote.headers and "x-editor-replica" not in local.headers
    assert remote.json()["text"] == local.json()["text"]
    assert remote.json()["seed"] == 11


def test_sse_streams_the_steps_from_the_replica(served: tuple[Client, RayBackend]) -> None:
    client, _ = served
    document_id = new_document(client)
    with client.stream("POST", f"/api/v1/documents/{document_id}/fill", json={"stream": True}) as response:
        assert response.status_code == 201  # the new revision's status, as without replicas
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-editor-replica"]
        events = [line.removeprefix("event: ") for line in response.iter_lines() if line.startswith("event: ")]
    assert events[-1] == "result"
    assert events.count("step") >= 2
    assert revisions(client, document_id) == 1


def test_a_full_front_answers_429_with_retry_after(served: tuple[Client, RayBackend]) -> None:
    client, _ = served
    document_id = new_document(client, LONG)
    answers = fill_in_parallel(client, document_id, 16)
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses.count(429) >= 1 and statuses.count(201) >= 4, statuses
    refused = next(answer for answer in answers if answer.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert "queue is full" in refused.json()["detail"]
    assert revisions(client, document_id) == statuses.count(201)


def test_a_client_that_goes_away_cancels_the_fill_on_its_replica(served: tuple[Client, RayBackend]) -> None:
    client, backend = served
    document_id = new_document(client, LONG)
    path = f"/api/v1/documents/{document_id}/fill"
    chunks = client.blocking_portal.call(api_tests.stream_then_disconnect, client.app, path)
    assert any(b"event: step" in chunk for chunk in chunks)
    assert not any(b"event: result" in chunk for chunk in chunks)
    deadline = time.monotonic() + 30
    while backend.jobs:  # the relay ends once the Serve call is cancelled
        assert time.monotonic() < deadline, "the fill was not cancelled"
        time.sleep(0.05)
    assert revisions(client, document_id) == 0


def test_a_killed_replica_fails_its_fill_with_503_and_is_restarted(served: tuple[Client, RayBackend]) -> None:
    client, backend = served
    document_id = new_document(client, LONG)
    before = {answer.headers["x-editor-replica"] for answer in fill_in_parallel(client, new_document(client), 4)}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.post, f"/api/v1/documents/{document_id}/fill", json={})
        wait_until_running(backend)
        for actor in replica_actors():
            ray.kill(actor, no_restart=True)
        answer = pending.result(timeout=60)
    assert answer.status_code == 503
    assert "the replica running this fill stopped" in answer.json()["detail"]
    assert "nothing was stored" in answer.json()["detail"]
    assert revisions(client, document_id) == 0
    # Serve starts new replicas; fills work again, on replicas that were not there before.
    deadline, after = time.monotonic() + 90, set[str]()
    short = new_document(client)
    while len(after) < 2:
        assert time.monotonic() < deadline, f"replicas did not come back: {after}"
        response = client.post(f"/api/v1/documents/{short}/fill", json={})
        if response.status_code == 201:
            after.add(response.headers["x-editor-replica"])
        else:
            time.sleep(0.5)
    assert not after & before


def test_api_batch_jobs_run_on_the_replicas(served: tuple[Client, RayBackend]) -> None:
    client, _ = served
    template = {"id": "{id}", "text": "[MASK 3]", "n": "[MASK 2 as=int]"}
    records = [{"id": f"r{n}"} for n in range(5)] + [[1]]
    created = client.post("/api/v1/batches", json={"template": template, "records": records})
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    job = wait_for(client, job_id, lambda body: body["status"] == "done")
    assert job["status"] == "done", job
    assert (job["completed"], job["failed"]) == (5, 1)
    lines = results(client, job_id)
    assert [line["custom_id"] for line in lines] == [f"r{n}" for n in range(5)] + ["6"]
    assert all(type(line["output"]["n"]) is int for line in lines[:5])


# --------------------------------------------------------------------------- Ray Data


BATCH_TEMPLATE = {"id": "{id}", "greeting": "Dear [MASK 3], thank you", "count": "[MASK 2 as=int]"}
SEEDED = SamplerOptions(schedule="threshold", steps=3, seed=5, temperature=1.0)


def batch_lines(count: int) -> list[str]:
    lines = [json.dumps({"id": f"r{n}", "name": "x" * (n % 7)}) for n in range(count)]
    lines[3] = "{not json"
    return lines


def test_ray_data_gives_the_local_outputs_in_order_with_per_record_errors(
    ray_instance: None, api_model_dir: Path, api_model: DiffusionModel, tmp_path: Path
) -> None:
    template = Template.parse(json.dumps(BATCH_TEMPLATE))
    records = read_input(batch_lines(23), max_chars=10_000)
    local = BatchFiller(api_model, template, SEEDED, batch_size=3)
    remote = RayDataFiller(
        partial(load_model, api_model_dir, device="cpu", dtype=torch.float32), template, SEEDED, batch_size=3, workers=2
    )
    with (tmp_path / "local.jsonl").open("wb") as stream:
        run_records(local, records, ResultWriter(stream))
    with (tmp_path / "ray.jsonl").open("wb") as stream:
        summary = run_records(remote, records, ResultWriter(stream))
    assert (summary.done, summary.failed, summary.errors) == (22, 1, {"invalid_json": 1})
    ray_lines = (tmp_path / "ray.jsonl").read_text().splitlines()
    assert ray_lines == (tmp_path / "local.jsonl").read_text().splitlines()
    assert [json.loads(line)["custom_id"] for line in ray_lines] == ["4" if n == 3 else f"r{n}" for n in range(23)]


def test_editor_batch_ray_resumes_an_interrupted_run(
    ray_instance: None, api_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDITOR_MODEL", str(api_model_dir))
    monkeypatch.setenv("EDITOR_DEVICE", "cpu")
    (tmp_path / "template.json").write_text(json.dumps(BATCH_TEMPLATE))
    (tmp_path / "records.jsonl").write_text("\n".join(batch_lines(12)) + "\n")
    common = ["batch", str(tmp_path / "template.json"), str(tmp_path / "records.jsonl"), "--no-progress"]
    common += ["--seed", "5", "--steps", "3", "--temperature", "1", "--batch-size", "2"]
    runner = CliRunner()
    full = runner.invoke(main, [*common, "-o", str(tmp_path / "full.jsonl")])
    assert full.exit_code == 0, full.output
    expected = (tmp_path / "full.jsonl").read_text().splitlines()
    # An interrupted run: the first 5 lines made it to disk, the 6th only half. Resumed locally
    # and on Ray, the same records run in the same windows, so the outputs are the same.
    partial_output = "\n".join(expected[:5]) + "\n" + expected[5][:20]
    outputs = []
    for name, extra in (("local.jsonl", []), ("ray.jsonl", ["--ray", "--workers", "2"])):
        (tmp_path / name).write_text(partial_output)
        resumed = runner.invoke(main, [*common, "-o", str(tmp_path / name), "--resume", *extra])
        assert resumed.exit_code == 0, resumed.output
        assert "done 7, failed 0, skipped 5" in resumed.output
        outputs.append((tmp_path / name).read_text().splitlines())
    assert outputs[0] == outputs[1]
    assert outputs[1][:5] == expected[:5]
    assert [json.loads(line)["custom_id"] for line in outputs[1]] == [
        json.loads(line)["custom_id"] for line in expected
    ]


def test_ray_only_options_need_ray(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text(json.dumps(BATCH_TEMPLATE))
    result = CliRunner().invoke(main, ["batch", str(tmp_path / "t.json"), "-", "-o", "-", "--workers", "2"])
    assert result.exit_code == 2 and "--address and --workers go with --ray" in result.output
