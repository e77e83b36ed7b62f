"""Backups as JSON Lines (docs/operations.md): `editor db export` and `editor db import`.

One object a line, each with a `type`: a header (`editor-backup`, the format and the schema
revision it was written at), then every `document`, every `revision` (with its `spans`), every
`batch_job` and every `batch_record`, each with all of its stored columns, and last an `end`
line with the counts, so that a cut-off file is recognised. Rows keep their ids: an import
restores the same URLs, and parents and records point at the same rows.

Both directions stream: the export reads the rows in batches inside one read transaction (one
consistent snapshot of a live database), and the import checks each line as it reads it and
writes in batches. The import is one transaction: a bad line (its number and what was expected
are in the error), a cut-off file or any failure rolls everything back, so nothing is half
written. It only fills an empty database, so that ids cannot clash.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    TypeDecorator,
    func,
    select,
    text,
)
from sqlalchemy.orm import Session, sessionmaker

from editor import __version__
from editor.db.engine import read_session, write_session
from editor.db.models import Base, BatchJob, BatchRecord, Document, Revision, RevisionSpan

FORMAT = 1
HEADER = "editor-backup"
BATCH_ROWS = 500  # rows read or written at a time: memory stays bounded on any database size

# (line type, model, order) in the order an import needs them (parents before children).
TABLES: list[tuple[str, type[Base]]] = [
    ("document", Document),
    ("revision", Revision),
    ("batch_job", BatchJob),
    ("batch_record", BatchRecord),
]
_SPAN_SKIP = {"id", "revision_id"}  # a span is stored inside its revision's line


class BackupError(ValueError):
    """A backup file that cannot be imported: the message names the line and what was expected."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line


@dataclass
class Counts:
    rows: dict[str, int] = field(default_factory=lambda: {name: 0 for name, _ in TABLES})

    def __str__(self) -> str:
        return ", ".join(
            f"{count} {name.replace('_', ' ')}{'' if count == 1 else 's'}" for name, count in self.rows.items()
        )


# --------------------------------------------------------------------------- export


def export(sessions: sessionmaker[Session], out: IO[str], *, schema: str | None) -> Counts:
    """Write every row to `out`, one JSON object a line (see the module docstring)."""
    counts = Counts()
    header = {"type": HEADER, "format": FORMAT, "schema": schema, "editor": __version__}
    _write(out, header | {"exported_at": datetime.now(UTC).isoformat()})
    with read_session(sessions) as session:
        if session.get_bind().dialect.name == "postgresql":  # one snapshot for every statement
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        for name, model in TABLES:
            for row in _rows(session, model):
                record = {"type": name, **_columns(row, set())}
                if isinstance(row, Revision):
                    record["spans"] = [_columns(span, _SPAN_SKIP) for span in row.spans]
                _write(out, record)
                counts.rows[name] += 1
            session.expunge_all()
    _write(out, {"type": "end", "counts": counts.rows})
    return counts


def _rows(session: Session, model: type[Base]) -> Iterator[Base]:
    key = model.__table__.c.id
    last = 0
    while True:  # keyset pages: each page is a bounded query, whatever the table's size
        page = session.scalars(select(model).where(key > last).order_by(key).limit(BATCH_ROWS)).all()
        if not page:
            return
        yield from page
        last = page[-1].id  # type: ignore[attr-defined]
        session.expunge_all()


def _columns(row: Base, skip: set[str]) -> dict[str, Any]:
    values = {}
    for column in row.__table__.columns:
        if column.key in skip:
            continue
        value = getattr(row, column.key)
        values[column.key] = value.isoformat() if isinstance(value, datetime) else value
    return values


