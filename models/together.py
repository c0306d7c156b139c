"""Multi-row and multi-statement writes on Postgres: fewer round trips on the hot paths.

- ``insert_rows``: many rows of one table in one ``COPY`` (a batch of jobs and its events).
- ``Together``: the statements of one unit of work that need no answer, each a multi-row INSERT
  (with an optional ``ON CONFLICT`` clause) or a statement of its own, gathered and sent to the
  server in one round trip (``send``), or the INSERTs as one statement with a common table
  expression they read and a query whose row is the answer (``send_within``). A move's
  event, its counters and its output files go with one another this way (``models.lifecycle``),
  and a submit's INSERTs with its turn (``models.dispatch.insert_in_turn``, on a bare cursor:
  ``Together.on_cursor``).

Values are bound by each column type's own processor (JSON serialized, UTC times checked), as
SQLAlchemy binds them, then quoted by psycopg2 (``mogrify``); the joined text is executed without
parameters, so nothing in it is read as a placeholder. A unique violation is raised as
SQLAlchemy's ``IntegrityError``, as ``session.execute`` would raise it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import re
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

import psycopg2.errors
import psycopg2.extras
from sqlalchemy import Table, insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

# An INSERT gathered on a cursor: its head, its rows' values, computed expressions, on_conflict.
Pending = tuple[str, list[tuple[Any, ...]], list[str], str]


class Together:
    """(Postgres) Writes gathered in the session's transaction, sent in one round trip by ``send``
    (or ``send_within``).

    ``computed``: per table name, columns whose value is an SQL expression rather than the row's
    value (for ``send_within``: the expression may read its common table expression)."""

    def __init__(self, session: Session, computed: Mapping[str, Mapping[str, str]] | None = None):
        self.session: Session | None = session
        self.cursor: Any = None
        self.dialect = session.get_bind().dialect
        self.computed = computed or {}
        self.parts: list[bytes] = []
        # On a cursor: the INSERTs as (head, rows' values, computed expressions, on_conflict), for
        # ``send_within`` to send as a prepared statement.
        self.pending: list[Pending] = []
        self.gathering = True  # INSERTs become text in ``parts`` (on a cursor: ``gathered_on``)

    @classmethod
    def on_cursor(
        cls, cursor: Any, dialect: Any, computed: Mapping[str, Mapping[str, str]] | None = None
    ) -> Together:
        """INSERTs sent on a DBAPI cursor of the caller's (``Database.statement``), not through a
        session, by ``send_within`` only, as a prepared statement (``_Prepared``); the caller turns
        psycopg2's errors into SQLAlchemy's."""
        together = cls.__new__(cls)
        together.session, together.cursor, together.dialect = None, cursor, dialect
        together.computed = computed or {}
        together.parts = []
        together.pending = []
        together.gathering = False
        return together

    @classmethod
    def gathered_on(cls, cursor: Any, dialect: Any) -> Together:
        """Writes gathered as text and sent by ``send`` on a DBAPI cursor of the caller's, in the
        transaction the caller opened on it (``models.lifecycle.apply_alone``: a move's event, its
        counters and ``COMMIT`` go in one round trip); the caller turns psycopg2's errors into
        SQLAlchemy's."""
        together = cls.on_cursor(cursor, dialect)
        together.gathering = True
        return together

    def insert(self, table: Table, rows: list[dict[str, Any]], on_conflict: str = "") -> None:
        """One multi-row INSERT of ``rows`` (the same keys in each), then ``on_conflict`` if any."""
        if not rows:
            return
        computed = self.computed.get(table.name, {})
        given = [{k: v for k, v in row.items() if k not in computed} for row in rows] if computed else rows
        columns, values = _bound(table, given, self.dialect)
        names = [*columns, *computed]
        quoted_names = ", ".join(f'"{name}"' for name in names)
        if not self.gathering:
            head = f'INSERT INTO "{table.name}" ({quoted_names}) VALUES '
            self.pending.append((head, values, list(computed.values()), on_conflict))
            return
        slots = ["%s"] * len(columns) + [expression.replace("%", "%%") for expression in computed.values()]
        row_sql = "(" + ", ".join(slots) + ")"
        with self._cursor() as cursor:
            quoted = b", ".join(cursor.mogrify(row_sql, v) for v in values)
        head_sql = f'INSERT INTO "{table.name}" ({quoted_names}) VALUES '.encode()
        self.parts.append(head_sql + quoted + (b" " + on_conflict.encode() if on_conflict else b""))

    def statement(self, sql: str) -> None:
        """A statement of its own, with no parameters."""
        self.parts.append(sql.encode())

    def send(self) -> None:
        """Send what was gathered, in one round trip."""
        if self.parts:
            statement, self.parts = b";\n".join(self.parts), []
            self._execute(statement)

    def send_within(
        self, name: str, cte: str, params: Mapping[str, Any], query: str
    ) -> dict[str, Any] | None:
        """Send the gathered INSERTs as one statement: ``WITH <name> AS (<cte>), <each INSERT> <query>``,
        so their ``computed`` columns and ``query`` read the same ``cte``, evaluated once; returns
        the first row of ``query``."""
        if not self.gathering:
            pending, self.pending = self.pending, []
            shape = tuple(
                (head, len(rows), len(rows[0]), tuple(exprs), tail) for head, rows, exprs, tail in pending
            )
            prepared = _Prepared.of(name, cte, query, shape)
            values = [value for _, rows, _, _ in pending for row in rows for value in row]
            return prepared.run(self.cursor, [*(params[key] for key in prepared.keys), *values])
        assert all(part.startswith(b"INSERT") for part in self.parts), "only INSERTs go in a WITH"
        with self._cursor() as cursor:
            head = f"WITH {name} AS (".encode() + cursor.mogrify(cte, params) + b")"
        writes = b"".join(b", w%d AS (%s)" % (index, part) for index, part in enumerate(self.parts))
        self.parts = []
        statement = head + writes + b" " + query.encode()
        row = self._execute(statement).mappings().first()
        return None if row is None else dict(row)

    def _execute(self, statement: bytes) -> Any:
        # Executed without parameters: nothing in the quoted values is read as a placeholder. In a
        # session, through SQLAlchemy (its events see the statement, its errors wrap psycopg2's).
        if self.session is None:
            self.cursor.execute(statement)  # the caller's cursor (``gathered_on``)
            return None
        return self.session.connection().exec_driver_sql(
            statement.decode(), execution_options={"no_parameters": True}
        )

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[Any]:
        if self.session is None:
            yield self.cursor
            return
        cursor = self.session.connection().connection.cursor()
        try:
            yield cursor
        finally:
            cursor.close()


