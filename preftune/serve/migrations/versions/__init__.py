"""Alembic revision files (this ``__init__`` only makes the folder ship as a package; Alembic ignores it)."""
