"""Fixtures: a migrated database per test session, a unique exchange per test.

Everything runs against the real RabbitMQ and PostgreSQL on this machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import pytest
from sqlalchemy import Engine, text

from shared.db import Base, make_engine
from shared.rabbitmq import Bus
from testkit.broker import temporary_exchange
from testkit.database import temporary_database
from testkit.processes import ServiceProcess
from tests.support import AMQP_URL, PG_ADMIN_URL

# Tables whose rows a test may leave behind; `metrics` keeps its seed.
KEEP = {"metrics", "alembic_version"}


def _check_services() -> None:
    try:
        pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()
    except Exception as exc:
        pytest.exit(f"RabbitMQ is not reachable at 127.0.0.1:5672 ({exc!r}); start it: rabbitmq-server -detached", 3)
    try:
        engine = make_engine(PG_ADMIN_URL)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:
        pytest.exit(
            f"PostgreSQL is not reachable at 127.0.0.1:5432 ({type(exc).__name__}); start it: "
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start", 3,
        )


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    _check_services()
    with temporary_database(PG_ADMIN_URL, "kpi_test") as url:
        yield url


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def db(engine: Engine) -> Engine:
    """The session database, emptied of everything but the metrics seed."""
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables if t.name not in KEEP)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    return engine


@pytest.fixture
def exchange() -> Iterator[str]:
    with temporary_exchange(AMQP_URL, "kpi.test") as name:
        yield name


@pytest.fixture
def bus(exchange: str) -> Iterator[Bus]:
    bus = Bus(AMQP_URL, exchange).connect()
    yield bus
    bus.close()


@pytest.fixture
def service_env(database_url: str, exchange: str) -> dict[str, str]:
    """Environment for a service process in this test's database and exchange."""
    return {
        "DATABASE_URL": database_url,
        "AMQP_URL": AMQP_URL,
        "KPI_EXCHANGE": exchange,
        "KPI_RETRY_DELAY_MS": "100",
        "KPI_RETRY_LIMIT": "3",
        "KPI_STARTUP_ATTEMPTS": "3",
        "KPI_LOG_LEVEL": "INFO",
        # Tests measure at fixed dates: retention must not take their rows as they age.
        "KPI_RETENTION_DAYS": "0",
    }


@pytest.fixture
def start_service(service_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """start_service("trigger_checker", EXTRA="1") -> a running ServiceProcess, stopped after the test."""
    started: list[ServiceProcess] = []

    def start(service: str, wait_ready: bool = True, **extra_env: str) -> ServiceProcess:
        process = ServiceProcess(service, {**service_env, **extra_env}, tmp_path)
        started.append(process)
        return process.start(wait_ready=wait_ready)

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def world(db: Engine) -> Engine:
    """The database with the action_runner tests' reference rows (offers, people, triggers)."""
    from tests.action_runner_support import seed_reference

    with db.begin() as conn:
        seed_reference(conn)
    return db
