"""SMTP_TIMEOUT_SECONDS: a server that takes the connection and then says nothing."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from services.action_runner.mailer import Mail, MailTransientError, SmtpMailer
from shared.settings import Settings


def test_a_silent_smtp_server_is_a_transient_failure_after_the_timeout(monkeypatch):
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_say_nothing():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])  # no banner, ever
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
    thread.start()
    monkeypatch.setenv("SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("SMTP_PORT", str(listener.getsockname()[1]))
    monkeypatch.setenv("SMTP_STARTTLS", "false")
    monkeypatch.setenv("SMTP_TIMEOUT_SECONDS", "0.5")
    mailer = SmtpMailer.from_settings(Settings())
    started = time.monotonic()
    try:
        with pytest.raises(MailTransientError):
            mailer.send(Mail(("a@x.example",), "s", "<p>h</p>", "h", "<kpi-1@kpi.example>", 1))
        took = time.monotonic() - started
    finally:
        stop.set()
        thread.join(5)
        for connection in held:
            connection.close()
        listener.close()
    # The setting, not the 30 s default, bounded the wait (generous: a loaded machine).
    assert took < 15, took
