"""A trigger scenario shared by the handler and process tests, with its expected outcome.

The expected outcome is worked out here from DESIGN.md section 4, independently of the
services' code: thresholds are written down by hand per (trigger, pair), and the state
changes come from a deliberately plain reference walk (`Model`).
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import Engine, text

from shared.events import METRIC_LOADED, TRIGGER_CHECKED, Envelope, new_event

T0 = datetime(2026, 11, 28, 10, tzinfo=timezone.utc)


def at(hour: int) -> datetime:
    return T0 + timedelta(hours=hour)


# name -> (metric_key, operator, general threshold, active)
TRIGGERS = {
    "min CR": ("cr", "lt", 0.05, True),
    "max CR": ("cr", "gt", None, True),
    "cap fill": ("cap_fill", "ge", 1.0, True),
    "pacc zero": ("pacc", "eq", 0.0, True),
    "disabled": ("cr", "lt", 100.0, False),
}

# (trigger, scope, category_id, offer_id, affiliate_id, value)
THRESHOLD_ROWS = [
    ("min CR", "offer_category", 20, None, None, 0.02),
    ("min CR", "offer_category", 10, None, None, 0.03),  # offer 101 is in 10 and 20: 10 wins
    ("min CR", "offer", None, 102, None, 0.04),
    ("min CR", "affiliate", None, None, 7, 0.01),
    ("min CR", "offer_affiliate", None, 102, 8, 0.06),
    ("max CR", "offer", None, 101, None, 0.5),
    ("max CR", "offer_category", 30, None, None, 0.7),    # no offer of ours is in category 30
    ("cap fill", "affiliate", None, None, 1, 1.2),
    ("disabled", "offer", None, 101, None, 100.0),
]
OFFER_CATEGORIES = {101: [20, 10], 102: [], 103: [40], 104: []}

# The effective threshold of every (trigger, offer, affiliate) the scenario touches, by
# hand; None = no threshold, the pair is skipped. "disabled" is never evaluated.
EXPECTED_THRESHOLDS: dict[tuple[str, int, int], float | None] = {
    ("min CR", 101, 1): 0.03,   # category 10 (smallest id), not 20
    ("min CR", 101, 7): 0.01,   # affiliate 7 beats the categories
    ("min CR", 102, 7): 0.01,   # affiliate 7 beats offer 102
    ("min CR", 102, 8): 0.06,   # offer_affiliate beats offer 102
    ("min CR", 102, 9): 0.04,   # offer 102
    ("min CR", 103, 9): 0.05,   # general: category 40 has no threshold
    ("max CR", 101, 1): 0.5,    # offer 101
    ("max CR", 101, 7): 0.5,
    ("max CR", 102, 7): None,   # no general threshold: skipped
    ("max CR", 102, 8): None,
    ("max CR", 102, 9): None,
    ("max CR", 103, 9): None,
    ("cap fill", 101, 1): 1.2,  # affiliate 1
    ("cap fill", 104, 2): 1.0,  # general
    ("pacc zero", 104, 2): 0.0,
}

OPS = {"lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge, "eq": operator.eq,
       "ne": operator.ne}

Item = tuple[str, int, int, int, float]  # metric_key, offer_id, affiliate_id, hour, value

# Arrival order of the metric.loaded batches. Per pair (min CR unless said otherwise):
#  (101,1) OK -> PROBLEM -> PROBLEM -> OK (0.03 at the 0.03 boundary is not "lt")
#  (101,7) first PROBLEM, then OK; max CR the other way round
#  (102,7) first OK, then PROBLEM
#  (102,8) PROBLEM, then hour 3 OK arrives before hour 2 PROBLEM (out of order)
#  (102,9) 0.04 at the boundary is OK, then PROBLEM
#  (103,9) PROBLEM, then the same key again with another value (ignored), then OK
#  cap fill (101,1) 1.2 >= 1.2 PROBLEM then OK; (104,2) OK
#  pacc zero (104,2): 0.0 == 0 PROBLEM, 1e-9 OK, -0.0 == 0 PROBLEM
#  gtr has no trigger: recorded, never checked
BATCHES: list[list[Item]] = [
    [("cr", 101, 1, 0, 0.04), ("cr", 101, 7, 0, 0.005), ("cr", 102, 7, 0, 0.02), ("cr", 102, 8, 0, 0.05),
     ("cr", 102, 9, 0, 0.04), ("cr", 103, 9, 0, 0.01), ("cap_fill", 101, 1, 0, 1.2), ("cap_fill", 104, 2, 0, 0.5),
     ("pacc", 104, 2, 0, 0.0), ("gtr", 104, 2, 0, 0.3)],
    [("cr", 101, 1, 1, 0.02), ("cr", 101, 7, 1, 0.6), ("cr", 102, 7, 1, 0.005), ("cr", 102, 9, 1, 0.039),
     ("cap_fill", 101, 1, 1, 1.19), ("pacc", 104, 2, 1, 1e-9)],
    [("cr", 101, 1, 2, 0.01), ("cr", 102, 8, 3, 0.07), ("pacc", 104, 2, 2, -0.0)],
    [("cr", 101, 1, 3, 0.03), ("cr", 102, 8, 2, 0.01), ("cr", 103, 9, 0, 0.09), ("cr", 103, 9, 1, 0.06)],
]


def seed(engine: Engine) -> dict[str, int]:
    """The scenario's triggers, thresholds, offers and categories; returns trigger ids by name."""
    with engine.begin() as conn:
        ids = {}
        for name, (metric_key, op, threshold, active) in TRIGGERS.items():
            ids[name] = conn.execute(text(
                "INSERT INTO triggers (name, metric_key, operator, threshold, active) "
                "VALUES (:name, :metric_key, :op, :threshold, :active) RETURNING id"
            ), dict(name=name, metric_key=metric_key, op=op, threshold=threshold, active=active)).scalar_one()
        for name, scope, category_id, offer_id, affiliate_id, value in THRESHOLD_ROWS:
            conn.execute(text(
                "INSERT INTO trigger_thresholds (trigger_id, scope, category_id, offer_id, affiliate_id, value) "
                "VALUES (:t, :scope, :c, :o, :a, :v)"
            ), dict(t=ids[name], scope=scope, c=category_id, o=offer_id, a=affiliate_id, v=value))
        for offer_id, categories in OFFER_CATEGORIES.items():
            conn.execute(text("INSERT INTO offers (id, name) VALUES (:id, :name)"),
                         dict(id=offer_id, name=f"offer {offer_id}"))
            for category_id in categories:
                conn.execute(text("INSERT INTO offer_categories (offer_id, category_id) VALUES (:o, :c)"),
                             dict(o=offer_id, c=category_id))
    return ids