def _write(out: IO[str], record: dict[str, Any]) -> None:
    out.write(json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n")


# --------------------------------------------------------------------------- import


def import_(sessions: sessionmaker[Session], lines: IO[str]) -> Counts:
    """Restore a backup into an empty database in one transaction (BackupError on a bad file)."""
    counts = Counts()
    with write_session(sessions) as session:
        _require_empty(session)
        ended = False
        header_seen = False
        pending = 0
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            if ended:
                raise BackupError("text after the `end` line: the file was joined with another or edited", number)
            record = _parse(raw, number)
            kind = record.pop("type", None)
            if not header_seen:
                _check_header(kind, record, number)
                header_seen = True
                continue
            if kind == "end":
                _check_end(record, counts, number)
                ended = True
                continue
            session.add(_row(kind, record, number))
            counts.rows[str(kind)] += 1
            pending += 1
            if pending >= BATCH_ROWS:
                session.flush()
                session.expunge_all()
                pending = 0
        if not header_seen:
            raise BackupError("the file is empty: expected an editor backup (from `editor db export`)")
        if not ended:
            raise BackupError("the file ends without its `end` line: it was cut off (nothing was imported)")
        session.flush()
        _reset_sequences(session)
    return counts


def _require_empty(session: Session) -> None:
    found = {name: session.scalar(select(func.count()).select_from(model)) or 0 for name, model in TABLES}
    if any(found.values()):
        held = ", ".join(f"{count} {name}s" for name, count in found.items() if count)
        raise BackupError(
            f"the database is not empty ({held}): import into a new database (`editor db upgrade` on a new "
            "file or URL), so that ids cannot clash"
        )


def _parse(raw: str, number: int) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as error:
        raise BackupError(f"not JSON ({error.msg} at column {error.colno}): expected one JSON object", number) from None
    if not isinstance(record, dict):
        raise BackupError(f"a JSON {type(record).__name__}: expected one JSON object with a `type`", number)
    return record


def _check_header(kind: object, record: dict[str, Any], number: int) -> None:
    if kind != HEADER:
        raise BackupError(f"expected the header line (type {HEADER!r}) first, found type {kind!r}", number)
    if record.get("format") != FORMAT:
        raise BackupError(f"backup format {record.get('format')!r}: this editor reads format {FORMAT}", number)


def _check_end(record: dict[str, Any], counts: Counts, number: int) -> None:
    if record.get("counts") != counts.rows:
        raise BackupError(f"the `end` line counts {record.get('counts')} but the file holds {counts.rows}", number)


def _row(kind: object, record: dict[str, Any], number: int) -> Base:
    models = dict(TABLES)
    if not isinstance(kind, str) or kind not in models:
        expected = ", ".join(repr(name) for name in [*models, "end"])
        raise BackupError(f"unknown type {kind!r}: expected one of {expected}", number)
    model = models[kind]
    spans = record.pop("spans", None) if model is Revision else None
    values = _checked(model, record, set(), f"{kind}", number)
    row = model(**values)
    if model is Revision:
        if not isinstance(spans, list):
            raise BackupError("revision: field 'spans' must be a list of span objects", number)
        row.spans = [  # type: ignore[attr-defined]
            RevisionSpan(**_checked(RevisionSpan, _object(span, number, i), _SPAN_SKIP, f"revision span {i}", number))
            for i, span in enumerate(spans)
        ]
    return row


def _object(value: object, number: int, index: int) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BackupError(f"revision span {index} is a JSON {type(value).__name__}: expected an object", number)
    return value


def _checked(model: type[Base], record: dict[str, Any], skip: set[str], what: str, number: int) -> dict[str, Any]:
    """The record's values, each checked against its column (type, null), as model arguments."""
    table = model.__table__
    columns: dict[str, Column[Any]] = {c.key: cast("Column[Any]", c) for c in table.columns if c.key not in skip}
    unknown = sorted(set(record) - set(columns))
    if unknown:
        raise BackupError(f"{what}: unknown field {unknown[0]!r}; expected fields: {', '.join(columns)}", number)
    values: dict[str, Any] = {}
    for key, column in columns.items():
        if key not in record:
            if column.nullable or column.default is not None or column.server_default is not None:
                continue  # an older backup without a newer column: the column's default
            raise BackupError(f"{what}: missing field {key!r}", number)
        values[key] = _value(column, record[key], f"{what}: field {key!r}", number)
    return values


def _value(column: Column[Any], value: object, where: str, number: int) -> object:
    if value is None:
        if column.nullable and not column.primary_key:
            return None
        raise BackupError(f"{where} is null: expected {_expected(column)}", number)
    converted = _converted(_base_type(column), value)
    if converted is _WRONG:
        raise BackupError(f"{where} is {json.dumps(value)[:60]}: expected {_expected(column)}", number)
    limit = getattr(_base_type(column), "length", None)
    if isinstance(converted, str) and limit is not None and len(converted) > limit:
        raise BackupError(f"{where} is {len(converted)} characters long: at most {limit} fit", number)
    return converted


_WRONG = object()  # a value of the wrong JSON type for its column


def _converted(kind: Any, value: object) -> object:
    """`value` as the column type `kind` stores it, or _WRONG."""
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(kind, Integer | BigInteger) and not isinstance(kind, Boolean):
        return value if isinstance(value, int) and not isinstance(value, bool) else _WRONG
    if isinstance(kind, Float):
        return float(value) if is_number and math.isfinite(value) else _WRONG  # type: ignore[arg-type]
    if isinstance(kind, DateTime):
        return _timestamp(value)
    if isinstance(kind, JSON):
        return value
    if isinstance(kind, String | Text):
        return value if isinstance(value, str) else _WRONG
    return _WRONG


def _timestamp(value: object) -> object:
    if not isinstance(value, str):
        return _WRONG
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return _WRONG
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _base_type(column: Column[Any]) -> Any:
    """The stored type under our decorators (UTC timestamps, portable text)."""
    kind = column.type
    return kind.impl if isinstance(kind, TypeDecorator) else kind


def _expected(column: Column[Any]) -> str:
    kind = _base_type(column)
    if isinstance(kind, Integer | BigInteger):
        return "an integer"
    if isinstance(kind, Float):
        return "a number"
    if isinstance(kind, DateTime):
        return "an ISO 8601 timestamp"
    if isinstance(kind, JSON):
        return "any JSON value"
    return "a string"


def _reset_sequences(session: Session) -> None:
    """PostgreSQL: rows came with their ids, so each id sequence moves past the largest one."""
    if session.get_bind().dialect.name != "postgresql":
        return
    for _, model in [*TABLES, ("span", RevisionSpan)]:
        table = model.__table__.name  # type: ignore[attr-defined]
        session.execute(
            text(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), COALESCE(MAX(id), 1), MAX(id) IS NOT NULL) "
                f"FROM {table}"
            )
        )


__all__ = ["BackupError", "Counts", "export", "import_"]
