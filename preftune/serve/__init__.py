"""The feedback service: where people pick the better answer (``preftune serve``).

Raters open a small page, see one prompt with several candidate answers side by side and
pick the best one; each judgement is committed to a SQL database (SQLite by default,
PostgreSQL in production) before the response returns. Tasks come from collect's
candidates JSONL; the export is the ``preftune.judgement`` v1 JSONL that collect reads.

This package is imported by the CLI only inside commands: importing ``preftune.serve``
itself stays cheap (no FastAPI, no SQLAlchemy), the heavy modules are
:mod:`preftune.serve.app`, :mod:`preftune.serve.db` and :mod:`preftune.serve.service`.
"""

from __future__ import annotations

__all__: list[str] = []
