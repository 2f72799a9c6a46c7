"""SQLite: the NULLs common to the rows of an insert written into its statement, not bound.

CPython's sqlite3 (3.11) binds an int, a float or a str directly, but anything else, None
included, goes through its adapter registry first: a tuple built, a dict looked up, the
adapter called, ~1,200 instructions a None. A keyless request's spend and request-log rows
hold eighteen (11 % of the writer's instructions a record). A batch's rows are alike (no key,
no team, no correlation id, no content ...), so the columns that are None in every row of a
statement are written `NULL` in it, where it had placeholders, and those values are not bound;
the rows stored are the same. Columns are compared across the rows in C (a tuple of Nones
compares by identity), one statement per set of such columns (at most `_MOST_SHAPES` kept a
table), so the statements prepared stay few.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Row = tuple[Any, ...]

# Sets of NULL columns a table has statements for: each is prepared in as many sizes as a
# piece has (`ledger_store._many_rows`), and the connection keeps 128 prepared statements
# (sqlite3's default), a re-prepared 32-row insert costing more than its Nones did.
_MOST_SHAPES = 4


def nullable(create_table: str, columns: Sequence[str]) -> tuple[int, ...]:
    """The positions in `columns` of those `create_table` (a CREATE TABLE's text, a column a
    line) does not declare NOT NULL."""
    free = {line.split()[0] for line in create_table.splitlines() if line.strip() and "NOT NULL" not in line}
    return tuple(i for i, c in enumerate(columns) if c in free)


def with_nulls(sql: str, positions: Sequence[int]) -> str:
    """The single-row `INSERT ... VALUES (?, ...) ...` `sql` with `NULL` for the values at `positions`."""
    head, values, tail = sql.partition(" VALUES (")
    marks, close, rest = tail.partition(")")
    cells = marks.split(", ")
    for p in positions:
        cells[p] = "NULL"
    return f"{head}{values}{', '.join(cells)}{close}{rest}"


class NullLiterals:
    """One table's insert `sql` (single-row, `?` marks) and the positions of its nullable columns."""

    def __init__(self, sql: str, positions: tuple[int, ...], width: int) -> None:
        self.sql = sql
        self._positions = positions
        self._width = width
        self._nones: dict[int, Row] = {}  # n -> n Nones
        self._shapes: dict[tuple[int, ...], tuple[str, tuple[int, ...]]] = {}  # NULL columns -> (sql, bound columns)

    def statement(self, rows: list[Row]) -> tuple[str, list[Any]] | None:
        """The single-row statement for the columns NULL in all of `rows` (to be made into a
        many-row one) and the values left to bind, in order; None when no column is NULL in all."""
        n = len(rows)
        nones = self._nones.get(n)
        if nones is None:
            nones = self._nones[n] = (None,) * n
        # Column by column, in C: a tuple compares its items by identity first, so a column of
        # Nones compares in a few instructions a row and any other stops at its first value.
        columns = list(zip(*rows, strict=False))  # rows of one table: one width
        nulls = tuple([p for p in self._positions if columns[p] == nones])
        shape = self._shape(nulls) if nulls else None
        if shape is None:
            return None
        sql, kept = shape
        values: list[Any] = []
        add = values.extend
        for r in zip(*[columns[i] for i in kept], strict=False):
            add(r)
        return sql, values

    def _shape(self, nulls: tuple[int, ...]) -> tuple[str, tuple[int, ...]] | None:
        """The statement for the NULL columns `nulls` and the columns it binds: its own while
        there is room for it, else the known one with the most of them NULL (None: none fits)."""
        shape = self._shapes.get(nulls)
        if shape is not None:
            return shape
        if len(self._shapes) < _MOST_SHAPES:
            shape = self._shapes[nulls] = (
                with_nulls(self.sql, nulls),
                tuple(i for i in range(self._width) if i not in nulls),
            )
            return shape
        fits = [known for known in self._shapes if set(known) <= set(nulls)]
        return self._shapes[max(fits, key=len)] if fits else None
