"""Document and revision services between the API and the database.

Every method is one transaction: a write either happens completely or not at all (and a failed
request stores nothing). Methods are synchronous; the API calls them from worker threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, text, true
from sqlalchemy.orm import Session, sessionmaker

from editor.canvas import SpanFill
from editor.db.engine import read_session, write_session
from editor.db.models import Document, Revision, RevisionSpan, utcnow


class NotFound(LookupError):
    """An unknown document or revision; the API answers 404."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} not found")
        self.what = what


class StaleVersion(Exception):
    """A write named a document version (If-Match) that is no longer the current one; the API
    answers 412 with the current version, and nothing is written."""

    def __init__(self, document_id: int, expected: int, current: int) -> None:
        super().__init__(
            f"document {document_id} is at version {current}, not {expected}: someone else changed it "
            "since you read it; read it again (GET) and reapply your change"
        )
        self.document_id = document_id
        self.expected = expected
        self.current = current


@dataclass(frozen=True)
class DocumentInfo:
    """A document with its revision count and latest revision number."""

    document: Document
    revision_count: int
    latest_revision: int | None


@dataclass(frozen=True)
class NewRevision:
    """Everything a fill produced, ready to be stored."""

    source: str
    text: str
    spans: Sequence[SpanFill]
    model: str
    seed: int
    options: dict[str, Any]
    steps: int
    queued_s: float
    fill_s: float
    total_s: float
    instruction: str | None = None
    trace: list[Any] | None = None
    kind: str = "fill"
    regenerated_span: int | None = None
    parent_number: int | None = None  # None: the document's latest revision (if any)
    # Span index -> the judge's score of that span's own text, where known (see RevisionSpan.score).
    scores: Mapping[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Page:
    items: list[Any]
    total: int
    limit: int
    offset: int


class Store:
    """Documents and revisions. Returned objects are detached and safe to read after the call."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    # -- health --

    def ping(self) -> None:
        """Raise if the database cannot be reached."""
        with read_session(self.sessions) as session:
            session.execute(text("SELECT 1"))

    # -- documents --

    def create_document(self, title: str, source: str) -> DocumentInfo:
        with write_session(self.sessions) as session:
            document = Document(title=title, source=source)
            session.add(document)
            session.flush()
            return DocumentInfo(document, 0, None)

    def list_documents(self, *, limit: int, offset: int, title_contains: str | None = None) -> Page:
        """Newest first (by last update); with `title_contains`, only titles containing it (any case)."""
        matching = Document.title.icontains(title_contains, autoescape=True) if title_contains else true()
        with read_session(self.sessions) as session:
            total = session.scalar(select(func.count()).select_from(Document).where(matching)) or 0
            stats = _revision_stats()
            rows = session.execute(
                select(Document, stats.c.count, stats.c.latest)
                .outerjoin(stats, stats.c.document_id == Document.id)
                .where(matching)
                .order_by(Document.updated_at.desc(), Document.id.desc())
                .limit(limit)
                .offset(offset)
            ).all()
            items = [DocumentInfo(document, count or 0, latest) for document, count, latest in rows]
            return Page(items, total, limit, offset)

    def get_document(self, document_id: int) -> DocumentInfo:
        with read_session(self.sessions) as session:
            return _document_info(session, document_id)

    def update_document(
        self,
        document_id: int,
        *,
        title: str | None = None,
        source: str | None = None,
        expected_version: int | None = None,
    ) -> DocumentInfo:
        """Change title and/or source and count the version up. With `expected_version`, raise
        StaleVersion (writing nothing) unless the document is still at that version."""
        with write_session(self.sessions) as session:
            document = _document(session, document_id, lock=True)
            _check_version(document, expected_version)
            if title is not None:
                document.title = title
            if source is not None:
                document.source = source
            document.updated_at = utcnow()  # also when nothing changed: the client did write
            document.version += 1
            session.flush()
            return _document_info(session, document_id)

    def delete_document(self, document_id: int, *, expected_version: int | None = None) -> None:
        """Delete a document with all its revisions (StaleVersion as in `update_document`)."""
        with write_session(self.sessions) as session:
            document = _document(session, document_id, lock=True)
            _check_version(document, expected_version)
            session.delete(document)

    # -- revisions --

    def add_revision(self, document_id: int, new: NewRevision, *, expected_version: int | None = None) -> Revision:
        """Store a fill as the document's next revision. Raises NotFound if the document (or the
        named parent revision) is gone, StaleVersion if `expected_version` is given and the
        document has moved on since; in either case nothing is stored."""
        with write_session(self.sessions) as session:
            # Concurrent fills of a document number in turn.
            _check_version(_document(session, document_id, lock=True), expected_version)
            latest = session.scalar(select(func.max(Revision.number)).where(Revision.document_id == document_id))
            parent_number = new.parent_number if new.parent_number is not None else latest
            parent = _revision(session, document_id, parent_number) if parent_number is not None else None
            revision = Revision(
                document_id=document_id,
                number=(latest or 0) + 1,
                parent_id=parent.id if parent else None,
                kind=new.kind,
                regenerated_span=new.regenerated_span,
                source=new.source,
                instruction=new.instruction,
                text=new.text,
                model=new.model,
                seed=new.seed,
                options=new.options,
                steps=new.steps,
                queued_s=new.queued_s,
                fill_s=new.fill_s,
                total_s=new.total_s,
                trace=new.trace,
                spans=[RevisionSpan.from_fill(span, new.scores.get(span.index)) for span in new.spans],
            )
            session.add(revision)
            document = session.get(Document, document_id)
            assert document is not None
            document.updated_at = utcnow()
            session.flush()
            session.refresh(revision)  # loads parent_number
            return revision

    def list_revisions(self, document_id: int, *, limit: int, offset: int) -> Page:
        """Newest first."""
        with read_session(self.sessions) as session:
            _document(session, document_id)
            total = session.scalar(select(func.count()).where(Revision.document_id == document_id)) or 0
            revisions = session.scalars(
                select(Revision)
                .where(Revision.document_id == document_id)
                .order_by(Revision.number.desc())
                .limit(limit)
                .offset(offset)
            ).all()
            return Page(list(revisions), total, limit, offset)

    def get_revision(self, document_id: int, number: int) -> Revision:
        with read_session(self.sessions) as session:
            _document(session, document_id)
            return _revision(session, document_id, number)


def _revision_stats() -> Any:
    return (
        select(Revision.document_id, func.count().label("count"), func.max(Revision.number).label("latest"))
        .group_by(Revision.document_id)
        .subquery()
    )


def _document(session: Session, document_id: int, *, lock: bool = False) -> Document:
    """With `lock`, the row stays locked until the transaction ends (SELECT ... FOR UPDATE on
    PostgreSQL, where writers do not queue on one database lock as with SQLite)."""
    document = session.get(Document, document_id, with_for_update=lock)
    if document is None:
        raise NotFound(f"document {document_id}")
    return document


def _check_version(document: Document, expected: int | None) -> None:
    if expected is not None and document.version != expected:
        raise StaleVersion(document.id, expected, document.version)


def _document_info(session: Session, document_id: int) -> DocumentInfo:
    document = _document(session, document_id)
    count, latest = session.execute(
        select(func.count(), func.max(Revision.number)).where(Revision.document_id == document_id)
    ).one()
    return DocumentInfo(document, count, latest)


def _revision(session: Session, document_id: int, number: int) -> Revision:
    revision = session.scalar(select(Revision).where(Revision.document_id == document_id, Revision.number == number))
    if revision is None:
        raise NotFound(f"revision {number} of document {document_id}")
    return revision


__all__ = ["DocumentInfo", "NewRevision", "NotFound", "Page", "StaleVersion", "Store"]
