"""The faults, injected from background threads while the scenario drives the rounds, and
the record of each: when, on what, and which operation runs it caught between their side
effect and its commit (the window the action_runner's bound is about)."""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from shared.events import Envelope
from testkit.fake_hasoffers.server import Fault
from testkit.fault_suite.world import Replica, World, carried_runs, kind_of_call, replica_by_port
from testkit.smtp import ReceivedMail


@dataclass
class FaultRecord:
    kind: str
    target: str
    started: float
    ended: float | None = None
    note: str = ""
    round: int = 0
    window: list[int] = field(default_factory=list)  # runs it caught between side effect and commit
    down_at: float | None = None  # a server restart: stopped (PostgreSQL: no commit until it is back)


# (when, which crash, [(run, side effects so far)]) of every crash that caught runs in the window
Window = tuple[float, str, list[tuple[int, int]]]


class Faults:
    """Injects faults from background threads while the main thread drives the rounds."""

    def __init__(self, world: World, rng: random.Random):
        self.world, self.rng = world, rng
        self.round = 0  # the scenario's current round, stamped on every record
        self.records: list[FaultRecord] = []
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        # runs found with their side effect done but not committed, just after a crash
        self.windows: list[Window] = []

    def later(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        def run() -> None:
            time.sleep(delay)
            try:
                fn(*args)
            except Exception as exc:  # a fault that could not be injected is reported, not fatal
                self.record(FaultRecord("error", fn.__name__, time.time(), time.time(), f"{type(exc).__name__}: {exc}"))
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def record(self, record: FaultRecord) -> FaultRecord:
        record.round = self.round
        with self.lock:
            self.records.append(record)
        return record

    def wait(self) -> None:
        for thread in self.threads:
            thread.join()

    def last_end(self) -> float:
        return max((r.ended or r.started for r in self.records), default=time.time())

    def of(self, kind: str) -> list[FaultRecord]:
        return [r for r in self.records if r.kind == kind]

    # -- the faults themselves ------------------------------------------------------------

    def kill(self, replica: Replica, pause: float) -> None:
        if not replica.in_fault.acquire(timeout=60):  # down for another fault: wait for it
            return
        if not replica.alive():
            replica.in_fault.release()
            return
        record = self.record(FaultRecord("kill -9", replica.name, time.time()))
        replica.kill()
        self._after_kill(replica, record, pause)

    def _after_kill(self, replica: Replica, record: FaultRecord, pause: float) -> None:
        try:
            if replica.service == "action_runner":
                found = runs_in_side_effect_window(self.world)
                time.sleep(0.3)
                caught = still_in_window(self.world, found)
                record.window = [run for run, _ in caught]
                self.windows.append((record.started, replica.name, caught))
                record.note = (record.note + f"; not committed: runs {record.window}" if caught
                               else record.note).lstrip("; ")
            time.sleep(pause)
            replica.start(wait_ready=False)
            record.ended = time.time()
        finally:
            replica.in_fault.release()

    def kill_loader_after_publish(self, request: Envelope) -> None:
        """Kill the metric_loader replica whose load's batches are confirmed but whose run
        is not yet marked succeeded (DESIGN.md section 7, "Redelivery"): the suite holds
        the run's row lock, so the replica blocks in the UPDATE that marks it; kill it
        there, let go of the lock, and the redelivered request must publish the same
        batches again."""
        world = self.world
        loaders = [r for r in world.replicas if r.service == "metric_loader"]
        # No other kill of a metric_loader meanwhile: a redelivery would wait for our lock.
        held = [r for r in loaders if r.in_fault.acquire(timeout=60)]
        victim, record = None, None
        try:
            deadline = time.monotonic() + 120
            while victim is None:
                if time.monotonic() > deadline or world.load_status(request) == "succeeded":
                    self.record(FaultRecord("error", "metric_loader after publish", time.time(), time.time(),
                                            "the load finished before the suite could catch it"))
                    return
                victim, record = self._catch_loader(request, held)
                if victim is None:
                    time.sleep(0.2)
        finally:
            for replica in held:
                if replica is not victim:
                    replica.in_fault.release()
        self._after_kill(victim, record, 1.0)  # releases the victim

    def _catch_loader(self, request: Envelope, loaders: list[Replica]) -> tuple[Replica | None, FaultRecord | None]:
        """One try: hold the run while it is running; if the statement that waits for it
        marks it succeeded, kill its replica. Any other step of the run (opening it,
        recording a failed attempt) is let through."""
        world = self.world
        world.fake.inject("slow", 1, method="Report.getStats", seconds=2.0)  # keeps the load reading
        with world.engine.connect() as conn, conn.begin():
            locked = conn.execute(text("SELECT id FROM load_runs WHERE request_event_id = :e AND status = 'running'"
                                       " FOR UPDATE"), {"e": str(request.event_id)}).first()
            if locked is None:
                return None, None
            waiting: list = []
            until = time.monotonic() + 30
            while not waiting and time.monotonic() < until:
                waiting = world.db.rows(
                    "SELECT client_port, query FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND query LIKE '%load_runs%'")
                time.sleep(0.05)
            marking = [w for w in waiting if _marks_succeeded(w.query)]
            victim = replica_by_port(marking[0].client_port, loaders) if marking else None
            if victim is None:
                return None, None
            record = self.record(FaultRecord(
                "kill -9", victim.name, time.time(),
                note=f"after its load's batches were confirmed, before run {locked.id} was marked succeeded"))
            victim.kill()
            return victim, record

    def arm_kill_mid_send(self, where: str) -> None:
        """Kill the action_runner replica whose next mail (or HasOffers write) was just
        taken, before it hears the answer: the crash the action_runner's bound is about."""
        runners = [r for r in self.world.replicas if r.service == "action_runner"]

        def hook(port: int) -> None:
            victim = replica_by_port(port, runners)
            if victim is None or not victim.in_fault.acquire(blocking=False):
                self.record(FaultRecord("error", f"kill mid-send ({where})", time.time(), time.time(),
                                        f"no idle action_runner owns port {port}"))
                return
            record = self.record(FaultRecord("kill -9", victim.name, time.time(), note=f"mid-send: {where}"))
            victim.kill()
            threading.Thread(target=self._after_kill, args=(victim, record, 1.0), daemon=True).start()

        if where == "SMTP":
            self.world.sink.on_next_mail = hook
        else:
            self.world.fake.calls.on_next_call = hook

    def smtp_outage(self, seconds: float) -> None:
        record = self.record(FaultRecord("SMTP down", "sink", time.time()))
        self.world.sink.stop()
        time.sleep(seconds)
        self.world.sink.start()
        record.ended = time.time()

    def hasoffers_outage(self, seconds: float) -> None:
        fake = self.world.fake
        record = self.record(FaultRecord("HasOffers down", "fake", time.time()))
        # Refuse new connections and fail every request on kept-alive ones.
        outage = Fault("http_500", 10**9)
        with fake.lock:
            fake._faults.insert(0, outage)
        fake.stop()
        time.sleep(seconds)
        with fake.lock:
            fake._faults.remove(outage)
        self.world.start_fake()
        record.ended = time.time()

    def hasoffers_errors(self) -> None:
        fake = self.world.fake
        record = self.record(FaultRecord("HasOffers errors", "fake", time.time(),
                                         note="6 x HTTP 500 on setAffiliateApproval, 4 x rate limit, "
                                              "4 x HTTP 500 on blockAffiliate"))
        fake.inject("http_500", 6, method="Offer.setAffiliateApproval")
        fake.inject("rate_limit", 4)
        fake.inject("http_500", 4, method="Offer.blockAffiliate")
        record.ended = time.time()

    def rabbitmq_restart_holding_a_run(self) -> None:
        """Restart RabbitMQ while an action_runner replica is in the middle of a run (its
        HasOffers call held open until the other replica has reconnected): the broker gives
        the holder's delivery to the other replica, which finds the run claimed."""
        calls = self.world.fake.calls

        def hold() -> None:
            self.rabbitmq_restart(note="while an action_runner held a run (its HasOffers call kept open)")
            time.sleep(8)  # the consumers' reconnect back-off is 1 + 2 + 4 s

        calls.hold_next_write = hold
        time.sleep(3)
        if calls.take_hold() is not None:  # no call came: restart anyway
            self.rabbitmq_restart(note="no HasOffers call to hold")

    def lose_node(self, cluster: Any, i: int) -> None:
        """kill -9 a cluster node's VM (it leads every queue: they were declared through it);
        the round goes on with the other two, and so does the rest of the run."""
        record = self.record(FaultRecord("RabbitMQ node lost", cluster.node_name(i).split("@")[0], time.time(),
                                         note="kill -9 of its VM; not started again"))
        cluster.kill(i)
        record.ended = time.time()

    def rabbitmq_restart(self, note: str = "") -> None:
        record = self.record(FaultRecord("RabbitMQ restart", "broker", time.time(), note=note))
        self._restart(record, ["rabbitmqctl", "stop_app"], ["rabbitmqctl", "start_app"], 2.0)

    def postgres_restart(self, seconds: float = 3.0) -> None:
        # stop + start rather than `restart`: a restart is down for some 60 ms, which the
        # services' pool_pre_ping hides; sessions in the middle of a transaction are
        # terminated either way (fast shutdown).
        version = sorted(os.listdir("/etc/postgresql"))[0]
        ctl = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]
        record = self.record(FaultRecord("PostgreSQL restart", "database", time.time(), note=f"down {seconds:.0f}s"))
        self._restart(record, [*ctl, "stop", "-m", "fast"], [*ctl, "start"], seconds)
        # Which runs it caught in their window is worked out afterwards
        # (caught_by_database_outages): a snapshot now would race with the retries that redo them.

    def _restart(self, record: FaultRecord, stop: list[str], start: list[str], down_seconds: float) -> None:
        """Stop a server, keep it down, start it again; it is never left stopped."""
        stopped = subprocess.run(stop, capture_output=True, text=True, timeout=180)
        record.down_at = time.time()
        time.sleep(down_seconds)
        for _ in range(5):
            started = subprocess.run(start, capture_output=True, text=True, timeout=180)
            if started.returncode == 0:
                break
            time.sleep(3)
        record.ended = time.time()
        if stopped.returncode or started.returncode:
            record.kind = "error"
            record.note = f"{stop[0]} failed: {stopped.stderr.strip()} {started.stderr.strip()}"[:300]

    def caught_by_database_outages(self, runs: list, mails: list[ReceivedMail], calls: list[dict[str, Any]]) -> None:
        """The runs a PostgreSQL outage caught between side effect and commit: a side
        effect before the database went down, a commit after it came back. (A mail is
        its run's by header; a HasOffers call belongs to the first run of its kind and pair
        that finished after it.)"""
        effects: dict[int, list[float]] = defaultdict(list)
        for mail in mails:
            for run_id in carried_runs(mail):
                effects[run_id].append(mail.at)
        finished = defaultdict(list)
        for r in runs:
            if r.finished_at is not None and not r.kind.startswith("email"):
                finished[(r.kind, r.offer_id, r.affiliate_id)].append((r.finished_at.timestamp(), r.id))
        for call in calls:
            later = sorted(f for f in finished[(kind_of_call(call), call["offer_id"], call["affiliate_id"])]
                           if f[0] >= call["at"])
            if later:
                effects[later[0][1]].append(call["at"])
        done = {r.id: r.finished_at.timestamp() for r in runs if r.finished_at is not None}
        for record in self.of("PostgreSQL restart"):
            if record.down_at is None:
                continue
            # A replica that claimed a run before the server stopped may still make its side
            # effect while it is down (it learns only when it commits): the window lasts
            # until the server is back.
            back = record.ended or record.down_at
            caught = [(run, sum(1 for t in times if t < back)) for run, times in effects.items()
                      if min(times) < back and record.down_at < done.get(run, 0)]
            record.window = [run for run, _ in caught]
            if caught:
                record.note += f"; not committed: runs {record.window}"
            self.windows.append((record.started, "PostgreSQL restart", caught))


