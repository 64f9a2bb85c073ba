"""Alembic environment: the URL comes from the caller's config or from DATABASE_URL."""

from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool

from shared.db import Base, make_engine
from shared.partitions import is_partition
from shared.settings import Settings

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def include_name(name: str | None, type_: str, _parent: object) -> bool:
    """Partitions are made and dropped by the services, not described by the models."""
    return not (type_ == "table" and is_partition(name))


def database_url() -> str:
    url = config.attributes.get("database_url")
    return url or Settings().database_url.get_secret_value()


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, compare_type=True,
                          include_name=include_name)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
