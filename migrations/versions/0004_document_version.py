"""documents: a version counted up by every change of title or source (optimistic concurrency: ETag / If-Match)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Documents stored before versions existed start at version 1. A plain ADD COLUMN: batch mode
    # would copy `documents`, and dropping the old copy would delete revisions (see downgrade).
    op.add_column("documents", sa.Column("version", sa.Integer(), server_default="1", nullable=False))


def downgrade() -> None:
    # A plain DROP COLUMN (SQLite 3.35+), not batch mode: batch mode copies the table and drops
    # the old one, and with foreign keys on, dropping `documents` would delete every revision.
    op.drop_column("documents", "version")
