"""Engine, sessions and the column types every model shares."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import DateTime, Engine, TypeDecorator, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from config import Settings


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every database.

    Postgres keeps the zone; SQLite stores naive text, so values read back are re-tagged as UTC.
    Naive values are refused on the way in: a naive time is a bug waiting for a DST change.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def rowcount(result: Result[Any]) -> int:
    """The rows an UPDATE or DELETE run through ``Session.execute`` matched.

    ``Session.execute`` is typed to return a plain ``Result`` whatever the statement; for DML it
    returns a ``CursorResult``, which is the class that carries ``rowcount``.
    """
    return cast("CursorResult[Any]", result).rowcount


class Base(DeclarativeBase):
    pass


def make_engine(settings: Settings) -> Engine:
    url = settings.database_url
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; aiorch ships psycopg2.
    for bare in ("postgres://", "postgresql://"):
        if url.startswith(bare):
            url = "postgresql+psycopg2://" + url[len(bare) :]
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the API read while a worker writes; the embedded default runs several
            # processes on one file, so writers wait on the lock instead of failing at once.
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    engine = create_engine(url, pool_size=10, max_overflow=20, connect_args=_keepalives(url))
    _ping_after_idle(engine)
    return engine


# TCP keepalives on both ends of every connection, so a peer that vanished (a worker host cut off
# from the network, a database host gone) is noticed within about 25 s instead of the kernel's two
# hours: libpq's on our side (a statement waiting on a dead server fails, and the pool replaces the
# connection), the server's for this session (it aborts the vanished client's transaction, so row
# locks that transaction held do not block the job's re-run on another host).
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 10, 5, 3


def _keepalives(url: str) -> dict[str, Any]:
    args: dict[str, Any] = {
        "keepalives": 1,
        "keepalives_idle": KEEPALIVE_IDLE,
        "keepalives_interval": KEEPALIVE_INTERVAL,
        "keepalives_count": KEEPALIVE_COUNT,
    }
    if "options=" not in url:  # an operator's own server options win
        args["options"] = (
            f"-c tcp_keepalives_idle={KEEPALIVE_IDLE} -c tcp_keepalives_interval={KEEPALIVE_INTERVAL} "
            f"-c tcp_keepalives_count={KEEPALIVE_COUNT}"
        )
    return args


# A pooled connection idle longer than this is pinged before use (a Postgres restart or an idle
# timeout may have closed it); one used moments ago is not: a ping on every checkout would cost a
# job's few short transactions a round trip each. A connection that broke anyway fails its
# statement once, and SQLAlchemy then replaces every connection of the pool.
IDLE_PING_SECONDS = 5.0


def _ping_after_idle(engine: Engine) -> None:
    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < IDLE_PING_SECONDS:
            return
        try:
            cursor = dbapi_conn.cursor()
            cursor.execute("SELECT 1")
            cursor.close()
            dbapi_conn.rollback()
        except Exception as exc:
            # The pool discards this connection and checks out (or opens) another.
            raise DisconnectionError() from exc


def database_unreachable(exc: BaseException) -> bool:
    """An error that means "no connection to the database" (refused, reset, shut down, a
    connection SQLAlchemy has just invalidated), as opposed to a bad query, which is a bug. The
    API answers the first with ``503``; a worker waits it out and gives the message back."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, OperationalError):
        return False
    text = str(exc.orig).lower()
    return any(
        marker in text
        for marker in (
            "could not connect",
            "connection refused",
            "server closed the connection",
            "terminating connection",
            "the database system is",
            "connection to server",
            "no route to host",
            "timeout expired",
            "database is locked",
            "unable to open database",
        )
    )


class Database:
    """One engine and its session factory, built from settings (tests build their own)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine = make_engine(settings)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)
        self._write_turn: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if self.engine.dialect.name == "sqlite" else contextlib.nullcontext()
        )

    @contextlib.contextmanager
    def session(self, autocommit: bool = False) -> Iterator[Session]:
        """A unit of work: commit on success, roll back on any exception.

        ``autocommit`` (Postgres; see ``reading``): each statement is its own transaction on the
        server, so the unit costs no ``BEGIN`` and no ``COMMIT`` round trip, two of the three a
        one-statement unit otherwise waits for."""
        session = self.sessionmaker()
        if autocommit and self.is_postgres:
            session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @contextlib.contextmanager
    def reading(self) -> Iterator[Session]:
        """``session`` for a unit of work that only reads. Postgres reads at READ COMMITTED, where
        every statement takes its own snapshot whether or not a transaction holds them together,
        so such a unit runs in autocommit and sees exactly what it would in a transaction, one
        round trip per statement and none for ``BEGIN`` or its end. (A read that locks rows, or
        needs one snapshot for several statements, takes ``session``.)"""
        with self.session(autocommit=True) as session:
            yield session

    @contextlib.contextmanager
    def writing(self) -> Iterator[Session]:
        """``session`` for a unit of work that writes. On SQLite (one writer at a time) the threads
        of this process take turns on a lock first: waiting on SQLite's own busy handler means
        sleeping in steps of up to 100 ms, and a thread holding the database lock while it waits
        for the GIL makes every other writer sleep its way up those steps (32 submitting threads
        ran at half the rate). Postgres needs no such turn."""
        with self._write_turn, self.session() as session:
            yield session

    @contextlib.contextmanager
    def statement(self) -> Iterator[Any]:
        """(Postgres) A DBAPI cursor on a pooled connection in autocommit, for a unit of work that
        is a single statement: Postgres runs it as a transaction of its own, with no ``BEGIN`` and
        no ``COMMIT`` round trip, and no ORM session is built around it (the single submit,
        ``models.dispatch.insert_in_turn``: the session's bookkeeping cost more of the request's
        CPU than its statement). A unit that writes twice must not use it: each write would commit
        alone. Errors come out as SQLAlchemy's (``IntegrityError``, ``OperationalError``), and a
        connection the error shows to be broken is dropped from the pool."""
        fairy = self.engine.raw_connection()
        conn: Any = fairy.driver_connection
        cursor = None
        try:
            conn.autocommit = True
            cursor = conn.cursor()
            yield cursor
        except self._dbapi.Error as exc:
            broken = bool(conn.closed) or self.engine.dialect.is_disconnect(exc, conn, cursor)
            if broken:
                fairy.invalidate(exc)
            raise DBAPIError.instance(
                None, None, exc, self._dbapi.Error, connection_invalidated=broken, dialect=self.engine.dialect
            ) from exc
        finally:
            if cursor is not None and not conn.closed:
                cursor.close()
            if not conn.closed:
                conn.autocommit = False  # the pool's next user gets a transactional connection
            fairy.close()

    @property
    def _dbapi(self) -> Any:
        return self.engine.dialect.loaded_dbapi

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def dispose(self) -> None:
        self.engine.dispose()


def on_postgres(session: Session) -> bool:
    """Whether the session's database is Postgres (else the embedded SQLite)."""
    return bool(session.get_bind().dialect.name == "postgresql")


def insert_or_ignore(session: Session, model: type[Any], values: dict[str, Any]) -> None:
    """INSERT a row unless one with the same primary key exists (then leave that row as it is).
    One statement on Postgres and SQLite alike, so two processes racing to create the same row
    both succeed and agree on the first one, without a read-then-write window."""
    dialect = postgresql if on_postgres(session) else sqlite
    session.execute(dialect.insert(model).values(**values).on_conflict_do_nothing())
