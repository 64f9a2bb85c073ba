"""Fault-injection suite: nothing is lost or doubled.

Runs the four services as two real processes each against their own database and
exchange, a fake HasOffers network and an SMTP sink; drives metric values through the
pipeline (loads through the metric_loader, the bulk as metric.loaded batches it
publishes itself) while it kills replicas with SIGKILL, restarts RabbitMQ and
PostgreSQL, takes the SMTP server and HasOffers away, publishes duplicates, stale and
poison messages. Then it waits for the pipeline to drain, compares everything with a
reference model computed from the values alone (fault_model.py) and prints a table.
Exit status 0 only when every invariant holds.

    scripts/fault-suite [--seed N] [--rounds N] [--skip-broker-restart] [--skip-db-restart]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pika.exceptions
from aiosmtpd.controller import Controller
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fault_model as fm  # noqa: E402  (scripts/ is on sys.path: this file's directory)

from testkit.fake_hasoffers.network import generate  # noqa: E402
from testkit.fake_hasoffers.server import FakeHasOffers, Fault  # noqa: E402
from shared import migrate  # noqa: E402
from shared.rabbitmq import SERVICE_BINDINGS, Bus, PublishError, queue_names  # noqa: E402
from shared.db import make_engine  # noqa: E402
from shared.events import (  # noqa: E402
    METRIC_LOAD_REQUESTED, METRIC_LOADED, OPERATION_EXECUTED, TRIGGER_CHECKED, TRIGGER_EVENT_OK,
    TRIGGER_EVENT_PROBLEM, CheckItem, Envelope, MetricLoadRequested, TriggerChecked, TriggerEvent, encode,
    new_event, stable_event_id,
)

SERVICES = list(SERVICE_BINDINGS)
DIRECT_METRICS = ("pacc", "gtr", "cap_fill")
LOOKBACK_HOURS = 96  # longer than the fake's 3 days of traffic: a load sees all of it
TOKEN = "NETfault" + uuid.uuid4().hex[:16]
STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[fault-suite {time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the SMTP sink -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SunkMail:
    at: float
    message_id: str
    run_id: str | None
    recipients: tuple[str, ...]


class MailSink:
    """aiosmtpd on a fixed port, recording every accepted message; stop() and start()
    again on the same port make an SMTP outage."""

    def __init__(self, port: int):
        self.port = port
        self.mails: list[SunkMail] = []
        self._lock = threading.Lock()
        self._controller: Controller | None = None
        # Called once with the client's port after the next mail is taken, before the
        # client hears "250": a fault that kills the sender in the middle of its send.
        self.on_next_mail: Callable[[int], None] | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd)
        message = message_from_bytes(envelope.content)
        with self._lock:
            self.mails.append(SunkMail(time.time(), str(message.get("Message-ID", "")),
                                       message.get("X-KPI-Operation-Run"), tuple(envelope.rcpt_tos)))
            hook, self.on_next_mail = self.on_next_mail, None
        if hook is not None:
            hook(session.peer[1])
        return "250 OK"

    def start(self) -> None:
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def received(self) -> list[SunkMail]:
        with self._lock:
            return list(self.mails)


class TimedCalls(list):
    """The fake HasOffers' record of write calls, each stamped with when it was answered
    and the caller's port; `on_next_call` works as MailSink.on_next_mail."""

    def __init__(self) -> None:
        super().__init__()
        self.peer = threading.local()
        self.on_next_call: Callable[[int], None] | None = None
        # Runs before the next write call is answered (the caller waits meanwhile).
        self.hold_next_write: Callable[[], None] | None = None
        self.hold_lock = threading.Lock()

    def take_hold(self) -> Callable[[], None] | None:
        with self.hold_lock:
            hold, self.hold_next_write = self.hold_next_write, None
            return hold

    def append(self, call: dict[str, Any]) -> None:
        super().append({**call, "at": time.time()})
        hook, self.on_next_call = self.on_next_call, None
        if hook is not None:
            hook(self.peer.port)


