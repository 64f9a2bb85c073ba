"""The invariants, one function each, comparing what the system produced with what the
reference model (model.py) says it must produce; each gives a row of the results table.

Everything observable is read once, after the services stopped (`observe`): the tables,
the SMTP sink, the fake HasOffers' calls, and what is left on the broker.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pika.data

from shared.events import OPERATION_EXECUTED
from shared.rabbitmq import queue_names
from testkit.fault_suite import model as fm
from testkit.fault_suite.injectors import Faults
from testkit.fault_suite.world import (
    HEARTBEAT_SECONDS, LONG_LOAD_HEARTBEATS, SERVICES, SLOW_PAGES, World, carried_runs, carrier, kind_of_call,
)
from testkit.smtp import ReceivedMail


@dataclass
class Row:
    check: str
    expected: Any
    observed: Any
    violations: int
    note: str = ""
    # What to show below the table: the first cases of each kind of violation.
    details: dict[str, list] = field(default_factory=dict)


@dataclass
class Observed:
    values: dict[tuple, float]  # (metric, offer, affiliate, measured_at) -> value
    checks: Counter  # (trigger, offer, affiliate, measured_at) -> rows
    check_statuses: dict[tuple, str]
    states: dict[tuple, fm.State]  # (trigger, offer, affiliate) -> state
    events: Counter  # (trigger, offer, affiliate, measured_at, previous, status) -> rows
    event_ids: set[int]
    announced: set[int]  # trigger_event ids seen on the bus
    notices: set[int]  # operation_run ids announced as operation.executed
    event_deliveries: int
    runs: list[Any]
    mails: list[ReceivedMail]
    mails_by_run: dict[str, list[ReceivedMail]]  # by carrier: the run's id, or "digest <Message-ID>"
    calls: list[dict[str, Any]]
    left: dict[str, int]  # service -> messages in its work and retry queues
    dead: dict[str, list[tuple[Any, bytes]]]  # service -> its dead letters
    loads: list[Any]

    def mails_per_run(self) -> Counter:
        return Counter({run_id: len(mails) for run_id, mails in self.mails_by_run.items()})

    def call_key(self, call: dict[str, Any]) -> tuple:
        return call["method"], call["offer_id"], call["affiliate_id"], call.get("status")


def observe(world: World, poison_ids: set[str]) -> Observed:
    """Everything the checks compare, read once (the observer and dead queues are emptied)."""
    db = world.db
    checks, statuses = Counter(), {}
    for r in db.rows("SELECT trigger_id, offer_id, affiliate_id, measured_at, status FROM trigger_checks"):
        checks[(r.trigger_id, r.offer_id, r.affiliate_id, r.measured_at)] += 1
        statuses[(r.trigger_id, r.offer_id, r.affiliate_id, r.measured_at)] = r.status
    events, event_ids = Counter(), set()
    for e in db.rows("SELECT id, trigger_id, offer_id, affiliate_id, measured_at, previous_status, status"
                     " FROM trigger_events"):
        events[(e.trigger_id, e.offer_id, e.affiliate_id, e.measured_at, e.previous_status, e.status)] += 1
        event_ids.add(e.id)
    # What went over the bus: the observer queue kept a copy of every announcement.
    announced, notices, deliveries = set(), set(), 0
    world.take_observed()
    for properties, body in world.observed:
        if properties.message_id in poison_ids:
            continue
        message = json.loads(body)
        if message["type"] == OPERATION_EXECUTED:
            notices.add(message["data"]["operation_run_id"])
        else:
            deliveries += 1
            announced.add(message["data"]["trigger_event_id"])
    mails = world.sink.mails()
    mails_by_run = defaultdict(list)
    for mail in mails:  # a header is parsed on every read: once each here
        mails_by_run[carrier(mail)].append(mail)
    # The services are stopped, so nothing is held unacked any more.
    left = {s: world.broker.depth(queue_names(world.exchange, s).work) +
            world.broker.depth(queue_names(world.exchange, s).retry) for s in SERVICES}
    return Observed(
        values={(r.metric_key, r.offer_id, r.affiliate_id, r.measured_at): r.value for r in db.rows(
            "SELECT metric_key, offer_id, affiliate_id, measured_at, value FROM metric_values")},
        checks=checks, check_statuses=statuses,
        states={(r.trigger_id, r.offer_id, r.affiliate_id): fm.State(r.status, r.since, r.measured_at)
                for r in db.rows("SELECT trigger_id, offer_id, affiliate_id, status, since, measured_at"
                                 " FROM trigger_states")},
        events=events, event_ids=event_ids, announced=announced, notices=notices, event_deliveries=deliveries,
        runs=db.rows("SELECT r.id, r.action_id, r.operation_id, r.kind, r.status, r.detail, r.finished_at, r.repeat,"
                     " r.digest_id, r.message_id, e.offer_id, e.affiliate_id, e.measured_at"
                     " FROM operation_runs r JOIN trigger_events e"
                     " ON e.id = r.trigger_event_id"),
        mails=mails, mails_by_run=dict(mails_by_run), calls=world.fake.write_calls(), left=left,
        dead={s: world.broker.take_all(queue_names(world.exchange, s).dead) for s in SERVICES},
        loads=db.rows("SELECT metric_key, status, values_published, error FROM load_runs ORDER BY id"),
    )


def verify(args: argparse.Namespace, model: fm.Model, world: World, faults: Faults,
           poison: dict[str, dict[str, str]], barrier_timeouts: list[str], long_load: Any = None,
           planned: list[str] | None = None) -> list[Row]:
    seen = observe(world, {i for ids in poison.values() for i in ids})
    return [
        values_stored_once(model, seen),
        *(checks_of_trigger(model, seen, trigger) for trigger in fm.TRIGGERS),
        final_states(model, seen),
        state_changes_recorded_once(model, seen),
        trigger_events_announced(seen),
        runs_once(model, seen),
        final_runs_announced(seen),
        emails_once(model, seen),
        hasoffers_calls_made(model, seen),
        emails_sent_twice(seen),
        hasoffers_calls_doubled(model, seen),
        repeats_within_crashes(model, seen, faults),
        queues_left_empty(seen),
        *(dead_letters_once(seen, service, poison[service], faults) for service in SERVICES),
        dead_letter_headers_bounded(seen),
        loads_succeeded(seen),
        *([long_load_once(world, long_load)] if long_load is not None else []),
        no_replica_exited(world),
        faults_as_planned(args, faults, planned),
        rounds_within_the_barrier(args, barrier_timeouts),
    ]


# -- the pipeline's records ------------------------------------------------------------------------


def values_stored_once(m: fm.Model, seen: Observed) -> Row:
    lost = [k for k in m.values if k not in seen.values]
    extra = [k for k in seen.values if k not in m.values]
    wrong = [k for k in m.values if k in seen.values and seen.values[k] != m.values[k]]
    return Row("metric values stored once (lost / extra / other value)", len(m.values), len(seen.values),
               len(lost) + len(extra) + len(wrong), f"{len(lost)} / {len(extra)} / {len(wrong)}",
               {"lost values": lost[:5], "extra values": extra[:5]})


def checks_of_trigger(m: fm.Model, seen: Observed, t: fm.TriggerDef) -> Row:
    expected = {k: s for k, s in m.checks.items() if k[0] == t.id}
    observed = {k: n for k, n in seen.checks.items() if k[0] == t.id}
    missing = sum(1 for k in expected if k not in observed)
    doubled = sum(n - 1 for n in observed.values() if n > 1) + sum(1 for k in observed if k not in expected)
    wrong = sum(1 for k, s in expected.items() if k in seen.check_statuses and seen.check_statuses[k] != s)
    return Row(f"  checks of '{t.name}' (missing / duplicated / other status)", len(expected),
               sum(observed.values()), missing + doubled + wrong, f"{missing} / {doubled} / {wrong}")


def final_states(m: fm.Model, seen: Observed) -> Row:
    wrong = sum(1 for k, s in m.states.items() if seen.states.get(k) != s) + \
        sum(1 for k in seen.states if k not in m.states)
    return Row("final trigger_states (status, since, measured_at)", len(m.states), len(seen.states), wrong)


def state_changes_recorded_once(m: fm.Model, seen: Observed) -> Row:
    expected = Counter((*k, prev, status) for k, (prev, status) in m.events.items())
    lost = sum((expected - seen.events).values())
    doubled = sum((seen.events - expected).values())
    return Row("state changes -> trigger_events (lost / doubled or wrong)", sum(expected.values()),
               sum(seen.events.values()), lost + doubled, f"{lost} / {doubled}")


def trigger_events_announced(seen: Observed) -> Row:
    missing = seen.event_ids - seen.announced
    return Row("trigger events announced on the bus (missing)", len(seen.event_ids), len(seen.announced),
               len(missing), f"{seen.event_deliveries} deliveries: duplicates absorbed downstream",
               {"trigger events never announced": sorted(missing)[:10]})


def runs_once(m: fm.Model, seen: Observed) -> Row:
    by_key = defaultdict(list)
    for r in seen.runs:
        by_key[run_key(r)].append(r)
    missing = [k for k in m.runs if k not in by_key]
    doubled = sum(len(v) - 1 for v in by_key.values()) + sum(len(v) for k, v in by_key.items() if k not in m.runs)
    wrong = [(k, v[0].status, v[0].detail) for k, v in by_key.items()
             if k in m.runs and v[0].status != m.runs[k].status]
    return Row("operation runs, one per (event, action, operation, reminder) (missing / duplicated / other outcome)",
               len(m.runs), len(seen.runs), len(missing) + doubled + len(wrong),
               f"{len(missing)} / {doubled} / {len(wrong)}",
               {"missing runs": missing[:5], "runs with another outcome": wrong[:5]})


def final_runs_announced(seen: Observed) -> Row:
    final = {r.id for r in seen.runs if r.status != "pending"}
    return Row("final runs announced as operation.executed (missing)", len(final), len(seen.notices),
               len(final - seen.notices), details={"final runs never announced": sorted(final - seen.notices)[:10]})


# -- side effects ------------------------------------------------------------------------------------


def run_key(r: Any) -> fm.RunKey:
    return r.action_id, r.operation_id, r.offer_id, r.affiliate_id, r.measured_at, r.repeat


def emails_once(m: fm.Model, seen: Observed) -> Row:
    """Every sending run carried by one email (a digest carries all the runs of its window),
    to the model's recipients; a digested run records the Message-ID that carried it."""
    sending = {r.id: r for r in seen.runs if r.kind.startswith("email") and r.status == "succeeded"}
    expected = sum(1 for run in m.runs.values() if run.kind.startswith("email") and run.status == "succeeded")
    carried_by: dict[int, set[str]] = defaultdict(set)  # run -> carriers
    for key, mails in seen.mails_by_run.items():
        for run_id in carried_runs(mails[0]):
            carried_by[run_id].add(key)
    unsent = [i for i in sending if not carried_by.get(i)]
    stray = [key for key, mails in seen.mails_by_run.items() if not set(carried_runs(mails[0])) <= set(sending)
             or not carried_runs(mails[0])]
    wrong = []  # wrong recipients, digested or not against the model, another Message-ID recorded
    for run_id, run in sending.items():
        expectation = m.runs.get(run_key(run))
        mails = [mail for key in carried_by.get(run_id, ()) for mail in seen.mails_by_run[key]]
        got = {tuple(mail.rcpt_tos) for mail in mails}
        if expectation is not None and (got and got != {expectation.recipients}
                                        or expectation.digest != (run.digest_id is not None)):
            wrong.append(run_id)
        elif run.digest_id is not None and mails and {mail.header("Message-ID") for mail in mails} != {run.message_id}:
            wrong.append(run_id)
    digests = [key for key in seen.mails_by_run if key.startswith("digest ")]
    in_digests = sum(len(carried_runs(seen.mails_by_run[key][0])) for key in digests)
    return Row("emails: every sending run carried once (missing / stray / wrong recipients or digest)", expected,
               len(carried_by), len(unsent) + len(stray) + len(wrong),
               f"{len(unsent)} / {len(stray)} / {len(wrong)}; {len(seen.mails)} mails, {len(digests)} of them "
               f"digests carrying {in_digests} runs",
               {"unsent mails": unsent[:5], "stray mails": stray[:5], "wrong mails": wrong[:5]})


