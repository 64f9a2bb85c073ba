"""The action_runner's clock: what is due without a message to say so.

Every KPI_ACTIONS_TICK_SECONDS each replica:
- sends the digests whose window has closed: one email listing every pair of its runs,
  then each run succeeded with the email's Message-ID, then their operation.executed;
- tells the administrators of the first reject held in each hour (reject_cap_alerts);
- records the reminders that are due (firing.due_reminders) and publishes their trigger
  event again, so a replica's handler runs them like any run.

All of it is claimed in the database (session advisory locks, ON CONFLICT), so any
number of replicas do each thing once; the state lives in the database, so a restart
loses nothing (a digest closed while every replica was down goes out at the next tick).
The crash window is the runs' own: a digest or an alert sent but not yet recorded is
sent again, with the same Message-ID. A digest recorded but not yet announced is
announced by the next replica to start (notices_of_recent_digests).
"""

from __future__ import annotations

import html
import logging
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Connection, Engine, func, select, update

from services.action_runner import firing
from services.action_runner.execution import notice_id
from services.action_runner.mailer import Mail, Mailer, MailRejectedError, MailTransientError
from services.action_runner.templates import format_number, header_safe
from shared.db import Administrator, Digest, Offer, Operation, OperationRun, RejectCapAlert, Trigger, TriggerEvent
from shared.events import (
    OPERATION_EXECUTED, TRIGGER_EVENT_TYPES, Envelope, OperationExecuted, TriggerEventMessage, new_event,
    stable_event_id,
)
from shared.rabbitmq import Bus
from shared.rabbitmq.outbox import Outbox
from shared.recorded import trigger_event_message
from shared.settings import Settings
from shared.sql import connection, transaction

logger = logging.getLogger(__name__)

DIGEST_LOCK = 0x6B706B
ALERT_LOCK = 0x6B706C
# A digest whose email keeps failing is given up after this many ticks' attempts.
DIGEST_ATTEMPTS = 50
# A replica starting announces again the runs of the digests closed this recently.
RENOTICE_HOURS = 1
# A released run still pending after this long is announced again.
RELEASE_GRACE_SECONDS = 60


