import uuid

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from shared import migrate
from shared.db import Base, make_engine
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
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == [], f"models and migrations disagree: {diff}"
