"""`kpi explain`: why a pair is in its state, and what every action did about it.

Everything shown is what the services recorded (trigger_states, trigger_checks,
trigger_events, action_evaluations, operation_runs) except the threshold in force, which
is resolved now by the trigger_checker's own function for the pair, with the row it
comes from.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, select

from services.action_runner.firing import load_actions, trigger_names
from services.trigger_checker.handler import load_rules
from services.trigger_checker.rules import Value, resolve_threshold
from shared.db import (
    ActionCondition, ActionEvaluation, Affiliate, Offer, OperationRun, Trigger, TriggerCheck, TriggerEvent,
    TriggerState, TriggerThreshold,
)


class ExplainError(Exception):
    """Bad input: the message is for a person."""


def explain(conn: Connection, trigger: str, offer_id: int, affiliate_id: int, checks: int = 20) -> dict[str, Any]:
    t = conn.execute(select(Trigger.id, Trigger.name, Trigger.metric_key, Trigger.operator, Trigger.active,
                            Trigger.for_checks).where(Trigger.name == trigger)).first()
    if t is None:
        raise ExplainError(f"no trigger named {trigger!r}")
    for name, value in (("offer", offer_id), ("affiliate", affiliate_id)):
        if not 0 < value <= 2**31 - 1:
            raise ExplainError(f"invalid {name} id {value}")
    s = TriggerState
    state = conn.execute(select(s.status, s.previous_status, s.since, s.streak, s.measured_at, s.value, s.threshold,
                                s.check_id).where(s.trigger_id == t.id, s.offer_id == offer_id,
                                                   s.affiliate_id == affiliate_id)).first()
    c = TriggerCheck
    recent = conn.execute(select(c.id, c.measured_at, c.value, c.threshold, c.recovery, c.threshold_scope, c.status)
                          .where(c.trigger_id == t.id, c.offer_id == offer_id, c.affiliate_id == affiliate_id)
                          .order_by(c.measured_at.desc()).limit(checks)).all()
    e = TriggerEvent
    events = conn.execute(select(e.id, e.previous_status, e.status, e.value, e.threshold, e.measured_at, e.check_id,
                                 e.created_at)
                          .where(e.trigger_id == t.id, e.offer_id == offer_id, e.affiliate_id == affiliate_id)
                          .order_by(e.measured_at, e.id)).all()
    offer = conn.execute(select(Offer.name).where(Offer.id == offer_id)).scalar()
    affiliate = conn.execute(select(Affiliate.company, Affiliate.protected).where(Affiliate.id == affiliate_id)).first()
    return {
        "trigger": {"id": t.id, "name": t.name, "metric": t.metric_key, "operator": t.operator, "active": t.active,
                    "for_checks": t.for_checks},
        "offer": {"id": offer_id, "name": offer},
        "affiliate": {"id": affiliate_id, "company": affiliate.company if affiliate else None,
                      "protected": bool(affiliate and affiliate.protected)},
        "state": None if state is None else {
            "status": state.status, "previous_status": state.previous_status, "since": _iso(state.since),
            "streak": state.streak, "for_checks": t.for_checks, "measured_at": _iso(state.measured_at),
            "value": state.value, "threshold": state.threshold, "check_id": state.check_id},
        "threshold": _threshold_in_force(conn, t, offer_id, affiliate_id),
        "checks": [{"check_id": r.id, "measured_at": _iso(r.measured_at), "value": r.value, "threshold": r.threshold,
                    "recovery": r.recovery, "scope": r.threshold_scope, "status": r.status} for r in recent],
        "state_changes": [{"trigger_event_id": r.id, "previous_status": r.previous_status, "status": r.status,
                           "value": r.value, "threshold": r.threshold, "measured_at": _iso(r.measured_at),
                           "check_id": r.check_id, "recorded_at": _iso(r.created_at)} for r in events],
        "actions": _actions(conn, t.id, [r.id for r in events]),
    }


def _threshold_in_force(conn: Connection, trigger: Any, offer_id: int, affiliate_id: int) -> dict[str, Any] | None:
    rules, categories = load_rules(conn, [Value(trigger.metric_key, offer_id, affiliate_id,
                                                datetime.now(timezone.utc), 0.0)])
    rule = next((r for r in rules if r.id == trigger.id), None)
    if rule is None:
        return {"value": None, "note": "the trigger is inactive: no threshold applies"}
    found = resolve_threshold(rule, offer_id, affiliate_id, categories.get(offer_id, ()))
    if found is None:
        return {"value": None, "note": "no threshold applies to this pair: it is not checked"}
    h = TriggerThreshold
    where = {"offer_affiliate": (h.offer_id == offer_id) & (h.affiliate_id == affiliate_id),
             "affiliate": h.affiliate_id == affiliate_id, "offer": h.offer_id == offer_id}.get(found.scope)
    row_id = None
    if found.scope == "offer_category":
        # The offer's category with a threshold and the smallest id (resolve_threshold's rule).
        category = min(set(categories.get(offer_id, ())) & set(rule.category))
        row_id = conn.execute(select(h.id).where(h.trigger_id == trigger.id, h.scope == found.scope,
                                                 h.category_id == category)).scalar()
    elif where is not None:
        row_id = conn.execute(select(h.id).where(h.trigger_id == trigger.id, h.scope == found.scope, where)).scalar()
    return {"value": found.value, "recovery": found.recovery, "scope": found.scope,
            "row": f"triggers #{trigger.id} (general threshold)" if found.scope == "general"
            else f"trigger_thresholds #{row_id}"}


def _actions(conn: Connection, trigger_id: int, event_ids: list[int]) -> list[dict[str, Any]]:
    ids = set(conn.scalars(select(ActionCondition.action_id).where(ActionCondition.trigger_id == trigger_id)))
    actions = load_actions(conn, action_ids=ids) if ids else []
    names = trigger_names(conn, {c.trigger_id for a in actions for c in a.conditions})
    evaluations = {(r.trigger_event_id, r.action_id): r for r in conn.execute(
        select(ActionEvaluation).where(ActionEvaluation.trigger_event_id.in_(event_ids)))} if event_ids else {}
    runs: dict[tuple[int, int], list] = {}
    if event_ids:
        r = OperationRun
        for run in conn.execute(select(r.id, r.trigger_event_id, r.action_id, r.kind, r.repeat, r.status, r.attempts,
                                       r.detail, r.last_error, r.created_at, r.finished_at, r.message_id)
                                .where(r.trigger_event_id.in_(event_ids)).order_by(r.id)):
            runs.setdefault((run.trigger_event_id, run.action_id), []).append(run)
    out = []
    for action in actions:
        per_event = []
        for event_id in event_ids:
            evaluation = evaluations.get((event_id, action.id))
            if evaluation is None:
                continue
            per_event.append({
                "trigger_event_id": event_id, "fired": evaluation.fired, "why": evaluation.reason,
                "runs": [{"run_id": x.id, "kind": x.kind, "reminder": x.repeat, "status": x.status,
                          "attempts": x.attempts, "detail": x.detail, "last_error": x.last_error,
                          "message_id": x.message_id, "finished_at": _iso(x.finished_at)}
                         for x in runs.get((event_id, action.id), [])]})
        out.append({"id": action.id, "name": action.name, "active": action.active,
                    "conditions": [f"{names.get(c.trigger_id, c.trigger_id)} is {c.status}" for c in action.conditions],
                    "operations": [f"{op.name} ({op.kind})" for op in action.operations],
                    "repeat_minutes": action.repeat_minutes, "events": per_event})
    return out


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def as_text(report: dict[str, Any]) -> str:
    t, s = report["trigger"], report["state"]
    lines = [f"{t['name']} ({t['metric']} {t['operator']}) for offer {report['offer']['id']} "
             f"({report['offer']['name'] or 'unknown offer'}) / affiliate {report['affiliate']['id']} "
             f"({report['affiliate']['company'] or 'unknown'}{', protected' if report['affiliate']['protected'] else ''})"]
    if s is None:
        lines.append("state: none yet (no check of this pair was applied)")
    else:
        lines.append(f"state: {s['status'] or 'undecided'} since {s['since']} (was {s['previous_status'] or 'none'}); "
                     f"streak {s['streak']}/{s['for_checks']}; last check {s['measured_at']}: value {s['value']}, "
                     f"threshold {s['threshold']}")
    th = report["threshold"]
    if th and th.get("value") is not None:
        lines.append(f"threshold in force: {th['value']} ({th['scope']}, {th['row']}); recovery "
                     f"{th['recovery'] if th['recovery'] is not None else 'at the threshold'}")
    elif th:
        lines.append(th["note"])
    lines.append(f"last checks ({len(report['checks'])}):")
    lines += [f"  {c['measured_at']}  {c['status']:7}  value {c['value']}  threshold {c['threshold']}"
              f"{'  recovery ' + str(c['recovery']) if c['recovery'] is not None else ''}" for c in report["checks"]]
    lines.append(f"state changes ({len(report['state_changes'])}):")
    lines += [f"  #{e['trigger_event_id']} {e['measured_at']}  {e['previous_status'] or 'none'} -> {e['status']} "
              f"(value {e['value']}, threshold {e['threshold']})" for e in report["state_changes"]]
    lines.append(f"actions on {t['name']} ({len(report['actions'])}):")
    for a in report["actions"]:
        lines.append(f"  {a['name']}{'' if a['active'] else ' (inactive)'}: when {' and '.join(a['conditions'])} "
                     f"-> {', '.join(a['operations'])}"
                     f"{'; reminders every ' + str(a['repeat_minutes']) + ' min' if a['repeat_minutes'] else ''}")
        for ev in a["events"]:
            lines.append(f"    event #{ev['trigger_event_id']}: {'fired' if ev['fired'] else 'did not fire'} "
                         f"({ev['why']})")
            lines += [f"      run {r['run_id']} {r['kind']}{' reminder ' + str(r['reminder']) if r['reminder'] else ''}"
                      f": {r['status']}{' - ' + r['detail'] if r['detail'] else ''}" for r in ev["runs"]]
    return "\n".join(lines)
