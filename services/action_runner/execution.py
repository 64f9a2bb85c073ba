"""Running an event's operation runs, each at most once, and announcing the final ones.

Per run still `pending`: claim it with a session advisory lock (pg_try_advisory_lock,
released when the process or its connection dies), count the attempt and commit, do the
side effect (operations.py), write the outcome, commit, release. The lock is what keeps
two replicas holding the same event from both sending: the second skips a run the first
is working on. It does not ack its delivery then, but sends it through the retry queue
until the run is final. The first may lose its own delivery (its broker connection
dropped meanwhile, or it died and its lock outlived it by a moment) and could neither
announce the run nor try it again. A run that is not `pending` is never done again, and a
run whose attempts all began and never finished (a crash each time) gives up after
KPI_RETRY_LIMIT + 1 of them.

Every final run of the event is announced as operation.executed (deterministic event id)
on every delivery: a crash between commit and publish loses none.

The window that remains: the side effect happened (the SMTP server accepted the mail, the
API call returned) but the process died, or the database went away, before the outcome
was committed. The run is still `pending` and the lock died with the connection, so the
redelivered event does it again: at most one duplicate per such crash, and at most
KPI_RETRY_LIMIT of them in all. A mail sent again carries the same Message-ID; the
HasOffers calls are harmless to repeat.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import BigInteger, Connection, Integer, Text, and_, bindparam, cast, column, func, or_, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError

from services.action_runner.mailer import Mailer
from services.action_runner.decisions import PROTECTED, cap_allows, held_detail
from services.action_runner.operations import EventFacts, OfferInfo, Outcome, RunSpec, perform, usable_recipients
from shared.db import Affiliate, Digest, Offer, Operation, OperationRun, RejectCapAlert, Trigger, TriggerEvent
from shared.events import (
    OPERATION_EXECUTED, Envelope, OperationExecuted, TriggerEventMessage, new_event, stable_event_id,
)
from shared.handling import Delivery, RetryableError
from shared.hasoffers import HasOffersClient
from shared.settings import Settings
from shared.sql import array_literal
from shared.vocabulary import EMAIL_KINDS

logger = logging.getLogger(__name__)

MAX_ERROR = 1000


@dataclass(frozen=True)
class RunResult:
    """How one run went in this delivery. `queued`: handed to its digest, which the
    ticker sends when its window closes."""

    kind: Literal["final", "retry", "gave_up", "busy", "queued"]
    reason: str = ""


# The statements of every event, built once: building a statement costs more CPU than
# running it (SQLAlchemy's cache keys them by structure, and memoizes a statement's key).
_EVENT_FACTS = (
    select(Trigger.metric_key, Offer.name, Offer.require_approval, Offer.id.is_not(None), TriggerEvent.created_at)
    .select_from(TriggerEvent).join(Trigger, Trigger.id == TriggerEvent.trigger_id)
    .outerjoin(Offer, Offer.id == TriggerEvent.offer_id).where(TriggerEvent.id == bindparam("event"))
)


def event_facts(conn: Connection, event_id: str, event: TriggerEventMessage) -> tuple[EventFacts, datetime]:
    """What every operation of the event needs besides the event (its metric and offer),
    and when the event was recorded."""
    metric, offer, require_approval, known, created_at = conn.execute(
        _EVENT_FACTS, {"event": event.trigger_event_id}).one()
    return EventFacts(event_id=event_id, event=event, metric=metric,
                      offer=OfferInfo(name=offer, require_approval=require_approval) if known else None), created_at


# First key of the session advisory locks that claim operation runs (the second is the run id).
RUN_LOCK = 0x6B7069  # "kpi"


def run_lock_key(run_id):  # noqa: ANN001, ANN201 (SQL expressions)
    """The two 32-bit keys of a run's advisory lock: (RUN_LOCK, id) for ids below 2**31,
    the next first keys after that."""
    return (RUN_LOCK + cast(run_id / 2147483648, Integer()), cast(run_id % 2147483648, Integer()))


# The transaction-scoped lock that serialises decisions under the reject cap, network-wide.
CAP_LOCK = 0x6B706A


def claim(conn: Connection, run_ids: list[int], settings: Settings) -> tuple[list, set[int]]:
    """Claim runs for this delivery, inside the caller's transaction: a session advisory
    lock per run (it outlives the commit, and dies with the process or its connection),
    and one more attempt counted for each claimed run still to do. Their rows (with their
    operation's), and the ids locked — to `release` whatever happens.

    Unlike a row lock the claim survives the commit that counts the attempts before the
    side effects, so an attempt that ends in a crash still counts and a run that keeps
    crashing its process gives up after KPI_RETRY_LIMIT + 1 attempts."""
    if not run_ids:
        return [], set()
    locked = set(conn.scalars(_TRY_LOCKS, {"ids": array_literal(run_ids)}))
    return (_claim(conn, sorted(locked), settings) if locked else []), locked


_RUN = column("id", BigInteger())
_RUN_IDS = func.unnest(cast(bindparam("ids", type_=Text()), ARRAY(BigInteger()))).alias("id")
_TRY_LOCKS = select(_RUN).select_from(_RUN_IDS).where(func.pg_try_advisory_lock(*run_lock_key(_RUN)))
_UNLOCK = select(func.count(func.pg_advisory_unlock(*run_lock_key(_RUN)))).select_from(_RUN_IDS)


def run_claimed(conn: Connection, run_ids: list[int], claimed: list, locked: set[int], facts: EventFacts,
                delivery: Delivery, *, mailer: Mailer, hasoffers: HasOffersClient | None,
                settings: Settings) -> list[RunResult]:
    """Do each claimed run's side effect and commit its outcome before the next: a crash
    repeats at most the one in flight. A run locked by another delivery comes back busy."""
    results = {}
    for run_id in run_ids:
        if run_id not in locked:
            # Another replica holds it. Its delivery normally finishes it, but that delivery may
            # be gone (a lost broker connection); this one comes back until the run is final.
            logger.info("event_id=%s run %d is being handled elsewhere; will look again", facts.event_id, run_id)
            results[run_id] = RunResult("busy", f"run {run_id} is being handled by another delivery")
    for row in claimed:
        results[row.id] = _run_claimed(conn, row, facts, delivery, mailer=mailer, hasoffers=hasoffers,
                                       settings=settings)
    for run_id in locked - set(results):
        # finished elsewhere since we listed the runs, or waiting in its digest
        results[run_id] = RunResult("final")
    return [results[run_id] for run_id in run_ids]


def _claim(conn: Connection, run_ids: list[int], settings: Settings) -> list:
    """Count an attempt of every claimed run still to do; their rows with their operation's."""
    return list(conn.execute(_CLAIM, {"ids": run_ids, "step": 0 if settings.actions_dry_run else 1}).all())


_r, _o = OperationRun.__table__.c, Operation.__table__.c
_CLAIM = (
    update(OperationRun.__table__)
    .where(_r.id.in_(bindparam("ids", expanding=True)), _r.status == "pending", _r.digest_id.is_(None),
           _o.id == _r.operation_id)
    .values(attempts=_r.attempts + bindparam("step", type_=Integer()),
            started_at=func.coalesce(_r.started_at, func.clock_timestamp()))
    .returning(_r.id, _r.trigger_event_id, _r.action_id, _r.operation_id, _r.kind, _r.attempts, _r.repeat,
               _r.decided_at, _r.cap_granted_at, _o.subject, _o.body, _o.digest_minutes)
)


def release(conn: Connection, run_ids: list[int]) -> None:
    try:
        conn.rollback()
        if run_ids:
            conn.execute(_UNLOCK, {"ids": array_literal(run_ids)})
        conn.commit()
    except DBAPIError:  # the connection is gone, and the locks with it
        conn.invalidate()


def _run_claimed(conn: Connection, row, facts: EventFacts, delivery: Delivery, *, mailer: Mailer,  # noqa: ANN001
                 hasoffers: HasOffersClient | None, settings: Settings) -> RunResult:
    run_id = row.id
    run = RunSpec(run_id=run_id, trigger_event_id=row.trigger_event_id, action_id=row.action_id,
                  operation_id=row.operation_id, kind=row.kind, subject=row.subject, body=row.body, repeat=row.repeat)
    attempt = delivery.at_attempt(row.attempts)
    if settings.actions_dry_run:
        with conn.begin():
            _finish(conn, run_id, Outcome("skipped", "dry run"))
        logger.info("event_id=%s run %d (%s): dry run, skipped", facts.event_id, run_id, run.kind)
        return RunResult("final")
    if attempt.exhausted:
        # Every allowed attempt began and none finished: the process died, or lost the
        # database, in the middle each time. Trying again would only do it again.
        detail = (f"gave up after {attempt.attempt - 1} attempts: each was interrupted before its outcome "
                  f"was recorded (the side effect may have happened)")
        with conn.begin():
            _finish(conn, run_id, Outcome("failed", detail), last_error=detail)
        logger.error("event_id=%s run %d (%s) failed: %s", facts.event_id, run_id, run.kind, detail)
        return RunResult("gave_up", f"run {run_id} ({run.kind}) {detail}")

    if run.kind == "reject_affiliate":
        stopped = _before_a_reject(conn, run_id, facts, row.decided_at is None and row.cap_granted_at is None,
                                   settings)
        if stopped is not None:
            return stopped
    elif row.digest_minutes and run.kind in EMAIL_KINDS:
        return _queue_in_digest(conn, run, facts, row.digest_minutes)

    try:
        with conn.begin():
            outcome = perform(conn, run, facts, mailer=mailer, hasoffers=hasoffers,
                              mail_domain=_domain(settings.mail_from))
    except RetryableError as exc:
        error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR]
        if attempt.is_last:
            # The bus would dead-letter the event after this attempt: record the failure
            # here, where the run is known, instead of leaving it pending in the dead queue.
            detail = f"gave up after {attempt.attempt} attempts: {error}"[:MAX_ERROR]
            with conn.begin():
                _finish(conn, run_id, Outcome("failed", detail), last_error=error)
            logger.error("event_id=%s run %d (%s) failed: %s", facts.event_id, run_id, run.kind, detail)
            return RunResult("gave_up", f"run {run_id} ({run.kind}) {detail}")
        with conn.begin():
            conn.execute(update(OperationRun).where(OperationRun.id == run_id).values(last_error=error))
        logger.warning("event_id=%s run %d (%s) attempt %d failed, will retry: %s",
                       facts.event_id, run_id, run.kind, attempt.attempt, error)
        return RunResult("retry", f"run {run_id} ({run.kind}): {error}")

    with conn.begin():
        _finish(conn, run_id, outcome, last_error=outcome.detail[:MAX_ERROR] if outcome.status == "failed" else None)
    log = logger.warning if outcome.status == "failed" else logger.info
    log("event_id=%s run %d (%s) %s: %s", facts.event_id, run_id, run.kind, outcome.status, outcome.detail)
    return RunResult("final")


