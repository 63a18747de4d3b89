"""Counters with the task row and one open assignment per rater (the fast next+submit cycle).

- ``tasks.n_taken``: slots held (open or done assignments), backfilled from ``assignments``;
- ``ix_tasks_fill`` on (``n_taken`` DESC, ``id``): the hand-out order as an index range scan;
- ``uq_assignments_one_open``: a partial unique index, at most one open assignment per rater
  (older duplicates, which the previous version could not create, are expired first).

Revision ID: 0002_fast_cycle
Revises: 0001_initial
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_fast_cycle"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("n_taken", sa.Integer(), nullable=False, server_default=sa.text("0")))
    op.execute(
        "UPDATE tasks SET n_taken = (SELECT count(*) FROM assignments a "
        "WHERE a.task_id = tasks.id AND a.status IN ('open', 'done'))"
    )
    op.create_index("ix_tasks_fill", "tasks", [sa.text("n_taken DESC"), "id"])
    op.execute(
        "UPDATE assignments SET status = 'expired' WHERE status = 'open' AND id NOT IN "
        "(SELECT min(id) FROM assignments WHERE status = 'open' GROUP BY rater_id)"
    )
    op.execute(
        "UPDATE tasks SET n_taken = (SELECT count(*) FROM assignments a "
        "WHERE a.task_id = tasks.id AND a.status IN ('open', 'done'))"
    )
    op.create_index(
        "uq_assignments_one_open",
        "assignments",
        ["rater_id"],
        unique=True,
        postgresql_where=sa.text("status = 'open'"),
        sqlite_where=sa.text("status = 'open'"),
    )


def downgrade() -> None:
    op.drop_index("uq_assignments_one_open", table_name="assignments")
    op.drop_index("ix_tasks_fill", table_name="tasks")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("n_taken")
