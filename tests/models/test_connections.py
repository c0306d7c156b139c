"""How the platform's Postgres connections are opened: keepalives on both ends, so a vanished peer
(a worker host cut off, a database host gone) is noticed in seconds, not the kernel's two hours."""

from __future__ import annotations

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
