"""load_runs: one row per load request, from request to outcome.

The request's event_id finds its run (UNIQUE request_event_id), so a redelivered or
retried request continues the same run with the same measured_at. The schedule creates
the run before it publishes the request (see schedule.py); the CLI and other
publishers let the handler create it.

Transient failures are counted in the run itself, so that the run is marked failed on
the attempt after which the consumer gives up and dead-letters the request: the
consumer dead-letters on attempt KPI_RETRY_LIMIT + 1. The count lives in `error` as
"attempt N/M: reason" because load_runs has no column for it; a run that is started
again after it failed (a replayed dead letter) starts counting afresh.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import Connection, Engine, text

from shared.events import InvalidMessageError

ERROR_MAX = 2000
_ATTEMPT = re.compile(r"^attempt (\d+)/\d+: ")


@dataclass(frozen=True)
class Run:
    id: int
    metric_key: str
    lookback_hours: int
    measured_at: datetime
    attempts_failed: int  # transient failures so far


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
        error = None if row.status == "failed" else row.error
        measured_at = conn.execute(text(
            "UPDATE load_runs SET status = 'running', error = :error, finished_at = NULL,"
            " started_at = coalesce(started_at, now()),"
            " measured_at = coalesce(measured_at, date_trunc('second', now()))"
            " WHERE id = :id RETURNING measured_at"), {"id": row.id, "error": error}).scalar_one()
    match = _ATTEMPT.match(error or "")
    # UTC whatever the session's time zone: it is published as is.
    return Run(row.id, metric_key, lookback_hours, measured_at.astimezone(timezone.utc),
               int(match.group(1)) if match else 0)


def succeed(engine: Engine, run_id: int, rows_read: int, values_published: int) -> None:
    with engine.begin() as conn:
        _finish(conn, run_id, "succeeded", rows_read, values_published, None)


def fail(engine: Engine, run_id: int, reason: str, rows_read: int = 0) -> None:
    with engine.begin() as conn:
        _finish(conn, run_id, "failed", rows_read, 0, reason)


def record_attempt(engine: Engine, run_id: int, attempt: int, limit: int, reason: str) -> None:
    """A transient failure: the run stays running and the request comes back."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE load_runs SET error = :error WHERE id = :id AND status = 'running'"),
                     {"id": run_id, "error": f"attempt {attempt}/{limit}: {reason}"[:ERROR_MAX]})


def _finish(conn: Connection, run_id: int, status: str, rows_read: int, values_published: int,
            error: str | None) -> None:
    conn.execute(text(
        "UPDATE load_runs SET status = :status, finished_at = now(), rows_read = :rows,"
        " values_published = :published, error = :error WHERE id = :id"),
        {"id": run_id, "status": status, "rows": rows_read, "published": values_published,
         "error": None if error is None else error[:ERROR_MAX]})
