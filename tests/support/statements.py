"""What a database's connections send, as the driver receives it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg2.extensions
from sqlalchemy import event

from models.db import Database


class _Recording(psycopg2.extensions.cursor):
    sink: list[str] | None = None

    def execute(self, query: Any, vars: Any = None) -> Any:  # noqa: A002 (psycopg2's name)
        if _Recording.sink is not None:
            _Recording.sink.append(query.decode() if isinstance(query, bytes) else str(query))
        return super().execute(query, vars)


@contextlib.contextmanager
def sent_statements(db: Database) -> Iterator[list[str]]:
    """Every statement ``db``'s connections send while this is open. On Postgres at the DBAPI
    cursor, so the bare cursors of ``Database.statement`` are seen as well as SQLAlchemy's;
    elsewhere (SQLite) through SQLAlchemy's ``before_cursor_execute``."""
    seen: list[str] = []
    if not db.is_postgres:

        def record(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
            seen.append(statement)

        event.listen(db.engine, "before_cursor_execute", record)
        try:
            yield seen
        finally:
            event.remove(db.engine, "before_cursor_execute", record)
        return

    def recording(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        dbapi_connection.cursor_factory = _Recording

    event.listen(db.engine, "checkout", recording)
    _Recording.sink = seen
    try:
        yield seen
    finally:
        _Recording.sink = None
        event.remove(db.engine, "checkout", recording)