def _before_a_reject(conn: Connection, run_id: int, facts: EventFacts, capped: bool,
                     settings: Settings) -> RunResult | None:
    """A reject never runs for a protected affiliate, and beyond KPI_MAX_REJECTS_PER_HOUR
    rejects in the last 60 minutes it is held (a released run is not capped again).

    The cap is decided under one transaction-scoped lock for the whole network, counting
    the rejects that succeeded in the last hour and those allowed and still running, so
    any number of replicas allow exactly the cap. The first hold of each clock hour is
    recorded in reject_cap_alerts, for the ticker to tell the administrators once."""
    with conn.begin():
        protected = conn.execute(select(Affiliate.protected)
                                 .where(Affiliate.id == facts.event.affiliate_id)).scalar()
        if protected:
            _finish(conn, run_id, Outcome("skipped", PROTECTED))
            logger.info("event_id=%s run %d (reject_affiliate) skipped: %s", facts.event_id, run_id, PROTECTED)
            return RunResult("final")
        if not capped:
            return None
        conn.execute(select(func.pg_advisory_xact_lock(CAP_LOCK)))
        hour_ago = func.now() - timedelta(hours=1)
        r = OperationRun
        recent = conn.execute(select(func.count()).select_from(r).where(
            r.kind == "reject_affiliate", r.id != run_id,
            or_(and_(r.status == "succeeded", r.finished_at > hour_ago),
                and_(r.status == "pending", r.cap_granted_at > hour_ago)))).scalar_one()
        limit = settings.kpi_max_rejects_per_hour
        if cap_allows(recent, limit):
            conn.execute(update(r).where(r.id == run_id).values(cap_granted_at=func.now()))
            return None
        detail = held_detail(recent, limit)
        conn.execute(update(r).where(r.id == run_id).values(status="held", detail=detail,
                                                            finished_at=func.clock_timestamp()))
        conn.execute(pg_insert(RejectCapAlert).values(hour=func.date_trunc("hour", func.now()), held_run_id=run_id)
                     .on_conflict_do_nothing())
    logger.warning("event_id=%s run %d (reject_affiliate) %s", facts.event_id, run_id, detail)
    return RunResult("final")