# The statements prepared on each connection (its server session keeps them while it lives).
_PREPARED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%")


# An INSERT's shape: its head, its rows, values per row, computed expressions, its tail.
Shape = tuple[tuple[str, int, int, tuple[str, ...], str], ...]
_MARK = re.compile("\0(\\d+)\0")  # an argument's number, in a statement's template


@dataclass(frozen=True)
class _Prepared:
    """A statement sent as ``EXECUTE`` of a statement PREPAREd once per connection: the server
    neither parses nor plans it again (planning the submit's statement, three look-ups of the jobs
    table against its partial indexes and two INSERTs, took as long as running it). Its text is
    built once per shape (``of``); a call gives only the arguments. Where the server cannot keep
    it (a pooler in transaction mode hands each statement to another session) the plain statement
    is sent instead, from then on, by this process."""

    name: str
    numbered: str  # with $1, $2, ... for PREPARE
    template: str  # with each argument's number between NULs, for the plain statement
    keys: tuple[str, ...]  # the common table expression's parameters: the first arguments

    usable: ClassVar[bool] = True

    @classmethod
    @functools.lru_cache(maxsize=64)
    def of(cls, name: str, cte: str, query: str, shape: Shape) -> _Prepared:
        """``WITH <name> AS (<cte>), w0 AS (<INSERT>), ... <query>`` with every value an argument:
        the common table expression's parameters (``keys``), then the rows' values in order."""
        keys: list[str] = []

        def named(match: re.Match[str]) -> str:
            if match.group(0) == "%%":
                return "%"
            if match.group(1) not in keys:
                keys.append(match.group(1))
            return f"\0{keys.index(match.group(1)) + 1}\0"

        parts = [f"WITH {name} AS ({_PLACEHOLDER.sub(named, cte)})"]
        given = len(keys)
        for index, (head, rows, width, expressions, on_conflict) in enumerate(shape):
            tuples = []
            for _ in range(rows):
                slots = [f"\0{given + column + 1}\0" for column in range(width)]
                given += width
                tuples.append("(" + ", ".join([*slots, *expressions]) + ")")
            tail = f" {on_conflict}" if on_conflict else ""
            parts.append(f", w{index} AS ({head}{', '.join(tuples)}{tail})")
        template = "".join(parts) + f" {query}"
        numbered = _MARK.sub(lambda m: f"${m.group(1)}", template)
        digest = hashlib.sha1(numbered.encode(), usedforsecurity=False).hexdigest()[:20]
        return cls(f"aiorch_{digest}", numbered, template, tuple(keys))

    def run(self, cursor: Any, args: list[Any]) -> dict[str, Any] | None:
        """Execute it with ``args`` ($1, $2, ...) and return its first row."""
        if _Prepared.usable:
            try:
                self._execute(cursor, args)
            except psycopg2.errors.InvalidSqlStatementName:  # not kept: no pooled session of our own
                _PREPARED.pop(cursor.connection, None)
                _Prepared.usable = False
                self._execute_plain(cursor, args)
        else:
            self._execute_plain(cursor, args)
        found = cursor.fetchone()
        names = [column.name for column in cursor.description]
        return None if found is None else dict(zip(names, found, strict=True))

    def _execute(self, cursor: Any, args: list[Any]) -> None:
        prepared = _PREPARED.setdefault(cursor.connection, set())
        if self.name not in prepared:
            with contextlib.suppress(psycopg2.errors.DuplicatePreparedStatement):
                cursor.execute(f"PREPARE {self.name} AS {self.numbered}")
            prepared.add(self.name)
        cursor.execute(f"EXECUTE {self.name} ({', '.join(['%s'] * len(args))})", args)

    def _execute_plain(self, cursor: Any, args: list[Any]) -> None:
        quoted: list[Any] = []  # one per placeholder: a parameter used twice is quoted twice

        def placeholder(match: re.Match[str]) -> str:
            quoted.append(args[int(match.group(1)) - 1])
            return "%s"

        cursor.execute(_MARK.sub(placeholder, self.template.replace("%", "%%")), quoted)