class Ticker:
    def __init__(self, engine: Engine, mailer: Mailer, make_bus: Callable[[], Bus], settings: Settings):
        self.engine = engine
        self.mailer = mailer
        self.settings = settings
        self.stopping = threading.Event()
        self.outbox = Outbox(make_bus, mandatory=lambda event: event.type != OPERATION_EXECUTED)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="action-runner-ticker", daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        try:
            self.outbox.add(self.notices_of_recent_digests())
        except Exception:  # the ticker must start all the same
            logger.exception("action_runner: the recent digests' notices could not be read")
        while not self.stopping.wait(self.settings.kpi_actions_tick_seconds):
            try:
                self.tick()
            except Exception:  # the ticker must outlive a bad tick; the next one tries again
                logger.exception("action_runner tick failed")
        self.outbox.close()

    def tick(self) -> None:
        self.outbox.keep_alive()
        for digest_id in self.due_digests():
            self.outbox.add(self.send_digest(digest_id))
            self.outbox.publish_pending()  # at once: the notices are only in memory until then
        self.send_alerts()
        self.outbox.add(self.record_reminders())
        self.outbox.add(self.released_not_run())
        self.outbox.publish_pending()

    # -- digests ---------------------------------------------------------------------------

    def due_digests(self) -> list[int]:
        with connection(self.engine) as conn:
            return list(conn.scalars(select(Digest.id).where(Digest.status == "open", Digest.closes_at <= func.now())
                                     .order_by(Digest.id)))

    def send_digest(self, digest_id: int) -> list:
        """Send one closed digest if no other replica is; the notices of its runs."""
        with connection(self.engine) as conn:
            if not conn.execute(select(func.pg_try_advisory_lock(DIGEST_LOCK, digest_id))).scalar_one():
                conn.rollback()
                return []
            try:
                conn.commit()
                return self._send_claimed(conn, digest_id)
            finally:
                conn.rollback()
                conn.execute(select(func.pg_advisory_unlock(DIGEST_LOCK, digest_id)))
                conn.commit()

    def _send_claimed(self, conn: Connection, digest_id: int) -> list:
        with conn.begin():
            digest = conn.execute(
                update(Digest).where(Digest.id == digest_id, Digest.status == "open")
                .values(attempts=Digest.attempts + 1).returning(Digest.operation_id, Digest.recipients,
                                                                 Digest.attempts)).first()
            if digest is None:
                return []  # sent by another replica meanwhile
            rows = digest_rows(conn, digest_id)
            operation = conn.execute(select(Operation.name).where(Operation.id == digest.operation_id)).scalar_one()
        recipients = tuple(digest.recipients.split(","))
        message_id = f"<kpi-digest-{stable_event_id('digest', digest_id).hex}@{_domain(self.settings.mail_from)}>"
        if rows:
            mail = Mail(recipients=recipients, subject=digest_subject(operation, rows), html=digest_html(rows),
                        text=digest_text(rows), message_id=message_id, run_id=None,
                        digest_runs=tuple(r["run_id"] for r in rows))
            try:
                self.mailer.send(mail)
            except MailTransientError as exc:
                if digest.attempts < DIGEST_ATTEMPTS:
                    logger.warning("digest %d not sent yet (attempt %d): %s", digest_id, digest.attempts, exc)
                    return []
                return self._close(conn, digest_id, "failed", None, f"gave up after {digest.attempts} attempts: {exc}")
            except MailRejectedError as exc:
                return self._close(conn, digest_id, "failed", None, str(exc))
        logger.info("digest %d sent to %d recipient(s): %d run(s)", digest_id, len(recipients), len(rows))
        return self._close(conn, digest_id, "sent", message_id,
                           f"sent to {', '.join(recipients)} in digest #{digest_id} ({len(rows)} pair(s))")

    def notices_of_recent_digests(self) -> list:
        """The notices of the runs of every digest closed in the last RENOTICE_HOURS: a
        replica that died (or stopped) between closing a digest and publishing its notices
        took them with it, and nothing else would announce them; at start they go out again
        (the same event ids: a copy is harmless)."""
        with connection(self.engine) as conn:
            runs = conn.execute(
                select(OperationRun.id, OperationRun.trigger_event_id, OperationRun.action_id,
                       OperationRun.operation_id, OperationRun.kind, OperationRun.status, OperationRun.detail,
                       OperationRun.repeat, OperationRun.digest_id)
                .join(Digest, Digest.id == OperationRun.digest_id)
                .where(Digest.status != "open", OperationRun.status != "pending",
                       Digest.closes_at > func.now() - timedelta(hours=RENOTICE_HOURS))
                .order_by(OperationRun.id)).all()
        return [self._notice(r, r.digest_id) for r in runs]

    @staticmethod
    def _notice(r: Any, digest_id: int) -> Envelope:
        return new_event(OPERATION_EXECUTED, OperationExecuted(
            operation_run_id=r.id, trigger_event_id=r.trigger_event_id, action_id=r.action_id,
            operation_id=r.operation_id, kind=r.kind, outcome=r.status, detail=r.detail),
            correlation_id=f"digest-{digest_id}",
            event_id=notice_id(r.trigger_event_id, r.action_id, r.operation_id, r.repeat, r.status))

    def _close(self, conn: Connection, digest_id: int, status: str, message_id: str | None, detail: str) -> list:
        with conn.begin():
            conn.execute(update(Digest).where(Digest.id == digest_id).values(
                status=status, message_id=message_id, sent_at=func.clock_timestamp() if message_id else None,
                detail=detail[:1000]))
            runs = conn.execute(
                update(OperationRun).where(OperationRun.digest_id == digest_id, OperationRun.status == "pending")
                .values(status="succeeded" if status == "sent" else "failed", message_id=message_id,
                        detail=detail[:1000], finished_at=func.clock_timestamp())
                .returning(OperationRun.id, OperationRun.trigger_event_id, OperationRun.action_id,
                           OperationRun.operation_id, OperationRun.kind, OperationRun.status, OperationRun.detail,
                           OperationRun.repeat)).all()
        return [self._notice(r, digest_id) for r in runs]

    # -- the reject cap's alert --------------------------------------------------------------

    def send_alerts(self) -> None:
        with connection(self.engine) as conn:
            hours = list(conn.scalars(select(RejectCapAlert.hour).where(RejectCapAlert.sent_at.is_(None))))
            conn.rollback()
            for hour in hours:
                key = int(hour.timestamp()) // 3600
                if not conn.execute(select(func.pg_try_advisory_lock(ALERT_LOCK, key))).scalar_one():
                    conn.rollback()
                    continue
                try:
                    conn.commit()
                    self._send_alert(conn, hour)
                finally:
                    conn.rollback()
                    conn.execute(select(func.pg_advisory_unlock(ALERT_LOCK, key)))
                    conn.commit()

    def _send_alert(self, conn: Connection, hour: datetime) -> None:
        with conn.begin():
            alert = conn.execute(select(RejectCapAlert.held_run_id).where(RejectCapAlert.hour == hour,
                                                                          RejectCapAlert.sent_at.is_(None))).first()
            if alert is None:
                return
            admins = list(conn.scalars(select(Administrator.email).where(Administrator.active)
                                       .order_by(Administrator.id)))
            held = conn.execute(select(func.count()).select_from(OperationRun)
                                .where(OperationRun.status == "held")).scalar_one()
        limit = self.settings.kpi_max_rejects_per_hour
        when = hour.astimezone(timezone.utc).strftime("%Y-%m-%d %H:00 UTC")
        if not admins:
            detail = "no active administrator to tell"
        else:
            text = (f"The reject cap (KPI_MAX_REJECTS_PER_HOUR = {limit}) was reached in the hour of {when}: "
                    f"reject run {alert.held_run_id} is held, {held} held in all. Review them with "
                    "`kpi held list`, then `kpi held release ID...` or `kpi held discard ID...` (or the console's "
                    "Held page).")
            mail = Mail(recipients=tuple(admins), subject=f"[KPI] Rejects held: the hourly cap was reached ({when})",
                        html=f"<p>{html.escape(text)}</p>", text=text, run_id=None,
                        message_id=f"<kpi-cap-{stable_event_id('cap', when).hex}@{_domain(self.settings.mail_from)}>")
            try:
                detail = self.mailer.send(mail) or f"sent to {', '.join(admins)}"
            except MailTransientError as exc:
                logger.warning("reject cap alert of %s not sent yet: %s", when, exc)
                return
            except MailRejectedError as exc:
                detail = f"refused: {exc}"
        with conn.begin():
            conn.execute(update(RejectCapAlert).where(RejectCapAlert.hour == hour)
                         .values(sent_at=func.clock_timestamp(), detail=detail[:1000]))
        logger.warning("reject cap reached in the hour of %s: administrators told (%s)", when, detail)

    # -- reminders ---------------------------------------------------------------------------

    def record_reminders(self) -> list:
        """Record the due reminders' runs; the trigger events to publish again so a
        handler runs them (a fresh message id: it is a new delivery, not a duplicate)."""
        with transaction(self.engine) as conn:
            due = firing.due_reminders(conn)
            events: dict[int, TriggerEventMessage] = {}
            now = conn.execute(select(func.now())).scalar_one()
            for trigger_event_id, action_id, repeat, measured_at in due:
                event = events.get(trigger_event_id) or trigger_event_message(conn, trigger_event_id)
                assert event is not None  # action_firings references trigger_events
                events[trigger_event_id] = event
                [action] = firing.load_actions(conn, action_ids=[action_id])
                added = firing.add_runs(conn, event, [(action, op) for op in action.email_operations],
                                        repeat=repeat, measured_at=measured_at, at=now)
                if added:
                    logger.info("trigger_event %d: reminder %d of action %d due (check at %s)", trigger_event_id,
                                repeat, action_id, measured_at.isoformat())
        return [new_event(TRIGGER_EVENT_TYPES[event.status], event, correlation_id="reminder",
                          event_id=uuid.uuid4()) for event in events.values()]

    def released_not_run(self) -> list:
        """Held runs released a while ago and still pending: their announcement was lost
        (`kpi held release` publishes after its commit, and a publish can fail)."""
        with connection(self.engine) as conn:
            ids = list(conn.scalars(
                select(OperationRun.trigger_event_id).distinct().where(
                    OperationRun.status == "pending", OperationRun.decided_at.is_not(None),
                    OperationRun.started_at.is_(None),
                    OperationRun.decided_at < func.now() - timedelta(seconds=RELEASE_GRACE_SECONDS))))
            events = [trigger_event_message(conn, te) for te in ids]
        return [new_event(TRIGGER_EVENT_TYPES[e.status], e, correlation_id="held-release", event_id=uuid.uuid4())
                for e in events if e is not None]


