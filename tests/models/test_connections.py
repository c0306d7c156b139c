"""How the platform's Postgres connections are opened: keepalives on both ends, so a vanished peer
(a worker host cut off, a database host gone) is noticed in seconds, not the kernel's two hours."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from config import Settings
from models.db import KEEPALIVE_COUNT, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, Database


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


def test_reads_and_one_statement_writes_run_in_autocommit_and_the_connection_comes_back_transactional(
    settings: Settings,
) -> None:
    db = Database(settings)
    try:
        with db.reading() as session:
            read = transactions_of_two_statements(session)
            connection = session.connection().connection.dbapi_connection
        with db.writing(one_statement=True) as session:
            one_statement = transactions_of_two_statements(session)
        # The same pooled connection, checked out again for an ordinary unit of work: a
        # transaction again, so a unit with several writes still commits them together.
        with db.writing() as session:
            assert session.connection().connection.dbapi_connection is connection
            ordinary = transactions_of_two_statements(session)
        with db.session() as session:
            also_ordinary = transactions_of_two_statements(session)
    finally:
        db.dispose()
    assert len(read) == 2 and len(one_statement) == 2
    assert len(ordinary) == 1 and len(also_ordinary) == 1