def _expected_calls(m: fm.Model) -> Counter:
    return Counter(run.call for run in m.runs.values() if run.call)


def _observed_calls(seen: Observed) -> Counter:
    return Counter(seen.call_key(c) for c in seen.calls)


def hasoffers_calls_made(m: fm.Model, seen: Observed) -> Row:
    expected = _expected_calls(m)
    missing = expected - _observed_calls(seen)
    return Row("HasOffers approve/reject calls (missing)", sum(expected.values()), len(seen.calls),
               sum(missing.values()), details={"missing calls": list(missing.items())[:5]})


def emails_sent_twice(seen: Observed) -> Row:
    twice = [n for n in seen.mails_per_run().values() if n > 1]
    same_id = sum(n - 1 for n in Counter(mail.header("Message-ID") or "" for mail in seen.mails).values() if n > 1)
    return Row("emails sent twice (same run / same Message-ID)", 0, f"{len(twice)} / {same_id}", 0,
               "counted in the bound below")


def hasoffers_calls_doubled(m: fm.Model, seen: Observed) -> Row:
    extra = _observed_calls(seen) - _expected_calls(m)
    return Row("HasOffers calls doubled", 0, sum(extra.values()), 0, "counted in the bound below")


def repeats_within_crashes(m: fm.Model, seen: Observed, faults: Faults) -> Row:
    """Every repeated side effect explained by a crash of its own between its copies, and
    no more repeats than crashes that caught a run in its window."""
    duplicates = []
    mail_copies = [(key, n) for key, n in seen.mails_per_run().items() if n > 1]
    for key, n in mail_copies:
        times = sorted(mail.at for mail in seen.mails_by_run[key])
        what = key if key.startswith("digest") else f"mail of run {key}"
        duplicates += [(times[0], times[-1], what, set(carried_runs(seen.mails_by_run[key][0])))] * (n - 1)
    extra_calls = _observed_calls(seen) - _expected_calls(m)
    for key, n in extra_calls.items():
        times = sorted(c["at"] for c in seen.calls if seen.call_key(c) == key)
        kind = kind_of_call({"status": key[3]})
        of_pair = {r.id for r in seen.runs if (r.kind, r.offer_id, r.affiliate_id) == (kind, key[1], key[2])}
        duplicates += [(times[0], times[-1], f"{key[0]} offer {key[1]} affiliate {key[2]}", of_pair)] * n
    faults.caught_by_database_outages(seen.runs, seen.mails, seen.calls)
    unexplained, explained = match_crashes(duplicates, faults)
    # A crash counts once (a PostgreSQL restart once per replica), and a run stuck in its
    # window counts once however many crashes see it there before it is done again.
    counted: set[tuple[int, int]] = set()
    windows = 0
    for _, what, caught in sorted(faults.windows, key=lambda w: w[0]):
        windows += len([c for c in caught if c not in counted][:2 if what == "PostgreSQL restart" else 1])
        counted.update(caught)
    runner_kills = [r for r in faults.of("kill -9") if r.target.startswith("action_runner")]
    repeated = sum(n - 1 for _, n in mail_copies) + sum(extra_calls.values())
    return Row("side effects repeated after a crash <= crashes in the send window", f"<= {windows}", repeated,
               max(0, repeated - windows) + len(unexplained),
               f"{len(runner_kills)} action_runner kills, {windows} landed between a side effect and "
               f"its commit (incl. PostgreSQL restarts); unexplained: {unexplained or 'none'}",
               {"duplicates": explained[:10]})