# -- what a digest says ----------------------------------------------------------------------------


def digest_rows(conn: Connection, digest_id: int) -> list[dict]:
    e, r = TriggerEvent, OperationRun
    rows = conn.execute(
        select(r.id.label("run_id"), Trigger.name.label("trigger"), e.offer_id, Offer.name.label("offer_name"),
               e.affiliate_id, e.value, e.threshold, e.previous_status, e.status, e.measured_at, r.repeat)
        .join(e, e.id == r.trigger_event_id).join(Trigger, Trigger.id == e.trigger_id)
        .outerjoin(Offer, Offer.id == e.offer_id)
        .where(r.digest_id == digest_id, r.status == "pending").order_by(e.measured_at, r.id)).all()
    return [row._asdict() for row in rows]


def digest_subject(operation: str, rows: list[dict]) -> str:
    problems = sum(1 for r in rows if r["status"] == "PROBLEM")
    return header_safe(f"[KPI] {operation}: {len(rows)} change(s), {problems} in PROBLEM")


def _cells(row: dict) -> list[str]:
    offer = f"{row['offer_name']} (#{row['offer_id']})" if row["offer_name"] else f"#{row['offer_id']}"
    status = f"{row['previous_status'] or 'none'} → {row['status']}" + (" (reminder)" if row["repeat"] else "")
    return [row["trigger"], offer, f"#{row['affiliate_id']}", format_number(row["value"]),
            format_number(row["threshold"]), status,
            row["measured_at"].astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")]


HEADER = ["Trigger", "Offer", "Affiliate", "Value", "Threshold", "Status", "Measured at"]


def digest_html(rows: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r)) + "</tr>" for r in rows)
    return (f"<p>{len(rows)} change(s) since the last message:</p>"
            f'<table border="1" cellpadding="4" cellspacing="0"><tr>{head}</tr>{body}</table>')


def digest_text(rows: list[dict]) -> str:
    return "\n".join([f"{len(rows)} change(s) since the last message:", ""]
                     + [" | ".join(_cells(r)) for r in rows])


def _domain(address: str) -> str:
    return address.rpartition("@")[2].strip(" >") or "localhost"
