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
    offer: tuple[tuple[int, float], ...] = ()  # offer-scope thresholds
    affiliate: tuple[tuple[int, float], ...] = ()  # affiliate-scope thresholds

    def threshold_for(self, offer_id: int, affiliate_id: int) -> float:
        # Most specific wins: affiliate > offer > general (the only scopes the suite seeds).
        for scoped, key in ((self.affiliate, affiliate_id), (self.offer, offer_id)):
            for target, value in scoped:
                if target == key:
                    return value
        return self.threshold


@dataclass(frozen=True)
class OperationDef:
    id: int
    name: str
    kind: str
    subject: str | None = None
    body: str | None = None


@dataclass(frozen=True)
class ActionDef:
    id: int
    name: str
    conditions: tuple[tuple[int, str], ...]  # (trigger id, status)
    operations: tuple[int, ...]
    active: bool = True


MIN_CR, MAX_CR, NEG_PACC, DEEP_LOSS, PACC_WATCH, LOW_GTR, HIGH_GTR, CAP_FILL, CAP_OVER = range(1, 10)

TRIGGERS = (
    TriggerDef(MIN_CR, "min CR", "cr", "lt", 0.005),
    TriggerDef(MAX_CR, "max CR", "cr", "gt", 0.30, offer=((4, 0.5),)),
    TriggerDef(NEG_PACC, "negative pacc", "pacc", "lt", 0.0),
    TriggerDef(DEEP_LOSS, "deep loss", "pacc", "lt", -20.0, affiliate=((3, -40.0),)),
    TriggerDef(PACC_WATCH, "pacc watch (inactive)", "pacc", "gt", 0.0, active=False),
    TriggerDef(LOW_GTR, "low goal ratio", "gtr", "lt", 0.05),
    TriggerDef(HIGH_GTR, "high goal ratio", "gtr", "gt", 0.8),
    TriggerDef(CAP_FILL, "cap fill", "cap_fill", "ge", 1.0, affiliate=((7, 1.2),)),
    TriggerDef(CAP_OVER, "cap overshoot", "cap_fill", "ge", 1.5),
)
TRIGGER_BY_ID = {t.id: t for t in TRIGGERS}

MAIL_AFF, MAIL_MGR, MAIL_ADMINS, APPROVE, REJECT, MAIL_ADMINS_REJECT = range(1, 7)
OPERATIONS = (
    OperationDef(MAIL_AFF, "mail affiliate", "email_affiliate", "Offer {offer-name}: {trigger-name} is {status}",
                 "<p>{metric} = {value} (threshold {threshold}) at {measured-at}</p>"),
    OperationDef(MAIL_MGR, "mail account manager", "email_affiliate_manager"),
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
    ActionDef(3, "loss alert", ((NEG_PACC, "PROBLEM"),), (MAIL_ADMINS,)),
    ActionDef(4, "approve when profitable again", ((NEG_PACC, "OK"),), (APPROVE,)),
    ActionDef(5, "goal ratio low", ((LOW_GTR, "PROBLEM"),), (MAIL_AFF,)),
    ActionDef(6, "cap reached", ((CAP_FILL, "PROBLEM"),), (MAIL_MGR,)),
    ActionDef(7, "cap back", ((CAP_FILL, "OK"),), (MAIL_AFF,)),
    ActionDef(8, "overshoot", ((CAP_OVER, "PROBLEM"),), (MAIL_ADMINS,)),
    ActionDef(9, "overshoot over", ((CAP_OVER, "OK"),), (APPROVE,)),
    # Two conditions on triggers of one metric: both states change in one transaction of
    # the event_detector, so which of them completes the conjunction is a race the
    # episode rule (DESIGN.md section 8) must absorb: one firing per episode either way.
    ActionDef(10, "reject overshoot", ((CAP_FILL, "PROBLEM"), (CAP_OVER, "PROBLEM")), (REJECT, MAIL_ADMINS_REJECT)),
    ActionDef(11, "loss alert (inactive)", ((NEG_PACC, "PROBLEM"),), (MAIL_ADMINS,), active=False),
)

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
        rows.append(f"INSERT INTO triggers (id, name, metric_key, operator, threshold, active) VALUES "
                    f"({t.id}, {_sql(t.name)}, {_sql(t.metric)}, {_sql(t.operator)}, {t.threshold!r}, {_sql(t.active)});")
        for offer_id, value in t.offer:
            rows.append(f"INSERT INTO trigger_thresholds (trigger_id, scope, offer_id, value) "
                        f"VALUES ({t.id}, 'offer', {offer_id}, {value!r});")
        for affiliate_id, value in t.affiliate:
            rows.append(f"INSERT INTO trigger_thresholds (trigger_id, scope, affiliate_id, value) "
                        f"VALUES ({t.id}, 'affiliate', {affiliate_id}, {value!r});")
    for o in OPERATIONS:
        rows.append(f"INSERT INTO operations (id, name, kind, subject, body) VALUES "
                    f"({o.id}, {_sql(o.name)}, {_sql(o.kind)}, {_sql(o.subject)}, {_sql(o.body)});")
    for a in ACTIONS:
        rows.append(f"INSERT INTO actions (id, name, active) VALUES ({a.id}, {_sql(a.name)}, {_sql(a.active)});")
        for trigger_id, status in a.conditions:
            rows.append(f"INSERT INTO action_conditions (action_id, trigger_id, trigger_status) "
                        f"VALUES ({a.id}, {trigger_id}, {_sql(status)});")
        for operation_id in a.operations:
            rows.append(f"INSERT INTO action_operations (action_id, operation_id) VALUES ({a.id}, {operation_id});")
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
    status: str
    since: datetime
    measured_at: datetime