def metric_loaded(items: list[Item], correlation_id: str = "run-1") -> Envelope:
    return new_event(METRIC_LOADED, {"metrics": [
        {"metric_key": k, "offer_id": o, "affiliate_id": a, "value": v, "measured_at": at(h).isoformat()}
        for k, o, a, h, v in items
    ]}, correlation_id=correlation_id)


# -- the reference model ---------------------------------------------------------------

CheckKey = tuple[str, int, int, int]  # trigger name, offer_id, affiliate_id, hour


@dataclass(frozen=True)
class ExpectedCheck:
    value: float
    threshold: float
    status: str


def expected_checks(batches: list[list[Item]], thresholds: dict | None = None) -> dict[CheckKey, ExpectedCheck]:
    """Every check the batches give: the first arrival of a value key wins."""
    thresholds = EXPECTED_THRESHOLDS if thresholds is None else thresholds
    first: dict[tuple[str, int, int, int], float] = {}
    for batch in batches:
        for metric_key, offer_id, affiliate_id, hour, value in batch:
            first.setdefault((metric_key, offer_id, affiliate_id, hour), value)
    checks = {}
    for (metric_key, offer_id, affiliate_id, hour), value in first.items():
        for name, (trigger_metric, op, _, active) in TRIGGERS.items():
            if trigger_metric != metric_key or not active:
                continue
            threshold = thresholds[name, offer_id, affiliate_id]
            if threshold is None:
                continue
            status = "PROBLEM" if OPS[op](value, threshold) else "OK"
            checks[name, offer_id, affiliate_id, hour] = ExpectedCheck(value, threshold, status)
    return checks


