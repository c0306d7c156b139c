"""How the platform's Postgres connections are opened: keepalives on both ends, so a vanished peer
(a worker host cut off, a database host gone) is noticed in seconds, not the kernel's two hours."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError

from config import Settings
from models.db import KEEPALIVE_COUNT, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, Database, database_unreachable


def test_the_server_keeps_alive_each_session_so_a_vanished_client_loses_its_locks(settings: Settings) -> None:
    db = Database(settings)
    try:
        with db.engine.connect() as conn:
            shown = {
                name: conn.execute(text(f"SHOW {name}")).scalar()
                for name in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")
            }
            dsn = conn.connection.dbapi_connection.get_dsn_parameters()  # type: ignore[union-attr]
    finally:
        db.dispose()
    assert shown == {
        "tcp_keepalives_idle": str(KEEPALIVE_IDLE),
        "tcp_keepalives_interval": str(KEEPALIVE_INTERVAL),
        "tcp_keepalives_count": str(KEEPALIVE_COUNT),
    }
    # And libpq's own, on the platform's end of the socket.
    assert dsn["keepalives"] == "1" and dsn["keepalives_idle"] == str(KEEPALIVE_IDLE)


def test_an_operators_own_server_options_are_kept(settings: Settings) -> None:
    url = settings.database_url + "?options=-c%20statement_timeout%3D12345"
    db = Database(settings.with_overrides(database_url=url))
    try:
        with db.engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "12345ms"
    finally:
        db.dispose()


def transactions_of_two_statements(session: Any) -> set[int]:
    """The server's transaction ids of two statements of one unit: one id inside a transaction,
    two in autocommit."""
    return {session.execute(text("SELECT txid_current()")).scalar() for _ in range(2)}


def test_reads_and_single_statements_run_in_autocommit_and_the_connection_comes_back_transactional(
    settings: Settings,
) -> None:
    db = Database(settings)
    try:
        with db.reading() as session:
            read = transactions_of_two_statements(session)
            connection = session.connection().connection.dbapi_connection
        with db.statement() as cursor:
            assert cursor.connection is connection  # the pool's connection, not one of its own
            single = set()
            for _ in range(2):
                cursor.execute("SELECT txid_current()")
                single.add(cursor.fetchone()[0])
        # The same pooled connection, checked out again for an ordinary unit of work: a
        # transaction again, so a unit with several writes still commits them together.
        with db.writing() as session:
            assert session.connection().connection.dbapi_connection is connection
            ordinary = transactions_of_two_statements(session)
        with db.session() as session:
            also_ordinary = transactions_of_two_statements(session)
    finally:
        db.dispose()
    assert len(read) == 2 and len(single) == 2
    assert len(ordinary) == 1 and len(also_ordinary) == 1


def test_a_single_statement_s_errors_are_sqlalchemy_s_and_a_broken_connection_leaves_the_pool(
    settings: Settings,
) -> None:
    """``Database.statement`` raises what a session would (the API maps a unique violation to an
    idempotent replay and a lost connection to ``503 database_unavailable``), and a connection
    that broke under it is not handed to the next unit of work."""
    db = Database(settings)
    try:
        with pytest.raises(IntegrityError), db.statement() as cursor:
            cursor.execute("CREATE TEMP TABLE once (id int PRIMARY KEY); INSERT INTO once VALUES (1), (1)")
        with db.statement() as cursor:
            broken = cursor.connection
            backend = broken.get_backend_pid()
        other = Database(settings)  # killed from another pool, as a server restart would
        try:
            with other.reading() as session:
                assert session.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backend}).scalar()
        finally:
            other.dispose()
        with pytest.raises(OperationalError) as raised, db.statement() as cursor:
            assert cursor.connection is broken
            cursor.execute("SELECT 1")
        assert database_unreachable(raised.value)
        with db.statement() as cursor:
            assert cursor.connection is not broken
            cursor.execute("SELECT 1")
            assert cursor.fetchone() == (1,)
    finally:
        db.dispose()
