"""Secure by default: secrets from files, passwords beside the URLs, SMTP STARTTLS on with
the certificate checked."""

from __future__ import annotations

import smtplib
import ssl

import pytest
from pydantic import SecretStr
from pydantic_settings import SettingsError

from services.action_runner.mailer import Mail, MailTransientError, SmtpMailer
from shared.settings import Settings
from testkit.smtp import FakeSmtpServer
from testkit.tls import make_certificates

SECRETS = ["database_url", "database_password", "amqp_url", "amqp_password", "hasoffers_network_token",
           "smtp_password", "kpi_web_password"]


def settings(**overrides) -> Settings:
    return Settings(_env_file=None, **overrides)


def secret(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


@pytest.fixture
def clean_env(monkeypatch):
    for name in SECRETS:
        monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.delenv(f"{name.upper()}_FILE", raising=False)
    return monkeypatch


@pytest.mark.parametrize("name", SECRETS)
def test_every_secret_can_come_from_a_file(clean_env, tmp_path, name):
    path = tmp_path / name
    path.write_text("from-a-file\n")  # as `echo secret > file` writes it
    clean_env.setenv(f"{name.upper()}_FILE", str(path))
    value = secret(getattr(settings(), name))
    if name == "database_password":
        assert ":from-a-file@" in settings().database_url.get_secret_value()
    elif name == "amqp_password":
        assert ":from-a-file@" in settings().amqp_url.get_secret_value()
    else:
        assert value == "from-a-file"


def test_a_secret_and_its_file_together_are_refused(clean_env, tmp_path):
    (tmp_path / "token").write_text("one")
    clean_env.setenv("HASOFFERS_NETWORK_TOKEN", "two")
    clean_env.setenv("HASOFFERS_NETWORK_TOKEN_FILE", str(tmp_path / "token"))
    with pytest.raises(SettingsError, match="HASOFFERS_NETWORK_TOKEN or HASOFFERS_NETWORK_TOKEN_FILE"):
        settings()


def test_an_unreadable_secret_file_is_a_clear_error_without_the_secret(clean_env, tmp_path):
    clean_env.setenv("DATABASE_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(SettingsError, match="DATABASE_PASSWORD_FILE: cannot read .*missing"):
        settings()


def test_settings_that_are_not_secrets_have_no_file_variant(clean_env, tmp_path):
    (tmp_path / "host").write_text("smtp.example")
    clean_env.setenv("SMTP_HOST_FILE", str(tmp_path / "host"))
    assert settings().smtp_host == "127.0.0.1"


def test_passwords_beside_the_urls_replace_theirs_whatever_they_hold(clean_env):
    s = settings(database_url="postgresql+psycopg2://kpi_loader@db:5432/kpi", database_password="p@ss:/w,rd",
                 amqp_url="amqp://kpi@rmq1:5672/%2F,amqp://kpi:old@rmq2:5672/%2F", amqp_password="p@ss:/w,rd")
    from sqlalchemy.engine import make_url
    url = make_url(s.database_url.get_secret_value())
    assert (url.username, url.password, url.host) == ("kpi_loader", "p@ss:/w,rd", "db")
    import pika

    from shared.rabbitmq.topology import amqp_urls
    nodes = [pika.URLParameters(node) for node in amqp_urls(s.amqp_url.get_secret_value())]
    assert [(n.host, n.credentials.username, n.credentials.password) for n in nodes] == [
        ("rmq1", "kpi", "p@ss:/w,rd"), ("rmq2", "kpi", "p@ss:/w,rd")]
    assert "p@ss" not in repr(s)


def test_tls_settings_reach_the_urls(clean_env, tmp_path):
    certificates = make_certificates(tmp_path)
    s = settings(database_url="postgresql+psycopg2://kpi@db.example:5432/kpi", database_sslmode="verify-full",
                 database_sslrootcert=str(certificates.ca),
                 amqp_url="amqps://kpi:pw@rmq.example:5671/%2F", amqp_ca_file=str(certificates.ca))
    assert s.database_url.get_secret_value().endswith(f"?sslmode=verify-full&sslrootcert={certificates.ca}"
                                                      .replace("/", "%2F"))
    import pika
    params = pika.URLParameters(s.amqp_url.get_secret_value())
    assert params.ssl_options.server_hostname == "rmq.example"
    assert params.ssl_options.context.verify_mode == ssl.CERT_REQUIRED
    assert params.ssl_options.context.check_hostname


# -- SMTP: STARTTLS by default, the certificate checked ----------------------------------


def test_starttls_is_on_by_default(clean_env):
    clean_env.delenv("SMTP_STARTTLS", raising=False)
    assert settings().smtp_starttls is True
    assert SmtpMailer.from_settings(settings()).starttls is True


def _mail() -> Mail:
    return Mail(("a@x.example",), "s", "<p>h</p>", "h\n", "<kpi-tls-1@kpi.example>", 1)


@pytest.fixture
def tls_sink(tmp_path):
    certificates = make_certificates(tmp_path / "certs")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates.cert, certificates.key)
    server = FakeSmtpServer(tls_context=context).start()
    yield server, certificates
    server.stop()


def test_mail_goes_over_starttls_with_the_certificate_checked(tls_sink):
    server, certificates = tls_sink
    mailer = SmtpMailer("localhost", server.port, sender="kpi@kpi.example", ca_file=str(certificates.ca), timeout=5)
    try:
        assert mailer.send(_mail()) == ""
    finally:
        mailer.close()
    [received] = server.mails()
    assert received.over_tls


def test_a_certificate_that_does_not_verify_gets_no_mail(tls_sink):
    server, certificates = tls_sink
    mailer = SmtpMailer("localhost", server.port, sender="kpi@kpi.example", ca_file=str(certificates.other_ca),
                        timeout=5)
    with pytest.raises(MailTransientError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        mailer.send(_mail())
    assert server.mails() == []


def test_a_server_without_starttls_gets_no_mail_unless_told(tmp_path):
    server = FakeSmtpServer().start()  # a plain sink, as in the demo
    try:
        with pytest.raises(MailTransientError, match="STARTTLS"):
            SmtpMailer("127.0.0.1", server.port, sender="kpi@kpi.example", timeout=5).send(_mail())
        assert server.mails() == []
        assert SmtpMailer("127.0.0.1", server.port, sender="kpi@kpi.example", starttls=False,
                          timeout=5).send(_mail()) == ""
        assert [m.over_tls for m in server.mails()] == [False]
    finally:
        server.stop()


def test_the_tls_sink_turns_away_a_plain_client(tls_sink):
    """The TLS sink really requires STARTTLS: a plain client is turned away (so the test
    above proves the mail went encrypted, not that the sink takes anything)."""
    server, _ = tls_sink
    with smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client:
        with pytest.raises(smtplib.SMTPException):
            client.sendmail("kpi@kpi.example", ["a@x.example"], b"Subject: s\r\n\r\nh\r\n")
    assert server.mails() == []


def test_a_missing_secret_file_stops_a_command_with_one_line(tmp_path):
    import subprocess
    import sys

    from tests.support import ROOT

    result = subprocess.run([sys.executable, "-m", "shared.cli", "status"], cwd=ROOT, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "DATABASE_PASSWORD_FILE": str(tmp_path / "missing")},
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"kpi: error: invalid configuration: DATABASE_PASSWORD_FILE: cannot read {tmp_path / 'missing'}: "
        "No such file or directory"]