def _marks_succeeded(query: str) -> bool:
    """The statement of metric_loader/runs.py that marks a run succeeded (the server sees
    it with its parameters in place)."""
    return query.replace(" ", "").startswith("UPDATEload_runsSETstatus='succeeded'")


# -- which runs a crash caught in their window ---------------------------------------------------


def runs_in_side_effect_window(world: World) -> list[int]:
    """Runs still pending whose side effect already happened: the mail is in the sink,
    or HasOffers answered more calls for the pair than runs of that kind are final."""
    try:
        with world.engine.connect() as conn:
            pending = list(conn.execute(text(
                "SELECT r.id, r.kind, e.offer_id, e.affiliate_id FROM operation_runs r"
                " JOIN trigger_events e ON e.id = r.trigger_event_id WHERE r.status = 'pending'")))
            final = Counter((k, o, a) for k, o, a in conn.execute(text(
                "SELECT r.kind, e.offer_id, e.affiliate_id FROM operation_runs r"
                " JOIN trigger_events e ON e.id = r.trigger_event_id"
                " WHERE r.status <> 'pending' AND r.kind IN ('approve_affiliate', 'reject_affiliate')")))
    except DBAPIError:
        return []
    mailed = {str(run) for mail in world.sink.mails() for run in carried_runs(mail)}
    calls = Counter((kind_of_call(c), c["offer_id"], c["affiliate_id"]) for c in world.fake.write_calls())
    return [p.id for p in pending
            if (p.kind.startswith("email") and str(p.id) in mailed)
            or (not p.kind.startswith("email") and calls[(p.kind, p.offer_id, p.affiliate_id)]
                > final[(p.kind, p.offer_id, p.affiliate_id)])]


