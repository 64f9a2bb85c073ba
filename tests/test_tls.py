"""TLS to PostgreSQL and RabbitMQ through the settings, certificates verified: against a
PostgreSQL cluster and a RabbitMQ node of the test's own (this machine's servers are
never reconfigured), presenting a certificate made in the test."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from shared.db import make_engine
from shared.rabbitmq import BrokerUnavailableError, Bus, queue_names
from shared.settings import Settings
from testkit.broker import delete_topology
from testkit.tls import Certificates, make_certificates, missing_requirement, tls_postgres, tls_rabbitmq
from tests.support import ROOT

pytestmark = pytest.mark.skipif(missing_requirement() is not None and not os.environ.get("CI"),
                                reason=str(missing_requirement()))


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


# -- PostgreSQL: DATABASE_SSLMODE, DATABASE_SSLROOTCERT ------------------------------------


@pytest.fixture(scope="module")
def pg_port(certificates) -> Iterator[int]:
    with tls_postgres(certificates) as port:
        yield port


def _settings(**overrides) -> Settings:
    return Settings(_env_file=None, **overrides)


def _database_settings(port: int, ca, sslmode: str = "verify-full") -> Settings:
    return _settings(database_url=f"postgresql+psycopg2://postgres@localhost:{port}/postgres",
                     database_sslmode=sslmode, database_sslrootcert=str(ca))


def test_postgresql_over_tls_with_the_certificate_verified(pg_port, certificates):
    engine = make_engine(_database_settings(pg_port, certificates.ca).database_url.get_secret_value())
    try:
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")) is True
    finally:
        engine.dispose()


def test_postgresql_refuses_a_certificate_we_cannot_verify_and_plain_text_is_refused(pg_port, certificates):
    for settings in (_database_settings(pg_port, certificates.other_ca),
                     _database_settings(pg_port, certificates.ca, sslmode="disable")):
        engine = make_engine(settings.database_url.get_secret_value())
        try:
            with pytest.raises(OperationalError, match="certificate verify failed|no pg_hba.conf entry|rejects"):
                with engine.connect():
                    pass
        finally:
            engine.dispose()


def test_kpi_migrate_over_tls_from_the_environment(pg_port, certificates):
    """The command line takes the TLS settings from the environment, as a service does."""
    env = {"PATH": os.environ["PATH"], "DATABASE_URL": f"postgresql+psycopg2://postgres@localhost:{pg_port}/postgres",
           "DATABASE_SSLMODE": "verify-full", "DATABASE_SSLROOTCERT": str(certificates.ca)}
    result = subprocess.run([sys.executable, "-m", "shared.cli", "migrate"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    result = subprocess.run([sys.executable, "-m", "shared.cli", "migrate"], cwd=ROOT,
                            env={**env, "DATABASE_SSLROOTCERT": str(certificates.other_ca)}, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode != 0 and "certificate verify failed" in result.stderr


# -- RabbitMQ: amqps://, AMQP_CA_FILE -----------------------------------------------------


@pytest.fixture(scope="module")
def amqps_port(certificates) -> Iterator[int]:
    with tls_rabbitmq(certificates) as port:
        yield port


def test_amqps_with_the_certificate_verified(amqps_port, certificates):
    exchange = f"kpi.tls.{uuid.uuid4().hex[:8]}"
    settings = _settings(amqp_url=f"amqps://guest:guest@localhost:{amqps_port}/%2F", amqp_ca_file=str(certificates.ca),
                         kpi_exchange=exchange)
    with Bus(settings.amqp_url.get_secret_value(), exchange).connect() as bus:
        assert bus.connection._impl.params.ssl_options is not None  # noqa: SLF001 (pika's own)
        bus.send_to_queue(queue_names(exchange, "trigger_checker").dead, b"{}", message_id="m", type="t", headers={})
        method, _, body = bus.channel.basic_get(queue_names(exchange, "trigger_checker").dead, auto_ack=True)
        assert body == b"{}"
        delete_topology(bus.channel, exchange)


def test_amqps_refuses_a_certificate_we_cannot_verify(amqps_port, certificates):
    settings = _settings(amqp_url=f"amqps://guest:guest@localhost:{amqps_port}/%2F",
                         amqp_ca_file=str(certificates.other_ca))
    with pytest.raises(BrokerUnavailableError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        Bus(settings.amqp_url.get_secret_value(), "kpi.tls.refused").connect_with_retry(attempts=1, delay=0)


def test_amqps_without_a_ca_file_trusts_only_the_system_cas(amqps_port):
    settings = _settings(amqp_url=f"amqps://guest:guest@localhost:{amqps_port}/%2F")
    with pytest.raises(BrokerUnavailableError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        Bus(settings.amqp_url.get_secret_value(), "kpi.tls.refused").connect_with_retry(attempts=1, delay=0)
