"""UTC timestamps, one spelling: ``YYYY-MM-DDTHH:MM:SSZ`` (what every preftune file and record carries)."""

from __future__ import annotations

from datetime import datetime, timezone

FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_now() -> str:
    """Now, in UTC, to the second."""
    return datetime.now(timezone.utc).strftime(FORMAT)


def utc_stamp(value: datetime | float) -> str:
    """A datetime (naive means UTC) or epoch seconds as a UTC timestamp."""
    if isinstance(value, datetime):
        value = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc).strftime(FORMAT)
    return datetime.fromtimestamp(float(value), tz=timezone.utc).strftime(FORMAT)