@dataclass
class Model:
    """DESIGN.md section 4 "State change", fed checks in arrival order."""

    states: dict[tuple[str, int, int], dict] = field(default_factory=dict)
    # (trigger, offer, affiliate, previous_status, status, hour)
    events: list[tuple[str, int, int, str | None, str, int]] = field(default_factory=list)

    def feed(self, key: CheckKey, check: ExpectedCheck) -> None:
        name, offer_id, affiliate_id, hour = key
        pair = (name, offer_id, affiliate_id)
        state = self.states.get(pair)
        if state is None:
            self.states[pair] = {"status": check.status, "since": hour, "hour": hour}
            if check.status == "PROBLEM":
                self.events.append((*pair, None, "PROBLEM", hour))
        elif hour > state["hour"]:
            if check.status != state["status"]:
                self.events.append((*pair, state["status"], check.status, hour))
                self.states[pair] = {"status": check.status, "since": hour, "hour": hour}
            else:
                state["hour"] = hour

    def feed_batch(self, checks: dict[CheckKey, ExpectedCheck]) -> None:
        """One message: its checks in measured_at order."""
        for key in sorted(checks, key=lambda k: k[3]):
            self.feed(key, checks[key])


def model_of_batches(batches: list[list[Item]]) -> Model:
    """The outcome when metric.loaded batches are handled one after the other."""
    model = Model()
    seen: list[list[Item]] = []
    for batch in batches:
        before = expected_checks(seen)
        seen.append(batch)
        after = expected_checks(seen)
        model.feed_batch({k: v for k, v in after.items() if k not in before})
    return model


def model_of_whole_pairs(checks: dict[CheckKey, ExpectedCheck]) -> Model:
    """The outcome when each pair's checks all arrive together (in any number of messages
    that each hold all of them): in measured_at order, whatever the arrival order."""
    model = Model()
    for pair in sorted({key[:3] for key in checks}):
        model.feed_batch({key: check for key, check in checks.items() if key[:3] == pair})
    return model


# -- reading the database back as the model's shapes --------------------------------------


def hour_of(measured_at: datetime) -> int:
    return int((measured_at - T0) / timedelta(hours=1))


def actual_checks(engine: Engine) -> dict[CheckKey, ExpectedCheck]:
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT t.name, c.offer_id, c.affiliate_id, c.measured_at, c.value, c.threshold, c.status "
            "FROM trigger_checks c JOIN triggers t ON t.id = c.trigger_id"
        )).all()
    checks = {(r.name, r.offer_id, r.affiliate_id, hour_of(r.measured_at)):
              ExpectedCheck(r.value, r.threshold, r.status) for r in rows}
    assert len(checks) == len(rows)
    return checks


def actual_states(engine: Engine) -> dict[tuple[str, int, int], dict]:
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT t.name, s.offer_id, s.affiliate_id, s.status, s.since, s.measured_at, c.measured_at AS check_at "
            "FROM trigger_states s JOIN triggers t ON t.id = s.trigger_id JOIN trigger_checks c ON c.id = s.check_id"
        )).all()
    states = {}
    for r in rows:
        assert r.check_at == r.measured_at, "the state's check_id is the check of its measured_at"
        states[r.name, r.offer_id, r.affiliate_id] = {
            "status": r.status, "since": hour_of(r.since), "hour": hour_of(r.measured_at)}
    return states


def actual_events(engine: Engine) -> list[tuple[str, int, int, str | None, str, int]]:
    """trigger_events rows in the model's shape, each checked against its check."""
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT t.name, e.offer_id, e.affiliate_id, e.previous_status, e.status, e.measured_at, e.value, "
            "e.threshold, c.status AS check_status, c.value AS check_value, c.threshold AS check_threshold, "
            "c.measured_at AS check_at, c.trigger_id = e.trigger_id AND c.offer_id = e.offer_id "
            "AND c.affiliate_id = e.affiliate_id AS same_pair "
            "FROM trigger_events e JOIN triggers t ON t.id = e.trigger_id JOIN trigger_checks c ON c.id = e.check_id "
            "ORDER BY e.id"
        )).all()
    for r in rows:
        assert r.same_pair and (r.status, r.value, r.threshold, r.measured_at) == (
            r.check_status, r.check_value, r.check_threshold, r.check_at), r
    return [(r.name, r.offer_id, r.affiliate_id, r.previous_status, r.status, hour_of(r.measured_at)) for r in rows]