# -- the broker ---------------------------------------------------------------------------------------


def queues_left_empty(seen: Observed) -> Row:
    left = sum(seen.left.values())
    return Row("messages left in work + retry queues", 0, left, left,
               ", ".join(f"{s} {n}" for s, n in seen.left.items() if n))


def dead_letters_once(seen: Observed, service: str, poison: dict[str, str], faults: Faults) -> Row:
    """One dead letter per poison message sent to `service`, none for anything else.

    Dead-lettering is at-least-once: a crash between publishing the dead letter and acking
    the message repeats it (same message id and reason). Each repeat must have a crash of
    its own: a kill of this service's replica or a broker restart."""
    dead = seen.dead[service]
    ids = Counter(p.message_id for p, _ in dead)
    expected_ids = set(poison)
    stray = [(p.message_id, (p.headers or {}).get("x-kpi-dead-reason", "")[:120]) for p, _ in dead
             if p.message_id not in expected_ids]
    missing = expected_ids - set(ids)
    repeats = []
    for message_id, n in ids.items():
        if n > 1 and message_id in expected_ids:
            stamps = sorted(_epoch((p.headers or {}).get("x-kpi-dead-at")) for p, _ in dead
                            if p.message_id == message_id)
            repeats += [(stamps[0] - 1, stamps[-1] + 1, poison[message_id], set())] * (n - 1)
    crashes = [(r.started, r.ended or r.started, r.target, set()) for r in faults.records
               if (r.kind == "kill -9" and r.target.startswith(service))
               or r.kind in ("RabbitMQ restart", "RabbitMQ node lost")]
    unexplained, explained = match(repeats, crashes)
    return Row(f"dead letters of {service}: one per poison message (missing / stray / repeated)",
               len(expected_ids), len(dead), len(stray) + len(missing) + len(unexplained),
               f"{len(missing)} / {len(stray)} / {len(repeats)}"
               + (f"; repeated after a crash: {'; '.join(explained)}" if explained else "")
               + (f"; UNEXPLAINED repeat: {unexplained}" if unexplained else "")
               + (f"; stray: {stray[:3]}" if stray else ""))


