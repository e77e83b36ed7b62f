"""Storage (docs/architecture.md): SQLAlchemy models, the engine and sessions, Alembic migrations and the
services that the API uses (each write one transaction)."""

from editor.db.engine import (
    make_engine,
    make_session_factory,
    read_session,
    write_session,
)
from editor.db.models import (
    Base,
    BatchJob,
    BatchRecord,
    Document,
    Revision,
    RevisionSpan,
)

__all__ = [
    "Base",
    "BatchJob",
    "BatchRecord",
    "Document",
    "Revision",
    "RevisionSpan",
    "make_engine",
    "make_session_factory",
    "read_session",
    "write_session",
]
