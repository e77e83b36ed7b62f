"""`editor db export` / `editor db import` (docs/operations.md): every stored row comes back the
same, a bad or cut-off file imports nothing and names the line, and an import only fills an empty
database. The round trip through PostgreSQL is in tests/test_postgres.py."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import text
from sqlalchemy.orm import Session

from editor.canvas import SpanAlternative, SpanFill
from editor.db import backup, migrate
from editor.db.batches import BatchStore, NewRecord, RecordOutcome
from editor.db.engine import make_engine, make_session_factory
from editor.db.models import Base
from editor.db.services import NewRevision, Store
from editor.server.commands import db

SOURCE = "Dear [MASK 3 name=greeting],\nthank you for [MASK 4]. ✓ 日本語 🙂"


def fill_sample(url: str) -> None:
    """Documents (one edited twice, one deleted), revisions with spans, alternatives, scores, a
    trace and a regenerated child, and a batch job with done, failed and pending records."""
    migrate.upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    store, batches = Store(sessions), BatchStore(sessions)
    first = store.create_document("Letter ✓", SOURCE).document.id
    store.update_document(first, source=SOURCE + " more")
    store.update_document(first, title="Letter, twice edited")
    gone = store.create_document("Deleted", "x [MASK 1]").document.id
    store.create_document("Empty", "no masks at all")
    span = SpanFill(
        index=0,
        name="greeting",
        start=5,
        end=10,
        text="Alice",
        token_ids=[5, 6],
        confidence=0.123456789012345,
        alternatives=[SpanAlternative(text="Bob", token_ids=[7], score=-1.0000000001)],
    )
    new = NewRevision(
        source=SOURCE,
        text="Dear Alice,\nthank you for it.",
        spans=[span],
        model="tiny",
        seed=2**62 + 5,
        options={"seed": 2**62 + 5, "temperature": 0.7, "nested": {"list": [1, 2.5, None]}},
        steps=12,
        queued_s=0.01,
        fill_s=1.25,
        total_s=1.26,
        instruction="be kind",
        trace=[{"step": 0, "commits": [{"position": 1, "token": 5}]}],
    )
    store.add_revision(first, new)
    store.add_revision(
        first, NewRevision(**{**new.__dict__, "kind": "regenerate", "regenerated_span": 0, "parent_number": 1})
    )
    store.add_revision(first, NewRevision(**{**new.__dict__, "trace": None, "scores": {0: -0.5}}))
    store.add_revision(gone, new)
    store.delete_document(gone)
    job = batches.create_job(
        template='{"n": "[MASK 2]"}',
        options={"steps": 4},
        instruction=None,
        model="tiny",
        input_name="in.jsonl",
        records=[
            NewRecord(1, "a", {"id": "a"}),
            NewRecord(2, "b", {"id": "b"}),
            NewRecord(3, "3", {}, error_line={"custom_id": "3", "error": {"code": "invalid_record", "message": "no"}}),
            NewRecord(4, "d", {"id": "d"}),
        ],
    )
    records = batches.pending_records(job.id, 10)
    batches.save_results(job.id, [RecordOutcome(records[0].id, {"custom_id": "a", "output": {"n": 1}}, seed=9)])
    engine.dispose()


def export_text(url: str) -> str:
    """The export without its header line (which says when and from which schema it was made)."""
    path = Path(url.removeprefix("sqlite:///")).with_suffix(".check.jsonl")
    result = CliRunner().invoke(db, ["--database-url", url, "export", str(path)])
    assert result.exit_code == 0, result.output
    return path.read_text(encoding="utf-8").split("\n", 1)[1]


@pytest.fixture
def sample(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'source.db'}"
    fill_sample(url)
    return url


def test_export_then_import_gives_back_every_row(sample: str, tmp_path: Path) -> None:
    runner = CliRunner()
    backup_file = tmp_path / "backup.jsonl"
    exported = runner.invoke(db, ["--database-url", sample, "export", str(backup_file)])
    assert exported.exit_code == 0, exported.output
    assert "Exported 2 documents, 3 revisions, 1 batch job, 4 batch records" in exported.output
    lines = [json.loads(line) for line in backup_file.read_text(encoding="utf-8").splitlines()]
    assert lines[0]["type"] == "editor-backup" and lines[0]["schema"] == migrate.head_revision(sample)
    assert lines[-1] == {
        "type": "end",
        "counts": {"document": 2, "revision": 3, "batch_job": 1, "batch_record": 4},
    }
    document = next(line for line in lines if line["type"] == "document")
    assert document["version"] == 3 and document["title"] == "Letter, twice edited"
    revision = next(line for line in lines if line["type"] == "revision")
    assert revision["seed"] == 2**62 + 5 and revision["spans"][0]["confidence"] == 0.123456789012345
    assert revision["spans"][0]["alternatives"] == [{"text": "Bob", "token_ids": [7], "score": -1.0000000001}]

    target = f"sqlite:///{tmp_path / 'restored.db'}"  # a new file: the import creates the schema
    imported = runner.invoke(db, ["--database-url", target, "import", str(backup_file)])
    assert imported.exit_code == 0, imported.output
    assert "Imported 2 documents, 3 revisions, 1 batch job, 4 batch records" in imported.output
    assert export_text(target) == export_text(sample)
    # The restored database goes on: new rows get new ids, versions and numbers continue.
    store = Store(make_session_factory(make_engine(target)))
    first = lines[1]["id"]
    assert store.update_document(first, title="after", expected_version=3).document.version == 4
    assert store.create_document("new", "x").document.id > max(
        line["id"] for line in lines if line["type"] == "document"
    )
    assert store.get_revision(first, 2).parent_number == 1


def test_a_bad_or_cut_off_file_imports_nothing_and_names_the_line(sample: str, tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    assert CliRunner().invoke(db, ["--database-url", sample, "export", str(good)]).exit_code == 0
    lines = good.read_text(encoding="utf-8").splitlines()
    revision_line = next(i for i, line in enumerate(lines) if '"type":"revision"' in line)
    broken_number = json.loads(lines[revision_line]) | {"number": "two"}
    cases = {
        "cut off": (lines[:-3], "ends without its `end` line"),
        "not json": ([*lines[:2], "{oops", *lines[2:]], "line 3: not JSON"),
        "bad field": (
            [*lines[:revision_line], json.dumps(broken_number), *lines[revision_line + 1 :]],
            f"line {revision_line + 1}: revision: field 'number' is \"two\": expected an integer",
        ),
        "unknown type": ([*lines[:1], '{"type": "comment"}', *lines[1:]], "line 2: unknown type 'comment'"),
        "unknown field": (
            [lines[0], lines[1].replace('"title"', '"titel"'), *lines[2:]],
            "line 2: document: unknown field 'titel'",
        ),
        "no header": (lines[1:], "line 1: expected the header line"),
        "wrong counts": ([*lines[:-1], '{"type":"end","counts":{}}'], "the `end` line counts"),
        "missing span field": (
            [
                *lines[:revision_line],
                json.dumps(json.loads(lines[revision_line]) | {"spans": [{"index": 0}]}),
                *lines[revision_line + 1 :],
            ],
            "revision span 0: missing field 'start'",
        ),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(content) + "\n", encoding="utf-8")
        target = f"sqlite:///{tmp_path / (name + '.db')}"
        result = CliRunner().invoke(db, ["--database-url", target, "import", str(path)])
        assert result.exit_code != 0 and message in result.output, (name, result.output)
        assert "nothing was imported" in result.output
        engine = make_engine(target)
        with engine.connect() as connection:  # not one row of the lines before the bad one
            for table in ("documents", "revisions", "revision_spans", "batch_jobs", "batch_records"):
                assert connection.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 0, (name, table)
            assert connection.execute(text("PRAGMA integrity_check")).scalar() == "ok"
        engine.dispose()


def test_import_refuses_a_database_that_has_documents(sample: str, tmp_path: Path) -> None:
    path = tmp_path / "b.jsonl"
    assert CliRunner().invoke(db, ["--database-url", sample, "export", str(path)]).exit_code == 0
    result = CliRunner().invoke(db, ["--database-url", sample, "import", str(path)])
    assert result.exit_code != 0 and "the database is not empty (2 documents" in result.output


def test_export_never_leaves_a_partial_file(sample: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "b.jsonl"
    path.write_text("an older backup\n", encoding="utf-8")

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(backup, "_write", fail)
    result = CliRunner().invoke(db, ["--database-url", sample, "export", str(path)])
    assert result.exit_code != 0
    assert path.read_text(encoding="utf-8") == "an older backup\n"  # the old backup is untouched
    assert not list(tmp_path.glob("*.partial"))


def test_export_streams_in_bounded_batches(sample: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are read a page at a time (keyset pages of BATCH_ROWS), never the whole table."""
    monkeypatch.setattr(backup, "BATCH_ROWS", 1)
    seen: list[int] = []
    original = backup._rows

    def counting(session: Session, model: type[Base]) -> Iterator[Base]:
        for row in original(session, model):
            seen.append(len(session.identity_map))
            yield row

    monkeypatch.setattr(backup, "_rows", counting)
    engine = make_engine(sample)
    out = io.StringIO()
    counts = backup.export(make_session_factory(engine), out, schema="x")
    engine.dispose()
    assert counts.rows["revision"] == 3 and max(seen) <= 3  # one row (a revision: with its span) at a time