def published_events(messages: list[tuple[object, bytes]]) -> dict[str, dict]:
    """Published trigger.event.* messages by event_id; a repeated id must repeat the same event."""
    by_id: dict[str, dict] = {}
    for properties, body in messages:
        message = json.loads(body)
        assert properties.message_id == message["event_id"]
        assert properties.type == message["type"] == f"trigger.event.{message['data']['status'].lower()}"
        known = by_id.setdefault(message["event_id"], message)
        assert known["data"] == message["data"], "one event id, two different events"
    return by_id


def as_model_events(published: dict[str, dict], trigger_names: dict[int, str]) -> list[tuple]:
    rows = []
    for message in published.values():
        d = message["data"]
        assert d["trigger_name"] == trigger_names[d["trigger_id"]]
        rows.append((d["trigger_name"], d["offer_id"], d["affiliate_id"], d["previous_status"], d["status"],
                     hour_of(datetime.fromisoformat(d["measured_at"]))))
    return rows


def checked_message(checks: list[dict], correlation_id: str = "run-1") -> Envelope:
    return new_event(TRIGGER_CHECKED, {"checks": checks}, correlation_id=correlation_id)


def check_items(engine: Engine, where: str = "true", **params) -> list[dict]:
    """trigger_checks rows as trigger.checked items."""
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT c.id, c.trigger_id, t.name, t.metric_key, c.offer_id, c.affiliate_id, c.value, c.operator, "
            f"c.threshold, c.status, c.measured_at FROM trigger_checks c JOIN triggers t ON t.id = c.trigger_id "
            f"WHERE {where} ORDER BY c.id"
        ), params).all()
    return [
        {"check_id": r.id, "trigger_id": r.trigger_id, "trigger_name": r.name, "metric_key": r.metric_key,
         "offer_id": r.offer_id, "affiliate_id": r.affiliate_id, "value": r.value, "operator": r.operator,
         "threshold": r.threshold, "status": r.status, "measured_at": r.measured_at.isoformat()}
        for r in rows
    ]


def assert_consistent_history(engine: Engine) -> int:
    """What must hold whatever the delivery order; returns the number of events.

    Every pair's state is its latest check; its events, in id order, are a chain of
    changes (each from the status the previous one went to, in measured_at order) that
    ends in the state's status, and a pair without events was first seen OK and stayed so.
    """
    with engine.connect() as conn:
        latest = {(r.trigger_id, r.offer_id, r.affiliate_id): r for r in conn.execute(text(
            "SELECT DISTINCT ON (trigger_id, offer_id, affiliate_id) * FROM trigger_checks "
            "ORDER BY trigger_id, offer_id, affiliate_id, measured_at DESC"))}
        states = {(r.trigger_id, r.offer_id, r.affiliate_id): r for r in conn.execute(text(
            "SELECT * FROM trigger_states"))}
        events: dict = {}
        for r in conn.execute(text("SELECT * FROM trigger_events ORDER BY id")):
            events.setdefault((r.trigger_id, r.offer_id, r.affiliate_id), []).append(r)
    assert set(states) == set(latest)
    for pair, state in states.items():
        check = latest[pair]
        assert (state.status, state.measured_at, state.check_id) == (check.status, check.measured_at, check.id), pair
        chain = events.get(pair, [])
        if not chain:
            assert state.status == "OK", pair
            continue
        for before, after in zip([None, *chain], chain):
            assert after.status != after.previous_status, pair
            if before is None:
                assert after.status == "PROBLEM", pair  # from nothing or from a first OK
            else:
                assert after.previous_status == before.status and after.measured_at > before.measured_at, pair
        assert chain[-1].status == state.status and chain[-1].measured_at == state.since, pair
    return sum(len(chain) for chain in events.values())
