"""The fault suite's seed and reference model.

What the pipeline must produce from the values the suite feeds it, computed here from
the seed and the values alone: a few lines per rule of DESIGN.md section 4 (and 8), never
the services' code. The suite's checks (checks.py) compare the database, the SMTP sink
and the fake HasOffers with it.

Order: the suite delivers the rounds of one (metric, pair) in measured_at order (it waits
until a round is applied before it publishes the next), so the expected state changes
are those of applying the rounds one after another. Inside a round, batches are
shuffled, duplicated and interleaved freely; stale copies of earlier rounds come late on
purpose and must change nothing.
"""

from __future__ import annotations

import math
import operator
import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from testkit.fake_hasoffers.network import Network, StatRow

# Its own operators, not shared.vocabulary's: the model checks the services and so shares
# none of their code.
OPERATORS = {"lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge,
             "eq": operator.eq, "ne": operator.ne}


# -- the seed ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TriggerDef:
    id: int
    name: str
    metric: str
    operator: str
    threshold: float
    active: bool = True
    # Scoped thresholds: (offer or affiliate id, threshold, recovery value or None).
    offer: tuple[tuple[int, float, float | None], ...] = ()
    affiliate: tuple[tuple[int, float, float | None], ...] = ()
    for_checks: int = 1  # debounce: PROBLEM only after this many PROBLEM checks in a row
    recovery: float | None = None  # hysteresis of the general threshold (None: the threshold)

    def threshold_for(self, offer_id: int, affiliate_id: int) -> tuple[float, float]:
        """(threshold, recovery) of the pair, both from the same row. Most specific wins:
        affiliate > offer > general (the only scopes the suite seeds)."""
        for scoped, key in ((self.affiliate, affiliate_id), (self.offer, offer_id)):
            for target, value, recovery in scoped:
                if target == key:
                    return value, value if recovery is None else recovery
        return self.threshold, self.threshold if self.recovery is None else self.recovery


@dataclass(frozen=True)
class OperationDef:
    id: int
    name: str
    kind: str
    subject: str | None = None
    body: str | None = None
    digest_minutes: int | None = None  # runs within this window go out as one email


@dataclass(frozen=True)
class ActionDef:
    id: int
    name: str
    conditions: tuple[tuple[int, str], ...]  # (trigger id, status)
    operations: tuple[int, ...]
    active: bool = True
    repeat_minutes: int | None = None  # reminders of the email operations


MIN_CR, MAX_CR, NEG_PACC, DEEP_LOSS, PACC_WATCH, LOW_GTR, HIGH_GTR, CAP_FILL, CAP_OVER = range(1, 10)

TRIGGERS = (
    TriggerDef(MIN_CR, "min CR", "cr", "lt", 0.005),
    TriggerDef(MAX_CR, "max CR", "cr", "gt", 0.30, offer=((4, 0.5, None),)),
    TriggerDef(NEG_PACC, "negative pacc", "pacc", "lt", 0.0),
    # Hysteresis, on the general threshold and on a scoped row of its own.
    TriggerDef(DEEP_LOSS, "deep loss", "pacc", "lt", -20.0, affiliate=((3, -40.0, -30.0),), recovery=-10.0),
    TriggerDef(PACC_WATCH, "pacc watch (inactive)", "pacc", "gt", 0.0, active=False),
    TriggerDef(LOW_GTR, "low goal ratio", "gtr", "lt", 0.05, for_checks=2),  # debounce
    TriggerDef(HIGH_GTR, "high goal ratio", "gtr", "gt", 0.8, recovery=0.7),
    TriggerDef(CAP_FILL, "cap fill", "cap_fill", "ge", 1.0, affiliate=((7, 1.2, None),)),
    TriggerDef(CAP_OVER, "cap overshoot", "cap_fill", "ge", 1.5),
)
TRIGGER_BY_ID = {t.id: t for t in TRIGGERS}

