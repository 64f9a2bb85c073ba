"""For the action_runner tests: helpers that seed actions, operations and trigger events
with SQL, and the HasOffers side of the same world (the SMTP sink is testkit.smtp)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, Engine, text

from services.action_runner.mailer import Mail
from shared.events import (
    TRIGGER_EVENT_OK, TRIGGER_EVENT_PROBLEM, Envelope, TriggerEventMessage, new_event, stable_event_id,
)
from testkit.fake_hasoffers.network import FakeAffiliate, FakeOffer, Network

MEASURED_AT = datetime(2026, 11, 28, 10, 0, tzinfo=timezone.utc)


# -- seeding --------------------------------------------------------------------------------

OFFER = 12  # does not require approval
OFFER_APPROVAL = 13  # requires approval
AFFILIATE = 7  # managed by employee 5, two active users and a blocked one
LONELY_AFFILIATE = 8  # no users, no manager
TRIGGER = 1  # "min CR"
TRIGGER_2 = 2  # "zero conv"


def seed_reference(conn: Connection) -> None:
    conn.execute(text("""
        INSERT INTO triggers (id, name, metric_key, operator, threshold) VALUES
            (1, 'min CR', 'cr', 'lt', 0.05), (2, 'zero conv', 'clicks_zero_conv', 'ge', 500);
        INSERT INTO offers (id, name, require_approval) VALUES
            (12, 'Summer <script>alert(1)</script> & Co', false), (13, 'Gated offer', true);
        INSERT INTO affiliates (id, company, account_manager_id) VALUES (7, 'Acme', 5), (8, 'Lonely', NULL);
        INSERT INTO affiliate_users (id, affiliate_id, email, status) VALUES
            (70, 7, 'ann@aff.example', 'active'), (71, 7, 'bob@aff.example', 'active'),
            (72, 7, 'blocked@aff.example', 'blocked');
        INSERT INTO employees (id, email, secondary_email, use_secondary) VALUES
            (5, 'manager@net.example', 'manager.backup@net.example', false);
        INSERT INTO administrators (email, active) VALUES ('ops@net.example', true), ('gone@net.example', false);
    """))


def add_operation(conn: Connection, kind: str, subject: str | None = None, body: str | None = None,
                  name: str | None = None) -> int:
    count = conn.execute(text("SELECT count(*) FROM operations")).scalar_one()
    return conn.execute(
        text("INSERT INTO operations (name, kind, subject, body) VALUES (:name, :kind, :subject, :body) RETURNING id"),
        {"name": name or f"{kind} {count + 1}", "kind": kind, "subject": subject, "body": body},
    ).scalar_one()


def add_action(conn: Connection, conditions: list[tuple[int, str]], operations: list[int], active: bool = True,
               name: str | None = None) -> int:
    count = conn.execute(text("SELECT count(*) FROM actions")).scalar_one()
    action_id = conn.execute(text("INSERT INTO actions (name, active) VALUES (:name, :active) RETURNING id"),
                             {"name": name or f"action {count + 1}", "active": active}).scalar_one()
    for trigger_id, status in conditions:
        conn.execute(text("INSERT INTO action_conditions (action_id, trigger_id, trigger_status) VALUES (:a, :t, :s)"),
                     {"a": action_id, "t": trigger_id, "s": status})
    for operation_id in operations:
        conn.execute(text("INSERT INTO action_operations (action_id, operation_id) VALUES (:a, :o)"),
                     {"a": action_id, "o": operation_id})
    return action_id


def set_state(conn: Connection, trigger_id: int, offer_id: int, affiliate_id: int, status: str) -> None:
    conn.execute(text("""
        INSERT INTO trigger_states (trigger_id, offer_id, affiliate_id, status, since, measured_at, check_id)
        VALUES (:t, :o, :a, :s, :m, :m, 1)
        ON CONFLICT (trigger_id, offer_id, affiliate_id) DO UPDATE SET status = excluded.status
    """), {"t": trigger_id, "o": offer_id, "a": affiliate_id, "s": status, "m": MEASURED_AT})


_check_ids = iter(range(1000, 10**9))


def add_trigger_event(conn: Connection, trigger_id: int = TRIGGER, offer_id: int = OFFER,
                      affiliate_id: int = AFFILIATE, status: str = "PROBLEM", previous: str | None = "OK",
                      value: float = 0.01, threshold: float = 0.05,
                      measured_at: datetime = MEASURED_AT) -> TriggerEventMessage:
    """A trigger_events row (and the state it produced), and the message that announces it."""
    check_id = next(_check_ids)
    trigger_event_id = conn.execute(text("""
        INSERT INTO trigger_events (trigger_id, offer_id, affiliate_id, previous_status, status, check_id,
                                    value, threshold, measured_at)
        VALUES (:t, :o, :a, :p, :s, :c, :v, :th, :m) RETURNING id
    """), {"t": trigger_id, "o": offer_id, "a": affiliate_id, "p": previous, "s": status, "c": check_id,
           "v": value, "th": threshold, "m": measured_at}).scalar_one()
    set_state(conn, trigger_id, offer_id, affiliate_id, status)
    name = conn.execute(text("SELECT name FROM triggers WHERE id = :t"), {"t": trigger_id}).scalar_one()
    return TriggerEventMessage(trigger_event_id=trigger_event_id, trigger_id=trigger_id, trigger_name=name,
                        offer_id=offer_id, affiliate_id=affiliate_id, previous_status=previous, status=status,
                        value=value, threshold=threshold, measured_at=measured_at, check_id=check_id)


def envelope_of(event: TriggerEventMessage) -> Envelope:
    # Deterministic, as the event detector makes it: a redelivery is the very same event.
    return new_event(TRIGGER_EVENT_PROBLEM if event.status == "PROBLEM" else TRIGGER_EVENT_OK, event,
                     correlation_id="test", event_id=stable_event_id("trigger.event", event.trigger_event_id))


def runs(engine: Engine, trigger_event_id: int | None = None) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT id, trigger_event_id, action_id, operation_id, kind, status, attempts, last_error, detail, "
            "started_at, finished_at FROM operation_runs "
            "WHERE :te IS NULL OR trigger_event_id = CAST(:te AS bigint) ORDER BY id"
        ), {"te": trigger_event_id}).mappings().all()
    return [dict(r) for r in rows]


def fake_network(*extra_offers: FakeOffer) -> Network:
    """The HasOffers side of seed_reference: an open offer, a gated one, the affiliate."""
    offers = [FakeOffer(OFFER, "Summer"), FakeOffer(OFFER_APPROVAL, "Gated", require_approval=True), *extra_offers]
    return Network(offers={o.id: o for o in offers}, affiliates={AFFILIATE: FakeAffiliate(AFFILIATE, "Acme")})


class FakeMailer:
    """Records mails; raises the queued failures first; `before_send` runs inside send()."""

    def __init__(self) -> None:
        self.sent: list[Mail] = []
        self.failures: list[Exception] = []
        self.before_send = lambda mail: None
        self.after_send = lambda mail: None

    def send(self, mail: Mail) -> str:
        if self.failures:
            raise self.failures.pop(0)
        self.before_send(mail)
        self.sent.append(mail)
        self.after_send(mail)
        return ""