@dataclass(frozen=True)
class RunExpectation:
    kind: str
    status: str  # succeeded | skipped
    recipients: tuple[str, ...] = ()  # emails
    call: tuple | None = None  # HasOffers: (method, offer, affiliate, status)


Item = tuple[str, int, int, float]  # metric, offer, affiliate, value
Pair = tuple[int, int]


@dataclass
class Model:
    people: People
    values: dict[tuple, float] = field(default_factory=dict)  # (metric, o, a, ts) -> value
    checks: dict[tuple, str] = field(default_factory=dict)  # (trigger, o, a, ts) -> status
    states: dict[tuple, State] = field(default_factory=dict)  # (trigger, o, a) -> state
    events: dict[tuple, tuple] = field(default_factory=dict)  # (trigger, o, a, ts) -> (previous, status)
    firings: set[tuple] = field(default_factory=set)  # (action, o, a, episode)
    runs: dict[tuple, RunExpectation] = field(default_factory=dict)  # (action, op, o, a, ts) -> run

    @staticmethod
    def checks_of(items: list[Item]) -> int:
        """How many (trigger, pair) checks a round of items makes."""
        per_metric = defaultdict(int)
        for t in TRIGGERS:
            per_metric[t.metric] += t.active
        return sum(per_metric[metric] for metric, *_ in items)

    def apply_round(self, items: list[Item], ts: datetime) -> None:
        """One round: every (metric, pair) at most once, all at measured_at `ts`."""
        round_events: list[tuple[int, int, int, str]] = []
        for metric, offer_id, affiliate_id, value in items:
            key = (metric, offer_id, affiliate_id, ts)
            if key in self.values:
                continue  # the first arrival wins
            self.values[key] = value
            for t in TRIGGERS:
                if not t.active or t.metric != metric:
                    continue
                threshold = t.threshold_for(offer_id, affiliate_id)
                status = "PROBLEM" if OPERATORS[t.operator](value, threshold) else "OK"
                self.checks[(t.id, offer_id, affiliate_id, ts)] = status
                previous = self.states.get((t.id, offer_id, affiliate_id))
                if previous is None:
                    self.states[(t.id, offer_id, affiliate_id)] = State(status, ts, ts)
                    if status == "PROBLEM":  # first seen in PROBLEM is news, first seen OK is not
                        self.events[(t.id, offer_id, affiliate_id, ts)] = (None, status)
                        round_events.append((t.id, offer_id, affiliate_id, status))
                elif ts <= previous.measured_at:
                    continue
                elif status != previous.status:
                    self.states[(t.id, offer_id, affiliate_id)] = State(status, ts, ts)
                    self.events[(t.id, offer_id, affiliate_id, ts)] = (previous.status, status)
                    round_events.append((t.id, offer_id, affiliate_id, status))
                else:
                    self.states[(t.id, offer_id, affiliate_id)] = State(status, previous.since, ts)
        self._fire(round_events, ts)

    def _fire(self, round_events: list[tuple[int, int, int, str]], ts: datetime) -> None:
        # States are read after the whole round: the suite lets the action_runner decide
        # every event of a multi-condition trigger before the next round changes a state.
        for action in ACTIONS:
            if not action.active:
                continue
            triggers = sorted({t for t, _ in action.conditions})
            for trigger_id, offer_id, affiliate_id, status in round_events:
                if (trigger_id, status) not in action.conditions:
                    continue
                if not all(self._holds(t, s, offer_id, affiliate_id) for t, s in action.conditions):
                    continue
                episode = tuple((t, self.states[(t, offer_id, affiliate_id)].since) for t in triggers)
                if (action.id, offer_id, affiliate_id, episode) in self.firings:
                    continue
                self.firings.add((action.id, offer_id, affiliate_id, episode))
                for operation_id in action.operations:
                    self.runs[(action.id, operation_id, offer_id, affiliate_id, ts)] = self._run(
                        OPERATION_BY_ID[operation_id].kind, offer_id, affiliate_id)

    def _holds(self, trigger_id: int, status: str, offer_id: int, affiliate_id: int) -> bool:
        state = self.states.get((trigger_id, offer_id, affiliate_id))
        return state is not None and state.status == status

    def _run(self, kind: str, offer_id: int, affiliate_id: int) -> RunExpectation:
        p = self.people
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
        return RunExpectation(kind, "succeeded" if recipients else "skipped", recipients=tuple(recipients))


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
