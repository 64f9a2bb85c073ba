"""Least privilege, enforced by PostgreSQL: each service's role writes only the tables its
service owns, the console only silences and held-run decisions, the reader nothing.

(The demo, tests/test_demo.py, runs the whole pipeline with each service as its role.)
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, ProgrammingError

from shared import held, roles, silences
from shared.db import Base, make_engine
from shared.sql import run_script
from testkit.database import create_service_roles, drop_service_roles, temporary_database
from tests.support import PG_ADMIN_URL, ROOT

INSUFFICIENT_PRIVILEGE = "42501"


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[str, dict[str, str]]]:
    with temporary_database(PG_ADMIN_URL, "kpi_roles") as url:
        prefix, urls = create_service_roles(url)
        try:
            yield url, urls
        finally:
            drop_service_roles(PG_ADMIN_URL, prefix, url)


@pytest.fixture(scope="module")
def engines(world) -> Iterator[dict[str, Engine]]:
    _, urls = world
    engines = {role: make_engine(url) for role, url in urls.items()}
    yield engines
    for engine in engines.values():
        engine.dispose()


def _allowed(engine: Engine, statement: str) -> bool:
    """Whether PostgreSQL lets the role run it (any other error counts as allowed: a
    constraint, a missing row). Nothing is kept."""
    with engine.connect() as conn:
        try:
            conn.execute(text(statement))
        except DBAPIError as exc:
            if getattr(exc.orig, "pgcode", None) == INSUFFICIENT_PRIVILEGE:
                return False
        finally:
            conn.rollback()
    return True


def _first_column(table: str) -> str:
    return next(iter(Base.metadata.tables[table].columns)).name


TABLES = sorted(Base.metadata.tables)


def test_every_table_has_a_writer_the_roles_know():
    assert set(TABLES) <= roles.OWNED | set(roles.DEFINITIONS) | set(roles.REFERENCE)


@pytest.mark.parametrize("role", roles.ROLES)
def test_each_role_writes_exactly_the_tables_its_service_owns(engines, role):
    engine = engines[role]
    owned = roles.WRITES[role]
    wrong = []
    for table in TABLES:
        column = _first_column(table)
        may = owned.get(table, "")
        expected = {"insert": "INSERT" in may, "update": "UPDATE" in may, "delete": "DELETE" in may}
        found = {
            "insert": _allowed(engine, f"INSERT INTO {table} DEFAULT VALUES"),
            "update": _allowed(engine, f"UPDATE {table} SET {column} = {column} WHERE false"),
            "delete": _allowed(engine, f"DELETE FROM {table} WHERE false"),
        }
        if table == "operation_runs" and role == "console":
            # Only the decision's columns: not the run's id, not its kind.
            found["update"] = _allowed(engine, "UPDATE operation_runs SET status = status WHERE false")
            assert not _allowed(engine, "UPDATE operation_runs SET kind = kind WHERE false")
        assert _allowed(engine, f"SELECT count(*) FROM {table}"), f"{role} cannot read {table}"
        if found != expected:
            wrong.append(f"{table}: may {expected}, can {found}")
    assert not wrong, f"{role}:\n" + "\n".join(wrong)


def test_the_action_runner_cannot_touch_the_states(engines):
    with pytest.raises(ProgrammingError, match="permission denied for table trigger_states"):
        with engines["action_runner"].begin() as conn:
            conn.execute(text("UPDATE trigger_states SET status = 'OK'"))


@pytest.fixture
def held_run(world) -> Iterator[int]:
    """A reject held by the cap, made by the owner; removed afterwards."""
    url, _ = world
    owner = make_engine(url)
    run_script(owner, (ROOT / "seeds/example.sql").read_text())
    with owner.begin() as conn:
        trigger_id, action_id, operation_id = conn.execute(text(
            "SELECT t.id, a.id, o.id FROM triggers t, actions a JOIN action_operations ao ON ao.action_id = a.id"
            " JOIN operations o ON o.id = ao.operation_id LIMIT 1")).one()
        event_id = conn.scalar(text(
            "INSERT INTO trigger_events (trigger_id, offer_id, affiliate_id, status, check_id, measured_at)"
            " VALUES (:t, 1, 2, 'PROBLEM', 1, now()) RETURNING id"), {"t": trigger_id})
        run_id = conn.scalar(text(
            "INSERT INTO operation_runs (trigger_event_id, action_id, operation_id, kind, status)"
            " VALUES (:e, :a, :o, 'reject_affiliate', 'held') RETURNING id"),
            {"e": event_id, "a": action_id, "o": operation_id})
    yield run_id
    with owner.begin() as conn:
        conn.execute(text("TRUNCATE trigger_events, operation_runs, silences, action_operations, action_conditions,"
                          " actions, operations, trigger_thresholds, triggers CASCADE"))
    owner.dispose()


def test_the_console_decides_held_runs_and_nothing_else_on_the_runs(engines, held_run):
    console = engines["console"]
    with pytest.raises(ProgrammingError, match="row-level security"):
        with console.begin() as conn:  # a held run may be released or discarded, not marked done
            conn.execute(text("UPDATE operation_runs SET status = 'succeeded' WHERE id = :id"), {"id": held_run})
    with console.begin() as conn:
        released, events = held.release(conn, [held_run], "ops")
    assert released == [held_run] and len(events) == 1
    with console.begin() as conn:  # no longer held: out of the console's reach
        touched = conn.execute(text("UPDATE operation_runs SET status = 'discarded' WHERE id = :id"),
                               {"id": held_run}).rowcount
        assert touched == 0
    with engines["action_runner"].begin() as conn:
        assert conn.execute(text("UPDATE operation_runs SET status = 'succeeded' WHERE id = :id"),
                            {"id": held_run}).rowcount == 1


def test_the_console_adds_and_ends_silences(engines, held_run):
    with engines["console"].begin() as conn:
        now = conn.scalar(text("SELECT now()"))
        silence_id = silences.add(conn, trigger=None, offer_id=1, affiliate_id=None, ends_at=now + timedelta(hours=1),
                                  reason="maintenance", created_by="ops")
        assert silences.end(conn, [silence_id]) == [silence_id]
    with pytest.raises(ProgrammingError, match="permission denied"):
        with engines["reader"].begin() as conn:
            silences.add(conn, trigger=None, offer_id=1, affiliate_id=None, ends_at=now + timedelta(hours=1),
                         reason="maintenance", created_by="ops")


@pytest.mark.parametrize("command", [["status"], ["triggers"], ["backtest", "--from", "2026-01-01T00:00:00Z"],
                                     ["explain", "--trigger", "min CR", "--offer", "1", "--affiliate", "2"]])
def test_the_reader_role_runs_the_read_only_commands(world, held_run, command):
    _, urls = world
    result = subprocess.run([sys.executable, "-m", "shared.cli", *command], cwd=ROOT, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "DATABASE_URL": urls["reader"]}, timeout=120)
    assert result.returncode == 0, result.stderr


def test_roles_are_made_once_when_two_databases_ask_at_the_same_time():
    """Roles are cluster-wide: two `kpi roles` on two new databases, same prefix, at once."""
    import concurrent.futures
    import uuid

    prefix = f"kpi_t{uuid.uuid4().hex[:10]}_"
    with temporary_database(PG_ADMIN_URL, "kpi_roles_a") as a, temporary_database(PG_ADMIN_URL, "kpi_roles_b") as b:
        def apply(url: str) -> list[roles.Applied]:
            engine = make_engine(url)
            try:
                with engine.begin() as conn:
                    return roles.apply(conn, prefix, login=True)
            finally:
                engine.dispose()
        try:
            for _ in range(3):
                with concurrent.futures.ThreadPoolExecutor(2) as pool:
                    results = list(pool.map(apply, [a, b]))
                assert [r.role for r in results[0]] == [r.role for r in results[1]]
        finally:
            drop_service_roles(PG_ADMIN_URL, prefix, a, b)


def test_a_bad_prefix_is_refused():
    with pytest.raises(roles.RolesError, match="lower-case"):
        roles.check_prefix('kpi"; DROP ROLE postgres; --')


def test_a_password_reaches_the_server_only_as_a_scram_verifier(world):
    url, _ = world
    import uuid

    prefix = f"kpi_t{uuid.uuid4().hex[:10]}_"
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            applied = roles.apply(conn, prefix, {"reader": "s3cret'pw:name%s"})
            stored = conn.scalar(text("SELECT rolpassword FROM pg_authid WHERE rolname = :name"),
                                 {"name": prefix + "reader"})
        assert {a.role: a.login for a in applied}[prefix + "reader"] is True
        assert {a.role: a.login for a in applied}[prefix + "console"] is False
        assert stored.startswith("SCRAM-SHA-256$") and "s3cret" not in stored
    finally:
        engine.dispose()
        drop_service_roles(PG_ADMIN_URL, prefix, url)
