"""PostgreSQL roles: one per service, one for the console, one that only reads.

The database enforces docs/DESIGN.md's rule that each table has one writing service:
a role may write only the tables its service owns (the trigger_checker owns its two
partitioned tables outright: it makes and drops their partitions). Every role reads every table (the
services join across nearly all of them; none holds a secret). The console may also
add and end silences and decide held runs: on operation_runs it may update only the
decision's columns, and a row-level policy lets it touch only `held` runs and leave them
`pending` (released) or `discarded`. Operators seed the definition tables (triggers,
actions, ...) as the database's owner, who also runs `kpi migrate` and `kpi roles`.

Roles belong to the whole PostgreSQL cluster, grants to one database: `kpi roles`
creates the roles it misses (safely beside another run doing the same), then replaces
their grants in the current database. Run it again after every `kpi migrate`.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

# Operators seed these; every role only reads them.
DEFINITIONS = ("metrics", "triggers", "trigger_thresholds", "operations", "actions", "action_conditions",
               "action_operations", "administrators", "alembic_version")
REFERENCE = ("offers", "offer_categories", "categories", "goals", "conversion_caps", "affiliates",
             "affiliate_users", "employees")
DECISION_COLUMNS = ("status", "decided_by", "decided_at", "finished_at", "started_at", "detail")

# Role (without its prefix) -> table -> privileges beyond SELECT.
WRITES: dict[str, dict[str, str]] = {
    # hasoffers_call_slots: the network's API rate limit, shared by every process that calls HasOffers.
    "metric_loader": {**{table: "INSERT, UPDATE, DELETE" for table in REFERENCE}, "load_runs": "INSERT, UPDATE",
                      "hasoffers_call_slots": "INSERT, UPDATE"},
    "trigger_checker": {"metric_values": "INSERT, UPDATE, DELETE", "trigger_checks": "INSERT, UPDATE, DELETE"},
    "event_detector": {"trigger_states": "INSERT, UPDATE", "trigger_events": "INSERT, UPDATE"},
    "action_runner": {"operation_runs": "INSERT, UPDATE", "action_firings": "INSERT, UPDATE",
                      "action_evaluations": "INSERT, UPDATE", "digests": "INSERT, UPDATE",
                      "reject_cap_alerts": "INSERT, UPDATE", "hasoffers_call_slots": "INSERT, UPDATE"},
    "console": {"silences": "INSERT, UPDATE", "operation_runs": f"UPDATE ({', '.join(DECISION_COLUMNS)})"},
    "reader": {},
}
# Partitioned by day (shared/partitions.py): their one writer makes and drops the
# partitions, which PostgreSQL allows only the table's owner, so it owns them.
OWNS = {"trigger_checker": ("metric_values", "trigger_checks")}
ROLES = tuple(WRITES)
OWNED = {table for tables in WRITES.values() for table in tables} | {"silences"}
DEFAULT_PREFIX = "kpi_"
_PREFIX = re.compile(r"[a-z_][a-z0-9_]{0,39}")
# One `kpi roles` at a time per database (concurrent GRANTs on one table can fail).
_LOCK = 7_245_110_020


class RolesError(Exception):
    pass


@dataclass(frozen=True)
class Applied:
    role: str
    login: bool
    created: bool


def role_name(prefix: str, role: str) -> str:
    return prefix + role


def check_prefix(prefix: str) -> str:
    if not _PREFIX.fullmatch(prefix):
        raise RolesError(f"role prefix {prefix!r}: lower-case letters, digits and _ only, 40 at most")
    return prefix


def password_from_env(role: str, environ: dict[str, str] | None = None) -> str | None:
    """KPI_DB_PASSWORD_<ROLE>, or the content of the file KPI_DB_PASSWORD_<ROLE>_FILE."""
    environ = os.environ if environ is None else environ
    name = f"KPI_DB_PASSWORD_{role.upper()}"
    value, path = environ.get(name), environ.get(f"{name}_FILE")
    if value is not None and path:
        raise RolesError(f"set {name} or {name}_FILE, not both")
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
        except OSError as exc:
            raise RolesError(f"{name}_FILE: cannot read {path}: {exc.strerror or exc}") from None
    return value or None


def _quote(conn: Connection, identifier: str) -> str:
    return conn.dialect.identifier_preparer.quote_identifier(identifier)


def _literal(conn: Connection, value: str) -> str:
    # Utility statements take no parameters; psycopg2 quotes the literal for this connection.
    from psycopg2.extensions import QuotedString

    quoted = QuotedString(value)
    quoted.prepare(conn.connection.dbapi_connection)
    return quoted.getquoted().decode()


def _scram(conn: Connection, role: str, password: str) -> str:
    """The password as a SCRAM-SHA-256 verifier computed here: the plain password never
    reaches the server, its statement log or pg_stat_activity."""
    from psycopg2.extensions import encrypt_password

    return encrypt_password(password, role, conn.connection.dbapi_connection, "scram-sha-256")


def _tables(conn: Connection) -> list[str]:
    return list(conn.scalars(text(
        "SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace"
        " AND c.relkind IN ('r', 'p') AND NOT c.relispartition ORDER BY c.relname")))


def _partitions(conn: Connection, table: str) -> list[str]:
    return list(conn.scalars(text(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = to_regclass(:table) ORDER BY 1"), {"table": table}))


def _sequences(conn: Connection, tables: list[str]) -> list[str]:
    """The sequences behind the id columns of `tables` (serial or identity)."""
    return list(conn.scalars(text(
        "SELECT DISTINCT s.relname FROM pg_class s JOIN pg_depend d ON d.objid = s.oid"
        " AND d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass"
        " JOIN pg_class t ON t.oid = d.refobjid WHERE s.relkind = 'S' AND t.relname = ANY(:tables)"
        " AND t.relnamespace = 'public'::regnamespace ORDER BY 1"), {"tables": tables}))


def _role_statement(conn: Connection, statement: str) -> bool:
    """Run a CREATE or ALTER ROLE that another `kpi roles` (on another database of the
    same cluster, so not under our advisory lock) may run at the same moment: False if
    the role was created by the other one; its concurrent update is waited out."""
    for attempt in range(100):
        savepoint = conn.begin_nested()
        try:
            # As is: a password's verifier may hold ":name" or "%", which text() and the
            # driver would take for parameters.
            conn.exec_driver_sql(statement, execution_options={"no_parameters": True})
            savepoint.commit()
            return True
        except DBAPIError as exc:
            savepoint.rollback()
            code = getattr(exc.orig, "pgcode", None)
            if code in ("42710", "23505"):  # duplicate role: created beside us
                return False
            if code != "XX000" or "concurrently" not in str(exc.orig):
                raise
            time.sleep(min(0.01 * (attempt + 1), 0.2))
    raise RolesError("roles kept changing under `kpi roles`: run it again")


def _ensure_role(conn: Connection, name: str, password: str | None, login: bool) -> bool:
    """Create the role if it is missing; True if this call created it."""
    exists = conn.scalar(text("SELECT count(*) FROM pg_roles WHERE rolname = :name"), {"name": name})
    created = not exists and _role_statement(conn, f"CREATE ROLE {_quote(conn, name)} NOLOGIN")
    attributes = "NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
    if password is not None:
        attributes += f" LOGIN PASSWORD {_literal(conn, _scram(conn, name, password))}"
    elif login:
        attributes += " LOGIN"
    _role_statement(conn, f"ALTER ROLE {_quote(conn, name)} {attributes}")
    return created


def apply(conn: Connection, prefix: str = DEFAULT_PREFIX, passwords: dict[str, str | None] | None = None,
          login: bool = False) -> list[Applied]:
    """Create the roles and replace their grants in this database, in the caller's
    transaction. A role with a password (or every role, with `login`) may log in."""
    check_prefix(prefix)
    passwords = passwords or {}
    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK})
    tables = _tables(conn)
    unknown = sorted(set(tables) - OWNED - set(DEFINITIONS) - set(REFERENCE))
    if unknown:
        raise RolesError(f"tables no role is told about: {', '.join(unknown)} (shared/roles.py decides who "
                         "writes them)")
    database = _quote(conn, conn.scalar(text("SELECT current_database()")))
    applied = []
    for role, writes in WRITES.items():
        name = role_name(prefix, role)
        password = passwords.get(role)
        created = _ensure_role(conn, name, password, login)
        who = _quote(conn, name)
        conn.execute(text(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {who}"))
        conn.execute(text(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {who}"))
        conn.execute(text(f"GRANT CONNECT ON DATABASE {database} TO {who}"))
        conn.execute(text(f"GRANT USAGE ON SCHEMA public TO {who}"))
        conn.execute(text(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {who}"))
        inserted = [table for table, privileges in writes.items() if "INSERT" in privileges]
        for table, privileges in writes.items():
            if table in tables:
                conn.execute(text(f"GRANT {privileges} ON {_quote(conn, table)} TO {who}"))
        for sequence in _sequences(conn, inserted):
            conn.execute(text(f"GRANT USAGE, SELECT ON SEQUENCE {_quote(conn, sequence)} TO {who}"))
        owned = [table for table in OWNS.get(role, ()) if table in tables]
        if owned:
            conn.execute(text(f"GRANT CREATE ON SCHEMA public TO {who}"))
        for table in owned:
            for relation in [table, *_partitions(conn, table)]:
                conn.execute(text(f"ALTER TABLE {_quote(conn, relation)} OWNER TO {who}"))
                conn.execute(text(f"GRANT ALL ON {_quote(conn, relation)} TO {who}"))
        can_login = conn.scalar(text("SELECT rolcanlogin FROM pg_roles WHERE rolname = :name"), {"name": name})
        applied.append(Applied(name, bool(can_login), created))
    _held_decisions_policy(conn, prefix)
    return applied


def _held_decisions_policy(conn: Connection, prefix: str) -> None:
    """operation_runs under row-level security: every role reads every row, the
    action_runner writes every row, the console only decides held runs. The owner (who
    migrates and seeds) is not subject to it."""
    runs = "operation_runs"
    everyone = ", ".join(_quote(conn, role_name(prefix, role)) for role in ROLES)
    runner, console = (_quote(conn, role_name(prefix, role)) for role in ("action_runner", "console"))
    policies = {
        f"{prefix}read": f"FOR SELECT TO {everyone} USING (true)",
        f"{prefix}action_runner": f"FOR ALL TO {runner} USING (true) WITH CHECK (true)",
        f"{prefix}held_decisions": (f"FOR UPDATE TO {console} USING (status = 'held')"
                                    " WITH CHECK (status IN ('pending', 'discarded'))"),
    }
    conn.execute(text(f"ALTER TABLE {runs} ENABLE ROW LEVEL SECURITY"))
    for policy, definition in policies.items():
        conn.execute(text(f"DROP POLICY IF EXISTS {_quote(conn, policy)} ON {runs}"))
        conn.execute(text(f"CREATE POLICY {_quote(conn, policy)} ON {runs} {definition}"))


def drop(conn: Connection, prefix: str) -> None:
    """Remove the roles' grants and policies in this database (roles stay: other
    databases may use them)."""
    check_prefix(prefix)
    names = [role_name(prefix, role) for role in ROLES]
    existing = list(conn.scalars(text("SELECT rolname FROM pg_roles WHERE rolname = ANY(:names)"), {"names": names}))
    if existing:
        quoted = ", ".join(_quote(conn, name) for name in existing)
        # What they own (the partitioned tables) goes back to us, not away with them.
        conn.execute(text(f"REASSIGN OWNED BY {quoted} TO CURRENT_USER"))
        conn.execute(text(f"DROP OWNED BY {quoted}"))


def describe() -> list[tuple[str, str]]:
    """(role, what it may write), for the CLI and the README."""
    rows = []
    for role, writes in WRITES.items():
        rows.append((role, "; ".join(f"{table}: {privileges}" for table, privileges in writes.items())
                     or "nothing (reads every table)"))
    return rows
