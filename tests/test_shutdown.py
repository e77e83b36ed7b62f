"""Graceful shutdown of a real `editor serve` process: SIGTERM cancels the running fill at its next
step, answers it with a clear error, refuses what was queued, and exits within seconds with the
database intact and no partial revision."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.servers import free_port, wait_ready

pytest_plugins = ("tests.api_fixtures",)

# Long enough to be mid-fill for many seconds on the tiny model: 8 spans of 500 masks, 4000 steps.
LONG = " ".join(f"part {n}: [MASK 500]" for n in range(8))


def test_sigterm_cancels_running_fills_and_exits_promptly(tmp_path: Path, api_model_dir: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    database = tmp_path / "editor.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDITOR_")}
    env |= {
        "EDITOR_DATABASE_URL": f"sqlite:///{database}",
        "EDITOR_MAX_STEPS": "100000",
        "EDITOR_MAX_CANVAS_TOKENS": "8192",
        "EDITOR_FILL_TIMEOUT_S": "600",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "editor", "serve", "--port", str(port), "--model", str(api_model_dir)]
    process = subprocess.Popen(
        [*command, "--device", "cpu"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_ready(base, process)
        doc_id = httpx.post(f"{base}/api/v1/documents", json={"title": "long", "source": LONG}).json()["id"]
        answers: dict[str, Any] = {}
        first_step = threading.Event()

        def plain_fill() -> None:
            response = httpx.post(f"{base}/api/v1/documents/{doc_id}/fill", json={}, timeout=120)
            answers["plain"] = (response.status_code, response.json())

        def streamed_fill() -> None:
            events = []
            with httpx.stream("POST", f"{base}/api/v1/fill", json={"document": LONG, "stream": True}, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        events.append(line.removeprefix("event: "))
                        first_step.set()
                    elif line.startswith("data: ") and events and events[-1] == "error":
                        answers["stream_error"] = json.loads(line.removeprefix("data: "))
            answers["stream"] = events

        threads = [threading.Thread(target=streamed_fill), threading.Thread(target=plain_fill)]
        threads[0].start()
        assert first_step.wait(60), "the streamed fill never started"
        threads[1].start()  # queued behind the running fill (a batch that has started takes no more jobs)
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)  # exits within a few seconds, not after 4000 steps
        for thread in threads:
            thread.join(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
        output = process.stdout.read().decode() if process.stdout else ""
    # Uvicorn re-raises the signal once it has shut down cleanly, so the exit reads as SIGTERM.
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    assert answers["stream"][0] == "step" and answers["stream"][-1] == "error", answers
    assert "shutting down" in answers["stream_error"]["detail"]
    status, body = answers["plain"]
    assert status == 503 and "shutting down" in body["detail"], body
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM revisions").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM revision_spans").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM documents").fetchone()[0] == 1


def start_server(tmp_path: Path, api_model_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDITOR_")}
    env |= {
        "EDITOR_DATABASE_URL": f"sqlite:///{tmp_path / 'editor.db'}",
        "EDITOR_BATCH_CHUNK_ROWS": "1",  # one record at a time, so SIGTERM finds the job part done
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "editor", "serve", "--port", str(port), "--model", str(api_model_dir)]
    return subprocess.Popen(
        [*command, "--device", "cpu"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def test_sigterm_during_a_batch_job_and_the_job_resumes_after_a_restart(tmp_path: Path, api_model_dir: Path) -> None:
    """Records stored before SIGTERM stay stored, once each; a restarted server takes the job up at
    once (the stopping server released its claim) and finishes exactly the records left."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    records = [{"id": f"r{n}", "topic": f"topic {n}"} for n in range(40)]
    template = {"id": "{id}", "line": "About {topic}: [MASK 24]"}
    process = start_server(tmp_path, api_model_dir, port)
    try:
        wait_ready(base, process)
        job = httpx.post(f"{base}/api/v1/batches", json={"template": template, "records": records}).json()
        deadline = time.monotonic() + 120
        while (status := httpx.get(f"{base}/api/v1/batches/{job['id']}").json())["completed"] < 3:
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
        output = process.stdout.read().decode() if process.stdout else ""
    assert process.returncode in (0, -signal.SIGTERM), output
    with sqlite3.connect(tmp_path / "editor.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        done_before = db.execute("SELECT line, output FROM batch_records WHERE status = 'done'").fetchall()
        assert 3 <= len(done_before) < len(records), "SIGTERM should find the job part done"
        assert db.execute("SELECT status, runner FROM batch_jobs").fetchone() == ("running", None)  # claim released

    process = start_server(tmp_path, api_model_dir, port)
    try:
        wait_ready(base, process)
        deadline = time.monotonic() + 240
        while (status := httpx.get(f"{base}/api/v1/batches/{job['id']}").json())["status"] != "done":
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        lines = [json.loads(line) for line in httpx.get(f"{base}/api/v1/batches/{job['id']}/results").text.splitlines()]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
    assert (status["completed"], status["failed"], status["pending"]) == (len(records), 0, 0)
    assert [line["custom_id"] for line in lines] == [r["id"] for r in records]  # each once, in order
    with sqlite3.connect(tmp_path / "editor.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        kept = dict(db.execute("SELECT line, output FROM batch_records WHERE status = 'done'").fetchall())
    assert all(kept[line] == output for line, output in done_before)  # nothing stored before was redone
