"""Databases of their own for a test session, the demo, a benchmark or the fault suite."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import text

from shared import migrate, roles
from shared.db import make_engine


def admin_url(variable: str) -> str:
    """The maintenance database's URL: from `variable` if set, else the local postgres."""
    return os.environ.get(variable, "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


def database_url(admin_url: str, name: str) -> str:
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def _as_admin(admin_url: str, statement: str) -> None:
    admin = make_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(statement))
    finally:
        admin.dispose()


def create_database(admin_url: str, name: str) -> str:
    """An empty database `name` (a leftover of the same name is dropped first); its URL."""
    drop_database(admin_url, name)
    _as_admin(admin_url, f'CREATE DATABASE "{name}"')
    return database_url(admin_url, name)


def migrated_database(admin_url: str, name: str) -> str:
    """A new database at the latest schema (Alembic, as `kpi migrate` does it); its URL."""
    url = create_database(admin_url, name)
    migrate.upgrade(url)
    return url


@contextmanager
def temporary_database(admin_url: str, prefix: str) -> Iterator[str]:
    """A migrated database `<prefix>_<random>` for the block; dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        yield migrated_database(admin_url, name)
    finally:
        drop_database(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    # WITH (FORCE): a killed service may still hold a connection.
    _as_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def role_url(database_url: str, role: str) -> str:
    """`database_url` with `role` as its user (no password: the local server trusts it)."""
    scheme, rest = database_url.split("://", 1)
    return f"{scheme}://{role}@{rest.rpartition('@')[2]}"


def create_service_roles(database_url: str) -> tuple[str, dict[str, str]]:
    """Roles of their own (`kpi roles` with a random prefix: roles are cluster-wide and
    other tests make theirs at the same time) for the database; (prefix, role -> URL)."""
    prefix = f"kpi_t{uuid.uuid4().hex[:10]}_"
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            roles.apply(conn, prefix, login=True)
    finally:
        engine.dispose()
    return prefix, {role: role_url(database_url, roles.role_name(prefix, role)) for role in roles.ROLES}


def drop_service_roles(admin_url: str, prefix: str, *database_urls: str | None) -> None:
    """Their grants in the databases (a role with grants left cannot go), then the roles."""
    for database_url in filter(None, database_urls):
        engine = make_engine(database_url)
        try:
            with engine.begin() as conn:
                roles.drop(conn, prefix)
        finally:
            engine.dispose()
    for role in roles.ROLES:
        _as_admin(admin_url, f'DROP ROLE IF EXISTS "{roles.role_name(prefix, role)}"')


@contextmanager
def service_roles(admin_url: str, database_url: str) -> Iterator[dict[str, str]]:
    """For the block: role -> URL of that role on `database_url` (see create_service_roles)."""
    prefix, urls = create_service_roles(database_url)
    try:
        yield urls
    finally:
        drop_service_roles(admin_url, prefix, database_url)
