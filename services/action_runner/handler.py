"""action_runner's handler: a trigger event in, each firing action's operations run once.

Exactly once, step by step (DESIGN.md section 4, "Action"):

1. In one transaction, serialised per trigger event by an advisory lock: if the event has
   no operation_runs yet, decide which actions fire and insert one `pending` run per
   (event, action, operation), ON CONFLICT DO NOTHING. A redelivery finds the runs and
   keeps that decision instead of re-reading trigger_states, which may have moved on.
2. Per run still `pending`: claim it with a session advisory lock (pg_try_advisory_lock,
   released when the process or its connection dies), count the attempt and commit, do
   the side effect, write the outcome, commit, release. The lock is what keeps two
   replicas holding the same event from both sending: the second skips a run the first
   is working on. It does not ack its delivery then, but sends it through the retry
   queue until the run is final. The first may lose its own delivery (its broker
   connection dropped meanwhile, or it died and its lock outlived it by a moment) and
   could neither announce the run nor try it again. A run that is not `pending` is
   never done again, and a run whose attempts all began and never finished (a crash each
   time) gives up after KPI_RETRY_LIMIT + 1 of them.
3. Publish an operation.executed notice (deterministic event id) for every final run of
   the event, on every delivery: a crash between commit and publish loses none.

The window that remains: the side effect happened (the SMTP server accepted the mail, the
API call returned) but the process died, or the database went away, before step 2
committed. The run is still `pending` and the lock died with the connection, so the
redelivered event does it again: at most one duplicate per such crash, and at most
KPI_RETRY_LIMIT of them in all. A mail sent again
carries the same Message-ID; the HasOffers calls are harmless to repeat.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import Connection, Engine, Select, and_, exists, func, literal, or_, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import aliased

from services.action_runner.mailer import Mailer
from services.action_runner.operations import EventFacts, OfferInfo, Outcome, RunSpec, perform
from shared.handling import DeadLetter, Delivery, HandlerResult, RetryableError
from shared.db import (
    Action,
    ActionCondition,
    ActionFiring,
    ActionOperation,
    Offer,
    Operation,
    OperationRun,
    Trigger,
    TriggerCheck,
    TriggerState,
)
from shared.db import TriggerEvent
from shared.events import (
    OPERATION_EXECUTED,
    TRIGGER_EVENT_TYPES,
    Envelope,
    InvalidMessageError,
    OperationExecuted,
    TriggerEventMessage,
    encode,
    new_event,
    parse_data,
    stable_event_id,
)
from shared.hasoffers import HasOffersClient
from shared.settings import Settings

logger = logging.getLogger(__name__)

MAX_ERROR = 1000


@dataclass(frozen=True)
class RunResult:
    """How one run went in this delivery."""

    kind: Literal["final", "retry", "gave_up", "busy"]
    reason: str = ""


def handle_trigger_event(envelope: Envelope, delivery: Delivery | None = None, *, engine: Engine, mailer: Mailer,
           hasoffers: HasOffersClient | None, settings: Settings) -> HandlerResult:
    message = _validate(envelope)
    delivery = delivery or Delivery(max_attempts=settings.kpi_retry_limit + 1)
    event_id = str(envelope.event_id)
    with engine.begin() as conn:
        event = recorded_event(conn, message)
        runs = _ensure_runs(conn, event)
        facts = _facts(conn, event_id, event)
    logger.info("event_id=%s trigger_event %d: %d operation run(s)", event_id, event.trigger_event_id, len(runs))

    retry: list[str] = []
    gave_up: list[str] = []
    for run_id, status in runs:
        if status != "pending":
            continue
        result = _run_once(engine, run_id, facts, delivery, mailer=mailer, hasoffers=hasoffers, settings=settings)
        if result.kind in ("retry", "busy"):
            retry.append(result.reason)
        elif result.kind == "gave_up":
            gave_up.append(result.reason)

    if retry:
        # Nothing is lost by raising: finished runs are committed, and their notices go out
        # with whichever later delivery (a retry, or a replay from the dead queue) returns.
        raise RetryableError("; ".join(retry))
    notices = _notices(engine, envelope, event)
    if gave_up:
        # The event itself goes to the dead queue, so an operator sees it and can replay it
        # (after resetting the failed runs to pending, see README).
        return HandlerResult(notices=notices, dead_letters=[DeadLetter(encode(envelope), "; ".join(gave_up))])
    return HandlerResult(notices=notices)


def _validate(envelope: Envelope) -> TriggerEventMessage:
    event = parse_data(envelope)
    if not isinstance(event, TriggerEventMessage):
        raise InvalidMessageError(f"action_runner does not handle {envelope.type}")
    if TRIGGER_EVENT_TYPES[event.status] != envelope.type:
        raise InvalidMessageError(f"a {envelope.type} event with status {event.status}")
    return event


def recorded_event(conn: Connection, message: TriggerEventMessage) -> TriggerEventMessage:
    """The trigger event as trigger_events recorded it: the message only names it.

    Anyone who can publish can send a trigger.event.*; what goes into an email or a
    reject note (trigger name, value, threshold, statuses, time) is read from the
    database, as the event_detector reads checks. operation_runs references
    trigger_events, so without the row no run can be recorded; a row that names another
    pair or status than the message means the message is not ours.
    """
    e, c = TriggerEvent, TriggerCheck
    row = conn.execute(
        select(e.trigger_id, e.offer_id, e.affiliate_id, e.status, e.previous_status, Trigger.name,
               func.coalesce(e.value, c.value).label("value"), func.coalesce(e.threshold, c.threshold).label("threshold"),
               e.measured_at, e.check_id)
        .join(Trigger, Trigger.id == e.trigger_id)
        .outerjoin(c, c.id == e.check_id)
        .where(e.id == message.trigger_event_id)
    ).first()
    if row is None:
        raise InvalidMessageError(f"trigger_event {message.trigger_event_id} does not exist in trigger_events")
    expected = (message.trigger_id, message.offer_id, message.affiliate_id, message.status)
    if (row.trigger_id, row.offer_id, row.affiliate_id, row.status) != expected:
        raise InvalidMessageError(
            f"trigger_event {message.trigger_event_id} is (trigger {row.trigger_id}, offer {row.offer_id}, "
            f"affiliate {row.affiliate_id}, {row.status}) in trigger_events, but the message says (trigger "
            f"{expected[0]}, offer {expected[1]}, affiliate {expected[2]}, {expected[3]})"
        )
    # Built without validation: these are our own rows (value may be NULL in rows older
    # than migration 0002 whose check is gone).
    return TriggerEventMessage.model_construct(
        trigger_event_id=message.trigger_event_id, trigger_id=row.trigger_id, trigger_name=row.name,
        offer_id=row.offer_id, affiliate_id=row.affiliate_id, previous_status=row.previous_status,
        status=row.status, value=row.value, threshold=row.threshold, measured_at=row.measured_at,
        check_id=row.check_id,
    )


def firing_actions(event: TriggerEventMessage) -> Select[tuple[int]]:
    """Active actions with a condition (T, S) all of whose conditions hold for the pair.

    A condition on the event's own trigger is judged by the event (it holds only for
    status S); any other is read from trigger_states, and holds only if a state row for
    the pair has that status.
    """
    t, s = event.trigger_id, event.status
    own = exists().where(ActionCondition.action_id == Action.id, ActionCondition.trigger_id == t,
                         ActionCondition.trigger_status == s)
    other = aliased(ActionCondition)
    state_holds = exists().where(
        TriggerState.trigger_id == other.trigger_id, TriggerState.offer_id == event.offer_id,
        TriggerState.affiliate_id == event.affiliate_id, TriggerState.status == other.trigger_status,
    )
    unmet = exists().where(
        other.action_id == Action.id,
        or_(and_(other.trigger_id == t, other.trigger_status != s),
            and_(other.trigger_id != t, ~state_holds)),
    )
    return select(Action.id).where(Action.active, own, ~unmet)


def _ensure_runs(conn: Connection, event: TriggerEventMessage) -> list[tuple[int, str]]:
    # Two replicas with the same event must not both evaluate the conditions: if
    # trigger_states changed in between, their union would run more than either decided.
    conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended('action_runner.trigger_event:' || :id, 0))"),
                 {"id": event.trigger_event_id})
    runs = _runs_of(conn, event.trigger_event_id)
    if runs:
        return runs
    firing = [a for a in conn.execute(firing_actions(event)).scalars() if _claim_episode(conn, event, a)]
    if not firing:
        return []
    conn.execute(
        pg_insert(OperationRun)
        .from_select(
            ["trigger_event_id", "action_id", "operation_id", "kind", "status"],
            select(literal(event.trigger_event_id), ActionOperation.action_id, ActionOperation.operation_id,
                   Operation.kind, literal("pending"))
            .join(Operation, Operation.id == ActionOperation.operation_id)
            .where(ActionOperation.action_id.in_(firing))
            .order_by(ActionOperation.action_id, ActionOperation.operation_id),
        )
        .on_conflict_do_nothing(index_elements=["trigger_event_id", "action_id", "operation_id"])
    )
    return _runs_of(conn, event.trigger_event_id)


def episode_of(conn: Connection, event: TriggerEventMessage, action_id: int) -> str:
    """Names the episode in which all the action's conditions hold: for each condition,
    its trigger and when its status began (the event's own measured_at for the event's
    trigger, the state's `since` for the others). Two events that complete the same
    conjunction name the same episode."""
    rows = conn.execute(
        select(ActionCondition.trigger_id, TriggerState.since)
        .outerjoin(TriggerState, and_(TriggerState.trigger_id == ActionCondition.trigger_id,
                                      TriggerState.offer_id == event.offer_id,
                                      TriggerState.affiliate_id == event.affiliate_id))
        .where(ActionCondition.action_id == action_id)
        .distinct().order_by(ActionCondition.trigger_id)
    ).all()
    parts = []
    for trigger_id, since in rows:
        began = event.measured_at if trigger_id == event.trigger_id else since
        parts.append(f"{trigger_id}@{began.isoformat()}")
    return ";".join(parts)


def _claim_episode(conn: Connection, event: TriggerEventMessage, action_id: int) -> bool:
    """True when this event is the one that fires the action for its episode.

    A second event completing the same conjunction (the other condition's change) finds
    the episode claimed and fires nothing: one reject, not two.
    """
    episode = episode_of(conn, event, action_id)
    conn.execute(
        pg_insert(ActionFiring)
        .values(action_id=action_id, offer_id=event.offer_id, affiliate_id=event.affiliate_id,
                episode=episode, trigger_event_id=event.trigger_event_id)
        .on_conflict_do_nothing()
    )
    owner = conn.execute(
        select(ActionFiring.trigger_event_id).where(
            ActionFiring.action_id == action_id, ActionFiring.offer_id == event.offer_id,
            ActionFiring.affiliate_id == event.affiliate_id, ActionFiring.episode == episode)
    ).scalar_one()
    if owner != event.trigger_event_id:
        logger.info("trigger_event %d: action %d already fired for this episode by trigger_event %d",
                    event.trigger_event_id, action_id, owner)
    return owner == event.trigger_event_id


def _runs_of(conn: Connection, trigger_event_id: int) -> list[tuple[int, str]]:
    return [tuple(r) for r in conn.execute(  # type: ignore[misc]
        select(OperationRun.id, OperationRun.status)
        .where(OperationRun.trigger_event_id == trigger_event_id).order_by(OperationRun.id)
    )]


def _facts(conn: Connection, event_id: str, event: TriggerEventMessage) -> EventFacts:
    metric = conn.execute(select(Trigger.metric_key).where(Trigger.id == event.trigger_id)).scalar_one()
    offer = conn.execute(select(Offer.name, Offer.require_approval).where(Offer.id == event.offer_id)).first()
    return EventFacts(event_id=event_id, event=event, metric=metric,
                      offer=OfferInfo(name=offer.name, require_approval=offer.require_approval) if offer else None)


# First key of the session advisory locks that claim operation runs (the second is the run id).
RUN_LOCK = 0x6B7069  # "kpi"


def _run_once(engine: Engine, run_id: int, facts: EventFacts, delivery: Delivery, *, mailer: Mailer,
              hasoffers: HasOffersClient | None, settings: Settings) -> RunResult:
    """Claim the run, count the attempt, do its side effect, commit the outcome.

    The claim is a session advisory lock on the run: held from before the side effect
    until after its outcome is committed, and released by PostgreSQL when the process or
    its connection dies. Unlike a row lock it survives the commit that counts the
    attempt before the side effect, so an attempt that ends in a crash still counts and
    a run that keeps crashing its process gives up after KPI_RETRY_LIMIT + 1 attempts.
    """
    with engine.connect() as conn:
        if not conn.execute(select(func.pg_try_advisory_lock(RUN_LOCK, run_id))).scalar_one():
            conn.rollback()
            # Another replica holds it. Its delivery normally finishes it, but that delivery may
            # be gone (a lost broker connection); this one comes back until the run is final.
            logger.info("event_id=%s run %d is being handled elsewhere; will look again", facts.event_id, run_id)
            return RunResult("busy", f"run {run_id} is being handled by another delivery")
        try:
            conn.commit()
            return _run_claimed(conn, run_id, facts, delivery, mailer=mailer, hasoffers=hasoffers, settings=settings)
        finally:
            _release(conn, run_id)


def _release(conn: Connection, run_id: int) -> None:
    try:
        conn.rollback()
        conn.execute(select(func.pg_advisory_unlock(RUN_LOCK, run_id)))
        conn.commit()
    except DBAPIError:  # the connection is gone, and the lock with it
        conn.invalidate()


def _run_claimed(conn: Connection, run_id: int, facts: EventFacts, delivery: Delivery, *, mailer: Mailer,
                 hasoffers: HasOffersClient | None, settings: Settings) -> RunResult:
    with conn.begin():
        row = conn.execute(
            update(OperationRun)
            .where(OperationRun.id == run_id, OperationRun.status == "pending")
            .values(attempts=OperationRun.attempts + (0 if settings.actions_dry_run else 1),
                    started_at=func.coalesce(OperationRun.started_at, func.clock_timestamp()))
            .returning(OperationRun.trigger_event_id, OperationRun.action_id, OperationRun.operation_id,
                       OperationRun.kind, OperationRun.attempts)
        ).first()
        if row is None:
            return RunResult("final")  # finished elsewhere since we listed the runs
        subject, body = conn.execute(
            select(Operation.subject, Operation.body).where(Operation.id == row.operation_id)).one()
    run = RunSpec(run_id=run_id, trigger_event_id=row.trigger_event_id, action_id=row.action_id,
                  operation_id=row.operation_id, kind=row.kind, subject=subject, body=body)
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


def _finish(conn: Connection, run_id: int, outcome: Outcome, *, last_error: str | None = None) -> None:
    values = {"status": outcome.status, "detail": outcome.detail[:MAX_ERROR],
              "started_at": func.coalesce(OperationRun.started_at, func.clock_timestamp()),
              "finished_at": func.clock_timestamp()}
    if last_error is not None:
        values["last_error"] = last_error
    conn.execute(update(OperationRun).where(OperationRun.id == run_id).values(**values))


def _notices(engine: Engine, envelope: Envelope, event: TriggerEventMessage) -> list[Envelope]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(OperationRun.id, OperationRun.action_id, OperationRun.operation_id, OperationRun.kind,
                   OperationRun.status, OperationRun.detail)
            .where(OperationRun.trigger_event_id == event.trigger_event_id, OperationRun.status != "pending")
            .order_by(OperationRun.id)
        ).all()
    return [
        new_event(
            OPERATION_EXECUTED,
            OperationExecuted(operation_run_id=r.id, trigger_event_id=event.trigger_event_id, action_id=r.action_id,
                              operation_id=r.operation_id, kind=r.kind, outcome=r.status, detail=r.detail),
            correlation_id=envelope.correlation_id,
            causation_id=str(envelope.event_id),
            event_id=stable_event_id(OPERATION_EXECUTED, event.trigger_event_id, r.action_id, r.operation_id),
        )
        for r in rows
    ]


def _domain(address: str) -> str:
    domain = address.rpartition("@")[2].strip(" >")
    return domain or "localhost"
