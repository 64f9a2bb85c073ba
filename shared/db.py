"""The database schema (typed SQLAlchemy 2.0) and engine construction.

Alembic owns the schema: migrations in migrations/ create these tables and a test
asserts that they agree with the models here. Table and column names of the tables
operators seed with SQL are public (DESIGN.md section 3).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    func,
    literal,
    select,
    text,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.vocabulary import (
    CHECK_SCOPES, LOAD_STATUSES, OPERATION_KINDS, OPERATORS, RUN_STATUSES, STATUSES, THRESHOLD_SCOPES,
)

logger = logging.getLogger(__name__)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


TZ = DateTime(timezone=True)


# --- Trigger definitions (seeded by operators) -------------------------------------


class Metric(Base):
    __tablename__ = "metrics"
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    title: Mapped[str | None] = mapped_column(Text)


class Trigger(Base):
    __tablename__ = "triggers"
    __table_args__ = (
        CheckConstraint(_in("operator", OPERATORS), name="operator"),
        CheckConstraint("for_checks >= 1", name="for_checks"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    metric_key: Mapped[str] = mapped_column(Text, ForeignKey("metrics.key"))
    operator: Mapped[str] = mapped_column(Text)
    threshold: Mapped[float | None] = mapped_column(Double)
    active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    # DESIGN.md section 6 (migration 0007): PROBLEM only after this many PROBLEM checks in
    # a row; back to OK only past the recovery value (NULL: at the threshold itself).
    for_checks: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    recovery_threshold: Mapped[float | None] = mapped_column(Double)


class TriggerThreshold(Base):
    """One threshold per scope target; the ids that the scope needs, and only those, are set."""

    __tablename__ = "trigger_thresholds"
    __table_args__ = (
        CheckConstraint(_in("scope", THRESHOLD_SCOPES), name="scope"),
        CheckConstraint(
            "(scope = 'offer_category' AND category_id IS NOT NULL AND offer_id IS NULL AND affiliate_id IS NULL)"
            " OR (scope = 'offer' AND offer_id IS NOT NULL AND category_id IS NULL AND affiliate_id IS NULL)"
            " OR (scope = 'affiliate' AND affiliate_id IS NOT NULL AND category_id IS NULL AND offer_id IS NULL)"
            " OR (scope = 'offer_affiliate' AND offer_id IS NOT NULL AND affiliate_id IS NOT NULL"
            " AND category_id IS NULL)",
            name="scope_target",
        ),
        UniqueConstraint(
            "trigger_id", "scope", "category_id", "offer_id", "affiliate_id",
            name="uq_trigger_thresholds_target",
            postgresql_nulls_not_distinct=True,
        ),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trigger_id: Mapped[int] = mapped_column(ForeignKey("triggers.id", ondelete="CASCADE"))
    scope: Mapped[str] = mapped_column(Text)
    category_id: Mapped[int | None] = mapped_column(Integer)
    offer_id: Mapped[int | None] = mapped_column(Integer)
    affiliate_id: Mapped[int | None] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Double)
    recovery_value: Mapped[float | None] = mapped_column(Double)


EMAIL_KINDS = OPERATION_KINDS[:3]


class Operation(Base):
    __tablename__ = "operations"
    __table_args__ = (
        CheckConstraint(_in("kind", OPERATION_KINDS), name="kind"),
        CheckConstraint(f"digest_minutes IS NULL OR (digest_minutes > 0 AND {_in('kind', EMAIL_KINDS)})",
                        name="digest_minutes"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    kind: Mapped[str] = mapped_column(Text)
    subject: Mapped[str | None] = mapped_column(Text)
    body: Mapped[str | None] = mapped_column(Text)
    # Runs for the same recipients within this many minutes of the first go out as one email.
    digest_minutes: Mapped[int | None] = mapped_column(Integer)


class Action(Base):
    __tablename__ = "actions"
    __table_args__ = (CheckConstraint("repeat_minutes > 0", name="repeat_minutes"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    # Email operations run again while the action's conditions hold, at most this often.
    repeat_minutes: Mapped[int | None] = mapped_column(Integer)


class Silence(Base):
    """While a silence matches a trigger event, its operations are recorded `silenced`.
    NULL matches anything (DESIGN.md section 6)."""

    __tablename__ = "silences"
    __table_args__ = (CheckConstraint("ends_at > starts_at", name="window"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trigger_id: Mapped[int | None] = mapped_column(ForeignKey("triggers.id", ondelete="CASCADE"))
    offer_id: Mapped[int | None] = mapped_column(Integer)
    affiliate_id: Mapped[int | None] = mapped_column(Integer)
    starts_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    ends_at: Mapped[datetime] = mapped_column(TZ, index=True)
    reason: Mapped[str] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())


class ActionCondition(Base):
    __tablename__ = "action_conditions"
    __table_args__ = (CheckConstraint(_in("trigger_status", STATUSES), name="trigger_status"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    action_id: Mapped[int] = mapped_column(ForeignKey("actions.id", ondelete="CASCADE"))
    trigger_id: Mapped[int] = mapped_column(ForeignKey("triggers.id"), index=True)
    trigger_status: Mapped[str] = mapped_column(Text)


class ActionOperation(Base):
    __tablename__ = "action_operations"
    action_id: Mapped[int] = mapped_column(ForeignKey("actions.id", ondelete="CASCADE"), primary_key=True)
    operation_id: Mapped[int] = mapped_column(ForeignKey("operations.id"), primary_key=True)


class Administrator(Base):
    __tablename__ = "administrators"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(Text, unique=True)
    active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))


# --- Reference data (loaded from HasOffers, or seeded by hand) ----------------------


class Offer(Base):
    """An offer. name/status/require_approval come from HasOffers; the rest are local
    settings that a reference refresh never overwrites."""

    __tablename__ = "offers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str | None] = mapped_column(Text)
    require_approval: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    monitoring: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    # Local settings: the goal whose conversions the gtr metric tracks, and per-offer
    # minimums (NULL = fall back to the category, then to the general configuration).
    tracked_goal_id: Mapped[int | None] = mapped_column(Integer)
    min_clicks: Mapped[int | None] = mapped_column(Integer)
    min_conversions: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())


class OfferCategory(Base):
    __tablename__ = "offer_categories"
    offer_id: Mapped[int] = mapped_column(ForeignKey("offers.id", ondelete="CASCADE"), primary_key=True)
    category_id: Mapped[int] = mapped_column(Integer, primary_key=True, index=True)


class Category(Base):
    """Offer categories by name, with the category-scoped minimum clicks."""

    __tablename__ = "categories"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str | None] = mapped_column(Text)
    min_clicks: Mapped[int | None] = mapped_column(Integer)


class Goal(Base):
    __tablename__ = "goals"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    offer_id: Mapped[int] = mapped_column(Integer, index=True)
    name: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str | None] = mapped_column(Text)


class ConversionCap(Base):
    __tablename__ = "conversion_caps"
    offer_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    affiliate_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversion_cap: Mapped[int] = mapped_column(Integer)


class Affiliate(Base):
    __tablename__ = "affiliates"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    company: Mapped[str | None] = mapped_column(Text)
    account_manager_id: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str | None] = mapped_column(Text)
    # Local (migration 0008): a reject never runs for a protected affiliate.
    protected: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))


class AffiliateUser(Base):
    __tablename__ = "affiliate_users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    affiliate_id: Mapped[int] = mapped_column(Integer, index=True)
    email: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str | None] = mapped_column(Text)


class Employee(Base):
    __tablename__ = "employees"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    email: Mapped[str | None] = mapped_column(Text)
    secondary_email: Mapped[str | None] = mapped_column(Text)
    use_secondary: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    status: Mapped[str | None] = mapped_column(Text)


class LoadRun(Base):
    """One load of a metric (or of the reference data), from request to outcome."""

    __tablename__ = "load_runs"
    __table_args__ = (CheckConstraint(_in("status", LOAD_STATUSES), name="status"),)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    # The request's event_id: a redelivered request finds its run instead of starting another.
    request_event_id: Mapped[str] = mapped_column(String(64), unique=True)
    metric_key: Mapped[str] = mapped_column(Text)
    lookback_hours: Mapped[int] = mapped_column(Integer)
    # Set by the schedule: one run per (metric_key, slot), whichever replica asks first.
    schedule_slot: Mapped[datetime | None] = mapped_column(TZ)
    status: Mapped[str] = mapped_column(Text)
    measured_at: Mapped[datetime | None] = mapped_column(TZ)
    requested_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(TZ)
    finished_at: Mapped[datetime | None] = mapped_column(TZ)
    rows_read: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    values_published: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    error: Mapped[str | None] = mapped_column(Text)
    # Handler starts, crashed and interrupted ones included (migration 0005).
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # What the load cleaned or skipped while it still succeeded.
    notes: Mapped[str | None] = mapped_column(Text)


Index(
    "uq_load_runs_schedule_slot",
    LoadRun.metric_key,
    LoadRun.schedule_slot,
    unique=True,
    postgresql_where=LoadRun.schedule_slot.isnot(None),
)


class HasOffersCallSlot(Base):
    """The network's API rate limit, shared by every process that calls it: one row per
    call the network allows in its window; a call takes the slot used longest ago once
    that use has left the window, and stamps it when its answer is in
    (shared/hasoffers_rate.py, migration 0009)."""

    __tablename__ = "hasoffers_call_slots"
    __table_args__ = (Index("ix_hasoffers_call_slots_network_id_used_at", "network_id", "used_at"),)
    network_id: Mapped[str] = mapped_column(Text, primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True)
    used_at: Mapped[datetime] = mapped_column(TZ)


# --- What the system writes -----------------------------------------------------------


# metric_values and trigger_checks are partitioned by day of measured_at (migration
# 0010, shared/partitions.py): every unique key holds measured_at, the primary key too.
PARTITIONED_BY_DAY = {"postgresql_partition_by": "RANGE (measured_at)"}


class MetricValue(Base):
    __tablename__ = "metric_values"
    __table_args__ = (
        PrimaryKeyConstraint("id", "measured_at"),
        UniqueConstraint("metric_key", "offer_id", "affiliate_id", "measured_at"),
        PARTITIONED_BY_DAY,
    )
    id: Mapped[int] = mapped_column(BigInteger, autoincrement=True)
    metric_key: Mapped[str] = mapped_column(Text, ForeignKey("metrics.key"))
    offer_id: Mapped[int] = mapped_column(Integer)
    affiliate_id: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Double)
    measured_at: Mapped[datetime] = mapped_column(TZ)
    received_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    event_id: Mapped[str | None] = mapped_column(String(64))


class TriggerCheck(Base):
    __tablename__ = "trigger_checks"
    __table_args__ = (
        UniqueConstraint("trigger_id", "offer_id", "affiliate_id", "measured_at"),
        CheckConstraint(_in("status", STATUSES), name="status"),
        CheckConstraint(_in("operator", OPERATORS), name="operator"),
        CheckConstraint(f"threshold_scope IS NULL OR {_in('threshold_scope', CHECK_SCOPES)}",
                        name="threshold_scope"),
        PrimaryKeyConstraint("id", "measured_at"),
        PARTITIONED_BY_DAY,
    )
    id: Mapped[int] = mapped_column(BigInteger, autoincrement=True)
    trigger_id: Mapped[int] = mapped_column(ForeignKey("triggers.id", ondelete="CASCADE"))
    offer_id: Mapped[int] = mapped_column(Integer)
    affiliate_id: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Double)
    # The operator and threshold the check was evaluated with (migration 0002): a
    # redelivered batch republishes the check as it was, whatever the trigger is now.
    operator: Mapped[str] = mapped_column(Text)
    threshold: Mapped[float] = mapped_column(Double)
    threshold_scope: Mapped[str | None] = mapped_column(Text)
    # The recovery value of the row that supplied the threshold (migration 0007).
    recovery: Mapped[float | None] = mapped_column(Double)
    status: Mapped[str] = mapped_column(Text)
    measured_at: Mapped[datetime] = mapped_column(TZ)
    checked_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())


class TriggerState(Base):
    __tablename__ = "trigger_states"
    __table_args__ = (
        PrimaryKeyConstraint("trigger_id", "offer_id", "affiliate_id"),
        CheckConstraint(_in("status", STATUSES), name="status"),
        CheckConstraint(f"previous_status IS NULL OR {_in('previous_status', STATUSES)}", name="previous_status"),
    )
    trigger_id: Mapped[int] = mapped_column(ForeignKey("triggers.id", ondelete="CASCADE"))
    offer_id: Mapped[int] = mapped_column(Integer)
    affiliate_id: Mapped[int] = mapped_column(Integer)
    # NULL while a new pair's first PROBLEM checks have not reached for_checks (0007).
    status: Mapped[str | None] = mapped_column(Text)
    # The status before the last change; NULL until the first one (migration 0004).
    previous_status: Mapped[str | None] = mapped_column(Text)
    # When the pair entered this status (measured_at of the check at which it did).
    since: Mapped[datetime | None] = mapped_column(TZ)
    # Consecutive PROBLEM checks up to the newest, counted up to for_checks (0007).
    streak: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    measured_at: Mapped[datetime] = mapped_column(TZ)
    check_id: Mapped[int] = mapped_column(BigInteger)
    value: Mapped[float | None] = mapped_column(Double)
    threshold: Mapped[float | None] = mapped_column(Double)
    updated_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())


# The console's problems page: PROBLEM states newest first (migration 0006).
Index(
    "ix_trigger_states_problem_since",
    TriggerState.since.desc(), TriggerState.trigger_id, TriggerState.offer_id, TriggerState.affiliate_id,
    postgresql_where=TriggerState.status == "PROBLEM",
)


class TriggerEvent(Base):
    __tablename__ = "trigger_events"
    __table_args__ = (
        UniqueConstraint("check_id"),
        CheckConstraint(_in("status", STATUSES), name="status"),
        CheckConstraint(f"previous_status IS NULL OR {_in('previous_status', STATUSES)}", name="previous_status"),
        Index("ix_trigger_events_pair", "trigger_id", "offer_id", "affiliate_id"),
    )
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    trigger_id: Mapped[int] = mapped_column(ForeignKey("triggers.id", ondelete="CASCADE"))
    offer_id: Mapped[int] = mapped_column(Integer)
    affiliate_id: Mapped[int] = mapped_column(Integer)
    previous_status: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    check_id: Mapped[int] = mapped_column(BigInteger)
    value: Mapped[float | None] = mapped_column(Double)
    threshold: Mapped[float | None] = mapped_column(Double)
    measured_at: Mapped[datetime] = mapped_column(TZ)
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    # The trigger.checked message whose handling recorded the event (migration 0007).
    source_event_id: Mapped[str | None] = mapped_column(Text, index=True)


class ActionFiring(Base):
    """One row per episode in which all of an action's conditions hold for a pair.

    The episode is named by when each condition's status began (trigger id and `since`
    of each condition), so two events that both complete the same conjunction (one for
    each condition) fire the action once, not twice.
    """

    __tablename__ = "action_firings"
    __table_args__ = (PrimaryKeyConstraint("action_id", "offer_id", "affiliate_id", "episode"),)
    action_id: Mapped[int] = mapped_column(ForeignKey("actions.id", ondelete="CASCADE"))
    offer_id: Mapped[int] = mapped_column(Integer)
    affiliate_id: Mapped[int] = mapped_column(Integer)
    episode: Mapped[str] = mapped_column(Text)
    trigger_event_id: Mapped[int] = mapped_column(ForeignKey("trigger_events.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())


class OperationRun(Base):
    __tablename__ = "operation_runs"
    __table_args__ = (
        UniqueConstraint("trigger_event_id", "action_id", "operation_id", "repeat", name="uq_operation_runs_run"),
        CheckConstraint(_in("status", RUN_STATUSES), name="status"),
        Index("ix_operation_runs_held", "id", postgresql_where=text("status = 'held'")),
        Index("ix_operation_runs_rejects", "finished_at", postgresql_where=text("kind = 'reject_affiliate'")),
    )
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    trigger_event_id: Mapped[int] = mapped_column(ForeignKey("trigger_events.id", ondelete="CASCADE"))
    action_id: Mapped[int] = mapped_column(ForeignKey("actions.id", ondelete="CASCADE"))
    operation_id: Mapped[int] = mapped_column(ForeignKey("operations.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(TZ)
    finished_at: Mapped[datetime | None] = mapped_column(TZ)
    # Migration 0008: 0 for the first run of the operation for its event, then one per
    # reminder; the check that caused the run (the reminders' clock).
    repeat: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    measured_at: Mapped[datetime | None] = mapped_column(TZ)
    silence_id: Mapped[int | None] = mapped_column(Integer)
    # The digest that carries the run (pending until it is sent) and the email that did.
    digest_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    message_id: Mapped[str | None] = mapped_column(Text)
    # A reject allowed under KPI_MAX_REJECTS_PER_HOUR: counted while it runs.
    cap_granted_at: Mapped[datetime | None] = mapped_column(TZ)
    # Who released or discarded a held run, and when.
    decided_by: Mapped[str | None] = mapped_column(Text)
    decided_at: Mapped[datetime | None] = mapped_column(TZ)


class Digest(Base):
    """One email for the runs of an email operation with digest_minutes, for the same
    recipients, from the first run's time for digest_minutes (DESIGN.md section 6)."""

    __tablename__ = "digests"
    __table_args__ = (
        CheckConstraint("status IN ('open', 'sent', 'failed')", name="status"),
        Index("ix_digests_open", "closes_at", postgresql_where=text("status = 'open'")),
    )
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    operation_id: Mapped[int] = mapped_column(ForeignKey("operations.id", ondelete="CASCADE"))
    recipients: Mapped[str] = mapped_column(Text)  # sorted, comma-separated
    opened_at: Mapped[datetime] = mapped_column(TZ)
    closes_at: Mapped[datetime] = mapped_column(TZ)
    status: Mapped[str] = mapped_column(Text, server_default=text("'open'"))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    message_id: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(TZ)
    detail: Mapped[str | None] = mapped_column(Text)


