"""A `postgresql://` database URL: the same migrations (up, down, up again) and the API storing
and reading revisions, on a throwaway PostgreSQL cluster started here from the Debian server
binaries (`apt-get install postgresql`, as the README's test command does), listening only on a
Unix socket in a temporary directory."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from litestar.testing import TestClient

from editor.db import migrate
from editor.db.batches import BatchStore, NewRecord
from editor.db.engine import make_engine, make_session_factory
from editor.db.services import Store
from editor.models.base import DiffusionModel
from editor.server.commands import db
from tests.api_fixtures import app_for, make_settings, results, wait_for
from tests.test_backup import export_text, fill_sample

pytest_plugins = ("tests.api_fixtures",)
pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("one_torch_thread")]


def server_binaries() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda path: int(path.parts[-3]))
    assert found, "PostgreSQL's server is not installed: apt-get install postgresql (see README, Tests)"
    return found[-1].parent


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A new cluster in a temporary directory; initdb refuses to run as root, so as root the
    server runs as `nobody`."""
    binaries = server_binaries()
    root = Path(tempfile.mkdtemp(prefix="editor-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        as_user = ["runuser", "-u", "nobody", "--"]
    data, log = root / "data", root / "server.log"
    try:
        subprocess.run(
            [*as_user, str(binaries / "initdb"), "-D", str(data), "-U", "editor", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
        )
        options = f"-k {root} -c listen_addresses='' -p 5432"
        subprocess.run(
            [*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start"],
            check=True,
            capture_output=True,
        )
        yield f"postgresql://editor@/postgres?host={root}"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                [*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], check=False
            )
        shutil.rmtree(root, ignore_errors=True)


def test_migrations_run_down_and_up_again(postgres_url: str) -> None:
    migrate.upgrade(postgres_url)
    head = migrate.head_revision(postgres_url)
    assert migrate.current_revision(postgres_url) == head
    migrate.downgrade(postgres_url, "base")
    assert migrate.current_revision(postgres_url) is None
    migrate.upgrade(postgres_url)
    assert migrate.current_revision(postgres_url) == head


def test_the_api_stores_and_reads_revisions(
    postgres_url: str, tmp_path: Path, api_model_dir: Path, api_model: DiffusionModel
) -> None:
    settings = make_settings(tmp_path, api_model_dir, database_url=postgres_url)
    app = app_for(settings, api_model)
    with TestClient(app) as client:
        assert app.state.worker.wait_ready(10)
        assert client.get("/ready").json()["database"] == "ok"
        source = "Dear [MASK 3 name=who],\nthank you for ordering [MASK 4]. [MASK 2 as=int] items"
        document = client.post("/api/v1/documents", json={"title": "pg", "source": source}).json()
        path = f"/api/v1/documents/{document['id']}"
        first = client.post(f"{path}/fill", json={"options": {"seed": 2**62 + 5}})
        assert first.status_code == 201, first.text
        stored = client.get(f"{path}/revisions/1?trace=true").json()
        assert stored["text"] == first.json()["text"]
        assert stored["seed"] == 2**62 + 5  # a 64-bit seed survives (BIGINT)
        assert [span["name"] for span in stored["spans"]] == ["who", None, None]
        assert stored["trace"]
        # Concurrent fills of one document get distinct, consecutive numbers (the row lock).
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: client.post(f"{path}/fill", json={}), range(6)))
        assert sorted(answer.json()["number"] for answer in answers) == [2, 3, 4, 5, 6, 7]
        regenerated = client.post(f"{path}/revisions/1/spans/who/regenerate", json={})
        assert regenerated.status_code == 201
        assert regenerated.json()["parent"] == 1
        listing = client.get(f"{path}/revisions?limit=100").json()
        assert listing["total"] == 8
        # U+0000 (which PostgreSQL's text cannot hold) is stored as U+FFFD, not a 500.
        odd = client.post("/api/v1/documents", json={"title": "a\x00b", "source": "x\x00y [MASK 2]"})
        assert odd.status_code == 201, odd.text
        stored_odd = client.get(f"/api/v1/documents/{odd.json()['id']}").json()
        assert (stored_odd["title"], stored_odd["source"]) == ("a\ufffdb", "x\ufffdy [MASK 2]")
        assert client.delete(path).status_code == 204
        assert client.get(f"{path}/revisions").status_code == 404


def test_api_batch_jobs_run_on_postgres(
    postgres_url: str, tmp_path: Path, api_model_dir: Path, api_model: DiffusionModel
) -> None:
    settings = make_settings(tmp_path, api_model_dir, database_url=postgres_url)
    app = app_for(settings, api_model)
    records = [{"id": "r1"}, {"id": "x" * 600}, {"id": "r3"}]
    with TestClient(app) as client:
        created = client.post(
            "/api/v1/batches", json={"template": {"id": "{id}", "n": "[MASK 2 as=int]"}, "records": records}
        )
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        job = wait_for(client, job_id, lambda body: body["status"] == "done")
        assert job["status"] == "done", job
        lines = results(client, job_id)
    assert [line["custom_id"] for line in lines] == ["r1", "2", "r3"]
    assert lines[1]["error"] == {"code": "invalid_record", "message": "line 2: the id is over 500 characters"}
    assert all(type(line["output"]["n"]) is int for line in (lines[0], lines[2]))


def test_a_batch_job_claim_is_exclusive_on_postgres(postgres_url: str) -> None:
    migrate.upgrade(postgres_url)
    engine = make_engine(postgres_url)
    store = BatchStore(make_session_factory(engine))
    job = store.create_job(
        template="{}", options={}, instruction=None, model=None, input_name=None, records=[NewRecord(1, "a", {})]
    )
    now = datetime.now(UTC)
    assert store.claim(job.id, "front a", 60, now=now)
    assert not store.claim(job.id, "front b", 60, now=now + timedelta(seconds=30))
    assert store.claim(job.id, "front b", 60, now=now + timedelta(seconds=61))  # a's claim expired
    store.release("front b")
    assert store.claim(job.id, "front a", 60, now=now + timedelta(seconds=62))
    engine.dispose()


def test_a_backup_goes_from_sqlite_to_postgres_and_back_unchanged(postgres_url: str, tmp_path: Path) -> None:
    """`editor db export` / `import`: SQLite -> PostgreSQL -> SQLite, and every row compares equal
    (ids, versions, timestamps, 64-bit seeds, floats, JSON, non-ASCII text)."""
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute("CREATE DATABASE roundtrip")
    postgres = postgres_url.replace("/postgres?", "/roundtrip?")
    source = f"sqlite:///{tmp_path / 'source.db'}"
    fill_sample(source)
    runner = CliRunner()
    first, second = tmp_path / "from-sqlite.jsonl", tmp_path / "from-postgres.jsonl"
    assert runner.invoke(db, ["--database-url", source, "export", str(first)]).exit_code == 0
    result = runner.invoke(db, ["--database-url", postgres, "import", str(first)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(db, ["--database-url", postgres, "export", str(second)])
    assert result.exit_code == 0, result.output
    assert second.read_text().split("\n", 1)[1] == first.read_text().split("\n", 1)[1]
    back = f"sqlite:///{tmp_path / 'back.db'}"
    assert runner.invoke(db, ["--database-url", back, "import", str(second)]).exit_code == 0
    assert export_text(back) == export_text(source)
    # PostgreSQL's id sequences moved past the imported ids: new rows do not collide.
    engine = make_engine(postgres)
    created = Store(make_session_factory(engine)).create_document("after import", "x")
    assert created.document.id > 1 and created.document.version == 1
    engine.dispose()