# A header table above RabbitMQ's frame size (128 KiB) closes the connection: a reason or a
# history copied in unbounded blocks the queue. Ours stay far below it.
HEADERS_MAX = 32 * 1024


def dead_letter_headers_bounded(seen: Observed) -> Row:
    sizes = [pika.data.encode_table([], p.headers or {}) for letters in seen.dead.values() for p, _ in letters]
    over = [size for size in sizes if size > HEADERS_MAX]
    return Row(f"dead letters' headers within {HEADERS_MAX // 1024} KiB (largest, bytes)", len(sizes),
               max(sizes, default=0), len(over))


# -- the run itself -----------------------------------------------------------------------------------


def loads_succeeded(seen: Observed) -> Row:
    failed = [lr for lr in seen.loads if lr.status != "succeeded"]
    return Row("load runs succeeded", len(seen.loads), len(seen.loads) - len(failed), len(failed),
               "; ".join(f"{lr.metric_key} {lr.status} {lr.error}" for lr in failed)[:200])


def long_load_once(world: World, load: Any) -> Row:
    """The slow cr load: done in one attempt although it outlasted LONG_LOAD_HEARTBEATS of
    its connection's heartbeats, each report page read once."""
    run = world.db.rows("SELECT status, attempts, started_at, finished_at FROM load_runs"
                        " WHERE request_event_id = :e", e=str(load.request.event_id))
    if not run or run[0].finished_at is None:
        return Row("long load: one attempt, each page once", 1, 0, 1, "the load never finished")
    run = run[0]
    seconds = (run.finished_at - run.started_at).total_seconds()
    begin, end = run.started_at.timestamp() - 1, run.finished_at.timestamp() + 1
    pages = Counter(params for at, params in world.fake.calls.report_pages if begin <= at <= end)
    twice = sum(n - 1 for n in pages.values())
    bad = (run.status != "succeeded") + (run.attempts != 1) + twice + (len(pages) < SLOW_PAGES) + \
        (seconds < LONG_LOAD_HEARTBEATS * HEARTBEAT_SECONDS)
    return Row("long load: one attempt, each page once (pages read twice)", 1, run.attempts, bad,
               f"{run.status} in {seconds:.1f}s = {seconds / HEARTBEAT_SECONDS:.1f} heartbeats of "
               f"{HEARTBEAT_SECONDS}s; {len(pages)} pages, {twice} read twice")


