"""Databases of their own for a test session, the demo, a benchmark or the fault suite."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import text

from shared import migrate
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
