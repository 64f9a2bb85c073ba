"""shared.sql against the real PostgreSQL."""

from datetime import datetime, timezone

import pytest
from sqlalchemy import BigInteger, Boolean, DateTime, Double, Text, func, select, text
from sqlalchemy.exc import IntegrityError

from shared.handling import RetryableError
from shared.sql import array, transaction, unnest


def test_unnest_round_trips_rows_of_every_type(engine):
    at = datetime(2026, 11, 28, 10, tzinfo=timezone.utc)
    rows = [(1, "cr", at, 0.5), (2**40, "it's", at, -0.0), (3, None, None, None)]
    v = unnest({"id": BigInteger(), "key": Text(), "at": DateTime(timezone=True), "value": Double()}, rows)
    with engine.connect() as conn:
        assert [tuple(r) for r in conn.execute(select(*v.c).order_by(v.c.id))] == sorted(rows, key=lambda r: r[0])
        assert conn.execute(select(*unnest({"id": BigInteger()}, []).c)).all() == []


@pytest.mark.parametrize("errcode", ["deadlock_detected", "serialization_failure", "lock_not_available"])
def test_transient_errors_become_retryable(engine, errcode):
    with pytest.raises(RetryableError, match="transient database error"):
        with transaction(engine) as conn:
            conn.execute(text(f"DO $$ BEGIN RAISE EXCEPTION 'boom' USING ERRCODE = '{errcode}'; END $$"))


def test_other_database_errors_pass_through(engine):
    with pytest.raises(IntegrityError):
        with transaction(engine) as conn:
            conn.execute(text("DO $$ BEGIN RAISE EXCEPTION 'dup' USING ERRCODE = 'unique_violation'; END $$"))


def test_arrays_travel_exactly_as_one_parameter(engine):
    texts = ['it\'s', 'a "quote"', "back\\slash", "{braces},commas", "NULL", "", "  spaced  ", "ünï"]
    floats = [0.1, 1e-300, 5e-324, -0.0, 1.7976931348623157e308, float("inf"), float("-inf")]
    at = datetime(2026, 11, 28, 10, 0, 0, 123456, tzinfo=timezone.utc)
    v = unnest({"n": BigInteger(), "key": Text()}, list(enumerate(texts)))
    with engine.connect() as conn:
        assert [r.key for r in conn.execute(select(*v.c).order_by(v.c.n))] == texts
        assert conn.execute(select(func.unnest(array(floats, Double())))).scalars().all() == floats
        assert conn.execute(select(func.unnest(array([at, None], DateTime(timezone=True))))).scalars().all() == [
            at, None]
        assert conn.execute(select(func.unnest(array([True, False, None], Boolean())))).scalars().all() == [
            True, False, None]
        [nan] = conn.execute(select(func.unnest(array([float("nan")], Double())))).scalars().all()
        assert nan != nan
