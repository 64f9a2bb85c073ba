"""A real local SMTP server (aiosmtpd) that keeps what it receives: the mail sink of the
tests, the demo and the fault suite."""

from __future__ import annotations

import asyncio
import email
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller

from testkit.ports import free_port


@dataclass(frozen=True)
class ReceivedMail:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    message: EmailMessage
    at: float  # time.time() when it was accepted
    over_tls: bool = False  # sent after STARTTLS
    # Parsing a header costs ~50 us; the fault suite asks thousands of mails for theirs.
    _headers: dict[str, str | None] = field(default_factory=dict, compare=False, repr=False)

    def part(self, subtype: str) -> str:
        found = self.message.get_body(preferencelist=(subtype,))
        assert found is not None and found.get_content_subtype() == subtype, f"no text/{subtype} part"
        return found.get_content()

    def header(self, name: str) -> str | None:
        if name not in self._headers:
            value = self.message.get(name)
            self._headers[name] = None if value is None else str(value)
        return self._headers[name]

    @property
    def subject(self) -> str:
        return self.header("Subject") or ""


class FakeSmtpServer:
    """aiosmtpd on 127.0.0.1:<port>; stop() and start() again on the same port make an
    SMTP outage.

    `replies` are answered to the next DATA commands instead of accepting them (e.g.
    "451 4.3.0 try again later"); `delay` holds each accepted mail; `together` holds each
    mail until that many are being sent at once (a barrier, 10 s at most), and
    `most_at_once` says how many were; `hold_until` (a callable) holds each mail until it
    returns true (`hold_seconds` at most, 10 by default; `holds_timed_out` counts the mails
    let go at that limit, so a test can tell a barrier met from one given up on): a barrier
    on something else. `on_next_mail` is called once, with the client's
    port, after the next mail is taken and before the client hears "250": a fault that
    kills the sender in the middle of its send.
    """

    def __init__(self, port: int | None = None, delay: float = 0.0, tls_context: ssl.SSLContext | None = None):
        self.port = port or free_port()
        # With a context: STARTTLS offered, and required before any mail.
        self.tls_context = tls_context
        self.delay = delay
        self.together = 0
        self.most_at_once = 0
        self.hold_until: Callable[[], bool] | None = None
        self.hold_seconds = 10.0
        self.holds_timed_out = 0
        self.replies: list[str] = []
        self.received: list[ReceivedMail] = []
        self.data_commands = 0
        self.on_next_mail: Callable[[int], None] | None = None
        self._in_flight = 0
        self._lock = threading.Lock()
        self._controller: Controller | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd's name)
        with self._lock:
            self.data_commands += 1
            if self.replies:
                return self.replies.pop(0)
            self._in_flight += 1
            self.most_at_once = max(self.most_at_once, self._in_flight)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + (self.hold_seconds if self.hold_until else 10)
            while ((self.most_at_once < self.together or (self.hold_until and not self.hold_until()))
                   and loop.time() < deadline):
                await asyncio.sleep(0.01)
            if self.hold_until and not self.hold_until():
                with self._lock:
                    self.holds_timed_out += 1
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            with self._lock:
                self._in_flight -= 1
        raw = envelope.content if isinstance(envelope.content, bytes) else envelope.content.encode()
        message = email.message_from_bytes(raw, policy=policy.default)
        with self._lock:
            self.received.append(ReceivedMail(envelope.mail_from, list(envelope.rcpt_tos), raw, message, time.time(),
                                              over_tls=session.ssl is not None))
            hook, self.on_next_mail = self.on_next_mail, None
        if hook is not None:
            hook(session.peer[1])
        return "250 OK"

    def start(self) -> FakeSmtpServer:
        tls = {"tls_context": self.tls_context, "require_starttls": True} if self.tls_context else {}
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port, **tls)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def mails(self) -> list[ReceivedMail]:
        with self._lock:
            return list(self.received)

    @property
    def env(self) -> dict[str, str]:
        return {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(self.port), "MAIL_FROM": "kpi@kpi.example",
                "SMTP_TIMEOUT_SECONDS": "5", "SMTP_STARTTLS": "false"}  # a sink on this host
