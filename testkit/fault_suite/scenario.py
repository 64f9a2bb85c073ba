"""The scenario: the reference load, then round after round of values (loads through the
metric_loader, the bulk as metric.loaded batches the suite publishes itself) with the
faults of each round, duplicates, stale and poison messages; the barrier between rounds,
and the drain at the end."""

from __future__ import annotations

import argparse
import json
import math
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from shared.events import (
    METRIC_LOAD_REQUESTED, METRIC_LOADED, TRIGGER_CHECKED, TRIGGER_EVENT_OK, TRIGGER_EVENT_PROBLEM, CheckItem,
    Envelope, MetricLoadRequested, TriggerChecked, TriggerEventMessage, encode, new_event, stable_event_id,
)
from testkit.fake_hasoffers.network import generate
from testkit.fault_suite import model as fm
from testkit.fault_suite.injectors import FaultRecord, Faults
from testkit.fault_suite.world import SLOW_PAGE_SECONDS, SLOW_PAGES, Replica, World, say
from testkit.waiting import wait_for

DIRECT_METRICS = ("pacc", "gtr", "cap_fill")
LOOKBACK_HOURS = 96  # longer than the fake's 3 days of traffic: a load sees all of it
SLOW = "as generated, slowly"  # the long load: see SLOW_PAGES
NODE_LOSS_ROUND = 1  # the cluster round's

# Poison per round (from 0); with fewer rounds, what does not fit goes into the last one.
POISON = {
    1: ["loaded: invalid JSON", "request: unknown metric key"],
    2: ["loaded: NaN value and unknown metric beside valid items", "checked: unknown check id"],
    3: ["loaded: ids out of range beside valid items", "event: unknown trigger event"],
    4: ["loaded: every item invalid", "request: invalid JSON"],
    5: ["loaded: envelope without event_id", "checked: invalid JSON"],
    6: ["event: status does not match the type"],
}
# The hostile round: oversized reasons, hostile x-kpi-* headers, deep nesting, timestamps
# that overflow, envelopes of another type (every one dead-lettered once, its valid items
# handled, the queue behind it drained); and valid batches under hostile headers.
HOSTILE_ROUND = 1
HOSTILE = [
    "loaded: a valid item and 999 empty items", "loaded: a 200 kB key beside a valid item",
    "loaded: 1,000 levels of nesting beside a valid item", "loaded: 1,100 levels of nesting",
    "loaded: timestamps that overflow beside a valid item",
    "loaded: invalid JSON, retry count 'abc'", "loaded: invalid JSON, retry count -1000000 and a 100 kB history",
    "request: a metric.loaded envelope", "loaded: a trigger.checked envelope", "checked: a metric.loaded envelope",
    "event: a metric.load.requested envelope",
]
HOSTILE_HEADERS = [{"x-kpi-retry-count": "abc"}, {"x-kpi-retry-count": -1_000_000},
                   {"x-kpi-retry-history": ["x" * 1000] * 100, "x-kpi-dead-reason": 12}]


def poison_plan(rounds: int) -> dict[int, list[str]]:
    kinds_of = {**POISON, HOSTILE_ROUND: POISON.get(HOSTILE_ROUND, []) + HOSTILE}
    plan = {r: list(kinds) for r, kinds in kinds_of.items() if r < rounds}
    left_over = [kind for r, kinds in sorted(kinds_of.items()) if r >= rounds for kind in kinds]
    if left_over:
        plan[rounds - 1] = plan.get(rounds - 1, []) + left_over
    return plan


@dataclass
class Load:
    request: Envelope
    expected: dict[tuple[int, int], float]
    run_id: int | None = None
    measured_at: datetime | None = None