MAIL_AFF, MAIL_MGR, MAIL_ADMINS, APPROVE, REJECT, MAIL_ADMINS_REJECT = range(1, 7)
OPERATIONS = (
    OperationDef(MAIL_AFF, "mail affiliate", "email_affiliate", "Offer {offer-name}: {trigger-name} is {status}",
                 "<p>{metric} = {value} (threshold {threshold}) at {measured-at}</p>"),
    OperationDef(MAIL_MGR, "mail account manager", "email_affiliate_manager", digest_minutes=1),
    OperationDef(MAIL_ADMINS, "mail administrators", "email_administrators",
                 "[KPI] {trigger-name} {previous-status} -> {status}: offer {offer-id}, affiliate {affiliate-id}"),
    OperationDef(APPROVE, "approve affiliate", "approve_affiliate"),
    OperationDef(REJECT, "reject affiliate", "reject_affiliate"),
    OperationDef(MAIL_ADMINS_REJECT, "mail administrators: rejected", "email_administrators",
                 "[KPI] affiliate {affiliate-id} rejected on offer {offer-id}"),
)
OPERATION_BY_ID = {o.id: o for o in OPERATIONS}

ACTIONS = (
    ActionDef(1, "warn on low CR", ((MIN_CR, "PROBLEM"),), (MAIL_AFF, MAIL_MGR)),
    ActionDef(2, "reject high CR", ((MAX_CR, "PROBLEM"),), (REJECT,)),
    ActionDef(3, "loss alert", ((NEG_PACC, "PROBLEM"),), (MAIL_ADMINS,), repeat_minutes=20),
    ActionDef(4, "approve when profitable again", ((NEG_PACC, "OK"),), (APPROVE,)),
    ActionDef(5, "goal ratio low", ((LOW_GTR, "PROBLEM"),), (MAIL_AFF,)),
    ActionDef(6, "cap reached", ((CAP_FILL, "PROBLEM"),), (MAIL_MGR,)),
    ActionDef(7, "cap back", ((CAP_FILL, "OK"),), (MAIL_AFF,)),
    ActionDef(8, "overshoot", ((CAP_OVER, "PROBLEM"),), (MAIL_ADMINS,)),
    ActionDef(9, "overshoot over", ((CAP_OVER, "OK"),), (APPROVE,)),
    # Two conditions on triggers of one metric: both states change in one transaction of
    # the event_detector, so which of them completes the conjunction is a race the
    # episode rule (DESIGN.md section 8) must absorb: one firing per episode either way.
    # Reminders of its mail only: a reject never repeats.
    ActionDef(10, "reject overshoot", ((CAP_FILL, "PROBLEM"), (CAP_OVER, "PROBLEM")), (REJECT, MAIL_ADMINS_REJECT),
              repeat_minutes=20),
    ActionDef(11, "loss alert (inactive)", ((NEG_PACC, "PROBLEM"),), (MAIL_ADMINS,), active=False),
)

# Silences in force all along: (trigger, offer, affiliate), None matching anything. Each
# matches whole episodes whichever trigger's event fired them (no race to model).
SILENCES = ((None, None, 5), (LOW_GTR, 3, None))

ACTION_BY_ID = {a.id: a for a in ACTIONS}

ADMINISTRATORS = (("ops@network.example", True), ("oncall@network.example", True),
                  ("former@network.example", False))

# Triggers whose events must all be decided by the action_runner before the next round:
# those of multi-condition actions, whose decision reads trigger_states (see the suite).
MULTI_CONDITION_TRIGGERS = tuple(sorted({t for a in ACTIONS if a.active and len(a.conditions) > 1
                                         for t, _ in a.conditions}))


def _check_seed() -> None:
    """The suite's barrier sees an event as decided once it has operation runs: every
    status of a multi-condition trigger must fire a single-condition action."""
    singles = {a.conditions[0] for a in ACTIONS if a.active and len(a.conditions) == 1}
    for trigger_id in MULTI_CONDITION_TRIGGERS:
        for status in ("OK", "PROBLEM"):
            assert (trigger_id, status) in singles, f"trigger {trigger_id} {status} fires no single action"


_check_seed()


