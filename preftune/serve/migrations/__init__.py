"""Alembic migrations of the feedback database (shipped inside the wheel; run by ``preftune serve migrate``)."""
