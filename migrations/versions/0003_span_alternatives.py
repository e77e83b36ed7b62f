"""revision spans: other judged candidates' texts (alternatives) and the judge's score of a chosen text

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Spans stored before judged candidates existed had none: they get an empty list.
    with op.batch_alter_table("revision_spans") as batch:
        batch.add_column(sa.Column("alternatives", sa.JSON(), server_default="[]", nullable=False))
        batch.add_column(sa.Column("score", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("revision_spans") as batch:
        batch.drop_column("score")
        batch.drop_column("alternatives")