def _sql(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def seed_sql() -> str:
    rows = []
    for t in TRIGGERS:
        rows.append(f"INSERT INTO triggers (id, name, metric_key, operator, threshold, active, for_checks,"
                    f" recovery_threshold) VALUES ({t.id}, {_sql(t.name)}, {_sql(t.metric)}, {_sql(t.operator)},"
                    f" {t.threshold!r}, {_sql(t.active)}, {t.for_checks}, {_sql(t.recovery)});")
        for scope, scoped in (("offer", t.offer), ("affiliate", t.affiliate)):
            for target, value, recovery in scoped:
                rows.append(f"INSERT INTO trigger_thresholds (trigger_id, scope, {scope}_id, value, recovery_value)"
                            f" VALUES ({t.id}, '{scope}', {target}, {value!r}, {_sql(recovery)});")
    for o in OPERATIONS:
        rows.append(f"INSERT INTO operations (id, name, kind, subject, body, digest_minutes) VALUES "
                    f"({o.id}, {_sql(o.name)}, {_sql(o.kind)}, {_sql(o.subject)}, {_sql(o.body)},"
                    f" {_sql(o.digest_minutes)});")
    for a in ACTIONS:
        rows.append(f"INSERT INTO actions (id, name, active, repeat_minutes) VALUES ({a.id}, {_sql(a.name)},"
                    f" {_sql(a.active)}, {_sql(a.repeat_minutes)});")
        for trigger_id, status in a.conditions:
            rows.append(f"INSERT INTO action_conditions (action_id, trigger_id, trigger_status) "
                        f"VALUES ({a.id}, {trigger_id}, {_sql(status)});")
        for operation_id in a.operations:
            rows.append(f"INSERT INTO action_operations (action_id, operation_id) VALUES ({a.id}, {operation_id});")
    for trigger_id, offer_id, affiliate_id in SILENCES:
        rows.append(f"INSERT INTO silences (trigger_id, offer_id, affiliate_id, starts_at, ends_at, reason, created_by)"
                    f" VALUES ({_sql(trigger_id)}, {_sql(offer_id)}, {_sql(affiliate_id)}, now() - interval '7 days',"
                    f" now() + interval '7 days', 'fault suite: a known case', 'fault-suite');")
    for email, active in ADMINISTRATORS:
        rows.append(f"INSERT INTO administrators (email, active) VALUES ({_sql(email)}, {_sql(active)});")
    for table in ("triggers", "operations", "actions"):
        rows.append(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}));")
    return "\n".join(rows)


# -- who gets what (the fake network is the truth the reference load copies) ---------------


@dataclass(frozen=True)
class People:
    users: dict[int, tuple[str, ...]]  # affiliate -> active users' addresses, by user id
    managers: dict[int, str | None]  # affiliate -> account manager's address
    admins: tuple[str, ...]
    require_approval: dict[int, bool]


def people_of(network: Network) -> People:
    users: dict[int, list[str]] = defaultdict(list)
    for user_id in sorted(network.affiliate_users):
        user = network.affiliate_users[user_id]
        if user.status.lower() == "active":
            users[user.affiliate_id].append(user.email)
    managers = {}
    for affiliate_id, affiliate in network.affiliates.items():
        employee = network.employees.get(affiliate.account_manager_id) if affiliate.account_manager_id else None
        managers[affiliate_id] = employee.email if employee else None
    return People(users={a: tuple(u) for a, u in users.items()}, managers=managers,
                  admins=tuple(e for e, active in ADMINISTRATORS if active),
                  require_approval={o.id: o.require_approval for o in network.offers.values()})


# -- the model -----------------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    status: str | None  # None: a new pair whose first PROBLEM checks have decided nothing yet
    since: datetime | None
    measured_at: datetime


@dataclass(frozen=True)
class RunExpectation:
    kind: str
    status: str  # succeeded | skipped | silenced
    recipients: tuple[str, ...] = ()  # emails
    call: tuple | None = None  # HasOffers: (method, offer, affiliate, status)
    digest: bool = False  # carried by a digest email (with the other runs of its window)


