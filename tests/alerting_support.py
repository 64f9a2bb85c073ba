"""For tests that run the whole pipeline round by round: when a round has settled."""

from __future__ import annotations

from sqlalchemy import text

from services.action_runner.firing import due_reminders


def settled(db, measured_at: str | None = None, checks: int = 0) -> bool:
    """The round's values all checked, every check applied, every run final (or waiting in
    its digest), no reminder due."""
    with db.connect() as conn:
        if measured_at is not None and conn.execute(
                text("SELECT count(*) FROM trigger_checks WHERE measured_at = :m"), {"m": measured_at}
        ).scalar_one() < checks:
            return False
        pending = conn.execute(text("SELECT count(*) FROM operation_runs WHERE status = 'pending' "
                                    "AND digest_id IS NULL")).scalar_one()
        behind = conn.execute(text(
            "SELECT count(*) FROM trigger_checks c LEFT JOIN trigger_states s USING (trigger_id, offer_id, affiliate_id) "
            "WHERE s.measured_at IS NULL OR s.measured_at < c.measured_at")).scalar_one()
        due = due_reminders(conn)
        unevaluated = conn.execute(text(
            "SELECT count(*) FROM trigger_events e WHERE e.status = 'PROBLEM' AND NOT EXISTS "
            "(SELECT 1 FROM action_evaluations v WHERE v.trigger_event_id = e.id)")).scalar_one()
    return pending == 0 and behind == 0 and not due and unevaluated == 0
