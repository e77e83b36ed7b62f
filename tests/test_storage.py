"""Storage: migrations (up from empty, down to empty, in step with the models), SQLite pragmas,
the services' transactions, the `editor db` commands, and the settings object."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from editor.canvas import SpanAlternative, SpanFill
from editor.db import migrate
from editor.db.engine import make_engine, make_session_factory, write_session
from editor.db.models import Base, BatchJob, BatchRecord, Revision, RevisionSpan
from editor.db.services import NewRevision, NotFound, Store
from editor.document import DocumentLimits
from editor.server.commands import db
from editor.settings import Settings, is_loopback_host

TABLES = {"documents", "revisions", "revision_spans", "batch_jobs", "batch_records"}


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'data' / 'editor.db'}"


@pytest.fixture
def store(url: str) -> Store:
    migrate.upgrade(url)
    return Store(make_session_factory(make_engine(url)))


def tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def revision(text_: str = "Hi there.", *, spans: list[SpanFill] | None = None, **overrides: object) -> NewRevision:
    values: dict[str, object] = {
        "source": "Hi [MASK 1].",
        "text": text_,
        "model": "tiny",
        "seed": 1,
        "options": {"seed": 1},
        "steps": 1,
        "queued_s": 0.0,
        "fill_s": 0.1,
        "total_s": 0.1,
        "spans": spans
        if spans is not None
        else [SpanFill(index=0, name=None, start=3, end=8, text="there", token_ids=[5], confidence=0.5)],
    }
    return NewRevision(**(values | overrides))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- migrations


def test_upgrade_creates_every_table_and_downgrade_removes_them(url: str) -> None:
    assert migrate.current_revision(url) is None
    applied = migrate.upgrade(url)
    assert [step.revision for step in applied] == ["0001", "0002", "0003", "0004"] and "initial schema" in applied[
        0
    ].message
    assert tables(url) == TABLES
    assert migrate.is_current(url) and migrate.upgrade(url) == []  # idempotent
    undone = migrate.downgrade(url, "base")
    assert [step.revision for step in undone] == ["0004", "0003", "0002", "0001"]
    assert tables(url) == set() and migrate.current_revision(url) is None
    assert migrate.upgrade(url) and tables(url) == TABLES  # and back up again


def test_migrations_match_the_models(url: str) -> None:
    migrate.upgrade(url)
    engine = make_engine(url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


def test_migration_scripts_ship_inside_the_package() -> None:
    location = migrate.script_location()
    assert (location / "env.py").is_file() and (location / "versions").is_dir()
    assert (location / "env.py").is_file() and (location / "script.py.mako").is_file()
    assert any((location / "versions").glob("0001_*.py"))


def test_sqlite_runs_in_wal_mode_with_foreign_keys(url: str) -> None:
    migrate.upgrade(url)
    engine = make_engine(url)
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    engine.dispose()


def test_db_commands_upgrade_show_and_downgrade(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the scripts are found from any directory
    runner = CliRunner()
    result = runner.invoke(db, ["--database-url", url, "current"])
    assert result.exit_code == 0 and "none (empty)" in result.output and "behind" in result.output
    result = runner.invoke(db, ["--database-url", url, "upgrade"])
    assert result.exit_code == 0 and "Applied 0001" in result.output
    assert "up to date" in runner.invoke(db, ["--database-url", url, "current"]).output
    assert "Nothing to do" in runner.invoke(db, ["--database-url", url, "upgrade"]).output
    result = runner.invoke(db, ["--database-url", url, "downgrade"])  # one step
    assert result.exit_code == 0 and "Undid 0004" in result.output and tables(url) == TABLES
    result = runner.invoke(db, ["--database-url", url, "downgrade", "--revision", "base"])
    assert result.exit_code == 0 and "Undid 0003 (" in result.output and "0001 (initial" in result.output
    assert tables(url) == set()
    monkeypatch.setenv("EDITOR_DATABASE_URL", url)  # the URL also comes from the settings
    assert "Applied 0001" in runner.invoke(db, ["upgrade", "--revision", "0001"]).output
    bad = runner.invoke(db, ["upgrade", "--revision", "nope"])
    assert bad.exit_code != 0 and "nope" in bad.output


def test_an_existing_database_upgrades_to_span_alternatives(url: str) -> None:
    """`editor db upgrade` on a database of the previous version: old spans get no alternatives."""
    migrate.upgrade(url, "0002")
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO documents (id, title, source, created_at, updated_at) "
                "VALUES (1, 'Old', 'Hi [MASK 1].', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
            )
        )
        connection.execute(
            text(
                "INSERT INTO revisions (id, document_id, number, kind, source, text, model, seed, options, steps, "
                "queued_s, fill_s, total_s, created_at) VALUES (1, 1, 1, 'fill', 'Hi [MASK 1].', 'Hi there.', "
                "'tiny', 1, '{}', 1, 0, 0, 0, '2026-01-01 00:00:00')"
            )
        )
        connection.execute(
            text(
                'INSERT INTO revision_spans (revision_id, "index", start, "end", text, token_ids, confidence) '
                "VALUES (1, 0, 3, 8, 'there', '[5]', 0.5)"
            )
        )
    engine.dispose()
    result = CliRunner().invoke(db, ["--database-url", url, "upgrade"])
    assert result.exit_code == 0 and "Applied 0003" in result.output, result.output
    store = Store(make_session_factory(make_engine(url)))
    (span,) = store.get_revision(1, 1).spans
    assert span.to_fill().alternatives == [] and span.score is None and span.text == "there"
    assert store.get_document(1).document.version == 1  # documents from before versions start at 1
    assert [step.revision for step in migrate.downgrade(url, "0002")] == ["0004", "0003"]  # and back: the span stays
    engine = make_engine(url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT text FROM revision_spans")).scalars().all() == ["there"]
        assert "alternatives" not in {c["name"] for c in inspect(connection).get_columns("revision_spans")}
    engine.dispose()


# --------------------------------------------------------------------------- services


def test_documents_create_read_update_delete(store: Store) -> None:
    created = store.create_document("Letter", "Hi [MASK 1].")
    assert (created.revision_count, created.latest_revision) == (0, None)
    doc_id = created.document.id
    updated = store.update_document(doc_id, title="New")
    assert updated.document.title == "New" and updated.document.source == "Hi [MASK 1]."
    assert updated.document.updated_at >= created.document.updated_at
    assert updated.document.created_at.tzinfo is not None
    assert store.get_document(doc_id).document.title == "New"
    store.delete_document(doc_id)
    with pytest.raises(NotFound, match=f"document {doc_id}"):
        store.get_document(doc_id)
    with pytest.raises(NotFound):
        store.delete_document(doc_id)


def test_documents_page_newest_first(store: Store) -> None:
    ids = [store.create_document(f"d{i}", "x").document.id for i in range(5)]
    store.add_revision(ids[0], revision())  # a fill counts as a change: d0 moves to the top
    page = store.list_documents(limit=3, offset=0)
    assert page.total == 5 and [i.document.id for i in page.items] == [ids[0], ids[4], ids[3]]
    assert (page.items[0].revision_count, page.items[0].latest_revision) == (1, 1)
    assert [i.document.id for i in store.list_documents(limit=3, offset=3).items] == [ids[2], ids[1]]


def test_revisions_are_numbered_per_document_with_parents(store: Store) -> None:
    a = store.create_document("a", "x").document.id
    b = store.create_document("b", "x").document.id
    first = store.add_revision(a, revision())
    second = store.add_revision(a, revision("Hi you."))
    other = store.add_revision(b, revision())
    branch = store.add_revision(a, revision(kind="regenerate", regenerated_span=0, parent_number=1))
    numbered = [(r.number, r.parent_number) for r in (first, second, other, branch)]
    assert numbered == [(1, None), (2, 1), (1, None), (3, 1)]
    stored = store.get_revision(a, 2)
    assert stored.text == "Hi you." and stored.spans[0].token_ids == [5] and stored.parent_number == 1
    page = store.list_revisions(a, limit=10, offset=0)
    assert [r.number for r in page.items] == [3, 2, 1] and page.total == 3
    with pytest.raises(NotFound, match="revision 9 of document"):
        store.get_revision(a, 9)


def test_span_alternatives_and_known_scores_are_stored(store: Store) -> None:
    doc_id = store.create_document("a", "x").document.id
    alternatives = [
        SpanAlternative(text="you", token_ids=[7], score=-1.23456789),
        SpanAlternative(text="all", token_ids=[8, 9], score=-2.5),
    ]
    span = SpanFill(index=0, name="who", start=3, end=8, text="there", token_ids=[5], confidence=0.5)
    store.add_revision(doc_id, revision(spans=[span.model_copy(update={"alternatives": alternatives})]))
    store.add_revision(doc_id, revision(spans=[span], scores={0: -0.75}))
    first, second = (store.get_revision(doc_id, n).spans[0] for n in (1, 2))
    assert first.to_fill().alternatives == alternatives and first.score is None  # scores kept unrounded
    assert second.to_fill().alternatives == [] and second.score == -0.75


def test_a_failed_write_stores_nothing(store: Store) -> None:
    doc_id = store.create_document("a", "x").document.id
    with pytest.raises(NotFound):  # the parent does not exist
        store.add_revision(doc_id, revision(parent_number=7))
    with pytest.raises(NotFound):
        store.add_revision(12345, revision())
    duplicate = [
        SpanFill(index=0, name=None, start=0, end=1, text="H", token_ids=[1], confidence=1.0),
        SpanFill(index=0, name=None, start=1, end=2, text="i", token_ids=[2], confidence=1.0),
    ]
    with pytest.raises(IntegrityError):  # fails half way: the revision row was already written
        store.add_revision(doc_id, revision(spans=duplicate))
    assert store.list_revisions(doc_id, limit=10, offset=0).total == 0
    with write_session(store.sessions) as session:
        assert session.query(RevisionSpan).count() == 0


def test_deleting_a_document_deletes_its_revisions(store: Store) -> None:
    doc_id = store.create_document("a", "x").document.id
    store.add_revision(doc_id, revision())
    store.add_revision(doc_id, revision())
    store.delete_document(doc_id)
    with write_session(store.sessions) as session:
        assert session.query(Revision).count() == 0 and session.query(RevisionSpan).count() == 0


def test_concurrent_writers_get_distinct_revision_numbers(store: Store) -> None:
    doc_id = store.create_document("a", "x").document.id
    errors: list[BaseException] = []

    def add() -> None:
        try:
            for _ in range(5):
                store.add_revision(doc_id, revision())
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=add) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    numbers = [r.number for r in store.list_revisions(doc_id, limit=100, offset=0).items]
    assert sorted(numbers) == list(range(1, 31))


def test_batch_jobs_keep_their_records(store: Store) -> None:
    with write_session(store.sessions) as session:
        job = BatchJob(template='{"a": "[MASK 2]"}', options={"seed": 1}, total=2)
        job.records = [BatchRecord(line=1, input={"id": "x"}), BatchRecord(line=2, input={"id": "y"})]
        session.add(job)
    with write_session(store.sessions) as session:
        stored = session.get(BatchJob, job.id)
        assert stored is not None and stored.status == "pending" and [r.line for r in stored.records] == [1, 2]
        assert stored.records[0].status == "pending"
    with pytest.raises(IntegrityError), write_session(store.sessions) as session:  # one record per input line
        session.add(BatchRecord(job_id=job.id, line=2, input={}))


# --------------------------------------------------------------------------- settings


def test_settings_come_from_the_environment_and_a_dotenv_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("EDITOR_PORT", "EDITOR_MODEL", "EDITOR_MAX_SPANS", "EDITOR_API_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("EDITOR_PORT=9001\nEDITOR_MAX_SPANS=3\nEDITOR_MODEL=/models/x\n")
    monkeypatch.setenv("EDITOR_MAX_SPANS", "5")  # the environment wins over .env
    settings = Settings()
    assert (settings.port, settings.max_spans, settings.model) == (9001, 5, "/models/x")
    assert settings.document_limits() == DocumentLimits(max_chars=100_000, max_spans=5, max_span_tokens=512)
    assert settings.database_url == "sqlite:///editor.db"
    assert settings.host == "127.0.0.1" and settings.api_token is None and "api_token=None" in repr(settings)


def test_settings_validate_their_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDITOR_DEVICE", "tpu")
    with pytest.raises(ValueError, match="device"):
        Settings(_env_file=None)
    monkeypatch.delenv("EDITOR_DEVICE")
    with pytest.raises(ValueError):
        Settings(_env_file=None, queue_size=0)
    assert Settings(_env_file=None, device="cuda:1").device == "cuda:1"


def test_token_is_required_off_loopback() -> None:
    assert all(is_loopback_host(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2", "[::1]"))
    assert not any(is_loopback_host(h) for h in ("0.0.0.0", "192.168.1.5", "example.com", "::"))
    Settings(_env_file=None).check_serving()
    with pytest.raises(ValueError, match="EDITOR_API_TOKEN"):
        Settings(_env_file=None, host="0.0.0.0").check_serving()
    secret = Settings(_env_file=None, host="0.0.0.0", api_token="s3cr3t-t0ken")
    secret.check_serving()
    assert secret.token == "s3cr3t-t0ken" and "s3cr3t" not in repr(secret)  # the token is not printed
