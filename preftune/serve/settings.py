"""Settings of the feedback service, read from ``PREFTUNE_*`` environment variables.

The names and defaults are a contract with the Helm chart (see ``docs/architecture.md``):
the chart sets exactly these variables, so renaming one breaks deployments.
"""

from __future__ import annotations

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from preftune.errors import ConfigError
from preftune.home import preftune_home

# Never echoed in error messages: a database URL may carry a password.
SECRET_FIELDS = ("database_url", "admin_token")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ServeSettings(BaseSettings):
    """Twelve-factor settings of ``preftune serve``; every field maps to ``PREFTUNE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="PREFTUNE_", extra="ignore", validate_default=True)

    database_url: str = Field(
        "",
        description="SQLAlchemy URL of the database; empty means sqlite:///<PREFTUNE_HOME>/feedback.db. "
        "PostgreSQL: postgresql+psycopg2://user:pass@host:5432/db.",
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for the admin endpoints; unset disables them. Only its hash is kept."
    )
    ratings_per_task: int = Field(3, ge=1, le=100, description="Distinct raters who judge each task.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest accepted request body, in bytes.")
    max_text_chars: int = Field(8000, ge=1, description="Longest accepted prompt or candidate text, in characters.")
    log_level: str = Field("INFO", description="Log level of the JSON logs.")
    auto_migrate: bool = Field(True, description="Run the Alembic upgrade to the newest schema at start.")
    assignment_ttl_seconds: int = Field(
        900, ge=10, description="How long a task handed to a rater stays reserved for them before others may take it."
    )
    shutdown_timeout_seconds: int = Field(
        20, ge=1, description="On SIGTERM, how long in-flight requests may take before the server stops."
    )
    db_pool_size: int = Field(
        10,
        ge=1,
        le=200,
        description="Database connections each worker keeps open (PostgreSQL); also its request handler "
        "threads (this many plus two), so requests wait for a free thread rather than open extra connections.",
    )
    db_pool_timeout_seconds: int = Field(
        30, ge=1, le=600, description="How long a request waits for a free database connection before a 503."
    )
    db_pre_ping: bool = Field(
        False,
        description="Test each pooled connection with a round trip before use. Off: a connection broken by a "
        "database restart fails one request (503), and the pool is then refreshed.",
    )
    workers: int = Field(
        1, ge=1, le=64, description="uvicorn worker processes of one replica (each with its own pool)."
    )
    undo_seconds: int = Field(
        20, ge=0, le=3600, description="How long a rater may undo their last judgement; 0 turns undo off."
    )
    agreement_refresh_seconds: int = Field(
        300, ge=0, description="How often the agreement gauges of /metrics are recomputed; 0 disables it."
    )

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        level = v.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("database_url")
    @classmethod
    def _url(cls, v: str) -> str:
        v = v.strip()
        if v and "://" not in v:
            raise ValueError("must be a SQLAlchemy URL such as sqlite:///path/feedback.db or postgresql+psycopg2://...")
        return v

    def resolved_database_url(self) -> str:
        """The database URL, with the default SQLite file under the preftune home."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{preftune_home() / 'feedback.db'}"


def load_settings(**overrides: object) -> ServeSettings:
    """Read the settings from the environment (plus overrides), failing with one actionable line."""
    try:
        return ServeSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        shown = "" if field in SECRET_FIELDS else f" (got {first.get('input')!r})"
        raise ConfigError(f"invalid feedback service setting PREFTUNE_{field.upper()}: {first['msg']}{shown}") from None