class RejectCapAlert(Base):
    """The first reject held in an hour: the administrators are told once per hour."""

    __tablename__ = "reject_cap_alerts"
    hour: Mapped[datetime] = mapped_column(TZ, primary_key=True)
    held_run_id: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    sent_at: Mapped[datetime | None] = mapped_column(TZ)
    detail: Mapped[str | None] = mapped_column(Text)


class ActionEvaluation(Base):
    """Whether an action fired for a trigger event, and if not, why (for `kpi explain`)."""

    __tablename__ = "action_evaluations"
    __table_args__ = (PrimaryKeyConstraint("trigger_event_id", "action_id"),)
    trigger_event_id: Mapped[int] = mapped_column(ForeignKey("trigger_events.id", ondelete="CASCADE"))
    action_id: Mapped[int] = mapped_column(ForeignKey("actions.id", ondelete="CASCADE"))
    fired: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(Text)
    episode: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())




class DatabaseUnavailableError(Exception):
    pass


def make_engine(url: str, **kwargs) -> Engine:
    kwargs.setdefault("pool_pre_ping", True)
    # Fail fast when PostgreSQL is down: the consumer retries the message later.
    kwargs.setdefault("connect_args", {"connect_timeout": 5})
    return create_engine(url, **kwargs)


def wait_for_database(engine: Engine, attempts: int, delay: float = 1.0) -> None:
    """Return once a connection works; raise DatabaseUnavailableError after `attempts` tries."""
    for attempt in range(1, attempts + 1):
        try:
            with engine.connect() as conn:
                conn.execute(select(literal(1)))
            return
        except OperationalError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
            logger.warning("database not reachable (attempt %d/%d): %s", attempt, attempts, reason)
            if attempt == attempts:
                raise DatabaseUnavailableError(
                    f"PostgreSQL not reachable at {engine.url.render_as_string(hide_password=True)} "
                    f"after {attempts} attempts: {reason}"
                ) from None
            time.sleep(min(delay * 2 ** (attempt - 1), 10))