def insert_rows(session: Session, table: Table, rows: list[dict[str, Any]]) -> None:
    """One multi-row write of ``rows`` (the same keys in each) in the session's transaction.

    On Postgres through ``COPY ... FROM STDIN`` (text format), each value bound by its column
    type's own processor first (JSON serialized, UTC times checked), as SQLAlchemy binds: a batch
    of 500 jobs spent a third of its INSERT in SQLAlchemy's executemany machinery, and then most of
    the rest quoting each value into a 500-row ``VALUES`` list (psycopg2's ``mogrify``) for the
    server to parse again; COPY sends the values as they are. A value of a type COPY's text form is
    not written for here falls back to one multi-row INSERT (``execute_values``). A unique
    violation is raised as SQLAlchemy's ``IntegrityError``, as ``session.execute`` would raise it.
    Elsewhere (SQLite) through SQLAlchemy's own executemany."""
    if not rows:
        return
    dialect = session.get_bind().dialect
    if dialect.name != "postgresql":
        session.execute(insert(table), rows)
        return
    names, values = _bound(table, rows, dialect)
    columns = ", ".join(f'"{name}"' for name in names)
    cursor = session.connection().connection.cursor()
    try:
        text_rows = _copy_text(values)
        if text_rows is None:
            statement = f'INSERT INTO "{table.name}" ({columns}) VALUES %s'
            psycopg2.extras.execute_values(cursor, statement, values, page_size=len(values))
        else:
            statement = f'COPY "{table.name}" ({columns}) FROM STDIN'
            cursor.copy_expert(statement, io.StringIO(text_rows))
    except psycopg2.IntegrityError as exc:
        raise IntegrityError(statement, None, exc) from exc
    finally:
        cursor.close()


def _bound(table: Table, rows: list[dict[str, Any]], dialect: Any) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The column names of ``rows`` and their values, each bound by its column type's own
    processor (JSON serialized, UTC times checked), as SQLAlchemy binds them."""
    names = list(rows[0])
    processors = _processors(table, tuple(names), dialect)
    values = [
        tuple(row[name] if process is None else process(row[name]) for name, process in processors)
        for row in rows
    ]
    return names, values


@functools.lru_cache(maxsize=256)
def _processors(table: Table, names: tuple[str, ...], dialect: Any) -> list[tuple[str, Any]]:
    """Each column's bind processor, built once per table, columns and dialect (building them was
    a tenth of the single submit's INSERT work)."""
    return [(name, table.c[name].type.bind_processor(dialect)) for name in names]


# COPY's text format: a backslash, a newline, a carriage return and a tab are escaped.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _copy_value(value: Any) -> str | None:
    if value is None:
        return "\\N"
    kind = type(value)
    if kind is str:
        # Four C scans cost less than one translate (a new string, char by char): most values,
        # a job's JSON among them, hold none of the four.
        if "\\" in value or "\n" in value or "\r" in value or "\t" in value:
            return value.translate(_COPY_ESCAPES)  # type: ignore[no-any-return]
        return value  # type: ignore[no-any-return]
    if kind is bool:
        return "t" if value else "f"
    if kind is int or kind is float:
        return repr(value)
    if kind is datetime and value.tzinfo is not None:
        return value.isoformat()  # type: ignore[no-any-return]
    return None  # anything else: not written by hand


def _copy_text(values: list[tuple[Any, ...]]) -> str | None:
    """``values`` as COPY text rows, or None when one of them is of a type not handled here."""
    lines = []
    for row in values:
        fields = [_copy_value(value) for value in row]
        if None in fields:
            return None
        lines.append("\t".join(fields))  # type: ignore[arg-type]
    lines.append("")
    return "\n".join(lines)
