"""Engine and sessions. SQLite runs in WAL mode with foreign keys on; a write session takes the
write lock up front (`BEGIN IMMEDIATE`), so concurrent writers queue on the busy timeout instead
of failing when a read transaction tries to upgrade to a write. PostgreSQL (`postgresql://`, through
psycopg 3) runs with its defaults; writes that must not interleave lock the rows they depend on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

BUSY_TIMEOUT_MS = 30_000
_IMMEDIATE = "editor_immediate"  # connection execution option read by the "begin" hook


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """An engine for `url`; for SQLite, create the file's directory and set the pragmas."""
    parsed = driver_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, echo=echo, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, echo=echo, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000})
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def driver_url(url: str) -> URL:
    """`url` with a driver we install: a plain `postgresql://` (or `postgres://`) URL means
    psycopg 3 (the `postgres` extra), not SQLAlchemy's default psycopg2."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg")
    return parsed


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" hook emit BEGIN itself (pysqlite's implicit BEGIN is deferred
    # and comes too late for DDL); see the SQLAlchemy docs on pysqlite transactions.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")  # safe in WAL mode: a crash loses no committed transaction
    cursor.close()


def _sqlite_on_begin(connection: Any) -> None:
    immediate = connection.get_execution_options().get(_IMMEDIATE, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # Objects stay readable after commit: services hand them to the API layer.
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def write_session(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One write transaction: committed when the block ends, rolled back if it raises."""
    with factory() as session:
        session.connection(execution_options={_IMMEDIATE: True})
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@contextmanager
def read_session(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A read-only transaction (one consistent snapshot). Closing ends it without expiring the
    loaded objects (a rollback would), so they stay readable after the block."""
    with factory() as session:
        yield session


__all__ = ["driver_url", "make_engine", "make_session_factory", "read_session", "write_session"]
