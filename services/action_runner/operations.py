"""The five operation kinds: who gets a mail, which HasOffers call is made.

`perform` does one operation run's side effect and says how it ended. A transient failure
(mail server down, HasOffers unavailable) is raised as a RetryableError; anything that
trying again cannot fix comes back as a `failed` Outcome, and a run with nobody to tell
as a `skipped` one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, func, select

from services.action_runner.mailer import Mail, Mailer, MailRejectedError, clean_recipients
from services.action_runner.templates import MacroValues, format_number, html_to_text, render_html, render_subject
from shared.db import Administrator, Affiliate, AffiliateUser, Employee
from shared.events import TriggerEventMessage, stable_event_id
from shared.hasoffers import HasOffersClient, HasOffersError
from shared.vocabulary import EMAIL_KINDS, RunOutcome

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Outcome:
    status: RunOutcome
    detail: str


@dataclass(frozen=True)
class OfferInfo:
    name: str | None
    require_approval: bool


@dataclass(frozen=True)
class EventFacts:
    """Everything the operations of one trigger event share."""

    event_id: str
    event: TriggerEventMessage
    metric: str
    offer: OfferInfo | None  # None: the offer is not in the local offers table

    def macro_values(self) -> MacroValues:
        e = self.event
        return MacroValues(
            trigger_name=e.trigger_name, metric=self.metric, value=e.value, threshold=e.threshold,
            status=e.status, previous_status=e.previous_status, offer_id=e.offer_id,
            offer_name=self.offer.name if self.offer else None, affiliate_id=e.affiliate_id,
            measured_at=e.measured_at,
        )


@dataclass(frozen=True)
class RunSpec:
    run_id: int
    trigger_event_id: int
    action_id: int
    operation_id: int
    kind: str
    subject: str | None
    body: str | None
    repeat: int = 0  # a reminder's number

    def message_id(self, mail_domain: str) -> str:
        """Stable per run: a copy sent again after a crash carries the same Message-ID; a
        reminder is a message of its own."""
        parts = (self.trigger_event_id, self.action_id, self.operation_id) + ((self.repeat,) if self.repeat else ())
        return f"<kpi-{stable_event_id('mail', *parts).hex}@{mail_domain}>"


def perform(conn: Connection, run: RunSpec, facts: EventFacts, *, mailer: Mailer,
            hasoffers: HasOffersClient | None, mail_domain: str) -> Outcome:
    if run.kind in EMAIL_KINDS:
        return send_mail(conn, run, facts, mailer, mail_domain)
    if run.kind in ("approve_affiliate", "reject_affiliate"):
        if hasoffers is None:
            return Outcome("failed", "HasOffers is not configured (HASOFFERS_NETWORK_ID / HASOFFERS_NETWORK_TOKEN)")
        try:
            if run.kind == "approve_affiliate":
                return approve(hasoffers, facts)
            return reject(hasoffers, facts)
        except HasOffersError as exc:  # the API said no: the same call would be refused again
            return Outcome("failed", str(exc))
    return Outcome("failed", f"unknown operation kind {run.kind!r}")


# -- mail ---------------------------------------------------------------------------------


def usable_recipients(conn: Connection, kind: str, affiliate_id: int) -> tuple[list[str], str]:
    """The addresses to write to, and a note (why there are none, or which were left out)."""
    addresses, why_none = recipients(conn, kind, affiliate_id)
    usable, unusable = clean_recipients(addresses)
    ignored = f"; ignored unusable address(es): {', '.join(repr(a) for a in unusable)}" if unusable else ""
    if not usable:
        return [], (why_none or "no usable recipient address") + ignored
    return usable, ignored


def send_mail(conn: Connection, run: RunSpec, facts: EventFacts, mailer: Mailer, mail_domain: str) -> Outcome:
    usable, ignored = usable_recipients(conn, run.kind, facts.event.affiliate_id)
    if not usable:
        return Outcome("skipped", ignored)
    values = facts.macro_values()
    html_body = render_html(run.body, run.kind, values)
    mail = Mail(
        recipients=tuple(usable),
        subject=render_subject(run.subject, values),
        html=html_body,
        text=html_to_text(html_body),
        message_id=run.message_id(mail_domain),
        run_id=run.run_id,
    )
    try:
        note = mailer.send(mail)
    except MailRejectedError as exc:
        return Outcome("failed", str(exc))
    logger.info("event_id=%s run %d: mail sent to %d recipient(s)", facts.event_id, run.run_id, len(usable))
    return Outcome("succeeded", "sent to " + ", ".join(usable) + (f"; {note}" if note else "") + ignored)


# Built once (every email run reads its recipients).
_AFFILIATE_USERS = (select(AffiliateUser.email)
                    .where(AffiliateUser.affiliate_id == bindparam("affiliate"),
                           func.lower(AffiliateUser.status) == "active")
                    .order_by(AffiliateUser.id))
_ADMINISTRATORS = select(Administrator.email).where(Administrator.active).order_by(Administrator.id)


def recipients(conn: Connection, kind: str, affiliate_id: int) -> tuple[list[str | None], str | None]:
    """The addresses an email operation goes to, or none and the reason why."""
    if kind == "email_affiliate":
        rows = conn.execute(_AFFILIATE_USERS, {"affiliate": affiliate_id}).scalars().all()
        return list(rows), f"affiliate {affiliate_id} has no active user"
    if kind == "email_administrators":
        rows = conn.execute(_ADMINISTRATORS).scalars().all()
        return list(rows), "there is no active administrator"
    # email_affiliate_manager
    manager_id = conn.execute(
        select(Affiliate.account_manager_id).where(Affiliate.id == affiliate_id)
    ).first()
    if manager_id is None:
        return [], f"affiliate {affiliate_id} is unknown"
    if manager_id[0] is None:
        return [], f"affiliate {affiliate_id} has no account manager"
    manager = conn.execute(
        select(Employee.email, Employee.secondary_email, Employee.use_secondary).where(Employee.id == manager_id[0])
    ).first()
    if manager is None:
        return [], f"account manager {manager_id[0]} of affiliate {affiliate_id} is unknown"
    # The secondary address when asked for and present; a manager who asked for it but has
    # none still hears about their affiliate on the primary one.
    if manager.use_secondary and (manager.secondary_email or "").strip():
        return [manager.secondary_email], None
    return [manager.email], f"account manager {manager_id[0]} has no email address"


# -- HasOffers ----------------------------------------------------------------------------


def approve(hasoffers: HasOffersClient, facts: EventFacts) -> Outcome:
    e = facts.event
    hasoffers.set_affiliate_approval(e.offer_id, e.affiliate_id, "approved")
    return Outcome("succeeded", f"Offer.setAffiliateApproval approved (offer {e.offer_id}, affiliate {e.affiliate_id})")


def reject(hasoffers: HasOffersClient, facts: EventFacts) -> Outcome:
    e = facts.event
    require_approval = facts.offer.require_approval if facts.offer else None
    if require_approval is None:
        # Not loaded locally yet (a reference refresh would bring it): ask the network.
        record = hasoffers.find_offer(e.offer_id)
        if record is None:
            return Outcome("failed", f"offer {e.offer_id} is unknown locally and to HasOffers")
        require_approval = _flag(_offer_field(record, "require_approval"))
    if require_approval:
        notes = f"hasoffers-kpi: trigger {e.trigger_name} is {e.status} ({facts.metric} = {format_number(e.value)})"
        hasoffers.set_affiliate_approval(e.offer_id, e.affiliate_id, "rejected", notes=notes)
        return Outcome("succeeded", f"Offer.setAffiliateApproval rejected (offer {e.offer_id}, "
                                    f"affiliate {e.affiliate_id}; the offer requires approval)")
    hasoffers.block_affiliate(e.offer_id, e.affiliate_id)
    return Outcome("succeeded", f"Offer.blockAffiliate (offer {e.offer_id}, affiliate {e.affiliate_id})")


def _offer_field(record: dict[str, Any], name: str) -> Any:
    offer = record.get("Offer")
    return offer.get(name) if isinstance(offer, dict) else None


def _flag(value: Any) -> bool:
    """HasOffers sends booleans as "1"/"0" (and sometimes as real booleans)."""
    return str(value).strip().lower() in ("1", "true", "yes")