def still_in_window(world: World, candidates: list[int]) -> list[tuple[int, int]]:
    """Of runs found in the window a moment ago, those a crash caught there: still
    pending, or already with a second side effect (a run whose replica was alive has
    committed by now, with one). (run, side effects so far) each."""
    if not candidates:
        return []
    try:
        with world.engine.connect() as conn:
            found = list(conn.execute(text(
                "SELECT r.id, r.kind, r.status, e.offer_id, e.affiliate_id FROM operation_runs r"
                " JOIN trigger_events e ON e.id = r.trigger_event_id WHERE r.id = ANY(:ids)"), {"ids": candidates}))
            runs = Counter((k, o, a) for k, o, a in conn.execute(text(
                "SELECT r.kind, e.offer_id, e.affiliate_id FROM operation_runs r"
                " JOIN trigger_events e ON e.id = r.trigger_event_id"
                " WHERE r.kind IN ('approve_affiliate', 'reject_affiliate')")))
    except DBAPIError:
        return [(run, 0) for run in candidates]
    mails = Counter(str(run) for mail in world.sink.mails() for run in carried_runs(mail))
    calls = Counter((kind_of_call(c), c["offer_id"], c["affiliate_id"]) for c in world.fake.write_calls())
    caught = []
    for r in found:
        if r.kind.startswith("email"):
            effects, more = mails[str(r.id)], mails[str(r.id)] > 1
        else:
            key = (r.kind, r.offer_id, r.affiliate_id)
            effects, more = calls[key], calls[key] > runs[key]
        if r.status == "pending" or more:
            caught.append((r.id, effects))
    return caught
