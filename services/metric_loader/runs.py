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

from sqlalchemy import Connection, Engine, text

from shared.events import InvalidMessageError

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
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO load_runs (request_event_id, metric_key, lookback_hours, status)"
            " VALUES (:event_id, :key, :lookback, 'requested') ON CONFLICT (request_event_id) DO NOTHING"),
            {"event_id": request_event_id, "key": metric_key, "lookback": lookback_hours})
        row = conn.execute(text(
            "SELECT id, metric_key, lookback_hours, status, error FROM load_runs"
            " WHERE request_event_id = :event_id FOR UPDATE"), {"event_id": request_event_id}).one()
        if (row.metric_key, row.lookback_hours) != (metric_key, lookback_hours):
            raise InvalidMessageError(
                f"request {request_event_id} belongs to run {row.id} of {row.metric_key}/{row.lookback_hours}h, "
                f"not {metric_key}/{lookback_hours}h")
        if row.status == "succeeded":
            return None
        # A failed run started again is a deliberate replay: it gets a fresh attempt count.
        replay = row.status == "failed"
        measured_at, attempts = conn.execute(text(
            "UPDATE load_runs SET status = 'running', finished_at = NULL,"
            " error = CASE WHEN :replay THEN NULL ELSE error END,"
            " attempts = CASE WHEN :replay THEN 1 ELSE attempts + 1 END,"
            " started_at = coalesce(started_at, now()),"
            " measured_at = coalesce(measured_at, date_trunc('second', now()))"
            " WHERE id = :id RETURNING measured_at, attempts"), {"id": row.id, "replay": replay}).one()
    # UTC whatever the session's time zone: it is published as is.
    return Run(row.id, metric_key, lookback_hours, measured_at.astimezone(timezone.utc), attempts)


def succeed(engine: Engine, run_id: int, rows_read: int, values_published: int, notes: str | None = None) -> None:
    with engine.begin() as conn:
        _finish(conn, run_id, "succeeded", rows_read, values_published, None, notes)


def fail(engine: Engine, run_id: int, reason: str, rows_read: int = 0) -> None:
    with engine.begin() as conn:
        _finish(conn, run_id, "failed", rows_read, 0, reason)


def record_attempt(engine: Engine, run_id: int, attempt: int, limit: int, reason: str) -> None:
    """A transient failure: the run stays running and the request comes back."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE load_runs SET error = :error WHERE id = :id AND status = 'running'"),
                     {"id": run_id, "error": f"attempt {attempt}/{limit}: {reason}"[:ERROR_MAX]})


def _finish(conn: Connection, run_id: int, status: str, rows_read: int, values_published: int,
            error: str | None, notes: str | None = None) -> None:
    conn.execute(text(
        "UPDATE load_runs SET status = :status, finished_at = now(), rows_read = :rows,"
        " values_published = :published, error = :error, notes = :notes WHERE id = :id"),
        {"id": run_id, "status": status, "rows": rows_read, "published": values_published,
         "error": None if error is None else error[:ERROR_MAX], "notes": None if notes is None else notes[:ERROR_MAX]})
