"""`kpi backtest`: what the current rules would have done with the values already stored.

The metric_values with measured_at in [from, to) are replayed in measured_at order
through the services' own decisions, starting from no state, with no side effect and no
write: the trigger_checker's thresholds and checks (load_rules, check_values), the
event_detector's state machine (debounce, hysteresis: machine.advance), the
action_runner's firing, silences, protected affiliates, reject cap and reminders
(decisions.py). Its clock is measured_at: a silence matches, and the cap's hour counts,
by the time the value was measured.

One implementation: nothing here decides; it feeds the same functions the services call
and keeps in memory what the services keep in tables.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select

from services.action_runner.decisions import (
    PROTECTED, ActionRule, StateOf, cap_allows, episode_holds, evaluate, reminder_due,
)
from services.action_runner.firing import load_actions, trigger_names
from services.action_runner.operations import usable_recipients
from services.event_detector.handler import as_reading
from services.event_detector.machine import NO_STATE, PairState, advance
from services.trigger_checker.handler import load_rules
from services.trigger_checker.rules import Value, check_values
from shared import silences
from shared.db import Affiliate, MetricValue, Trigger
from shared.vocabulary import EMAIL_KINDS

CHUNK = 20_000  # values read and checked at a time (the services take up to 1000 a message)

Pair = tuple[int, int, int]


@dataclass
class Backtest:
    max_rejects_per_hour: int
    state_changes: list[dict[str, Any]] = field(default_factory=list)
    operations: list[dict[str, Any]] = field(default_factory=list)
    values: int = 0
    checks: int = 0

    def summary(self) -> dict[str, Any]:
        outcomes = dict.fromkeys(("would_run", "held", "skipped", "silenced"), 0)
        for op in self.operations:
            outcomes[op["outcome"]] += 1
        rejected = sorted({(op["offer_id"], op["affiliate_id"]) for op in self.operations
                           if op["kind"] == "reject_affiliate" and op["outcome"] == "would_run"})
        return {"state_changes": len(self.state_changes), "operations": outcomes,
                "rejected_affiliates": [list(pair) for pair in rejected]}

    def as_json(self) -> dict[str, Any]:
        return {"state_changes": self.state_changes, "operations": self.operations, "summary": self.summary(),
                "replayed": {"values": self.values, "checks": self.checks}}


def run(conn: Connection, start: datetime, end: datetime, max_rejects_per_hour: int) -> Backtest:
    result = Backtest(max_rejects_per_hour)
    for_checks = dict(conn.execute(select(Trigger.id, Trigger.for_checks)).all())
    actions = load_actions(conn)
    names = trigger_names(conn, for_checks)
    replay = _Replay(conn, result, actions, names, silences.all_rules(conn))
    states: dict[Pair, PairState] = defaultdict(lambda: NO_STATE)
    for chunk in _values(conn, start, end):
        result.values += len(chunk)
        rules, categories = load_rules(conn, chunk)
        checks, _ = check_values(rules, chunk, categories)
        # The services apply a pair's checks in measured_at order whatever the batch: so
        # does the replay (check_values keeps the chunk's order, which is measured_at's).
        checks.sort(key=lambda c: c.value.measured_at)
        result.checks += len(checks)
        for n, check in enumerate(checks, start=result.checks - len(checks)):
            v, t = check.value, check.threshold
            pair = (check.trigger_id, v.offer_id, v.affiliate_id)
            reading = as_reading(n + 1, v.measured_at, v.value, t.value, t.recovery, check.operator, check.status)
            states[pair], changes = advance(states[pair], [reading], for_checks[check.trigger_id])
            replay.states[v.offer_id, v.affiliate_id][check.trigger_id] = StateOf(states[pair].status,
                                                                                  states[pair].since)
            for change in changes:
                replay.change(pair, change.previous, change.status, change.entered.measured_at)
            if not changes:
                replay.check(pair, v.measured_at)
    return result


def _values(conn: Connection, start: datetime, end: datetime) -> Iterator[list[Value]]:
    mv = MetricValue
    rows = conn.execution_options(stream_results=True, yield_per=CHUNK).execute(
        select(mv.metric_key, mv.offer_id, mv.affiliate_id, mv.measured_at, mv.value)
        .where(mv.measured_at >= start, mv.measured_at < end)
        .order_by(mv.measured_at, mv.metric_key, mv.offer_id, mv.affiliate_id))
    for partition in rows.partitions():
        yield [Value(*row) for row in partition]


class _Replay:
    """The action side: firings, episodes, the cap's last hour and reminders, in memory."""

    def __init__(self, conn: Connection, result: Backtest, actions: list[ActionRule], names: dict[int, str],
                 all_silences: list[silences.SilenceRule]):
        self.conn = conn
        self.result = result
        self.names = names
        self.silences = all_silences
        self.by_condition: dict[tuple[int, str], list[ActionRule]] = defaultdict(list)
        for action in actions:
            for condition in set(action.conditions):
                self.by_condition[condition].append(action)
        self.states: dict[tuple[int, int], dict[int, StateOf]] = defaultdict(dict)
        self.claimed: set[tuple[int, int, int, str]] = set()
        self.rejects: list[datetime] = []  # measured_at of every reject that would run
        # open episodes with reminders: (trigger, offer, affiliate) -> [(action, episode, last run at)]
        self.reminding: dict[Pair, list[list[Any]]] = defaultdict(list)
        self._protected: dict[int, bool] = {}
        self._recipients: dict[tuple[str, int], bool] = {}

    def change(self, pair: Pair, previous: str | None, status: str, measured_at: datetime) -> None:
        trigger_id, offer_id, affiliate_id = pair
        self.result.state_changes.append({
            "trigger": self.names.get(trigger_id, str(trigger_id)), "offer_id": offer_id,
            "affiliate_id": affiliate_id, "previous_status": previous, "status": status,
            "measured_at": measured_at.isoformat()})
        if previous is None and status == "OK":
            return
        states = self.states[offer_id, affiliate_id]
        for action in self.by_condition.get((trigger_id, status), []):
            evaluation = evaluate(action, trigger_id, status, measured_at, states, self.names)
            if not evaluation.fired:
                continue
            key = (action.id, offer_id, affiliate_id, evaluation.episode)
            if key in self.claimed:
                continue
            self.claimed.add(key)  # type: ignore[arg-type]
            for op in action.operations:
                self._operation(action, op, pair, measured_at, repeat=0)
            if action.repeat_minutes and action.email_operations:
                self.reminding[pair].append([action, evaluation.episode, measured_at])

    def check(self, pair: Pair, measured_at: datetime) -> None:
        """A check that changed nothing: a reminder may be due."""
        for entry in self.reminding.get(pair, ()):
            action, episode, last_at = entry
            states = self.states[pair[1], pair[2]]
            if not episode_holds(episode, states, action.conditions):
                continue
            if reminder_due(last_at, measured_at, action.repeat_minutes):
                entry[2] = measured_at
                for op in action.email_operations:
                    self._operation(action, op, pair, measured_at, repeat=-1)

    def _operation(self, action: ActionRule, op: Any, pair: Pair, at: datetime, repeat: int) -> None:
        trigger_id, offer_id, affiliate_id = pair
        silence = silences.matching(self.silences, trigger_id, offer_id, affiliate_id, at)
        outcome, detail = "would_run", ""
        if silence is not None:
            outcome, detail = "silenced", f"silenced by {silence.describe()}"
        elif op.kind in EMAIL_KINDS and not self._has_recipients(op.kind, affiliate_id):
            outcome, detail = "skipped", "no usable recipient"
        elif op.kind == "reject_affiliate":
            if self._is_protected(affiliate_id):
                outcome, detail = "skipped", PROTECTED
            else:
                hour_ago = at - timedelta(hours=1)
                self.rejects = [t for t in self.rejects if t > hour_ago]
                if cap_allows(len(self.rejects), self.result.max_rejects_per_hour):
                    self.rejects.append(at)
                else:
                    outcome, detail = "held", f"{len(self.rejects)} rejects in the hour before"
        self.result.operations.append({
            "action": action.name, "operation": op.name, "kind": op.kind, "offer_id": offer_id,
            "affiliate_id": affiliate_id, "trigger": self.names.get(trigger_id, str(trigger_id)),
            "measured_at": at.isoformat(), "reminder": repeat != 0, "outcome": outcome,
            **({"detail": detail} if detail else {})})

    def _is_protected(self, affiliate_id: int) -> bool:
        if affiliate_id not in self._protected:
            self._protected[affiliate_id] = bool(self.conn.execute(
                select(Affiliate.protected).where(Affiliate.id == affiliate_id)).scalar())
        return self._protected[affiliate_id]

    def _has_recipients(self, kind: str, affiliate_id: int) -> bool:
        key = (kind, affiliate_id)
        if key not in self._recipients:
            self._recipients[key] = bool(usable_recipients(self.conn, kind, affiliate_id)[0])
        return self._recipients[key]
