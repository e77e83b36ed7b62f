"""The stored schema (docs/architecture.md): documents, their revisions and each revision's spans, and
batch jobs with their records. Alembic migrations in `editor/migrations` create these tables;
`tests/test_storage.py` checks that the migrations and these models agree."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    select,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    column_property,
    mapped_column,
    relationship,
)

from editor.canvas import SpanFill

# Stable constraint names, so later migrations (SQLite batch mode) can refer to them.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored as UTC and read back timezone-aware (SQLite keeps no zone)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use timezone-aware UTC timestamps")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class PortableText(TypeDecorator[str]):
    """Text that every supported database stores: PostgreSQL's text cannot hold U+0000, which a
    document or a byte-level model's output may contain, so there it is stored as U+FFFD (the
    replacement character). Other databases store the text unchanged."""

    impl = Text
    cache_ok = True

    def __init__(self, length: int | None = None) -> None:
        super().__init__()
        self.impl = String(length) if length is not None else Text()  # type: ignore[assignment]

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        if value is not None and dialect.name == "postgresql":
            return value.replace("\x00", "\ufffd")
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class Document(Base):
    """A user's document source; every fill of it becomes a revision."""

    __tablename__ = "documents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(PortableText(200))
    source: Mapped[str] = mapped_column(PortableText())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # Counted up by every change of title or source: the API's ETag, checked against If-Match so
    # that two editors of one document cannot overwrite each other unseen. Fills leave it alone.
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")

    revisions: Mapped[list[Revision]] = relationship(
        back_populates="document", cascade="all, delete-orphan", passive_deletes=True, order_by="Revision.number"
    )


class Revision(Base):
    """One fill of a document: what was filled, with which parameters, and what came out.

    `number` counts 1, 2, 3... per document and is what URLs use. `options` holds every sampler
    parameter as given (with the seed actually used), so a revision can be reproduced.
    """

    __tablename__ = "revisions"
    __table_args__ = (UniqueConstraint("document_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("revisions.id", ondelete="SET NULL"), index=True)
    kind: Mapped[str] = mapped_column(PortableText(16))  # "fill", "regenerate" or "choose"
    # The span a "regenerate" refilled or a "choose" took another candidate's text for (its index).
    regenerated_span: Mapped[int | None] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(PortableText())  # the document source that was filled
    instruction: Mapped[str | None] = mapped_column(PortableText())
    text: Mapped[str] = mapped_column(PortableText())
    model: Mapped[str] = mapped_column(PortableText(500))
    seed: Mapped[int] = mapped_column(BigInteger)
    options: Mapped[dict[str, Any]] = mapped_column(JSON)
    steps: Mapped[int] = mapped_column(Integer)  # sampler steps actually run
    queued_s: Mapped[float] = mapped_column(Float)
    fill_s: Mapped[float] = mapped_column(Float)
    total_s: Mapped[float] = mapped_column(Float)
    trace: Mapped[list[Any] | None] = mapped_column(JSON)  # step events, when kept
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    document: Mapped[Document] = relationship(back_populates="revisions")
    if TYPE_CHECKING:
        parent_number: int | None  # a column_property, defined below the class
    spans: Mapped[list[RevisionSpan]] = relationship(
        back_populates="revision",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="RevisionSpan.index",
        lazy="selectin",
    )


# The parent's per-document number (what URLs use), loaded with every revision.
_parent = Revision.__table__.alias("parent")
Revision.parent_number = column_property(  # type: ignore[assignment]
    select(_parent.c.number).where(_parent.c.id == Revision.parent_id).correlate_except(_parent).scalar_subquery()
)


class RevisionSpan(Base):
    """One span's result in a revision: character offsets into the revision's text, tokens, confidence."""

    __tablename__ = "revision_spans"
    __table_args__ = (UniqueConstraint("revision_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    revision_id: Mapped[int] = mapped_column(ForeignKey("revisions.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    name: Mapped[str | None] = mapped_column(PortableText(64))
    start: Mapped[int] = mapped_column(Integer)
    end: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(PortableText())
    token_ids: Mapped[list[Any]] = mapped_column(JSON)
    confidence: Mapped[float] = mapped_column(Float)
    # Other judged candidates' texts for the span, best first: SpanAlternative fields as JSON.
    alternatives: Mapped[list[Any]] = mapped_column(JSON, default=list, server_default="[]")
    # The judge's score of this span's own text when known: a fill reports scores only for the
    # candidates it did not keep, so this is set when a text is chosen from the alternatives.
    score: Mapped[float | None] = mapped_column(Float)

    revision: Mapped[Revision] = relationship(back_populates="spans")

    @classmethod
    def from_fill(cls, span: SpanFill, score: float | None = None) -> RevisionSpan:
        # Field by field, unrounded (model_dump would round the confidence and the scores).
        fields = dict(span) | {"alternatives": [dict(alternative) for alternative in span.alternatives]}
        return cls(**fields, score=score)

    def to_fill(self) -> SpanFill:
        return SpanFill.model_validate(self, from_attributes=True)


class BatchJob(Base):
    """A JSON-template batch: stored so that it survives a restart and resumes where it stopped."""

    __tablename__ = "batch_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # pending, running, done, failed or cancelled
    status: Mapped[str] = mapped_column(PortableText(16), default="pending", index=True)
    template: Mapped[str] = mapped_column(PortableText())
    options: Mapped[dict[str, Any]] = mapped_column(JSON)
    instruction: Mapped[str | None] = mapped_column(PortableText())
    model: Mapped[str | None] = mapped_column(PortableText(500))
    input_name: Mapped[str | None] = mapped_column(PortableText(500))  # e.g. the JSONL file it came from
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(PortableText())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()
    # The front process running the job and until when its claim holds: several `editor serve`
    # processes on one database run each job once; a crashed one's job is taken over after expiry.
    runner: Mapped[str | None] = mapped_column(PortableText(200))
    lease_until: Mapped[datetime | None] = mapped_column()

    records: Mapped[list[BatchRecord]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True, order_by="BatchRecord.line"
    )


class BatchRecord(Base):
    """One input line of a batch job and its outcome (output or error)."""

    __tablename__ = "batch_records"
    __table_args__ = (UniqueConstraint("job_id", "line"), Index("ix_batch_records_job_id_status", "job_id", "status"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("batch_jobs.id", ondelete="CASCADE"))
    line: Mapped[int] = mapped_column(Integer)  # 1-based line in the input
    record_key: Mapped[str | None] = mapped_column(PortableText(500))  # the record's id field, if any
    input: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(PortableText(16), default="pending")  # pending/done/failed
    output: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(PortableText())
    seed: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    job: Mapped[BatchJob] = relationship(back_populates="records")


__all__ = ["Base", "BatchJob", "BatchRecord", "Document", "Revision", "RevisionSpan", "utcnow"]