def replica_by_port(port: int, candidates: list[Replica]) -> Replica | None:
    """The replica that owns the TCP connection whose local port is `port` (/proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                parts = line.split()
                if int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{parts[9]}]")
    for replica in candidates:
        if not replica.alive():
            continue
        fds = f"/proc/{replica.process.pid}/fd"
        for fd in os.listdir(fds):
            try:
                if os.readlink(f"{fds}/{fd}") in inodes:
                    return replica
            except OSError:
                continue
    return None


# -- service replicas --------------------------------------------------------------------------


class Replica:
    def __init__(self, service: str, index: int, env: dict[str, str], log_dir: Path):
        self.service, self.index, self.env = service, index, env
        self.name = f"{service}#{index}"
        self.log_path = log_dir / f"{service}-{index}.log"
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.in_fault = threading.Lock()  # held from the kill until the restart

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", f"services.{self.service}"], cwd=ROOT,
                                        env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.starts += 1

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()  # SIGKILL, this child by its pid
        self.process.wait(10)

    def terminate(self, timeout: float = 20) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)

    def ready(self) -> bool:
        return self.log_path.exists() and "consuming" in self.log_path.read_text(errors="replace")


# -- the broker and the database, surviving their own restarts ---------------------------------

BROKER_ERRORS = (pika.exceptions.AMQPError, OSError, PublishError)


class Broker:
    """The suite's own confirming connection; every call is tried again, on a fresh
    connection, until it goes through (a publish may then happen twice: harmless)."""

    def __init__(self, url: str, exchange: str):
        self.url, self.exchange = url, exchange
        self.bus: Bus | None = None
        self.retries = 0
        self.lock = threading.Lock()

    def call(self, fn: Callable[[Bus], Any], timeout: float = 240) -> Any:
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                try:
                    if self.bus is None or self.bus.connection is None or not self.bus.connection.is_open:
                        self.bus = Bus(self.url, self.exchange, name="hasoffers-kpi fault-suite").connect()
                    return fn(self.bus)
                except BROKER_ERRORS:
                    if self.bus is not None:
                        self.bus.close()
                    self.bus = None
                    self.retries += 1
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)

    def publish(self, event: Envelope) -> None:
        self.call(lambda bus: bus.publish(event))

    def publish_raw(self, routing_key: str, body: bytes, message_id: str, type: str | None = None) -> None:
        self.call(lambda bus: bus.publish_raw(routing_key, body, message_id=message_id, type=type or routing_key))

    def depth(self, queue: str) -> int:
        return self.call(lambda bus: bus.queue_depth(queue))

    def take_all(self, queue: str) -> list[tuple[Any, bytes]]:
        def take(bus: Bus) -> list[tuple[Any, bytes]]:
            out = []
            while True:
                method, properties, body = bus.channel.basic_get(queue, auto_ack=True)
                if method is None:
                    return out
                out.append((properties, body))
        return self.call(take)

    def close(self) -> None:
        if self.bus is not None:
            self.bus.close()


class Database:
    def __init__(self, engine: Engine):
        self.engine = engine

    def rows(self, sql: str, timeout: float = 240, **params: Any) -> list[Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.engine.connect() as conn:
                    return list(conn.execute(text(sql), params))
            except DBAPIError as exc:  # PostgreSQL restarting: try again; a bad query: fail
                if not (isinstance(exc, (OperationalError, InterfaceError)) or exc.connection_invalidated):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def scalar(self, sql: str, **params: Any) -> Any:
        return self.rows(sql, **params)[0][0]


# -- faults --------------------------------------------------------------------------------------


@dataclass
class FaultRecord:
    kind: str
    target: str
    started: float
    ended: float | None = None
    note: str = ""
    round: int = 0
    window: list[int] = field(default_factory=list)  # runs it caught between side effect and commit
    down_at: float | None = None  # PostgreSQL: stopped (no commit can happen until it is back)


class Faults:
    """Injects faults from background threads while the main thread drives the rounds."""

    def __init__(self, suite: Suite, rng: random.Random):
        self.suite, self.rng = suite, rng
        self.records: list[FaultRecord] = []
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        # runs found with their side effect done but not committed, just after a crash
        self.windows: list[tuple[float, str, list[tuple[int, int]]]] = []

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
        record.round = self.suite.round
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
        replica.kill9()
        self._after_kill(replica, record, pause)

    def _after_kill(self, replica: Replica, record: FaultRecord, pause: float) -> None:
        try:
            if replica.service == "action_runner":
                found = self.suite.runs_in_side_effect_window()
                time.sleep(0.3)
                caught = self.suite.still_in_window(found)
                record.window = [run for run, _ in caught]
                self.windows.append((record.started, replica.name, caught))
                record.note = (record.note + f"; not committed: runs {record.window}" if caught
                               else record.note).lstrip("; ")
            time.sleep(pause)
            replica.start()
            record.ended = time.time()
        finally:
            replica.in_fault.release()

    def kill_loader_after_publish(self, request: Envelope) -> None:
        """Kill the metric_loader replica whose load's batches are confirmed but whose run
        is not yet marked succeeded (DESIGN.md section 7, "Redelivery"): the suite holds
        the run's row lock, so the replica blocks in the UPDATE that marks it; kill it
        there, let go of the lock, and the redelivered request must publish the same
        batches again."""
        suite = self.suite
        loaders = [r for r in suite.replicas if r.service == "metric_loader"]
        # No other kill of a metric_loader meanwhile: a redelivery would wait for our lock.
        held = [r for r in loaders if r.in_fault.acquire(timeout=60)]
        victim, record = None, None
        try:
            deadline = time.monotonic() + 120
            while victim is None:
                if time.monotonic() > deadline or suite._run_status(request) == "succeeded":
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
        suite = self.suite
        self.suite.fake.inject("slow", 1, method="Report.getStats", seconds=2.0)  # keeps the load reading
        with suite.engine.connect() as conn, conn.begin():
            locked = conn.execute(text("SELECT id FROM load_runs WHERE request_event_id = :e AND status = 'running'"
                                       " FOR UPDATE"), {"e": str(request.event_id)}).first()
            if locked is None:
                return None, None
            waiting: list = []
            until = time.monotonic() + 30
            while not waiting and time.monotonic() < until:
                waiting = suite.db.rows(
                    "SELECT client_port, query FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND query LIKE '%load_runs%'")
                time.sleep(0.05)
            marking = [w for w in waiting if w.query.startswith("UPDATE load_runs SET status = 'succeeded'")]
            victim = replica_by_port(marking[0].client_port, loaders) if marking else None
            if victim is None:
                return None, None
            record = self.record(FaultRecord(
                "kill -9", victim.name, time.time(),
                note=f"after its load's batches were confirmed, before run {locked.id} was marked succeeded"))
            victim.kill9()
            return victim, record

    def arm_kill_mid_send(self, where: str) -> None:
        """Kill the action_runner replica whose next mail (or HasOffers write) was just
        taken, before it hears the answer: the crash the action_runner's bound is about."""
        runners = [r for r in self.suite.replicas if r.service == "action_runner"]

        def hook(port: int) -> None:
            victim = replica_by_port(port, runners)
            if victim is None or not victim.in_fault.acquire(blocking=False):
                self.record(FaultRecord("error", f"kill mid-send ({where})", time.time(), time.time(),
                                        f"no idle action_runner owns port {port}"))
                return
            record = self.record(FaultRecord("kill -9", victim.name, time.time(), note=f"mid-send: {where}"))
            victim.kill9()
            threading.Thread(target=self._after_kill, args=(victim, record, 1.0), daemon=True).start()

        if where == "SMTP":
            self.suite.sink.on_next_mail = hook
        else:
            self.suite.fake.calls.on_next_call = hook

    def smtp_outage(self, seconds: float) -> None:
        record = self.record(FaultRecord("SMTP down", "sink", time.time()))
        self.suite.sink.stop()
        time.sleep(seconds)
        self.suite.sink.start()
        record.ended = time.time()

    def hasoffers_outage(self, seconds: float) -> None:
        fake = self.suite.fake
        record = self.record(FaultRecord("HasOffers down", "fake", time.time()))
        # Refuse new connections and fail every request on kept-alive ones.
        outage = Fault("http_500", 10**9)
        with fake.lock:
            fake._faults.insert(0, outage)
        fake.stop()
        time.sleep(seconds)
        with fake.lock:
            fake._faults.remove(outage)
        self.suite.start_fake()
        record.ended = time.time()

    def hasoffers_errors(self) -> None:
        fake = self.suite.fake
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
        calls = self.suite.fake.calls

        def hold() -> None:
            self.rabbitmq_restart(note="while an action_runner held a run (its HasOffers call kept open)")
            time.sleep(8)  # the consumers' reconnect back-off is 1 + 2 + 4 s

        calls.hold_next_write = hold
        time.sleep(3)
        if calls.take_hold() is not None:  # no call came: restart anyway
            self.rabbitmq_restart(note="no HasOffers call to hold")

    def rabbitmq_restart(self, note: str = "") -> None:
        record = self.record(FaultRecord("RabbitMQ restart", "broker", time.time(), note=note))
        stop = subprocess.run(["rabbitmqctl", "stop_app"], capture_output=True, text=True, timeout=180)
        time.sleep(2)
        for _ in range(5):  # never leave the broker stopped
            start = subprocess.run(["rabbitmqctl", "start_app"], capture_output=True, text=True, timeout=180)
            if start.returncode == 0:
                break
            time.sleep(3)
        record.ended = time.time()
        if stop.returncode or start.returncode:
            record.kind = "error"
            record.note = f"rabbitmqctl failed: {stop.stderr.strip()} {start.stderr.strip()}"[:300]

    def postgres_restart(self, seconds: float = 3.0) -> None:
        # stop + start rather than `restart`: a restart is down for some 60 ms, which the
        # services' pool_pre_ping hides; sessions in the middle of a transaction are
        # terminated either way (fast shutdown).
        version = sorted(os.listdir("/etc/postgresql"))[0]
        ctl = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]
        record = self.record(FaultRecord("PostgreSQL restart", "database", time.time(), note=f"down {seconds:.0f}s"))
        stop = subprocess.run([*ctl, "stop", "-m", "fast"], capture_output=True, text=True, timeout=180)
        record.down_at = time.time()
        time.sleep(seconds)
        for _ in range(5):  # never leave the database stopped
            start = subprocess.run([*ctl, "start"], capture_output=True, text=True, timeout=180)
            if start.returncode == 0:
                break
            time.sleep(3)
        record.ended = time.time()
        if stop.returncode or start.returncode:
            record.kind = "error"
            record.note = f"pg_ctlcluster failed: {stop.stderr.strip()} {start.stderr.strip()}"[:300]
        # Which runs it caught in their window is worked out afterwards (Suite.verify): a
        # snapshot now would race with the retries that redo them.