def no_replica_exited(world: World) -> Row:
    exits = world.unexpected_exits
    return Row("replicas that exited on their own", 0, len(exits), len(exits), "; ".join(exits))


def faults_as_planned(args: argparse.Namespace, faults: Faults, planned: list[str] | None = None) -> Row:
    errors = faults.of("error")
    if planned is None:
        planned = ["kill -9", "SMTP down", "HasOffers down", "HasOffers errors"]
        planned += [] if args.skip_broker_restart else ["RabbitMQ restart"]
        planned += [] if args.skip_db_restart else ["PostgreSQL restart"]
    absent = [kind for kind in planned if not faults.of(kind)]
    return Row("faults injected as planned (failed / kinds missing)", len(planned), len(planned) - len(absent),
               len(errors) + len(absent), "; ".join([f"{e.target}: {e.note}" for e in errors] + absent)[:300])


def rounds_within_the_barrier(args: argparse.Namespace, barrier_timeouts: list[str]) -> Row:
    return Row("rounds applied within the barrier timeout", args.rounds, args.rounds - len(barrier_timeouts),
               len(barrier_timeouts), "; ".join(barrier_timeouts)[:300])


# -- matching repeats with crashes ----------------------------------------------------------------------


def _epoch(stamp: str | None) -> float:
    if not stamp:
        return 0.0
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


