"""Outgoing mail over SMTP (stdlib smtplib), with failures sorted into transient and permanent.

One SmtpMailer per thread that sends (the handler's, the ticker's) holds the configuration
and one connection, reused from mail to mail and replaced when it has died (a server
restart between two events), never with a mail half sent on it.
"""

from __future__ import annotations

import logging
import re
import smtplib
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.header import Header
from email.policy import compat32
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formataddr, formatdate, parseaddr
from typing import Protocol

from shared.handling import RetryableError
from shared.settings import Settings

logger = logging.getLogger(__name__)

# Deliberately strict: an address with spaces, brackets, commas or line breaks could smuggle
# a second recipient or a header; such addresses are left out rather than "fixed".
_HEADER_BREAK = re.compile(r"[\r\n]")
# As it goes on the wire: smtplib sends bytes as they are, and SMTP lines end in CRLF.
_SMTP_LINES = compat32.clone(linesep="\r\n")
_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


class MailTransientError(RetryableError):
    """The mail was not accepted for now (server down, timeout, 4xx): try again later."""


class MailRejectedError(Exception):
    """The server refused the mail for good (5xx): trying again would not help."""


@dataclass(frozen=True)
class Mail:
    recipients: tuple[str, ...]
    subject: str
    html: str
    text: str
    # Stable per operation run: a copy sent again after a crash carries the same id,
    # which lets mail clients and archives recognise it as the same message.
    message_id: str
    run_id: int | None
    # A digest carries several runs: X-KPI-Digest-Runs lists them instead.
    digest_runs: tuple[int, ...] = ()


class Mailer(Protocol):
    def send(self, mail: Mail) -> str:
        """Send the mail; return a note for the run's detail, or raise MailTransientError /
        MailRejectedError."""
        ...


def valid_address(address: str) -> bool:
    return _ADDRESS.fullmatch(address) is not None


def clean_recipients(addresses: Sequence[str | None]) -> tuple[list[str], list[str]]:
    """(usable addresses, without duplicates in any letter case; the unusable ones)."""
    usable: list[str] = []
    seen: set[str] = set()
    unusable: list[str] = []
    for raw in addresses:
        address = (raw or "").strip()
        if not address:
            continue
        if not valid_address(address):
            unusable.append(address)
        elif address.lower() not in seen:
            seen.add(address.lower())
            usable.append(address)
    return usable, unusable


def build_message(mail: Mail, sender: str) -> bytes:
    """The mail as sent: multipart/alternative (text, then HTML), UTF-8.

    Built with the email package's compat32 classes: EmailMessage's header registry and
    content manager cost three times the CPU (about 2 ms a mail) for an equivalent
    message. compat32 does not refuse a line break in a header value, so every value is
    checked here (subject and addresses are cleaned before; this is the backstop)."""
    name, address = parseaddr(sender)
    headers = [("From", formataddr((name, address), charset="utf-8") if name else sender),
               ("To", ", ".join(mail.recipients)), ("Subject", mail.subject), ("Date", formatdate(usegmt=True)),
               ("Message-ID", mail.message_id)]
    if mail.run_id is not None:
        headers.append(("X-KPI-Operation-Run", str(mail.run_id)))
    if mail.digest_runs:
        headers.append(("X-KPI-Digest-Runs", ",".join(map(str, mail.digest_runs))))
    message = MIMEMultipart("alternative")
    for header, value in headers:
        if _HEADER_BREAK.search(value):
            raise ValueError(f"a line break in the {header} header")
        message[header] = value if value.isascii() else Header(value, "utf-8").encode()
    message.attach(MIMEText(mail.text, "plain", "utf-8"))
    message.attach(MIMEText(mail.html, "html", "utf-8"))
    return message.as_bytes(policy=_SMTP_LINES)