def _queue_in_digest(conn: Connection, run: RunSpec, facts: EventFacts, digest_minutes: int) -> RunResult:
    """Hand an email run to the open digest of its operation and recipients, opening one
    (for digest_minutes from now) if there is none; the ticker sends it when it closes."""
    with conn.begin():
        usable, note = usable_recipients(conn, run.kind, facts.event.affiliate_id)
        if not usable:
            _finish(conn, run.run_id, Outcome("skipped", note))
            return RunResult("final")
        recipients = ",".join(sorted(set(usable)))
        conn.execute(select(func.pg_advisory_xact_lock(
            func.hashtextextended(f"digest:{run.operation_id}:{recipients}", 0))))
        digest_id = conn.execute(
            select(Digest.id).where(Digest.operation_id == run.operation_id, Digest.recipients == recipients,
                                    Digest.status == "open", Digest.closes_at > func.now())
            .order_by(Digest.id.desc()).limit(1)).scalar()
        if digest_id is None:
            digest_id = conn.execute(
                pg_insert(Digest).values(operation_id=run.operation_id, recipients=recipients, opened_at=func.now(),
                                         closes_at=func.now() + timedelta(minutes=digest_minutes))
                .returning(Digest.id)).scalar_one()
        conn.execute(update(OperationRun).where(OperationRun.id == run.run_id)
                     .values(digest_id=digest_id, detail=f"in digest #{digest_id} to {recipients}{note}"))
    logger.info("event_id=%s run %d (%s) queued in digest %d", facts.event_id, run.run_id, run.kind, digest_id)
    return RunResult("queued")


