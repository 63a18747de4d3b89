"""A rater's own answer beside an "all unacceptable" judgement (``judgements.written``, nullable).

Existing judgements keep NULL: nothing was written for them.

Revision ID: 0003_written_answers
Revises: 0002_fast_cycle
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_written_answers"
down_revision: str | None = "0002_fast_cycle"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("judgements") as batch:
        batch.add_column(sa.Column("written", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("judgements") as batch:
        batch.drop_column("written")