# -- the suite -----------------------------------------------------------------------------------


@dataclass
class Load:
    request: Envelope
    expected: dict[tuple[int, int], float]
    run_id: int | None = None
    measured_at: datetime | None = None


@dataclass
class Row:
    check: str
    expected: Any
    observed: Any
    violations: int
    note: str = ""


@dataclass
class Suite:
    args: argparse.Namespace
    rng: random.Random = field(init=False)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def __post_init__(self) -> None:
        self.rng = random.Random(self.args.seed)
        self.db_name = f"kpi_fault_{self.run_id}"
        self.exchange = f"kpi.fault.{self.run_id}"
        self.observer = f"{self.exchange}.observer"
        self.log_dir = Path(tempfile.mkdtemp(prefix="kpi-fault-"))
        self.pg_admin = os.environ.get("FAULT_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
        self.amqp_url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
        self.replicas: list[Replica] = []
        self.poison: dict[str, dict[str, str]] = defaultdict(dict)  # service -> message id -> what
        self.batches: dict[int, list[Envelope]] = defaultdict(list)
        self.published = Counter()
        self.loads: list[Load] = []
        self.barrier_timeouts: list[str] = []
        self.unexpected_exits: list[str] = []
        self.stats_versions: list[list] = []
        self.timings: dict[str, float] = {}
        self.round = 0
        self.sink: MailSink | None = None
        self.fake: FakeHasOffers | None = None
        self.broker: Broker | None = None
        self.engine: Engine | None = None

    # -- set-up ---------------------------------------------------------------------------

    def setup(self) -> None:
        a = self.args
        say(f"database {self.db_name}, exchange {self.exchange}, logs in {self.log_dir}")
        admin = make_engine(self.pg_admin, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.db_name}"'))
        admin.dispose()
        self.database_url = self.pg_admin.rsplit("/", 1)[0] + f"/{self.db_name}"
        migrate.upgrade(self.database_url)
        self.engine = make_engine(self.database_url)
        self.db = Database(self.engine)
        with self.engine.begin() as conn:
            conn.exec_driver_sql(fm.seed_sql())

        self.network = generate(a.seed, offers=a.offers, affiliates=a.affiliates, days=3)
        self.stats_versions.append(self.network.stats)
        self.model = fm.Model(fm.people_of(self.network))
        self.fake = FakeHasOffers(self.network, network_id="fault", network_token=TOKEN,
                                  rate_limit=(1_000_000, 10.0))
        self.fake.calls = TimedCalls()
        self.fake_port = free_port()
        self.start_fake()
        self.sink = MailSink(free_port())
        self.sink.start()

        self.broker = Broker(self.amqp_url, self.exchange)
        self.broker.call(self._declare_observer)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "DATABASE_URL": self.database_url, "AMQP_URL": self.amqp_url,
               "KPI_EXCHANGE": self.exchange, "KPI_RETRY_DELAY_MS": str(a.retry_delay_ms),
               "KPI_RETRY_LIMIT": str(a.retry_limit), "KPI_STARTUP_ATTEMPTS": "40", "KPI_LOG_LEVEL": "INFO",
               "HASOFFERS_BASE_URL": f"http://127.0.0.1:{self.fake_port}/Apiv3/json",
               "HASOFFERS_NETWORK_ID": "fault", "HASOFFERS_NETWORK_TOKEN": TOKEN, "HASOFFERS_MAX_ATTEMPTS": "2",
               "HASOFFERS_TIMEOUT_SECONDS": "20", "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(self.sink.port),
               "SMTP_TIMEOUT_SECONDS": "5", "MAIL_FROM": "kpi@fault.example", "KPI_MIN_CLICKS": "0",
               "KPI_MIN_CONVERSIONS": "0", "KPI_SCHEDULE_METRICS_SECONDS": "0", "KPI_SCHEDULE_REFERENCE_SECONDS": "0"}
        for service in SERVICES:
            for index in (1, 2):
                replica = Replica(service, index, env, self.log_dir)
                replica.start()
                self.replicas.append(replica)
        self._wait(lambda: all(r.ready() for r in self.replicas), 60, "eight replicas to start")
        say(f"fake HasOffers :{self.fake_port} ({a.offers} offers, {a.affiliates} affiliates), "
            f"SMTP sink :{self.sink.port}, 4 services x 2 replicas running")

    def start_fake(self) -> None:
        if "_serve" not in vars(self.fake):
            serve, calls = self.fake._serve, self.fake.calls

            def remember_caller(request: Any, body: bytes) -> None:
                calls.peer.port = request.client_address[1]
                if b"Method=setAffiliateApproval" in body or b"Method=blockAffiliate" in body:
                    hold = calls.take_hold()
                    if hold is not None:
                        hold()
                serve(request, body)
            self.fake._serve = remember_caller
        self.fake.start(port=self.fake_port)
        # A client that hangs up mid-answer (a killed replica) is not worth a traceback.
        self.fake._server.handle_error = lambda request, client_address: None

    def _declare_observer(self, bus: Bus) -> None:
        """A queue of our own that keeps a copy of every trigger event and operation notice."""
        bus.channel.queue_declare(self.observer, durable=True)
        for key in ("trigger.event.*", OPERATION_EXECUTED):
            bus.channel.queue_bind(self.observer, self.exchange, routing_key=key)

    def _wait(self, condition: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = condition()
            if result:
                return result
            time.sleep(0.25)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")

    # -- the run --------------------------------------------------------------------------

    def run(self) -> None:
        a = self.args
        begun = time.monotonic()
        reference = new_event(METRIC_LOAD_REQUESTED, MetricLoadRequested(metric_key="reference"),
                              correlation_id="fault-suite")
        self.broker.publish(reference)
        self._wait(lambda: self._run_status(reference) == "succeeded", 90, "the reference load")
        say("reference data loaded through the metric_loader")

        start = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(days=1)
        pairs = {"pacc": a.pacc_pairs, "gtr": a.gtr_pairs, "cap_fill": a.cap_pairs}
        self.plan = fm.plan_rounds(self.rng, self.network, a.rounds, pairs, a.volatile, 0.04, start)
        self.load_rounds = {max(1, a.rounds // 4): "as generated", max(2, a.rounds // 2): "conversions zeroed",
                            max(3, (3 * a.rounds) // 4): "as generated"}
        self.faults = Faults(self, random.Random(a.seed + 1))
        kills = self._plan_kills()
        for r in range(a.rounds):
            self.round = r + 1
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
            say(f"round {r + 1}/{a.rounds} applied in {time.monotonic() - round_began:.1f}s "
                f"({len(self.plan.rounds[r])} values{f', a cr load of {len(load.expected)}' if load else ''})")
        self.timings["rounds"] = time.monotonic() - begun
        for armed, where in ((self.sink.on_next_mail, "SMTP"), (self.fake.calls.on_next_call, "HasOffers")):
            if armed is not None:
                self.faults.record(FaultRecord("error", f"kill mid-send ({where})", time.time(), time.time(),
                                               "armed, but nothing was sent afterwards"))
        self.sink.on_next_mail = self.fake.calls.on_next_call = None
        self.faults.wait()
        self._restart_dead_replicas()
        last_fault = self.faults.last_end()
        say("every fault injected; waiting for the pipeline to drain")
        self._drain()
        self.timings["drain after the last fault"] = time.time() - last_fault
        for replica in self.replicas:
            replica.terminate()

    def _run_status(self, request: Envelope) -> str | None:
        rows = self.db.rows("SELECT status FROM load_runs WHERE request_event_id = :e", e=str(request.event_id))
        return rows[0][0] if rows else None

    # -- faults per round ---------------------------------------------------------------------

    def _plan_kills(self) -> dict[int, list[tuple[float, Replica, float]]]:
        """Every replica once and the action_runner's twice more, at random moments of
        random rounds: (delay after the round starts publishing, victim, pause). Not in the
        rounds of the broker and database restarts: those must find every replica at work."""
        victims = list(self.replicas) + [r for r in self.replicas if r.service == "action_runner"]
        self.rng.shuffle(victims)
        victims = (victims * math.ceil(self.args.kills / len(victims)))[:self.args.kills]
        n = self.args.rounds
        rounds = [r for r in range(n) if r not in (min(3, n - 1), min(5, n - 1))] or list(range(n))
        plan: dict[int, list] = defaultdict(list)
        for victim in victims:
            plan[self.rng.choice(rounds)].append(
                (self.rng.uniform(0.2, 4.0), victim, self.rng.uniform(0.5, 3.0)))
        return plan

    def _faults_of_round(self, r: int, kills: list[tuple[float, Replica, float]]) -> None:
        f, n = self.faults, self.args.rounds
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

    def _restart_dead_replicas(self) -> None:
        for replica in self.replicas:
            if not replica.in_fault.acquire(blocking=False):
                continue  # a fault thread has it down on purpose and will start it again
            try:
                if not replica.alive():
                    code = replica.process.returncode if replica.process else None
                    self.unexpected_exits.append(f"{replica.name} exited with {code}")
                    replica.start()
            finally:
                replica.in_fault.release()

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
        for kind in POISON.get(r, []) + (POISON_LAST if r == self.args.rounds - 1 else []):
            messages.append(self._poison(kind, items, stamp))
        while items:
            size = self.rng.randint(40, 400)
            batch, items = items[:size], items[size:]
            envelope = self._envelope(batch, stamp)
            self.batches[r].append(envelope)
            messages.append(lambda e=envelope: self._publish(e, "metric.loaded batches"))
            if self.rng.random() < 0.12:  # the same message twice
                messages.append(lambda e=envelope: self._publish(e, "metric.loaded published twice"))
        self.rng.shuffle(messages)  # batches out of order, copies before originals, poison anywhere
        for publish in messages:
            publish()

    def _publish(self, event: Envelope, what: str) -> None:
        self.broker.publish(event)
        self.published[what] += 1

    def _poison(self, kind: str, items: list, stamp: datetime) -> Callable[[], None]:
        """A message that must end in exactly one dead letter; valid items it carries are
        taken from the round (and so must be processed)."""
        message_id = str(uuid.uuid4())

        def raw(service: str, routing_key: str, body: bytes) -> Callable[[], None]:
            self.poison[service][message_id] = kind

            def publish() -> None:
                self.broker.publish_raw(routing_key, body, message_id)
                self.published["poison"] += 1
            return publish

        def batch_with(bad: list[dict], valid: int) -> bytes:
            good = [items.pop() for _ in range(min(valid, len(items)))]
            body = json.loads(encode(self._envelope(good, stamp, uuid.UUID(message_id))))
            body["data"]["metrics"][1:1] = bad
            return json.dumps(body).encode()  # NaN stays NaN

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
            data = TriggerEvent(trigger_event_id=2_000_000_000 if unknown else 1, trigger_id=fm.MIN_CR,
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
        checks = self.db.rows(
            "SELECT c.id, c.trigger_id, t.name, t.metric_key, c.offer_id, c.affiliate_id, c.value, c.operator,"
            " c.threshold, c.status, c.measured_at FROM trigger_checks c JOIN triggers t ON t.id = c.trigger_id"
            " WHERE c.measured_at <= :ts ORDER BY random() LIMIT 200", ts=self.plan.stamps[r - 1])
        if checks:
            items = [CheckItem(check_id=c.id, trigger_id=c.trigger_id, trigger_name=c.name, metric_key=c.metric_key,
                               offer_id=c.offer_id, affiliate_id=c.affiliate_id, value=c.value, operator=c.operator,
                               threshold=c.threshold, status=c.status, measured_at=c.measured_at) for c in checks]
            self._publish(new_event(TRIGGER_CHECKED, TriggerChecked(checks=items), correlation_id="fault-suite"),
                          "trigger.checked of old checks")
        events = self.db.rows(
            "SELECT e.id, e.trigger_id, t.name, e.offer_id, e.affiliate_id, e.previous_status, e.status, e.value,"
            " e.threshold, e.measured_at, e.check_id FROM trigger_events e JOIN triggers t ON t.id = e.trigger_id"
            " ORDER BY random() LIMIT 60")
        for e in events:
            data = TriggerEvent(trigger_event_id=e.id, trigger_id=e.trigger_id, trigger_name=e.name,
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
        with self.fake.lock:
            self.network.stats = stats
            self.fake._reports.clear()
        expected = fm.cr_values(stats, set(self.network.offers), datetime.now(timezone.utc), LOOKBACK_HOURS)
        request = new_event(METRIC_LOAD_REQUESTED, MetricLoadRequested(metric_key="cr", lookback_hours=LOOKBACK_HOURS),
                            correlation_id="fault-suite")
        load = Load(request, expected)
        self.loads.append(load)
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
        stamp = self.plan.stamps[r]
        expected = fm.Model.checks_of(self.plan.rounds[r])
        direct = [t.id for t in fm.TRIGGERS if t.active and t.metric in DIRECT_METRICS]
        cr = [t.id for t in fm.TRIGGERS if t.active and t.metric == "cr"]
        deadline = time.monotonic() + self.args.barrier_timeout
        while True:
            self._restart_dead_replicas()
            applied = self.db.scalar("SELECT count(*) FROM trigger_states WHERE trigger_id = ANY(:t)"
                                     " AND measured_at = :ts", t=direct, ts=stamp)
            load_done = True
            if load is not None:
                run = self.db.rows("SELECT id, status, measured_at, error FROM load_runs WHERE request_event_id = :e",
                                   e=str(load.request.event_id))
                load_done = False
                if run and run[0].status == "succeeded":
                    load.run_id, load.measured_at = run[0].id, run[0].measured_at
                    # the window is the run's; the expectation was made at the request
                    load.expected = fm.cr_values(self.network.stats, set(self.network.offers), load.measured_at,
                                                 LOOKBACK_HOURS)
                    load_done = self.db.scalar(
                        "SELECT count(*) FROM trigger_states WHERE trigger_id = ANY(:t) AND measured_at = :ts",
                        t=cr, ts=load.measured_at) == len(cr) * len(load.expected)
                elif run and run[0].status == "failed":
                    self.barrier_timeouts.append(f"round {r + 1}: the cr load failed: {run[0].error}")
                    load.measured_at = None
                    load_done = True
            undecided = self.db.scalar(
                "SELECT count(*) FROM trigger_events e WHERE e.trigger_id = ANY(:t)"
                " AND NOT EXISTS (SELECT 1 FROM operation_runs o WHERE o.trigger_event_id = e.id)",
                t=list(fm.MULTI_CONDITION_TRIGGERS))
            if applied == expected and load_done and undecided == 0:
                return
            if time.monotonic() > deadline:
                self.barrier_timeouts.append(
                    f"round {r + 1}: {applied}/{expected} checks applied, load done {load_done}, "
                    f"{undecided} undecided events")
                return
            time.sleep(0.25)

    def _activity(self) -> tuple:
        return tuple(self.db.rows(
            "SELECT (SELECT count(*) FROM metric_values), (SELECT count(*) FROM trigger_checks),"
            " (SELECT count(*) FROM trigger_events), (SELECT count(*) FROM operation_runs),"
            " (SELECT count(*) FROM operation_runs WHERE status = 'pending'),"
            " (SELECT count(*) FROM load_runs WHERE status IN ('requested', 'running'))")[0])

    def _queues_empty(self) -> bool:
        for service in SERVICES:
            names = queue_names(self.exchange, service)
            if self.broker.depth(names.work) or self.broker.depth(names.retry):
                return False
        return True

    def _drain(self) -> None:
        """Idle: no run pending, no load open, work and retry queues empty, and nothing
        written for 3 seconds."""
        deadline = time.monotonic() + self.args.drain_timeout
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            self._restart_dead_replicas()
            now = self._activity()
            if now != last:
                last, since = now, time.monotonic()
            elif now[4] == 0 and now[5] == 0 and self._queues_empty() and time.monotonic() - since >= 3:
                return
            time.sleep(0.5)
        self.barrier_timeouts.append("the pipeline did not drain in time")

    def runs_in_side_effect_window(self) -> list[int]:
        """Runs still pending whose side effect already happened: the mail is in the sink,
        or HasOffers answered more calls for the pair than runs of that kind are final."""
        try:
            with self.engine.connect() as conn:
                pending = list(conn.execute(text(
                    "SELECT r.id, r.kind, e.offer_id, e.affiliate_id FROM operation_runs r"
                    " JOIN trigger_events e ON e.id = r.trigger_event_id WHERE r.status = 'pending'")))
                final = Counter((k, o, a) for k, o, a in conn.execute(text(
                    "SELECT r.kind, e.offer_id, e.affiliate_id FROM operation_runs r"
                    " JOIN trigger_events e ON e.id = r.trigger_event_id"
                    " WHERE r.status <> 'pending' AND r.kind IN ('approve_affiliate', 'reject_affiliate')")))
        except DBAPIError:
            return []
        mailed = {m.run_id for m in self.sink.received()}
        calls = Counter((_kind_of_call(c), c["offer_id"], c["affiliate_id"]) for c in self.fake.write_calls())
        return [p.id for p in pending
                if (p.kind.startswith("email") and str(p.id) in mailed)
                or (not p.kind.startswith("email") and calls[(p.kind, p.offer_id, p.affiliate_id)]
                    > final[(p.kind, p.offer_id, p.affiliate_id)])]

    def _database_windows(self, runs: list, mails: list[SunkMail], calls: list[dict[str, Any]]) -> None:
        """The runs a PostgreSQL outage caught between side effect and commit: a side
        effect before the database went down, a commit after it came back. (A mail is
        its run's by header; a HasOffers call belongs to the first run of its kind and pair
        that finished after it.)"""
        effects: dict[int, list[float]] = defaultdict(list)
        for mail in mails:
            if mail.run_id and mail.run_id.isdigit():
                effects[int(mail.run_id)].append(mail.at)
        finished = defaultdict(list)
        for r in runs:
            if r.finished_at is not None and not r.kind.startswith("email"):
                finished[(r.kind, r.offer_id, r.affiliate_id)].append((r.finished_at.timestamp(), r.id))
        for call in calls:
            later = sorted(f for f in finished[(_kind_of_call(call), call["offer_id"], call["affiliate_id"])]
                           if f[0] >= call["at"])
            if later:
                effects[later[0][1]].append(call["at"])
        done = {r.id: r.finished_at.timestamp() for r in runs if r.finished_at is not None}
        for record in self.faults.of("PostgreSQL restart"):
            if record.down_at is None:
                continue
            caught = [(run, sum(1 for t in times if t < record.down_at)) for run, times in effects.items()
                      if min(times) < record.down_at < done.get(run, 0)]
            record.window = [run for run, _ in caught]
            if caught:
                record.note += f"; not committed: runs {record.window}"
            self.faults.windows.append((record.started, "PostgreSQL restart", caught))

    def still_in_window(self, candidates: list[int]) -> list[tuple[int, int]]:
        """Of runs found in the window a moment ago, those a crash caught there: still
        pending, or already with a second side effect (a run whose replica was alive has
        committed by now, with one). (run, side effects so far) each."""
        if not candidates:
            return []
        try:
            with self.engine.connect() as conn:
                found = list(conn.execute(text(
                    "SELECT r.id, r.kind, r.status, e.offer_id, e.affiliate_id FROM operation_runs r"
                    " JOIN trigger_events e ON e.id = r.trigger_event_id WHERE r.id = ANY(:ids)"), {"ids": candidates}))
                runs = Counter((k, o, a) for k, o, a in conn.execute(text(
                    "SELECT r.kind, e.offer_id, e.affiliate_id FROM operation_runs r"
                    " JOIN trigger_events e ON e.id = r.trigger_event_id"
                    " WHERE r.kind IN ('approve_affiliate', 'reject_affiliate')")))
        except DBAPIError:
            return [(run, 0) for run in candidates]
        mails = Counter(m.run_id for m in self.sink.received())
        calls = Counter((_kind_of_call(c), c["offer_id"], c["affiliate_id"]) for c in self.fake.write_calls())
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

    # -- verification ---------------------------------------------------------------------------

    def verify(self) -> tuple[list[Row], dict[str, Any]]:
        m, rows = self.model, []
        db = self.db

        values = {(r.metric_key, r.offer_id, r.affiliate_id, r.measured_at): r.value
                  for r in db.rows("SELECT metric_key, offer_id, affiliate_id, measured_at, value FROM metric_values")}
        lost = [k for k in m.values if k not in values]
        extra = [k for k in values if k not in m.values]
        wrong = [k for k in m.values if k in values and values[k] != m.values[k]]
        rows.append(Row("metric values stored once (lost / extra / other value)", len(m.values), len(values),
                        len(lost) + len(extra) + len(wrong), f"{len(lost)} / {len(extra)} / {len(wrong)}"))

        checks = Counter()
        statuses = {}
        for r in db.rows("SELECT trigger_id, offer_id, affiliate_id, measured_at, status FROM trigger_checks"):
            checks[(r.trigger_id, r.offer_id, r.affiliate_id, r.measured_at)] += 1
            statuses[(r.trigger_id, r.offer_id, r.affiliate_id, r.measured_at)] = r.status
        for t in fm.TRIGGERS:
            expected = {k: s for k, s in m.checks.items() if k[0] == t.id}
            observed = {k: n for k, n in checks.items() if k[0] == t.id}
            missing = sum(1 for k in expected if k not in observed)
            doubled = sum(n - 1 for n in observed.values() if n > 1) + sum(1 for k in observed if k not in expected)
            wrong = sum(1 for k, s in expected.items() if k in statuses and statuses[k] != s)
            rows.append(Row(f"  checks of '{t.name}' (missing / duplicated / other status)", len(expected),
                            sum(observed.values()), missing + doubled + wrong, f"{missing} / {doubled} / {wrong}"))

        states = {(r.trigger_id, r.offer_id, r.affiliate_id): fm.State(r.status, r.since, r.measured_at)
                  for r in db.rows("SELECT trigger_id, offer_id, affiliate_id, status, since, measured_at"
                                   " FROM trigger_states")}
        wrong_states = sum(1 for k, s in m.states.items() if states.get(k) != s) + \
            sum(1 for k in states if k not in m.states)
        rows.append(Row("final trigger_states (status, since, measured_at)", len(m.states), len(states), wrong_states))

        events = Counter()
        event_rows = db.rows("SELECT id, trigger_id, offer_id, affiliate_id, measured_at, previous_status, status"
                             " FROM trigger_events")
        event_ids = {}
        for e in event_rows:
            events[(e.trigger_id, e.offer_id, e.affiliate_id, e.measured_at, e.previous_status, e.status)] += 1
            event_ids[e.id] = e
        expected_events = Counter((*k, prev, status) for k, (prev, status) in m.events.items())
        lost_events = sum((expected_events - events).values())
        doubled_events = sum((events - expected_events).values())
        rows.append(Row("state changes -> trigger_events (lost / doubled or wrong)", sum(expected_events.values()),
                        sum(events.values()), lost_events + doubled_events, f"{lost_events} / {doubled_events}"))

        # What went over the bus: the observer queue kept a copy of every announcement.
        announced, notices, deliveries = set(), set(), Counter()
        poison_ids = {i for ids in self.poison.values() for i in ids}
        for properties, body in self.broker.take_all(self.observer):
            if properties.message_id in poison_ids:
                continue
            message = json.loads(body)
            deliveries[message["type"].startswith("trigger.event")] += 1
            if message["type"] == OPERATION_EXECUTED:
                notices.add(message["data"]["operation_run_id"])
            else:
                announced.add(message["data"]["trigger_event_id"])
        not_announced = len(set(event_ids) - announced)
        rows.append(Row("trigger events announced on the bus (missing)", len(event_ids), len(announced),
                        not_announced, f"{deliveries[True]} deliveries: duplicates absorbed downstream"))

        runs = db.rows("SELECT r.id, r.action_id, r.operation_id, r.kind, r.status, r.detail, r.finished_at,"
                       " e.offer_id, e.affiliate_id, e.measured_at FROM operation_runs r JOIN trigger_events e"
                       " ON e.id = r.trigger_event_id")
        by_key = defaultdict(list)
        for r in runs:
            by_key[(r.action_id, r.operation_id, r.offer_id, r.affiliate_id, r.measured_at)].append(r)
        missing_runs = [k for k in m.runs if k not in by_key]
        doubled_runs = sum(len(v) - 1 for v in by_key.values()) + sum(len(v) for k, v in by_key.items()
                                                                      if k not in m.runs)
        wrong_runs = [(k, v[0].status, v[0].detail) for k, v in by_key.items()
                      if k in m.runs and v[0].status != m.runs[k].status]
        rows.append(Row("operation runs, one per (event, action, operation) (missing / duplicated / other outcome)",
                        len(m.runs), len(runs), len(missing_runs) + doubled_runs + len(wrong_runs),
                        f"{len(missing_runs)} / {doubled_runs} / {len(wrong_runs)}"))
        final_runs = {r.id for r in runs if r.status != "pending"}
        rows.append(Row("final runs announced as operation.executed (missing)", len(final_runs), len(notices),
                        len(final_runs - notices)))

        # Side effects.
        mails = self.sink.received()
        per_run = Counter(mail.run_id for mail in mails)
        per_message_id = Counter(mail.message_id for mail in mails)
        sending = {str(r.id): r for r in runs if r.kind.startswith("email") and r.status == "succeeded"}
        expected_mails = sum(1 for run in m.runs.values() if run.kind.startswith("email") and run.status == "succeeded")
        unsent = [i for i in sending if per_run[i] == 0]
        stray = [i for i in per_run if i not in sending]
        wrong_to = []
        for run_id, run in sending.items():
            expectation = m.runs.get((run.action_id, run.operation_id, run.offer_id, run.affiliate_id, run.measured_at))
            got = {mail.recipients for mail in mails if mail.run_id == run_id}
            if expectation is not None and got and got != {expectation.recipients}:
                wrong_to.append(run_id)
        mail_dups = [(i, n) for i, n in per_run.items() if n > 1]
        mid_dups = sum(n - 1 for n in per_message_id.values() if n > 1)
        rows.append(Row("emails, one per sending run (missing / stray / wrong recipients)", expected_mails,
                        len(mails), len(unsent) + len(stray) + len(wrong_to),
                        f"{len(unsent)} / {len(stray)} / {len(wrong_to)}"))

        calls = self.fake.write_calls()
        observed_calls = Counter((c["method"], c["offer_id"], c["affiliate_id"], c.get("status")) for c in calls)
        expected_calls = Counter(run.call for run in m.runs.values() if run.call)
        missing_calls = expected_calls - observed_calls
        extra_calls = observed_calls - expected_calls
        rows.append(Row("HasOffers approve/reject calls (missing)", sum(expected_calls.values()), len(calls),
                        sum(missing_calls.values())))

        # Duplicated side effects, each explained by a crash between its two copies.
        duplicates = []
        for run_id, n in mail_dups:
            times = sorted(mail.at for mail in mails if mail.run_id == run_id)
            duplicates += [(times[0], times[-1], f"mail of run {run_id}", {int(run_id)})] * (n - 1)
        for key, n in extra_calls.items():
            times = sorted(c["at"] for c in calls
                           if (c["method"], c["offer_id"], c["affiliate_id"], c.get("status")) == key)
            kind = _kind_of_call({"status": key[3]})
            of_pair = {r.id for r in runs if (r.kind, r.offer_id, r.affiliate_id) == (kind, key[1], key[2])}
            duplicates += [(times[0], times[-1], f"{key[0]} offer {key[1]} affiliate {key[2]}", of_pair)] * n
        self._database_windows(runs, mails, calls)
        unexplained, explained = match_crashes(duplicates, self.faults)
        # A crash counts once (a PostgreSQL restart once per replica), and a run stuck in its
        # window counts once however many crashes see it there before it is done again.
        seen: set[tuple[int, int]] = set()
        windows = 0
        for _, what, caught in sorted(self.faults.windows, key=lambda w: w[0]):
            windows += len([c for c in caught if c not in seen][:2 if what == "PostgreSQL restart" else 1])
            seen.update(caught)
        runner_kills = [r for r in self.faults.of("kill -9") if r.target.startswith("action_runner")]
        dup_total = sum(n - 1 for _, n in mail_dups) + sum(extra_calls.values())
        rows.append(Row("emails sent twice (same run / same Message-ID)", 0, f"{len(mail_dups)} / {mid_dups}",
                        0, "counted in the bound below"))
        rows.append(Row("HasOffers calls doubled", 0, sum(extra_calls.values()), 0, "counted in the bound below"))
        rows.append(Row("side effects repeated after a crash <= crashes in the send window", f"<= {windows}",
                        dup_total, max(0, dup_total - windows) + len(unexplained),
                        f"{len(runner_kills)} action_runner kills, {windows} landed between a side effect and "
                        f"its commit (incl. PostgreSQL restarts); unexplained: {unexplained or 'none'}"))

        # Queues: the services are stopped, so nothing is held unacked any more.
        left = {s: self.broker.depth(queue_names(self.exchange, s).work) +
                self.broker.depth(queue_names(self.exchange, s).retry) for s in SERVICES}
        rows.append(Row("messages left in work + retry queues", 0, sum(left.values()), sum(left.values()),
                        ", ".join(f"{s} {n}" for s, n in left.items() if n)))
        for service in SERVICES:
            dead = self.broker.take_all(queue_names(self.exchange, service).dead)
            ids = Counter(p.message_id for p, _ in dead)
            expected_ids = set(self.poison[service])
            stray_dead = [(p.message_id, (p.headers or {}).get("x-kpi-dead-reason", "")[:120]) for p, _ in dead
                          if p.message_id not in expected_ids]
            missing_dead = expected_ids - set(ids)
            # Dead-lettering is at-least-once: a crash between publishing the dead letter and
            # acking the message repeats it (same message id and reason). Each repeat must
            # have a crash of its own: a kill of this service's replica or a broker restart.
            repeats = []
            for message_id, n in ids.items():
                if n > 1 and message_id in expected_ids:
                    stamps = sorted(_epoch((p.headers or {}).get("x-kpi-dead-at")) for p, _ in dead
                                    if p.message_id == message_id)
                    repeats += [(stamps[0] - 1, stamps[-1] + 1, self.poison[service][message_id], set())] * (n - 1)
            crashes = [(r.started, r.ended or r.started, r.target, set()) for r in self.faults.records
                       if (r.kind == "kill -9" and r.target.startswith(service)) or r.kind == "RabbitMQ restart"]
            unexplained_repeats, explained_repeats = match(repeats, crashes)
            rows.append(Row(f"dead letters of {service}: one per poison message (missing / stray / repeated)",
                            len(expected_ids), len(dead), len(stray_dead) + len(missing_dead) + len(unexplained_repeats),
                            f"{len(missing_dead)} / {len(stray_dead)} / {len(repeats)}"
                            + (f"; repeated after a crash: {'; '.join(explained_repeats)}" if explained_repeats else "")
                            + (f"; UNEXPLAINED repeat: {unexplained_repeats}" if unexplained_repeats else "")
                            + (f"; stray: {stray_dead[:3]}" if stray_dead else "")))

        loads = db.rows("SELECT metric_key, status, values_published, error FROM load_runs ORDER BY id")
        failed_loads = [lr for lr in loads if lr.status != "succeeded"]
        rows.append(Row("load runs succeeded", len(loads), len(loads) - len(failed_loads), len(failed_loads),
                        "; ".join(f"{lr.metric_key} {lr.status} {lr.error}" for lr in failed_loads)[:200]))
        rows.append(Row("replicas that exited on their own", 0, len(self.unexpected_exits),
                        len(self.unexpected_exits), "; ".join(self.unexpected_exits)))
        errors = self.faults.of("error")
        planned = ["kill -9", "SMTP down", "HasOffers down", "HasOffers errors"]
        planned += [] if self.args.skip_broker_restart else ["RabbitMQ restart"]
        planned += [] if self.args.skip_db_restart else ["PostgreSQL restart"]
        absent = [kind for kind in planned if not self.faults.of(kind)]
        rows.append(Row("faults injected as planned (failed / kinds missing)", len(planned),
                        len(planned) - len(absent), len(errors) + len(absent),
                        "; ".join([f"{e.target}: {e.note}" for e in errors] + absent)[:300]))
        rows.append(Row("rounds applied within the barrier timeout", self.args.rounds,
                        self.args.rounds - len(self.barrier_timeouts), len(self.barrier_timeouts),
                        "; ".join(self.barrier_timeouts)[:300]))
        details = {"lost values": lost[:5], "extra values": extra[:5], "missing runs": missing_runs[:5],
                   "runs with another outcome": wrong_runs[:5], "missing calls": list(missing_calls.items())[:5],
                   "unsent mails": unsent[:5], "stray mails": stray[:5], "duplicates": explained[:10],
                   "final runs never announced": sorted(final_runs - notices)[:10],
                   "trigger events never announced": sorted(set(event_ids) - announced)[:10]}
        return rows, details


POISON = {
    1: ["loaded: invalid JSON", "request: unknown metric key"],
    2: ["loaded: NaN value and unknown metric beside valid items", "checked: unknown check id"],
    3: ["loaded: ids out of range beside valid items", "event: unknown trigger event"],
    4: ["loaded: every item invalid", "request: invalid JSON"],
    5: ["loaded: envelope without event_id", "checked: invalid JSON"],
    6: ["event: status does not match the type"],
}
POISON_LAST: list[str] = []  # with fewer rounds, what did not fit goes into the last one


def _kind_of_call(call: dict[str, Any]) -> str:
    return "approve_affiliate" if call.get("status") == "approved" else "reject_affiliate"


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


def print_report(suite: Suite, rows: list[Row], details: dict[str, Any], elapsed: float) -> bool:
    a = suite.args
    ok = all(row.violations == 0 for row in rows)
    width = max(len(r.check) for r in rows)
    out = ["", "=" * 100, "hasoffers-kpi fault suite", "=" * 100,
           f"seed {a.seed}; {a.rounds} rounds; fake network {a.offers} offers x {a.affiliates} affiliates; "
           f"direct pairs pacc {a.pacc_pairs}, gtr {a.gtr_pairs}, cap_fill {a.cap_pairs} ({a.volatile:.0%} volatile); "
           f"4 services x 2 replicas; KPI_RETRY_DELAY_MS {a.retry_delay_ms}, KPI_RETRY_LIMIT {a.retry_limit}",
           f"published: " + ", ".join(f"{k} {v}" for k, v in sorted(suite.published.items())),
           "", "Faults injected:"]
    kinds = Counter(r.kind for r in suite.faults.records)
    out.append("  " + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())))
    for r in sorted(suite.faults.records, key=lambda r: r.started):
        span = f"{(r.ended or r.started) - r.started:5.1f}s"
        out.append(f"  round {r.round}  {time.strftime('%H:%M:%S', time.gmtime(r.started))}Z  {r.kind:<18} "
                   f"{r.target:<18} {span}  {r.note}")
    out += ["", f"{'check':<{width}}  {'expected':>9}  {'observed':>9}  {'bad':>4}  verdict  note", "-" * 120]
    for r in rows:
        out.append(f"{r.check:<{width}}  {str(r.expected):>9}  {str(r.observed):>9}  {r.violations:>4}  "
                   f"{'ok' if r.violations == 0 else 'FAIL':<7}  {r.note}")
    out.append("-" * 120)
    out.append(f"time to drain after the last fault: {suite.timings.get('drain after the last fault', 0):.1f}s; "
               f"rounds {suite.timings.get('rounds', 0):.1f}s; whole suite {elapsed:.1f}s; "
               f"suite's publisher reconnects {suite.broker.retries}")
    for name, items in details.items():
        if items and (not ok or name == "duplicates"):
            out.append(f"{name}: {items}")
    out.append(f"VERDICT: {'PASS' if ok else 'FAIL'}")
    print("\n".join(out), flush=True)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--offers", type=int, default=25)
    parser.add_argument("--affiliates", type=int, default=40)
    parser.add_argument("--pacc-pairs", type=int, default=1000)
    parser.add_argument("--gtr-pairs", type=int, default=800)
    parser.add_argument("--cap-pairs", type=int, default=700)
    parser.add_argument("--volatile", type=float, default=0.12, help="share of pairs whose level changes")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--retry-delay-ms", type=int, default=750)
    parser.add_argument("--retry-limit", type=int, default=40)
    parser.add_argument("--barrier-timeout", type=float, default=150)
    parser.add_argument("--drain-timeout", type=float, default=150)
    parser.add_argument("--skip-broker-restart", action="store_true", help="do not restart RabbitMQ")
    parser.add_argument("--skip-db-restart", action="store_true", help="do not restart PostgreSQL")
    parser.add_argument("--keep", action="store_true", help="keep the database and the queues for inspection")
    args = parser.parse_args()
    for r in sorted(POISON):
        if r >= args.rounds:
            POISON_LAST.extend(POISON.pop(r))

    suite = Suite(args)
    ok = False
    try:
        suite.setup()
        suite.run()
        rows, details = suite.verify()
        ok = print_report(suite, rows, details, time.monotonic() - STARTED)
    except Exception as exc:
        say(f"FAILED: {type(exc).__name__}: {exc}; logs are in {suite.log_dir}")
        raise
    finally:
        teardown(suite)
    say(f"finished in {time.monotonic() - STARTED:.1f}s; logs in {suite.log_dir}")
    return 0 if ok else 1


def teardown(suite: Suite) -> None:
    for replica in suite.replicas:
        replica.terminate()
    if suite.sink is not None:
        suite.sink.stop()
    if suite.fake is not None:
        suite.fake.stop()
    if suite.broker is not None and not suite.args.keep:
        def delete(bus: Bus) -> None:
            for service in SERVICES:
                names = queue_names(suite.exchange, service)
                for queue in (names.work, names.retry, names.dead):
                    bus.channel.queue_delete(queue)
            bus.channel.queue_delete(suite.observer)
            bus.channel.exchange_delete(suite.exchange)
        try:
            suite.broker.call(delete, timeout=30)
        except Exception:  # best effort
            pass
        suite.broker.close()
    if suite.engine is not None:
        suite.engine.dispose()
    if not suite.args.keep:
        admin = make_engine(suite.pg_admin, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{suite.db_name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    sys.exit(main())