def match_crashes(duplicates: list[tuple[float, float, str, set[int]]], faults: Faults
                  ) -> tuple[list[str], list[str]]:
    """Give each duplicated side effect a crash of its own that happened between its first
    and its last copy: an action_runner kill, or a PostgreSQL restart (one per replica),
    preferably the one that caught its run in the window."""
    crashes = [(r.started, r.started, r.target, set(r.window)) for r in faults.of("kill -9")
               if r.target.startswith("action_runner")]
    for r in faults.of("PostgreSQL restart"):
        crashes += [(r.started, r.ended or r.started, "PostgreSQL restart", set(r.window))] * 2
    return match([(first - 0.5, last, what, runs) for first, last, what, runs in duplicates], crashes)


def match(repeats: list[tuple[float, float, str, set[int]]], crashes: list[tuple[float, float, str, set[int]]]
          ) -> tuple[list[str], list[str]]:
    """Match each repeat (first, last copy, what, its runs) with a distinct crash (begin,
    end, which, runs it caught) that overlaps it in time, one that caught the repeat's run
    first; (unexplained, explained)."""
    used: set[int] = set()
    unexplained, explained = [], []
    for first, last, what, runs in sorted(repeats, key=lambda d: d[1]):
        fits = [i for i, (begin, end, _, _) in enumerate(crashes) if i not in used and first <= end and begin <= last]
        fits.sort(key=lambda i: not (runs & crashes[i][3]))
        if fits:
            used.add(fits[0])
            explained.append(f"{what}: {crashes[fits[0]][2]}")
        else:
            unexplained.append(what)
    return unexplained, explained
