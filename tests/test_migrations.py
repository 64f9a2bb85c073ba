import re
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from shared import migrate
from shared.db import Base, make_engine
from shared.partitions import is_partition
from testkit.database import create_database, drop_database
from tests.support import PG_ADMIN_URL


def test_upgrade_and_downgrade_on_an_empty_database():
    name = f"kpi_mig_{uuid.uuid4().hex[:8]}"
    url = create_database(PG_ADMIN_URL, name)
    engine = make_engine(url)
    try:
        migrate.upgrade(url)
        tables = set(inspect(engine).get_table_names())
        assert set(Base.metadata.tables) <= tables
        with engine.connect() as conn:
            keys = {row[0] for row in conn.execute(text("SELECT key FROM metrics"))}
        assert keys == {"cr", "pacc", "gtr", "clicks_zero_conv", "cap_fill"}

        migrate.downgrade(url, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}

        migrate.upgrade(url)  # and back up again
        assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
        drop_database(PG_ADMIN_URL, name)


def test_models_agree_with_migrations(engine):
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={
            "compare_type": True,
            "include_name": lambda name, type_, _parent: not (type_ == "table" and is_partition(name)),
        })
        diff = compare_metadata(context, Base.metadata)
    assert diff == [], f"models and migrations disagree: {diff}"


# -- 0010: metric_values and trigger_checks partitioned by day ----------------------------

BEFORE_PARTITIONS = ScriptDirectory.from_config(migrate.alembic_config("")).get_revision("0010").down_revision
TABLES = ("metric_values", "trigger_checks")
KEYS = {
    "metric_values": ("(metric_key, offer_id, affiliate_id, measured_at)",
                      "INSERT INTO metric_values (metric_key, offer_id, affiliate_id, value, measured_at) "
                      "SELECT metric_key, offer_id, affiliate_id, value + 1, measured_at FROM metric_values "
                      "WHERE id = :id"),
    "trigger_checks": ("(trigger_id, offer_id, affiliate_id, measured_at)",
                       "INSERT INTO trigger_checks (trigger_id, offer_id, affiliate_id, value, operator, threshold, "
                       "status, measured_at) SELECT trigger_id, offer_id, affiliate_id, value, operator, threshold, "
                       "status, measured_at FROM trigger_checks WHERE id = :id"),
}


def _fill(conn) -> None:
    """Rows over the last 500 hours, a day 3 years old (no partition of its own: the
    default one), tomorrow; an event and a state recorded without a value (before 0002)."""
    conn.execute(text("INSERT INTO triggers (name, metric_key, operator, threshold) VALUES ('low cr', 'cr', 'lt', 1)"))
    conn.execute(text(
        "INSERT INTO metric_values (metric_key, offer_id, affiliate_id, value, measured_at, event_id) "
        "SELECT 'cr', g % 5, g % 11, g * 0.5, date_trunc('hour', now()) - g * interval '1 hour', 'e' || g "
        "FROM generate_series(-20, 500) g "
        "UNION ALL SELECT 'pacc', 1, 2, 3.5, now() - interval '3 years', NULL"))
    conn.execute(text(
        "INSERT INTO trigger_checks (trigger_id, offer_id, affiliate_id, value, operator, threshold, status, "
        "measured_at) SELECT t.id, v.offer_id, v.affiliate_id, v.value, 'lt', 1, "
        "CASE WHEN v.value < 1 THEN 'PROBLEM' ELSE 'OK' END, v.measured_at "
        "FROM metric_values v, triggers t WHERE v.metric_key = 'cr' ORDER BY v.measured_at"))
    conn.execute(text(
        "INSERT INTO trigger_events (trigger_id, offer_id, affiliate_id, status, check_id, measured_at) "
        "SELECT trigger_id, offer_id, affiliate_id, status, id, measured_at FROM trigger_checks ORDER BY id LIMIT 3"))
    conn.execute(text(
        "INSERT INTO trigger_states (trigger_id, offer_id, affiliate_id, status, since, measured_at, check_id) "
        "SELECT trigger_id, offer_id, affiliate_id, status, measured_at, measured_at, id FROM trigger_checks "
        "ORDER BY id LIMIT 1"))


def _rows(conn, table: str) -> list[tuple]:
    return [tuple(r) for r in conn.execute(text(f"SELECT * FROM {table} ORDER BY id"))]


def _relkind(conn, table: str) -> str:
    return conn.execute(text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:t)"), {"t": table}).scalar()


def _assert_keys_hold(conn, table: str) -> None:
    key, duplicate = KEYS[table]
    some_id = conn.execute(text(f"SELECT min(id) FROM {table}")).scalar()
    with pytest.raises(IntegrityError, match=re.escape(f"Key {key}=")):
        with conn.begin_nested():
            conn.execute(text(duplicate), {"id": some_id})


