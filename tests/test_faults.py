"""Faults injected into a running server (issue 22), each answered with a clear 503 or 507 that
carries a request id (never a bare 500), with everything acknowledged before it still there, the
database passing its integrity check, and the next request working:

- SQLite full (its page limit reached) and read-only (query_only) while a revision is written;
- the database locked by another process for longer than the busy timeout;
- the model raising inside its forward pass at step k;
- the worker thread dying (it is restarted; past `worker_restarts`, /ready says not ready);
- a streaming client disconnecting mid-fill.

SIGTERM during a batch job is in tests/test_shutdown.py. The table of answers is in
docs/operations.md."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy import Engine, event

from editor.models.base import DiffusionModel
from editor.settings import Settings
from tests.api_fixtures import SlowModel, app_for, make_settings
from tests.test_api import stream_then_disconnect

pytest_plugins = ("tests.api_fixtures",)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

LETTER = "Dear [MASK 3 name=greeting],\nthank you for [MASK 12]. Kind regards, [MASK 2 name=sign]"
Client = TestClient[Litestar]


class FaultyModel(SlowModel):
    """The tiny model, raising `error` once, at its `fail_at`-th forward pass from now (`arm`)."""

    def __init__(self, model: DiffusionModel) -> None:
        super().__init__(model, delay=0.0)
        self.fail_at: int | None = None
        self.error: BaseException = RuntimeError("CUDA out of memory (injected)")

    def arm(self, step: int, error: BaseException) -> None:
        self.fail_at, self.error = self.forwards + step, error

    def _forward(self) -> None:
        super()._forward()
        if self.fail_at is not None and self.forwards >= self.fail_at:
            self.fail_at = None
            raise self.error


class WorkerKilled(BaseException):
    """Not an Exception: nothing in the worker's loop catches it, so its thread dies (as with a
    SystemExit from a library, or a bug in the loop itself)."""


@pytest.fixture
def model(api_model: DiffusionModel) -> FaultyModel:
    return FaultyModel(api_model)


@contextmanager
def running(settings: Settings, model: Any) -> Iterator[Client]:
    app = app_for(settings, model)
    with TestClient(app) as client:
        assert app.state.worker.wait_ready(10)
        yield client


def engine_of(client: Client) -> Engine:
    app: Litestar = client.app
    return app.state.store.sessions.kw["bind"]


@contextmanager
def on_every_connection(engine: Engine, *pragmas: str) -> Iterator[None]:
    """Run `pragmas` on each new SQLite connection while the block runs (the pool starts afresh)."""

    def apply(connection: Any, _record: Any) -> None:
        for pragma in pragmas:
            connection.execute(pragma)

    event.listen(engine, "connect", apply)
    engine.dispose()
    try:
        yield
    finally:
        event.remove(engine, "connect", apply)
        engine.dispose()


def database_file(settings: Settings) -> Path:
    return Path(settings.database_url.removeprefix("sqlite:///"))


def assert_intact(settings: Settings) -> None:
    with sqlite3.connect(database_file(settings)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def acknowledged(client: Client) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """A document edited once and filled once: what the client was told is stored."""
    created = client.post("/api/v1/documents", json={"title": "Kept", "source": LETTER})
    doc_id = created.json()["id"]
    edited = client.patch(f"/api/v1/documents/{doc_id}", json={"source": LETTER + " P.S."})
    assert edited.status_code == 200
    filled = client.post(f"/api/v1/documents/{doc_id}/fill", json={"options": {"seed": 3}, "trace": True})
    assert filled.status_code == 201
    return doc_id, edited.json(), filled.json()


def assert_kept(client: Client, doc_id: int, document: dict[str, Any], revision: dict[str, Any]) -> None:
    assert client.get(f"/api/v1/documents/{doc_id}").json()["source"] == document["source"]
    stored = client.get(f"/api/v1/documents/{doc_id}/revisions/{revision['number']}?trace=true").json()
    assert stored["text"] == revision["text"] and stored["spans"] == revision["spans"]


def assert_clear_error(response: Any, status: int, words: str) -> dict[str, Any]:
    body: dict[str, Any] = response.json()
    assert response.status_code == status, response.text
    assert words in body["detail"] and body["request_id"] == response.headers["x-request-id"], body
    return body


def assert_next_requests_work(client: Client, doc_id: int, revisions: int) -> None:
    assert client.get("/ready").status_code == 200
    assert client.patch(f"/api/v1/documents/{doc_id}", json={"title": "after the fault"}).status_code == 200
    again = client.post(f"/api/v1/documents/{doc_id}/fill", json={"options": {"seed": 5}})
    assert again.status_code == 201, again.text
    assert again.json()["number"] == revisions + 1  # no number was used up by the failed write


# --------------------------------------------------------------------------- the database


FaultCase = tuple[str, Callable[[int], tuple[str, ...]], int, str]
DATABASE_FAULTS: list[FaultCase] = [
    # The database may not grow beyond its present pages: SQLITE_FULL, as on a full disk.
    ("disk full", lambda pages: (f"PRAGMA max_page_count={pages}",), 507, "no room left"),
    # Writes refused by SQLite itself: SQLITE_READONLY, as for a read-only file or mount.
    ("read-only", lambda _pages: ("PRAGMA query_only=ON",), 503, "read-only"),
]


@pytest.mark.parametrize("case", DATABASE_FAULTS, ids=[case[0] for case in DATABASE_FAULTS])
def test_a_database_that_cannot_be_written_during_a_revision_write(
    settings: Settings, model: FaultyModel, case: FaultCase
) -> None:
    _, pragmas, status, words = case
    with running(settings, model) as client:
        doc_id, document, revision = acknowledged(client)
        pages = sqlite3.connect(database_file(settings)).execute("PRAGMA page_count").fetchone()[0]
        with on_every_connection(engine_of(client), *pragmas(pages)):
            # The model fills, then storing its revision (with the step trace) fails.
            fill = client.post(f"/api/v1/documents/{doc_id}/fill", json={"trace": True})
            body = assert_clear_error(fill, status, words)
            assert "nothing was stored" in body["detail"]
            big = client.patch(f"/api/v1/documents/{doc_id}", json={"source": LETTER + " x" * 20_000})
            assert_clear_error(big, status, words)
            assert client.get(f"/api/v1/documents/{doc_id}").status_code == 200  # reading still works
            assert client.get("/ready").status_code == 200
        assert_intact(settings)
        assert_kept(client, doc_id, document, revision)
        assert client.get(f"/api/v1/documents/{doc_id}/revisions").json()["total"] == 1
        assert_next_requests_work(client, doc_id, revisions=1)


def test_a_database_locked_beyond_the_busy_timeout(tmp_path: Path, api_model_dir: Path, model: FaultyModel) -> None:
    settings = make_settings(tmp_path, api_model_dir, database_busy_timeout_s=0.3)
    with running(settings, model) as client:
        doc_id, document, revision = acknowledged(client)
        other = sqlite3.connect(database_file(settings), isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            patch = client.patch(f"/api/v1/documents/{doc_id}", json={"title": "mine"})
            assert_clear_error(patch, 503, "database is busy")
            assert patch.headers["retry-after"] == "5"
            fill = client.post(f"/api/v1/documents/{doc_id}/fill")
            assert_clear_error(fill, 503, "database is busy")
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert_intact(settings)
        assert_kept(client, doc_id, document, revision)
        assert_next_requests_work(client, doc_id, revisions=1)


# --------------------------------------------------------------------------- the model and its worker


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_exception_in_the_models_forward_at_step_k(settings: Settings, model: FaultyModel, stream: bool) -> None:
    with running(settings, model) as client:
        doc_id, document, revision = acknowledged(client)
        model.arm(step=4, error=RuntimeError("CUDA out of memory (injected)"))
        fill = client.post(f"/api/v1/documents/{doc_id}/fill", json={"stream": stream})
        if stream:  # the stream has started: its last event says what happened
            last = fill.text.replace("\r\n", "\n").strip().split("\n\n")[-1]
            assert last.startswith("event: error") and '"status_code": 503' in last, last
            assert "the model failed during this fill (RuntimeError)" in last and "request_id" in last
        else:
            body = assert_clear_error(fill, 503, "the model failed during this fill (RuntimeError)")
            assert "nothing was stored" in body["detail"]
        assert model.fail_at is None  # it did fail
        assert client.get(f"/api/v1/documents/{doc_id}/revisions").json()["total"] == 1
        assert_intact(settings)
        assert_kept(client, doc_id, document, revision)
        assert_next_requests_work(client, doc_id, revisions=1)


# The dying thread's traceback is the injected fault, reported as it would be in production.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_worker_thread_dying_is_noticed_and_it_is_restarted(settings: Settings, model: FaultyModel) -> None:
    with running(settings, model) as client:
        app: Litestar = client.app
        doc_id, document, revision = acknowledged(client)
        first_thread = app.state.worker._thread
        model.arm(step=3, error=WorkerKilled())
        fill = client.post(f"/api/v1/documents/{doc_id}/fill")
        body = assert_clear_error(fill, 503, "the model worker stopped unexpectedly")
        assert "nothing was stored" in body["detail"]
        deadline = time.monotonic() + 5
        while not app.state.worker.ready and time.monotonic() < deadline:
            time.sleep(0.02)
        assert app.state.worker.ready
        assert app.state.worker._thread is not first_thread and app.state.worker._thread.is_alive()
        assert_intact(settings)
        assert_kept(client, doc_id, document, revision)
        assert_next_requests_work(client, doc_id, revisions=1)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_worker_that_keeps_dying_makes_the_server_not_ready(
    tmp_path: Path, api_model_dir: Path, model: FaultyModel
) -> None:
    settings = make_settings(tmp_path, api_model_dir, worker_restarts=0)
    with running(settings, model) as client:
        doc_id, document, revision = acknowledged(client)
        model.arm(step=2, error=WorkerKilled())
        assert_clear_error(client.post(f"/api/v1/documents/{doc_id}/fill"), 503, "stopped unexpectedly")
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["ready"] is False  # a supervisor restarts it
        later = client.post(f"/api/v1/documents/{doc_id}/fill")
        assert_clear_error(later, 503, "the server needs a restart")
        assert client.patch(f"/api/v1/documents/{doc_id}", json={"title": "still saved"}).status_code == 200
        assert_intact(settings)
        assert_kept(client, doc_id, document, revision)


def test_a_streaming_client_that_disconnects(settings: Settings, api_model: DiffusionModel) -> None:
    slow = FaultyModel(api_model)
    slow.delay = 0.02
    with running(settings, slow) as client:
        doc_id, document, revision = acknowledged(client)
        long_doc = client.post("/api/v1/documents", json={"title": "long", "source": "Start [MASK 60] end."})
        path = f"/api/v1/documents/{long_doc.json()['id']}/fill"
        chunks = client.blocking_portal.call(stream_then_disconnect, client.app, path)
        assert any(b"event: step" in chunk for chunk in chunks)
        assert not any(b"event: result" in chunk for chunk in chunks)
        assert client.get(f"{path.removesuffix('/fill')}/revisions").json()["total"] == 0  # nothing half stored
        assert_intact(settings)
        assert_kept(client, doc_id, document, revision)
        assert_next_requests_work(client, doc_id, revisions=1)
