"""Set-based SQL helpers shared by the handlers that write in bulk.

A batch goes to PostgreSQL as one array per column and comes back as rows through
`unnest`, so a statement costs one round trip whatever the batch size, and its text
(hence SQLAlchemy's compiled-statement cache) does not depend on the number of rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, column, func, literal
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.sql.selectable import TableValuedAlias
from sqlalchemy.types import TypeEngine

from shared.bus import RetryableError

# SQLSTATEs worth another try: serialization failure, deadlock, lock timeout,
# and the server going away (admin shutdown, crash, cannot connect now).
_TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03", "57P01", "57P02", "57P03"}


def unnest(columns: Mapping[str, TypeEngine[Any]], rows: Sequence[Sequence[Any]], name: str = "v") -> TableValuedAlias:
    """`unnest(array, array, ...) AS name(col, col, ...)` of `rows` (tuples in `columns` order)."""
    arrays = [literal([row[i] for row in rows], ARRAY(type_)) for i, type_ in enumerate(columns.values())]
    return (
        func.unnest(*arrays)
        .table_valued(*(column(col, type_) for col, type_ in columns.items()))
        .render_derived(name=name)
    )


def is_transient(exc: DBAPIError) -> bool:
    if isinstance(exc, OperationalError) or exc.connection_invalidated:
        return True
    return getattr(exc.orig, "pgcode", None) in _TRANSIENT_SQLSTATES


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction; a deadlock, serialization failure or lost connection becomes a
    RetryableError so the bus tries the message again later (it rolled back entirely)."""
    try:
        with engine.begin() as conn:
            yield conn
    except DBAPIError as exc:
        if is_transient(exc):
            sqlstate = getattr(exc.orig, "pgcode", None) or type(exc.orig).__name__
            raise RetryableError(f"transient database error ({sqlstate}): {str(exc.orig).strip()[:300]}") from exc
        raise
