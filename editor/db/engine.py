"""Engine and sessions. SQLite runs in WAL mode with foreign keys on; a write session takes the
write lock up front (`BEGIN IMMEDIATE`), so concurrent writers queue on the busy timeout instead
of failing when a read transaction tries to upgrade to a write. PostgreSQL (`postgresql://`, through
psycopg 3) runs with its defaults; writes that must not interleave lock the rows they depend on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

BUSY_TIMEOUT_S = 30.0  # the default of the setting database_busy_timeout_s
_IMMEDIATE = "editor_immediate"  # connection execution option read by the "begin" hook


def make_engine(url: str, *, echo: bool = False, busy_timeout_s: float = BUSY_TIMEOUT_S) -> Engine:
    """An engine for `url`; for SQLite, create the file's directory and set the pragmas (a writer
    waits up to `busy_timeout_s` for another's write lock before the database reports it busy)."""
    parsed = driver_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, echo=echo, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, echo=echo, connect_args={"check_same_thread": False, "timeout": busy_timeout_s})
    event.listen(engine, "connect", lambda connection, record: _sqlite_on_connect(connection, busy_timeout_s))
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def driver_url(url: str) -> URL:
    """`url` with a driver we install: a plain `postgresql://` (or `postgres://`) URL means
    psycopg 3 (the `postgres` extra), not SQLAlchemy's default psycopg2."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg")
    return parsed


def _sqlite_on_connect(dbapi_connection: Any, busy_timeout_s: float) -> None:
    # Let SQLAlchemy's "begin" hook emit BEGIN itself (pysqlite's implicit BEGIN is deferred
    # and comes too late for DDL); see the SQLAlchemy docs on pysqlite transactions.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={round(busy_timeout_s * 1000)}")
    cursor.execute("PRAGMA synchronous=NORMAL")  # safe in WAL mode: a crash loses no committed transaction
    cursor.close()


def _sqlite_on_begin(connection: Any) -> None:
    immediate = connection.get_execution_options().get(_IMMEDIATE, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class DatabaseFault(Enum):
    """Why a database could not do its part of a request (see `fault_of`)."""

    FULL = "full"  # the disk or the database's size limit is full
    READ_ONLY = "read-only"  # the file or the database is read-only
    BUSY = "busy"  # another writer held the lock past the busy timeout
    UNAVAILABLE = "unavailable"  # the server cannot be reached, or the file cannot be opened


def fault_of(error: BaseException) -> DatabaseFault | None:
    """The database fault behind an exception raised by SQLAlchemy, or None if it is not one
    (a bug in a query, a constraint that a caller should have checked...)."""
    if not isinstance(error, OperationalError | InterfaceError):
        return None
    original = error.orig
    name = getattr(original, "sqlite_errorname", "") or ""
    state = getattr(original, "sqlstate", None) or ""
    text = str(original).lower()
    if name.startswith("SQLITE_FULL") or state == "53100" or "disk is full" in text:
        return DatabaseFault.FULL
    if name.startswith("SQLITE_READONLY") or state == "25006" or "readonly database" in text:
        return DatabaseFault.READ_ONLY
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or state in ("55P03", "40P01") or "database is locked" in text:
        return DatabaseFault.BUSY
    return DatabaseFault.UNAVAILABLE


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


__all__ = [
    "DatabaseFault",
    "driver_url",
    "fault_of",
    "make_engine",
    "make_session_factory",
    "read_session",
    "write_session",
]
