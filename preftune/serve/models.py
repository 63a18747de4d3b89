"""Tables of the feedback service (SQLAlchemy 2 declarative models).

The schema is owned by the Alembic migrations in :mod:`preftune.serve.migrations`; a test
checks that these models and the migrations agree.

- ``raters``: one row per person; only the sha256 of their token is stored.
- ``tasks``: one imported candidates record (a prompt and its candidate answers).
- ``assignments``: a task handed to a rater; unique per (task, rater), so nobody sees a
  task twice; its status (open, done, skipped, expired) and lease decide who may take the
  remaining slots of the task. A rater holds at most one open assignment (a partial unique
  index), which is what makes a double click or two replicas unable to reserve two tasks.
- ``judgements``: what a rater picked; unique per (task, rater) and per client-supplied
  ``uid``, which makes resubmission idempotent.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

ASSIGNMENT_OPEN = "open"
ASSIGNMENT_DONE = "done"
ASSIGNMENT_SKIPPED = "skipped"
ASSIGNMENT_EXPIRED = "expired"


class Base(DeclarativeBase):
    pass


class Rater(Base):
    __tablename__ = "raters"
    __table_args__ = (
        UniqueConstraint("name", name="uq_raters_name"),
        UniqueConstraint("token_hash", name="uq_raters_token_hash"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    token_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    disabled: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("item_id", name="uq_tasks_item_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[str] = mapped_column(String(200), nullable=False)
    prompt_id: Mapped[str] = mapped_column(String(200), nullable=False)
    family: Mapped[str] = mapped_column(String(100), nullable=False, index=True)
    tags: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    prompt: Mapped[str] = mapped_column(Text, nullable=False)
    candidates: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False)
    n_candidates: Mapped[int] = mapped_column(Integer, nullable=False)
    policy: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    imported_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    # Judgements received so far; kept in step with ``judgements`` in the same transaction.
    n_done: Mapped[int] = mapped_column(Integer, nullable=False, default=0, index=True)
    # Slots held: assignments that are open (expired or not, until released) or done. Kept in step
    # with ``assignments`` in the same transaction, so handing out a task needs no count query.
    n_taken: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default=text("0"))


# The hand-out order: tasks nearest completion first, then oldest; an index range scan from the top.
Index("ix_tasks_fill", Task.n_taken.desc(), Task.id)


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("task_id", "rater_id", name="uq_assignments_task_rater"),
        Index("ix_assignments_rater_status", "rater_id", "status"),
        Index(
            "uq_assignments_one_open",
            "rater_id",
            unique=True,
            postgresql_where=text("status = 'open'"),
            sqlite_where=text("status = 'open'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False, index=True)
    rater_id: Mapped[int] = mapped_column(ForeignKey("raters.id", ondelete="CASCADE"), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    assigned_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    expires_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)

    task: Mapped[Task] = relationship(lazy="joined", innerjoin=True)


class Judgement(Base):
    __tablename__ = "judgements"
    __table_args__ = (
        UniqueConstraint("uid", name="uq_judgements_uid"),
        UniqueConstraint("task_id", "rater_id", name="uq_judgements_task_rater"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    uid: Mapped[str] = mapped_column(String(64), nullable=False)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False, index=True)
    rater_id: Mapped[int] = mapped_column(ForeignKey("raters.id", ondelete="CASCADE"), nullable=False, index=True)
    best: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ranking: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    all_unacceptable: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    unsafe: Mapped[list[int]] = mapped_column(JSON, nullable=False)
    source: Mapped[str] = mapped_column(String(16), nullable=False, default="service")
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, index=True)
    # the rater's own acceptable answer, when every candidate was unacceptable (migration 0003)
    written: Mapped[str | None] = mapped_column(Text, nullable=True)

    task: Mapped[Task] = relationship(lazy="joined", innerjoin=True)
    rater: Mapped[Rater] = relationship(lazy="joined", innerjoin=True)
