"""Alembic, configured from the package: the scripts live in `editor/migrations` (installed with
the package), so `editor db upgrade` works from any directory and after `pip install .`."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError

from editor.db.engine import make_engine

# What Alembic raises for an unknown or unreachable target revision.
MigrationError = (CommandError, RevisionError)


def script_location() -> Path:
    return Path(str(resources.files("editor.migrations")))


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # configparser interpolation
    return config


@dataclass(frozen=True)
class Step:
    """One applied or pending migration."""

    revision: str
    message: str

    def __str__(self) -> str:
        return f"{self.revision} ({self.message})"


def head_revision(url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def current_revision(url: str) -> str | None:
    """The revision the database is at; None for an empty (or missing) database."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def pending(url: str, target: str = "head") -> list[Step]:
    """Migrations that `upgrade(url, target)` would apply, oldest first."""
    scripts = ScriptDirectory.from_config(alembic_config(url))
    current = current_revision(url)
    steps = scripts.iterate_revisions(target, current)  # newest first
    return [Step(s.revision, s.doc or "") for s in reversed(list(steps))]


def upgrade(url: str, target: str = "head") -> list[Step]:
    """Bring the database to `target` (creating it if missing); returns what was applied."""
    steps = pending(url, target)
    if steps:
        command.upgrade(alembic_config(url), target)
    return steps


def downgrade(url: str, target: str = "-1") -> list[Step]:
    """Step the database back to `target` ('-1' = one migration, 'base' = empty); returns what was undone."""
    scripts = ScriptDirectory.from_config(alembic_config(url))
    current = current_revision(url)
    if current is None:
        return []
    command.downgrade(alembic_config(url), target)
    after = current_revision(url)
    undone = scripts.iterate_revisions(current, after)  # newest first: the order they were undone
    return [Step(s.revision, s.doc or "") for s in undone]


def is_current(url: str) -> bool:
    """True when the database is at the newest migration."""
    return current_revision(url) == head_revision(url)


__all__ = [
    "MigrationError",
    "Step",
    "alembic_config",
    "current_revision",
    "downgrade",
    "head_revision",
    "is_current",
    "pending",
    "script_location",
    "upgrade",
]