def _finish(conn: Connection, run_id: int, outcome: Outcome, *, last_error: str | None = None) -> None:
    conn.execute(_FINISH, {"run": run_id, "status": outcome.status, "detail": outcome.detail[:MAX_ERROR],
                           "last_error": last_error})


_FINISH = (
    update(OperationRun.__table__).where(_r.id == bindparam("run"))
    .values(status=bindparam("status"), detail=bindparam("detail"),
            started_at=func.coalesce(_r.started_at, func.clock_timestamp()), finished_at=func.clock_timestamp(),
            # None keeps the error an earlier attempt recorded
            last_error=func.coalesce(bindparam("last_error", type_=Text()), _r.last_error))
)


def notices(conn: Connection, envelope: Envelope, event: TriggerEventMessage) -> list[Envelope]:
    """An operation.executed for every final run of the event, the same ids every time."""
    rows = conn.execute(_FINAL_RUNS, {"event": event.trigger_event_id}).all()
    conn.rollback()  # a read: end its transaction
    return [
        new_event(
            OPERATION_EXECUTED,
            OperationExecuted(operation_run_id=r.id, trigger_event_id=event.trigger_event_id, action_id=r.action_id,
                              operation_id=r.operation_id, kind=r.kind, outcome=r.status, detail=r.detail),
            correlation_id=envelope.correlation_id,
            causation_id=str(envelope.event_id),
            event_id=notice_id(event.trigger_event_id, r.action_id, r.operation_id, r.repeat, r.status),
        )
        for r in rows
    ]


_FINAL_RUNS = (
    select(_r.id, _r.action_id, _r.operation_id, _r.kind, _r.status, _r.detail, _r.repeat)
    .where(_r.trigger_event_id == bindparam("event"), _r.status != "pending").order_by(_r.id)
)


def notice_id(trigger_event_id: int, action_id: int, operation_id: int, repeat: int, status: str) -> uuid.UUID:
    """The same run announced again gets the same id; a held run announced later with its
    final outcome (after a release) is another notice."""
    if repeat == 0 and status in ("succeeded", "failed", "skipped"):
        return stable_event_id(OPERATION_EXECUTED, trigger_event_id, action_id, operation_id)
    return stable_event_id(OPERATION_EXECUTED, trigger_event_id, action_id, operation_id, repeat, status)


def _domain(address: str) -> str:
    domain = address.rpartition("@")[2].strip(" >")
    return domain or "localhost"
