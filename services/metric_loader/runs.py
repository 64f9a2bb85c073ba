"""load_runs: one row per load request, from request to outcome.

The request's event_id finds its run (UNIQUE request_event_id), so a redelivered or
retried request continues the same run with the same measured_at. The schedule creates
the run before it publishes the request (see schedule.py); the CLI and other
publishers let the handler create it.

Every start of a run counts in `attempts` (migration 0005), crashes and lost
connections included, which the broker's retry count cannot see: the handler merges
the two (Delivery.at_attempt) and gives up after KPI_RETRY_LIMIT + 1 attempts, marking
the run failed as the request goes to the dead queue. A run that is started again after
it failed (a replayed dead letter) starts counting afresh.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import Connection, Engine, func, select, update
from sqlalchemy.dialects.postgresql import insert

from shared.db import LoadRun
from shared.events import InvalidMessageError
from shared.sql import transaction
from shared.vocabulary import LoadStatus

ERROR_MAX = 2000


@dataclass(frozen=True)
class Run:
    id: int
    metric_key: str
    lookback_hours: int
    measured_at: datetime
    attempts: int  # starts of this run so far, this one included


def open_run(engine: Engine, request_event_id: str, metric_key: str, lookback_hours: int) -> Run | None:
    """Find or create the run of a request and mark it running; None when it already succeeded."""
    with transaction(engine) as conn:
        conn.execute(
            insert(LoadRun)
            .values(request_event_id=request_event_id, metric_key=metric_key, lookback_hours=lookback_hours,
                    status="requested")
            .on_conflict_do_nothing(index_elements=[LoadRun.request_event_id])
        )
        row = conn.execute(
            select(LoadRun.id, LoadRun.metric_key, LoadRun.lookback_hours, LoadRun.status)
            .where(LoadRun.request_event_id == request_event_id)
            .with_for_update()
        ).one()
        if (row.metric_key, row.lookback_hours) != (metric_key, lookback_hours):
            raise InvalidMessageError(
                f"request {request_event_id} belongs to run {row.id} of {row.metric_key}/{row.lookback_hours}h, "
                f"not {metric_key}/{lookback_hours}h")
        if row.status == "succeeded":
            return None
        # A failed run started again is a deliberate replay: it gets a fresh attempt count.
        replay = row.status == "failed"
        started = {"error": None, "attempts": 1} if replay else {"attempts": LoadRun.attempts + 1}
        measured_at, attempts = conn.execute(
            update(LoadRun)
            .where(LoadRun.id == row.id)
            .values(status="running", finished_at=None, **started,
                    started_at=func.coalesce(LoadRun.started_at, func.now()),
                    measured_at=func.coalesce(LoadRun.measured_at, func.date_trunc("second", func.now())))
            .returning(LoadRun.measured_at, LoadRun.attempts)
        ).one()
    # UTC whatever the session's time zone: it is published as is.
    return Run(row.id, metric_key, lookback_hours, measured_at.astimezone(timezone.utc), attempts)


def succeed(engine: Engine, run_id: int, rows_read: int, values_published: int, notes: str | None = None) -> None:
    with transaction(engine) as conn:
        _finish(conn, run_id, "succeeded", rows_read, values_published, None, notes)


def fail(engine: Engine, run_id: int, reason: str, rows_read: int = 0) -> None:
    with transaction(engine) as conn:
        _finish(conn, run_id, "failed", rows_read, 0, reason)


def record_attempt(engine: Engine, run_id: int, attempt: int, limit: int, reason: str) -> None:
    """A transient failure: the run stays running and the request comes back."""
    with transaction(engine) as conn:
        conn.execute(update(LoadRun).where(LoadRun.id == run_id, LoadRun.status == "running")
                     .values(error=f"attempt {attempt}/{limit}: {reason}"[:ERROR_MAX]))


def _finish(conn: Connection, run_id: int, status: LoadStatus, rows_read: int, values_published: int,
            error: str | None, notes: str | None = None) -> None:
    # The fault suite recognises the statement that marks a run succeeded by its start,
    # "UPDATE load_runs SET status='succeeded'" (SQLAlchemy sets columns in table order).
    conn.execute(
        update(LoadRun).where(LoadRun.id == run_id)
        .values(status=status, finished_at=func.now(), rows_read=rows_read, values_published=values_published,
                error=None if error is None else error[:ERROR_MAX], notes=None if notes is None else notes[:ERROR_MAX])
    )