def test_partitioning_an_existing_database_keeps_every_row_and_key():
    name = f"kpi_mig_{uuid.uuid4().hex[:8]}"
    url = create_database(PG_ADMIN_URL, name)
    engine = make_engine(url)
    try:
        migrate.upgrade(url, BEFORE_PARTITIONS)
        with engine.begin() as conn:
            _fill(conn)
            before = {table: _rows(conn, table) for table in TABLES}
            last_ids = {table: before[table][-1][0] for table in TABLES}
        assert len(before["metric_values"]) == 522 and len(before["trigger_checks"]) == 521

        migrate.upgrade(url)
        with engine.connect() as conn:
            for table in TABLES:
                assert _relkind(conn, table) == "p"
                assert _rows(conn, table) == before[table]
                _assert_keys_hold(conn, table)
                primary_key = inspect(conn).get_pk_constraint(table)
                assert (primary_key["name"], primary_key["constrained_columns"]) == (
                    f"pk_{table}", ["id", "measured_at"])
                # Every day of the last 500 hours has its partition; the 3-year-old row is
                # in the default one; tomorrow's rows are in tomorrow's partition.
                days = {r[0] for r in conn.execute(text(
                    f"SELECT DISTINCT (measured_at AT TIME ZONE 'UTC')::date FROM {table} "
                    f"WHERE measured_at > now() - interval '30 days'"))}
                made = {r[0] for r in conn.execute(text(
                    "SELECT to_date(substr(c.relname, length(:t) + 3), 'YYYYMMDD') FROM pg_inherits i "
                    "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(:t) "
                    "AND c.relname <> :t || '_default'"), {"t": table})}
                assert days <= made
                today = datetime.now(timezone.utc).date()
                assert {today + timedelta(days=n) for n in range(-1, 9)} <= made
                default_rows = conn.execute(text(f"SELECT count(*) FROM {table}_default")).scalar()
                assert default_rows == (1 if table == "metric_values" else 0)
            # Ids go on from the same sequence (the refused duplicates above took one each).
            new_id = conn.execute(text(
                "INSERT INTO metric_values (metric_key, offer_id, affiliate_id, value, measured_at) "
                "VALUES ('gtr', 1, 1, 1, now()) RETURNING id")).scalar()
            assert last_ids["metric_values"] < new_id <= last_ids["metric_values"] + 2
            conn.rollback()
            # The facts an event or a state shows no longer need their check.
            assert conn.execute(text("SELECT count(*) FROM trigger_events WHERE value IS NULL OR threshold IS NULL"
                                     )).scalar() == 0
            assert conn.execute(text("SELECT count(*) FROM trigger_states WHERE value IS NULL OR threshold IS NULL"
                                     )).scalar() == 0
            context = MigrationContext.configure(conn, opts={
                "compare_type": True,
                "include_name": lambda n, type_, _p: not (type_ == "table" and is_partition(n)),
            })
            assert compare_metadata(context, Base.metadata) == []

        migrate.downgrade(url, BEFORE_PARTITIONS)
        with engine.connect() as conn:
            for table in TABLES:
                assert _relkind(conn, table) == "r"
                assert _rows(conn, table) == before[table]
                _assert_keys_hold(conn, table)
                assert inspect(conn).get_pk_constraint(table)["constrained_columns"] == ["id"]
            assert not [n for n in inspect(conn).get_table_names() if is_partition(n)]
    finally:
        engine.dispose()
        drop_database(PG_ADMIN_URL, name)


SEEDED = text("""
    SELECT (SELECT array_agg(name ORDER BY name) FROM triggers),
           (SELECT array_agg(name || ':' || kind ORDER BY name) FROM operations),
           (SELECT array_agg(name ORDER BY name) FROM actions),
           (SELECT count(*) FROM trigger_thresholds), (SELECT count(*) FROM action_conditions),
           (SELECT count(*) FROM action_operations), (SELECT count(*) FROM administrators)
""")


def test_every_revision_one_step_at_a_time_up_and_down_keeping_the_seeded_rows():
    """Each migration on its own, over a database holding the example seed (loaded at the
    first revision whose schema takes it): every upgrade keeps the rows, every downgrade runs."""
    import subprocess

    from tests.support import ROOT

    script = ScriptDirectory.from_config(migrate.alembic_config("unused"))
    revisions = [r.revision for r in reversed(list(script.walk_revisions("base", "heads")))]
    assert len(revisions) >= 10
    name = f"kpi_mig_{uuid.uuid4().hex[:8]}"
    url = create_database(PG_ADMIN_URL, name)
    dsn = url.replace("postgresql+psycopg2://", "postgresql://")
    engine = make_engine(url)
    seeded = None
    try:
        for revision in revisions:
            migrate.upgrade(url, revision)
            if seeded is None:
                loaded = subprocess.run(["psql", dsn, "-v", "ON_ERROR_STOP=1", "-q", "-f",
                                         str(ROOT / "seeds/example.sql")], capture_output=True, text=True, timeout=60)
                if loaded.returncode == 0:
                    with engine.connect() as conn:
                        seeded = tuple(conn.execute(SEEDED).one())
                    assert len(seeded[0]) == 6 and seeded[3:] == (6, 3, 4, 1)
                continue
            with engine.connect() as conn:
                assert tuple(conn.execute(SEEDED).one()) == seeded, f"the seeded rows changed at {revision}"
        assert seeded is not None, "the example seed never loaded"
        for revision in reversed(revisions[:-1]):
            migrate.downgrade(url, revision)
            with engine.connect() as conn:
                assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == revision
        migrate.downgrade(url, "base")
        migrate.upgrade(url)
    finally:
        engine.dispose()
        drop_database(PG_ADMIN_URL, name)