class SmtpMailer:
    # A connection used this recently is taken as alive without a NOOP first.
    REUSE_WITHOUT_CHECK_SECONDS = 1.0

    def __init__(self, host: str, port: int, *, sender: str, user: str | None = None,
                 password: str | None = None, starttls: bool = True, ca_file: str | None = None,
                 timeout: float = 30.0):
        self.host = host
        self.port = port
        self.sender = sender
        self.user = user
        self._password = password
        self.starttls = starttls
        self.ca_file = ca_file
        self.timeout = timeout
        self._smtp: smtplib.SMTP | None = None
        self._used_at = 0.0
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> SmtpMailer:
        password = settings.smtp_password.get_secret_value() if settings.smtp_password else None
        return cls(settings.smtp_host, settings.smtp_port, sender=settings.mail_from, user=settings.smtp_user,
                   password=password, starttls=settings.smtp_starttls, ca_file=settings.smtp_ca_file,
                   timeout=settings.smtp_timeout_seconds)

    def __repr__(self) -> str:  # never the password
        return f"SmtpMailer({self.host}:{self.port}, user={self.user!r}, starttls={self.starttls})"

    def _scrub(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text

    def _session(self) -> smtplib.SMTP:
        """The open connection, checked with a NOOP if it may have gone stale, or a new one.

        Reused between mails: a new connection (TCP, EHLO, STARTTLS, login) for each mail
        cost more than the mail. A connection found dead before a mail is replaced before
        anything is sent, so nothing is sent twice because of it."""
        if self._smtp is not None:
            try:
                if time.monotonic() - self._used_at < self.REUSE_WITHOUT_CHECK_SECONDS or \
                        self._smtp.noop()[0] == 250:
                    return self._smtp
            except (smtplib.SMTPException, OSError):
                pass
            self.close()
        smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        try:
            if self.starttls:
                # Certificate and host name checked: a server without STARTTLS, or with a
                # certificate we cannot verify, gets no mail (a transient failure).
                smtp.starttls(context=ssl.create_default_context(cafile=self.ca_file))
            if self.user:
                smtp.login(self.user, self._password or "")
        except BaseException:
            smtp.close()
            raise
        self._smtp = smtp
        return smtp

    def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            try:
                smtp.quit()
            except (smtplib.SMTPException, OSError):
                smtp.close()

    def send(self, mail: Mail) -> str:
        message = build_message(mail, self.sender)
        try:
            with self._lock:
                try:
                    refused = self._session().sendmail(self.sender, list(mail.recipients), message)
                    self._used_at = time.monotonic()
                except BaseException:
                    # What the server made of an interrupted conversation is unknown: start afresh.
                    self.close()
                    raise
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            reason = "all recipients refused: " + ", ".join(
                f"{address} ({code})" for address, (code, _) in exc.recipients.items())
            if all(400 <= code < 500 for code in codes):
                raise MailTransientError(reason) from None
            raise MailRejectedError(reason) from None
        except smtplib.SMTPResponseException as exc:
            reason = self._scrub(f"SMTP {exc.smtp_code}: {_decode(exc.smtp_error)}")
            # A refused login is our configuration, not the message: keep the event for a replay.
            if 400 <= exc.smtp_code < 500 or isinstance(exc, smtplib.SMTPAuthenticationError):
                raise MailTransientError(reason) from None
            raise MailRejectedError(reason) from None
        except (smtplib.SMTPException, OSError) as exc:
            # Connection refused or reset, timeouts (socket.timeout is an OSError), a server
            # that hung up, STARTTLS trouble.
            raise MailTransientError(self._scrub(f"{type(exc).__name__}: {exc}" if str(exc)
                                                 else type(exc).__name__)) from None
        if refused:
            return "refused by the server: " + ", ".join(sorted(refused))
        return ""


class PerThreadMailer:
    """A mailer of its own (`make()`, one SMTP connection) for each thread that sends, so
    the action_runner's workers send side by side."""

    def __init__(self, make: Callable[[], SmtpMailer]):
        self._make = make
        self._local = threading.local()
        self._made: list[SmtpMailer] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{self._make()!r} per thread"

    def send(self, mail: Mail) -> str:
        mailer = getattr(self._local, "mailer", None)
        if mailer is None:
            mailer = self._local.mailer = self._make()
            with self._lock:
                self._made.append(mailer)
        return mailer.send(mail)

    def close(self) -> None:
        with self._lock:
            made, self._made = self._made, []
        for mailer in made:
            mailer.close()


def _decode(value: bytes | str) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return " ".join(text.split())