class Scenario:
    def __init__(self, args: argparse.Namespace, world: World, cluster: Any = None):
        """`cluster` (scripts/rabbit_cluster.RabbitCluster): the cluster round, whose one
        fault is the loss of node 1 in the middle of publishing round NODE_LOSS_ROUND; no
        loads but the reference, no poison."""
        self.args, self.world, self.cluster = args, world, cluster
        self.rng = random.Random(args.seed)
        self.poison_kinds = poison_plan(args.rounds) if cluster is None else {}
        self.poison: dict[str, dict[str, str]] = defaultdict(dict)  # service -> message id -> what
        self.batches: dict[int, list[Envelope]] = defaultdict(list)
        self.published = Counter()
        self.loads: list[Load] = []
        self.barrier_timeouts: list[str] = []
        self.stats_versions: list[list] = []
        self.timings: dict[str, float] = {}
        self.long_load: Load | None = None

    def setup(self) -> None:
        a = self.args
        self.network = generate(a.seed, offers=a.offers, affiliates=a.affiliates, days=3)
        self.stats_versions.append(self.network.stats)
        self.model = fm.Model(fm.people_of(self.network))
        self.world.setup(self.network, fm.seed_sql())

    # -- the run --------------------------------------------------------------------------

    def run(self) -> None:
        a, world = self.args, self.world
        begun = time.monotonic()
        reference = new_event(METRIC_LOAD_REQUESTED, MetricLoadRequested(metric_key="reference"),
                              correlation_id="fault-suite")
        world.broker.publish(reference)
        wait_for(lambda: world.load_status(reference) == "succeeded", 90, 0.25, "the reference load")
        say("reference data loaded through the metric_loader")

        start = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(days=1)
        pairs = {"pacc": a.pacc_pairs, "gtr": a.gtr_pairs, "cap_fill": a.cap_pairs}
        self.plan = fm.plan_rounds(self.rng, self.network, a.rounds, pairs, a.volatile, 0.04, start)
        self.load_rounds = {max(1, a.rounds // 4): "as generated", max(2, a.rounds // 2): "conversions zeroed",
                            max(3, (3 * a.rounds) // 4): SLOW} if self.cluster is None else {}
        self.faults = Faults(world, random.Random(a.seed + 1))
        kills = self._plan_kills()
        for r in range(a.rounds):
            self.faults.round = r + 1
            round_began = time.monotonic()
            self._faults_of_round(r, kills.get(r, []))
            if r >= 2:
                self._stale_and_duplicates(r)
            load = self._request_load(r) if r in self.load_rounds else None
            self._publish_round(r)
            self._barrier(r, load)
            self.model.apply_round(self.plan.rounds[r], self.plan.stamps[r])
            if load is not None and load.measured_at is not None:
                self.model.apply_round([("cr", o, af, v) for (o, af), v in sorted(load.expected.items())],
                                       load.measured_at)
            self._runs_recorded(r)
            say(f"round {r + 1}/{a.rounds} applied in {time.monotonic() - round_began:.1f}s "
                f"({len(self.plan.rounds[r])} values{f', a cr load of {len(load.expected)}' if load else ''})")
        self.timings["rounds"] = time.monotonic() - begun
        for armed, where in ((world.sink.on_next_mail, "SMTP"), (world.fake.calls.on_next_call, "HasOffers")):
            if armed is not None:
                self.faults.record(FaultRecord("error", f"kill mid-send ({where})", time.time(), time.time(),
                                               "armed, but nothing was sent afterwards"))
        world.sink.on_next_mail = world.fake.calls.on_next_call = None
        self.faults.wait()
        world.restart_dead_replicas()
        last_fault = self.faults.last_end()
        say("every fault injected; waiting for the pipeline to drain")
        self._drain()
        self.timings["drain after the last fault"] = time.time() - last_fault
        world.stop_replicas()

    # -- faults per round ---------------------------------------------------------------------

    def _plan_kills(self) -> dict[int, list[tuple[float, Replica, float]]]:
        """Every replica once and the action_runner's twice more, at random moments of
        random rounds: (delay after the round starts publishing, victim, pause). Not in the
        rounds of the broker and database restarts: those must find every replica at work."""
        replicas = self.world.replicas
        victims = list(replicas) + [r for r in replicas if r.service == "action_runner"]
        self.rng.shuffle(victims)
        victims = (victims * math.ceil(self.args.kills / len(victims)))[:self.args.kills]
        n = self.args.rounds
        rounds = [r for r in range(n) if r not in (min(3, n - 1), min(5, n - 1))] or list(range(n))
        # The long load must not be interrupted: it is to complete in one attempt.
        slow = [r for r, kind in self.load_rounds.items() if kind == SLOW]
        plan: dict[int, list] = defaultdict(list)
        for victim in victims:
            allowed = [r for r in rounds if not (victim.service == "metric_loader" and r in slow)] or rounds
            plan[self.rng.choice(allowed)].append(
                (self.rng.uniform(0.2, 4.0), victim, self.rng.uniform(0.5, 3.0)))
        return plan

    def _faults_of_round(self, r: int, kills: list[tuple[float, Replica, float]]) -> None:
        f, n = self.faults, self.args.rounds
        if self.cluster is not None:
            return  # the node loss comes in the middle of publishing (_publish_round)
        for delay, victim, pause in kills:
            f.later(delay, f.kill, victim, pause)
        if r == 1 % n:
            f.later(0.5, f.smtp_outage, 6.0)
        if r == min(2, n - 1):
            f.later(0.3, f.hasoffers_outage, 6.0)
        if r == min(3, n - 1) and not self.args.skip_broker_restart:
            f.later(0.5, f.rabbitmq_restart_holding_a_run)
        if r == min(4, n - 1):
            f.later(0.5, f.hasoffers_errors)
        if r == min(5, n - 1) and not self.args.skip_db_restart:
            f.later(0.6, f.postgres_restart)
        if r == min(6, n - 1):
            f.later(1.5, f.smtp_outage, 4.0)
        if r == min(2, n - 1):
            f.later(0.2, f.arm_kill_mid_send, "SMTP")
        if r == min(4, n - 1):
            f.later(0.2, f.arm_kill_mid_send, "HasOffers")
        if r == max(0, n - 2):
            f.later(0.2, f.arm_kill_mid_send, "SMTP")

    # -- what the suite publishes -----------------------------------------------------------

    def _envelope(self, items: list[tuple[str, int, int, float]], stamp: datetime,
                  event_id: uuid.UUID | None = None) -> Envelope:
        stamp_text = stamp.isoformat().replace("+00:00", "Z")
        data = {"metrics": [{"metric_key": m, "offer_id": o, "affiliate_id": af, "value": v,
                             "measured_at": stamp_text} for m, o, af, v in items]}
        return new_event(METRIC_LOADED, data, correlation_id="fault-suite",
                         event_id=event_id or uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def _publish_round(self, r: int) -> None:
        items = list(self.plan.rounds[r])
        self.rng.shuffle(items)
        stamp = self.plan.stamps[r]
        messages: list[Callable[[], None]] = []
        for kind in self.poison_kinds.get(r, []):
            messages.append(self._poison(kind, items, stamp))
        while items:
            size = self.rng.randint(40, 400)
            batch, items = items[:size], items[size:]
            envelope = self._envelope(batch, stamp)
            self.batches[r].append(envelope)
            if r == HOSTILE_ROUND and self.poison_kinds and len(self.batches[r]) <= len(HOSTILE_HEADERS):
                headers = HOSTILE_HEADERS[len(self.batches[r]) - 1]
                messages.append(lambda e=envelope, h=headers: self._publish_with(e, h))
                continue
            messages.append(lambda e=envelope: self._publish(e, "metric.loaded batches"))
            if self.rng.random() < 0.12:  # the same message twice
                messages.append(lambda e=envelope: self._publish(e, "metric.loaded published twice"))
        self.rng.shuffle(messages)  # batches out of order, copies before originals, poison anywhere
        for n, publish in enumerate(messages):
            if self.cluster is not None and r == min(NODE_LOSS_ROUND, self.args.rounds - 1) and n == len(messages) // 2:
                self.faults.lose_node(self.cluster, 1)
            publish()

    def _publish(self, event: Envelope, what: str) -> None:
        self.world.broker.publish(event)
        self.published[what] += 1

    def _publish_with(self, event: Envelope, headers: dict) -> None:
        """A valid batch under hostile x-kpi-* headers: handled like any other."""
        self.world.broker.publish_raw(METRIC_LOADED, encode(event), str(event.event_id), headers=headers)
        self.published["metric.loaded batches under hostile headers"] += 1

    def _poison(self, kind: str, items: list, stamp: datetime) -> Callable[[], None]:
        """A message that must end in exactly one dead letter; valid items it carries are
        taken from the round (and so must be processed)."""
        message_id = str(uuid.uuid4())

        def raw(service: str, routing_key: str, body: bytes, headers: dict | None = None) -> Callable[[], None]:
            self.poison[service][message_id] = kind

            def publish() -> None:
                self.world.broker.publish_raw(routing_key, body, message_id, headers=headers)
                self.published["poison"] += 1
            return publish

        def batch_with(bad: list[dict], valid: int) -> bytes:
            good = [items.pop() for _ in range(min(valid, len(items)))]
            body = json.loads(encode(self._envelope(good, stamp, uuid.UUID(message_id))))
            body["data"]["metrics"][1:1] = bad
            return json.dumps(body).encode()  # NaN stays NaN

        def nested(depth: int) -> str:  # deeper than Python's json writes: spliced in as text
            return "[" * depth + "1" + "]" * depth

        def of_type(type_: str, data: dict) -> bytes:
            return json.dumps({"event_id": message_id, "type": type_, "schema_version": 1,
                               "occurred_at": stamp.isoformat(), "correlation_id": "fault-suite",
                               "causation_id": None, "data": data}).encode()

        at = stamp.isoformat()
        if kind == "loaded: invalid JSON":
            return raw("trigger_checker", METRIC_LOADED, b'{"event_id": "not json')
        if kind == "loaded: NaN value and unknown metric beside valid items":
            return raw("trigger_checker", METRIC_LOADED, batch_with([
                {"metric_key": "pacc", "offer_id": 1, "affiliate_id": 1, "value": float("nan"), "measured_at": at},
                {"metric_key": "bogus", "offer_id": 1, "affiliate_id": 1, "value": 1.0, "measured_at": at}], 30))
        if kind == "loaded: ids out of range beside valid items":
            return raw("trigger_checker", METRIC_LOADED, batch_with([
                {"metric_key": "gtr", "offer_id": 2**31, "affiliate_id": 1, "value": 0.1, "measured_at": at},
                {"metric_key": "gtr", "offer_id": -3, "affiliate_id": 1, "value": 0.1, "measured_at": at}], 30))
        if kind == "loaded: every item invalid":
            body = json.loads(encode(self._envelope([("pacc", 1, 1, 1.0)], stamp, uuid.UUID(message_id))))
            body["data"]["metrics"][0]["value"] = "12"
            return raw("trigger_checker", METRIC_LOADED, json.dumps(body).encode())
        if kind == "loaded: envelope without event_id":
            body = json.loads(encode(self._envelope([("pacc", 1, 1, 1.0)], stamp)))
            del body["event_id"]
            return raw("trigger_checker", METRIC_LOADED, json.dumps(body).encode())
        if kind == "checked: unknown check id":
            item = CheckItem(check_id=2_000_000_000, trigger_id=fm.NEG_PACC, trigger_name="negative pacc",
                             metric_key="pacc", offer_id=1, affiliate_id=1, value=-1.0, operator="lt", threshold=0.0,
                             status="PROBLEM", measured_at=stamp)
            event = new_event(TRIGGER_CHECKED, TriggerChecked(checks=[item]), event_id=uuid.UUID(message_id))
            return raw("event_detector", TRIGGER_CHECKED, encode(event))
        if kind == "checked: invalid JSON":
            return raw("event_detector", TRIGGER_CHECKED, b"\xff\xfe not even UTF-8")
        if kind in ("event: unknown trigger event", "event: status does not match the type"):
            unknown = kind == "event: unknown trigger event"
            data = TriggerEventMessage(trigger_event_id=2_000_000_000 if unknown else 1, trigger_id=fm.MIN_CR,
                                trigger_name="min CR", offer_id=1, affiliate_id=1, previous_status="OK",
                                status="PROBLEM", value=0.001, threshold=0.005, measured_at=stamp, check_id=1)
            event = new_event(TRIGGER_EVENT_PROBLEM if unknown else TRIGGER_EVENT_OK, data,
                              event_id=uuid.UUID(message_id))
            return raw("action_runner", event.type, encode(event))
        if kind == "request: unknown metric key":
            event = new_event(METRIC_LOAD_REQUESTED, {"metric_key": "bogus", "lookback_hours": 24},
                              event_id=uuid.UUID(message_id))
            return raw("metric_loader", METRIC_LOAD_REQUESTED, encode(event))
        if kind == "request: invalid JSON":
            return raw("metric_loader", METRIC_LOAD_REQUESTED, b"[1, 2")
        return self._hostile(kind, raw, batch_with, nested, of_type, at)

    def _hostile(self, kind: str, raw: Callable, batch_with: Callable, nested: Callable, of_type: Callable,
                 at: str) -> Callable[[], None]:
        """The hostile round's poison (see HOSTILE)."""
        if kind == "loaded: a valid item and 999 empty items":
            return raw("trigger_checker", METRIC_LOADED, batch_with([{}] * 999, 1))
        if kind == "loaded: a 200 kB key beside a valid item":
            return raw("trigger_checker", METRIC_LOADED, batch_with([
                {"metric_key": "pacc", "offer_id": 1, "affiliate_id": 1, "value": 1.0, "measured_at": at,
                 "k" * 200_000: 1}], 1))
        if kind == "loaded: 1,000 levels of nesting beside a valid item":
            body = batch_with([{"metric_key": "pacc", "offer_id": 1, "affiliate_id": 1, "value": "NEST",
                                "measured_at": at}], 1)
            return raw("trigger_checker", METRIC_LOADED, body.replace(b'"NEST"', nested(1000).encode()))
        if kind == "loaded: 1,100 levels of nesting":
            body = batch_with([{"metric_key": "pacc", "offer_id": 1, "affiliate_id": 1, "value": 1.0,
                                "measured_at": at, "extra": "NEST"}], 0)
            return raw("trigger_checker", METRIC_LOADED, body.replace(b'"NEST"', nested(1100).encode()))
        if kind == "loaded: timestamps that overflow beside a valid item":
            return raw("trigger_checker", METRIC_LOADED, batch_with([
                {"metric_key": "pacc", "offer_id": 1, "affiliate_id": 1, "value": 1.0, "measured_at": when}
                for when in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "9999-06-01T00:00:00Z",
                             "1999-12-31T23:59:59Z")], 1))
        if kind == "loaded: invalid JSON, retry count 'abc'":
            return raw("trigger_checker", METRIC_LOADED, b'{"data": ', HOSTILE_HEADERS[0])
        if kind == "loaded: invalid JSON, retry count -1000000 and a 100 kB history":
            return raw("trigger_checker", METRIC_LOADED, b'{"data": ', {**HOSTILE_HEADERS[1], **HOSTILE_HEADERS[2]})
        if kind == "request: a metric.loaded envelope":
            return raw("metric_loader", METRIC_LOAD_REQUESTED, of_type(METRIC_LOADED, {"metrics": []}))
        if kind == "loaded: a trigger.checked envelope":
            return raw("trigger_checker", METRIC_LOADED, of_type(TRIGGER_CHECKED, {"checks": []}))
        if kind == "checked: a metric.loaded envelope":
            return raw("event_detector", TRIGGER_CHECKED, of_type(METRIC_LOADED, {"metrics": []}))
        if kind == "event: a metric.load.requested envelope":
            return raw("action_runner", TRIGGER_EVENT_PROBLEM,
                       of_type(METRIC_LOAD_REQUESTED, {"metric_key": "cr", "lookback_hours": 24}))
        raise ValueError(kind)

    def _stale_and_duplicates(self, r: int) -> None:
        """Messages that arrive late or twice and must change nothing: batches of an older
        round (the same messages, and a copy with other values under a new id), a
        trigger.checked of old checks, trigger events delivered again."""
        old = self.batches[r - 2]
        for envelope in self.rng.sample(old, min(2, len(old))):
            self._publish(envelope, "stale metric.loaded (same message, late)")
        if old:
            source = self.rng.choice(old)
            changed = [(i["metric_key"], i["offer_id"], i["affiliate_id"], i["value"] + 1.5)
                       for i in source.data["metrics"]]
            self._publish(self._envelope(changed, self.plan.stamps[r - 2]), "stale metric.loaded (other values)")
        checks = self.world.db.rows(
            "SELECT c.id, c.trigger_id, t.name, t.metric_key, c.offer_id, c.affiliate_id, c.value, c.operator,"
            " c.threshold, c.status, c.measured_at FROM trigger_checks c JOIN triggers t ON t.id = c.trigger_id"
            " WHERE c.measured_at <= :ts ORDER BY random() LIMIT 200", ts=self.plan.stamps[r - 1])
        if checks:
            items = [CheckItem(check_id=c.id, trigger_id=c.trigger_id, trigger_name=c.name, metric_key=c.metric_key,
                               offer_id=c.offer_id, affiliate_id=c.affiliate_id, value=c.value, operator=c.operator,
                               threshold=c.threshold, status=c.status, measured_at=c.measured_at) for c in checks]
            self._publish(new_event(TRIGGER_CHECKED, TriggerChecked(checks=items), correlation_id="fault-suite"),
                          "trigger.checked of old checks")
        events = self.world.db.rows(
            "SELECT e.id, e.trigger_id, t.name, e.offer_id, e.affiliate_id, e.previous_status, e.status, e.value,"
            " e.threshold, e.measured_at, e.check_id FROM trigger_events e JOIN triggers t ON t.id = e.trigger_id"
            " ORDER BY random() LIMIT 60")
        for e in events:
            data = TriggerEventMessage(trigger_event_id=e.id, trigger_id=e.trigger_id, trigger_name=e.name,
                                offer_id=e.offer_id, affiliate_id=e.affiliate_id, previous_status=e.previous_status,
                                status=e.status, value=e.value, threshold=e.threshold, measured_at=e.measured_at,
                                check_id=e.check_id)
            self._publish(new_event(TRIGGER_EVENT_PROBLEM if e.status == "PROBLEM" else TRIGGER_EVENT_OK, data,
                                    event_id=stable_event_id("trigger_event", e.id)), "trigger event again")
        if self.loads:
            self._publish(self.loads[0].request, "load request again (after it succeeded)")

    def _request_load(self, r: int) -> Load:
        """A cr load through the metric_loader; between loads the fake's conversions change."""
        stats = self.stats_versions[0]
        if self.load_rounds[r] == "conversions zeroed":
            pairs = sorted({(s.offer_id, s.affiliate_id) for s in stats})
            zeroed = set(self.rng.sample(pairs, len(pairs) // 4))
            stats = [s if (s.offer_id, s.affiliate_id) not in zeroed or s.goal_id else replace(s, conversions=0)
                     for s in stats]
            self.stats_versions.append(stats)  # kept alive: the fake caches reports by the list's id
        fake = self.world.fake
        with fake.lock:
            self.network.stats = stats
            fake._reports.clear()
        expected = fm.cr_values(stats, set(self.network.offers), datetime.now(timezone.utc), LOOKBACK_HOURS)
        request = new_event(METRIC_LOAD_REQUESTED, MetricLoadRequested(metric_key="cr", lookback_hours=LOOKBACK_HOURS),
                            correlation_id="fault-suite")
        load = Load(request, expected)
        self.loads.append(load)
        if self.load_rounds[r] == SLOW:
            # Pages answered slowly: the load outlasts several heartbeats of its connection.
            fake.inject("slow", SLOW_PAGES, method="Report.getStats", seconds=SLOW_PAGE_SECONDS)
            self.long_load = load
        if self.load_rounds[r] == "conversions zeroed":
            self.faults.later(0.0, self.faults.kill_loader_after_publish, request)
        self._publish(request, "load requests")
        if len(self.loads) == 1:
            self._publish(request, "load request twice (at once)")
        return load

    # -- waiting --------------------------------------------------------------------------------

    def _barrier(self, r: int, load: Load | None) -> None:
        """Round r is applied: every check of it reached trigger_states, the load (if any)
        succeeded and its values did too, and every event of a multi-condition trigger has
        been decided by the action_runner (it has operation runs)."""
        db = self.world.db
        stamp = self.plan.stamps[r]
        expected = fm.Model.checks_of(self.plan.rounds[r])
        direct = [t.id for t in fm.TRIGGERS if t.active and t.metric in DIRECT_METRICS]
        cr = [t.id for t in fm.TRIGGERS if t.active and t.metric == "cr"]
        deadline = time.monotonic() + self.args.barrier_timeout
        progress = None
        while True:
            self.world.restart_dead_replicas()
            applied = db.scalar("SELECT count(*) FROM trigger_states WHERE trigger_id = ANY(:t)"
                                " AND measured_at = :ts", t=direct, ts=stamp)
            load_done = True
            if load is not None:
                run = db.rows("SELECT id, status, measured_at, error FROM load_runs WHERE request_event_id = :e",
                              e=str(load.request.event_id))
                load_done = False
                if run and run[0].status == "succeeded":
                    load.run_id, load.measured_at = run[0].id, run[0].measured_at
                    # the window is the run's; the expectation was made at the request
                    load.expected = fm.cr_values(self.network.stats, set(self.network.offers), load.measured_at,
                                                 LOOKBACK_HOURS)
                    load_done = db.scalar(
                        "SELECT count(*) FROM trigger_states WHERE trigger_id = ANY(:t) AND measured_at = :ts",
                        t=cr, ts=load.measured_at) == len(cr) * len(load.expected)
                elif run and run[0].status == "failed":
                    self.barrier_timeouts.append(f"round {r + 1}: the cr load failed: {run[0].error}")
                    load.measured_at = None
                    load_done = True
            undecided = db.scalar(
                "SELECT count(*) FROM trigger_events e WHERE e.trigger_id = ANY(:t)"
                " AND NOT EXISTS (SELECT 1 FROM operation_runs o WHERE o.trigger_event_id = e.id)",
                t=list(fm.MULTI_CONDITION_TRIGGERS))
            if applied == expected and load_done and undecided == 0:
                return
            if (applied, load_done, undecided) != progress:  # on a busy machine: as long as it moves
                progress, deadline = (applied, load_done, undecided), time.monotonic() + self.args.barrier_timeout
            if time.monotonic() > deadline:
                self.barrier_timeouts.append(
                    f"round {r + 1}: {applied}/{expected} checks applied, load done {load_done}, "
                    f"{undecided} undecided events")
                return
            time.sleep(0.25)

    def _runs_recorded(self, r: int) -> None:
        """Every run the model expects so far is recorded (pending, waiting in its digest, or
        final): the reminders of the round's checks too, which the action_runner's ticker
        records; a reminder is due only while its episode lasts, so before the next round."""
        deadline = time.monotonic() + self.args.barrier_timeout
        last = None
        while True:
            self.world.restart_dead_replicas()
            recorded = self.world.db.scalar("SELECT count(*) FROM operation_runs")
            if recorded >= len(self.model.runs):
                return
            if recorded != last:  # on a busy machine: as long as it moves
                last, deadline = recorded, time.monotonic() + min(self.args.barrier_timeout, 60)
            if time.monotonic() > deadline:
                self.barrier_timeouts.append(f"round {r + 1}: {recorded}/{len(self.model.runs)} runs recorded")
                return
            time.sleep(0.25)

    def _drain(self) -> None:
        """Idle: no run pending, no load open, work and retry queues empty, every final run
        and every trigger event announced, and nothing written or announced for 3 seconds
        (a replica may hold prefetched messages that the queue depths do not show)."""
        world = self.world
        poison_ids = {i for ids in self.poison.values() for i in ids}
        notices, announced = set(), set()
        deadline = time.monotonic() + self.args.drain_timeout
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            world.restart_dead_replicas()
            # Digests still open close now rather than up to a minute later (their windows
            # are wall-clock minutes; those of the earlier rounds closed by themselves).
            world.db.rows("UPDATE digests SET closes_at = now() WHERE status = 'open' AND closes_at > now()"
                          " RETURNING id", write=True)
            for properties, body in world.take_observed():
                if properties.message_id not in poison_ids:
                    data = json.loads(body)["data"]
                    (notices.add(data["operation_run_id"]) if "operation_run_id" in data
                     else announced.add(data["trigger_event_id"]))
            now = (*world.activity(), len(world.observed))
            if now != last:  # on a busy machine: as long as it moves
                last, since = now, time.monotonic()
                deadline = since + self.args.drain_timeout
            elif now[4] == 0 and now[5] == 0 and world.queues_empty() and time.monotonic() - since >= 3:
                final = {r.id for r in world.db.rows("SELECT id FROM operation_runs WHERE status <> 'pending'")}
                events = {r.id for r in world.db.rows("SELECT id FROM trigger_events")}
                if final <= notices and events <= announced:
                    return
            time.sleep(0.5)
        self.barrier_timeouts.append("the pipeline did not drain in time")