@dataclass
class Firing:
    """An action fired for an episode: what its reminders need."""
    trigger_id: int  # of the event that fired it (reminders follow that trigger's checks)
    event_at: datetime
    last_run_at: datetime
    repeat: int = 0


Item = tuple[str, int, int, float]  # metric, offer, affiliate, value
Pair = tuple[int, int]
# Runs are keyed (action, operation, offer, affiliate, the event's measured_at, repeat).
RunKey = tuple[int, int, int, int, datetime, int]


@dataclass
class Model:
    people: People
    values: dict[tuple, float] = field(default_factory=dict)  # (metric, o, a, ts) -> value
    checks: dict[tuple, str] = field(default_factory=dict)  # (trigger, o, a, ts) -> status
    states: dict[tuple, State] = field(default_factory=dict)  # (trigger, o, a) -> state
    streaks: dict[tuple, int] = field(default_factory=dict)  # (trigger, o, a) -> PROBLEM checks in a row
    events: dict[tuple, tuple] = field(default_factory=dict)  # (trigger, o, a, ts) -> (previous, status)
    firings: dict[tuple, Firing] = field(default_factory=dict)  # (action, o, a, episode) -> firing
    runs: dict[RunKey, RunExpectation] = field(default_factory=dict)

    @staticmethod
    def checks_of(items: list[Item]) -> int:
        """How many (trigger, pair) checks a round of items makes."""
        per_metric = defaultdict(int)
        for t in TRIGGERS:
            per_metric[t.metric] += t.active
        return sum(per_metric[metric] for metric, *_ in items)

    def apply_round(self, items: list[Item], ts: datetime) -> None:
        """One round: every (metric, pair) at most once, all at measured_at `ts`, newer
        than every earlier round (the suite delivers rounds in order)."""
        round_events: list[tuple[int, int, int, str]] = []
        checked: set[tuple[int, int, int]] = set()
        for metric, offer_id, affiliate_id, value in items:
            key = (metric, offer_id, affiliate_id, ts)
            if key in self.values:
                continue  # the first arrival wins
            self.values[key] = value
            for t in TRIGGERS:
                if not t.active or t.metric != metric:
                    continue
                threshold, recovery = t.threshold_for(offer_id, affiliate_id)
                problem = OPERATORS[t.operator](value, threshold)
                self.checks[(t.id, offer_id, affiliate_id, ts)] = "PROBLEM" if problem else "OK"
                checked.add((t.id, offer_id, affiliate_id))
                changed = self._step((t.id, offer_id, affiliate_id), t, problem,
                                     clears=not problem and not OPERATORS[t.operator](value, recovery), ts=ts)
                if changed is not None:
                    self.events[(t.id, offer_id, affiliate_id, ts)] = changed
                    round_events.append((t.id, offer_id, affiliate_id, changed[1]))
        self._fire(round_events, ts)
        self._remind(checked, ts)

    def _step(self, key: tuple, t: TriggerDef, problem: bool, clears: bool, ts: datetime
              ) -> tuple[str | None, str] | None:
        """Fold one check into the pair's state (DESIGN.md section 6: debounce and
        hysteresis); the change it makes, if any: (previous, status)."""
        previous = self.states.get(key)
        if previous is not None and ts <= previous.measured_at:
            return None  # older than the state: recorded, nothing else (not in the suite's order)
        status, since = (previous.status, previous.since) if previous else (None, None)
        if problem:
            self.streaks[key] = streak = self.streaks.get(key, 0) + 1
            if status != "PROBLEM" and streak >= t.for_checks:
                self.states[key] = State("PROBLEM", ts, ts)
                return status, "PROBLEM"  # first seen in PROBLEM is news (previous None)
        else:
            self.streaks[key] = 0
            if status is None:
                self.states[key] = State("OK", ts, ts)  # first seen OK is not
                return None
            if status == "PROBLEM" and clears:
                self.states[key] = State("OK", ts, ts)
                return "PROBLEM", "OK"
        self.states[key] = State(status, since, ts)
        return None

    def _episode(self, action: ActionDef, offer_id: int, affiliate_id: int) -> tuple:
        triggers = sorted({t for t, _ in action.conditions})
        return tuple((t, self.states[(t, offer_id, affiliate_id)].since) for t in triggers)

    def _fire(self, round_events: list[tuple[int, int, int, str]], ts: datetime) -> None:
        # States are read after the whole round: the suite lets the action_runner decide
        # every event of a multi-condition trigger before the next round changes a state.
        for action in ACTIONS:
            if not action.active:
                continue
            for trigger_id, offer_id, affiliate_id, status in round_events:
                if (trigger_id, status) not in action.conditions:
                    continue
                if not all(self._holds(t, s, offer_id, affiliate_id) for t, s in action.conditions):
                    continue
                episode = self._episode(action, offer_id, affiliate_id)
                if (action.id, offer_id, affiliate_id, episode) in self.firings:
                    continue
                self.firings[(action.id, offer_id, affiliate_id, episode)] = Firing(trigger_id, ts, ts)
                for operation_id in action.operations:
                    self.runs[(action.id, operation_id, offer_id, affiliate_id, ts, 0)] = self._run(
                        OPERATION_BY_ID[operation_id], trigger_id, offer_id, affiliate_id)

    def _remind(self, checked: set[tuple[int, int, int]], ts: datetime) -> None:
        """Reminders (DESIGN.md section 6): an action with repeat_minutes whose episode still
        lasts runs its email operations again at the first check of the pair, under the
        trigger of the event that fired it, at least repeat_minutes after its last run."""
        for (action_id, offer_id, affiliate_id, episode), firing in self.firings.items():
            action = ACTION_BY_ID[action_id]
            if action.repeat_minutes is None or (firing.trigger_id, offer_id, affiliate_id) not in checked:
                continue
            if ts < firing.last_run_at + timedelta(minutes=action.repeat_minutes):
                continue
            if not all(self._holds(t, s, offer_id, affiliate_id) for t, s in action.conditions) or \
                    self._episode(action, offer_id, affiliate_id) != episode:
                continue  # the episode ended (a new one is a firing of its own)
            firing.repeat += 1
            firing.last_run_at = ts
            for operation_id in action.operations:
                operation = OPERATION_BY_ID[operation_id]
                if operation.kind.startswith("email"):
                    self.runs[(action_id, operation_id, offer_id, affiliate_id, firing.event_at, firing.repeat)] = \
                        self._run(operation, firing.trigger_id, offer_id, affiliate_id)

    def _holds(self, trigger_id: int, status: str, offer_id: int, affiliate_id: int) -> bool:
        state = self.states.get((trigger_id, offer_id, affiliate_id))
        return state is not None and state.status == status

    def _run(self, operation: OperationDef, trigger_id: int, offer_id: int, affiliate_id: int) -> RunExpectation:
        p, kind = self.people, operation.kind
        if any(silenced(trigger_id, offer_id, affiliate_id, silence) for silence in SILENCES):
            return RunExpectation(kind, "silenced")
        if kind == "approve_affiliate":
            return RunExpectation(kind, "succeeded", call=("Offer.setAffiliateApproval", offer_id, affiliate_id,
                                                           "approved"))
        if kind == "reject_affiliate":
            if p.require_approval[offer_id]:
                return RunExpectation(kind, "succeeded", call=("Offer.setAffiliateApproval", offer_id, affiliate_id,
                                                               "rejected"))
            return RunExpectation(kind, "succeeded", call=("Offer.blockAffiliate", offer_id, affiliate_id, None))
        if kind == "email_affiliate":
            recipients = p.users.get(affiliate_id, ())
        elif kind == "email_affiliate_manager":
            manager = p.managers.get(affiliate_id)
            recipients = (manager,) if manager else ()
        else:
            recipients = p.admins
        return RunExpectation(kind, "succeeded" if recipients else "skipped", recipients=tuple(recipients),
                              digest=bool(recipients) and operation.digest_minutes is not None)


def silenced(trigger_id: int, offer_id: int, affiliate_id: int, silence: tuple) -> bool:
    return all(want is None or want == have for want, have in zip(silence, (trigger_id, offer_id, affiliate_id)))


# -- the values the suite publishes itself ---------------------------------------------------

# Per metric: value ranges ("levels") that put the metric's two triggers in each
# combination of states, the weight of each level for a pair whose level never changes,
# and the exact thresholds (operator edges) a value sometimes sits on.
LEVELS = {
    "pacc": ([(1.0, 80.0), (-19.0, -0.5), (-80.0, -21.0)], [0.86, 0.10, 0.04], [0.0, -20.0, -40.0]),
    "gtr": ([(0.06, 0.79), (0.0, 0.049), (0.81, 1.4)], [0.86, 0.10, 0.04], [0.05, 0.8]),
    "cap_fill": ([(0.1, 0.95), (1.0, 1.45), (1.5, 2.5)], [0.86, 0.10, 0.04], [1.0, 1.2, 1.5]),
}


@dataclass(frozen=True)
class Plan:
    rounds: list[list[Item]]  # per round, the direct items
    stamps: list[datetime]  # per round, its measured_at


def plan_rounds(rng: random.Random, network: Network, rounds: int, pairs_per_metric: dict[str, int],
                volatile: float, skip: float, start: datetime) -> Plan:
    """Rounds of values for metric.loaded batches the suite publishes itself.

    Most pairs keep one level (their statuses never change after the first round); a
    `volatile` share draws a level every round, so their states go OK -> PROBLEM -> OK.
    A pair misses a round with probability `skip`.
    """
    all_pairs = [(o, a) for o in sorted(network.offers) for a in sorted(network.affiliates)]
    pair_levels: dict[str, dict[Pair, int | None]] = {}
    for metric, count in pairs_per_metric.items():
        ranges, weights, _ = LEVELS[metric]
        chosen = rng.sample(all_pairs, min(count, len(all_pairs)))
        pair_levels[metric] = {
            pair: None if rng.random() < volatile else rng.choices(range(len(ranges)), weights)[0]
            for pair in chosen
        }
    out: list[list[Item]] = []
    for _ in range(rounds):
        items: list[Item] = []
        for metric, levels in pair_levels.items():
            ranges, _, edges = LEVELS[metric]
            for (offer_id, affiliate_id), level in levels.items():
                if rng.random() < skip:
                    continue
                if rng.random() < 0.02:
                    value = rng.choice(edges)
                else:
                    low, high = ranges[rng.randrange(len(ranges)) if level is None else level]
                    value = round(rng.uniform(low, high), 4)
                items.append((metric, offer_id, affiliate_id, value))
        out.append(items)
    return Plan(rounds=out, stamps=[start + timedelta(minutes=10 * r) for r in range(rounds)])


# -- what the metric_loader must load: cr, from the fake's raw rows -------------------------


def cr_values(stats: list[StatRow], offers: set[int], measured_at: datetime, lookback_hours: int
              ) -> dict[Pair, float]:
    """conversions / clicks of goal 0 per pair over the look-back's whole hours (0 without
    clicks); the suite sets no minimum of clicks."""
    last = measured_at.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
    first = last - timedelta(hours=lookback_hours - 1)
    sums: dict[Pair, list[int]] = {}
    for row in stats:
        if row.goal_id != 0 or row.offer_id not in offers:
            continue
        moment = datetime.strptime(row.date, "%Y-%m-%d").replace(hour=row.hour, tzinfo=timezone.utc)
        if not first <= moment <= last:
            continue
        clicks_conversions = sums.setdefault((row.offer_id, row.affiliate_id), [0, 0])
        clicks_conversions[0] += row.clicks
        clicks_conversions[1] += row.conversions
    out = {}
    for pair, (clicks, conversions) in sums.items():
        value = conversions / clicks if clicks else 0.0
        if math.isfinite(value):
            out[pair] = value
    return out
