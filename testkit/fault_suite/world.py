"""What the suite runs and talks to: the four services as two replicas each, the fake
HasOffers, the SMTP sink, and the suite's own connections to RabbitMQ and PostgreSQL,
which outlive the restarts the suite inflicts on both."""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pika.exceptions
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from shared.db import make_engine
from shared.events import OPERATION_EXECUTED, Envelope
from shared.rabbitmq import SERVICE_BINDINGS, Bus, PublishError, queue_names
from shared.sql import run_script
from testkit import broker as broker_tools
from testkit.database import admin_url, drop_database, migrated_database
from testkit.fake_hasoffers.network import Network
from testkit.fake_hasoffers.server import FakeHasOffers
from testkit.ports import free_port
from testkit.processes import ServiceProcess, terminate_all
from testkit.smtp import FakeSmtpServer
from testkit.waiting import wait_for

SERVICES = list(SERVICE_BINDINGS)
TOKEN = "NETfault" + uuid.uuid4().hex[:16]
# The metric_loader's heartbeat: short, so that the long load outlasts several of them.
HEARTBEAT_SECONDS = 2
# Small pages, so that a cr load reads several of them; the long load has SLOW_PAGES of
# them answered slowly, so that it lasts at least LONG_LOAD_HEARTBEATS heartbeats.
REPORT_PAGE_SIZE = 100
LONG_LOAD_HEARTBEATS = 5
SLOW_PAGES, SLOW_PAGE_SECONDS = 6, 2.0
STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[fault-suite {time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


# -- service replicas --------------------------------------------------------------------------


class Replica(ServiceProcess):
    """One of a service's replicas; killed and started again, it keeps one log."""

    def __init__(self, service: str, index: int, env: dict[str, str], log_dir: Path):
        super().__init__(service, env, log_dir, log_name=f"{service}-{index}.log")
        self.index = index
        self.name = f"{service}#{index}"
        self.in_fault = threading.Lock()  # held from the kill until the restart


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
        fds = f"/proc/{replica.pid}/fd"
        for fd in os.listdir(fds):
            try:
                if os.readlink(f"{fds}/{fd}") in inodes:
                    return replica
            except OSError:
                continue
    return None


# -- the fake HasOffers' record of write calls ---------------------------------------------------


class TimedCalls(list):
    """The fake HasOffers' record of write calls, each stamped with when it was answered
    and the caller's port; `on_next_call` works as FakeSmtpServer.on_next_mail."""

    def __init__(self) -> None:
        super().__init__()
        self.peer = threading.local()
        self.on_next_call: Callable[[int], None] | None = None
        # Every Report.getStats request: (when, its parameters without the token).
        self.report_pages: list[tuple[float, tuple]] = []
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


def carried_runs(mail: Any) -> list[int]:
    """The operation runs a mail carries: its own run, or every run of a digest."""
    one = mail.header("X-KPI-Operation-Run")
    if one is not None:
        return [int(one)] if one.isdigit() else []
    return [int(run) for run in (mail.header("X-KPI-Digest-Runs") or "").split(",") if run.strip().isdigit()]


def carrier(mail: Any) -> str:
    """What a mail is a copy of: its run (the id), or its digest (by Message-ID)."""
    one = mail.header("X-KPI-Operation-Run")
    return one if one is not None else f"digest {mail.header('Message-ID')}"


def kind_of_call(call: dict[str, Any]) -> str:
    """The operation kind a HasOffers write call does."""
    return "approve_affiliate" if call.get("status") == "approved" else "reject_affiliate"


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

    def publish_raw(self, routing_key: str, body: bytes, message_id: str, type: str | None = None,
                    headers: dict[str, Any] | None = None) -> None:
        self.call(lambda bus: bus.publish_raw(routing_key, body, message_id=message_id, type=type or routing_key,
                                              headers=headers))

    def depth(self, queue: str) -> int:
        return self.call(lambda bus: bus.queue_depth(queue))

    def take_all(self, queue: str) -> list[tuple[Any, bytes]]:
        return self.call(lambda bus: broker_tools.take_all(bus.channel, queue))

    def close(self) -> None:
        if self.bus is not None:
            self.bus.close()


class Database:
    def __init__(self, engine: Engine):
        self.engine = engine

    def rows(self, sql: str, timeout: float = 240, write: bool = False, **params: Any) -> list[Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with (self.engine.begin() if write else self.engine.connect()) as conn:
                    return list(conn.execute(text(sql), params))
            except DBAPIError as exc:  # PostgreSQL restarting: try again; a bad query: fail
                if not (isinstance(exc, (OperationalError, InterfaceError)) or exc.connection_invalidated):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def scalar(self, sql: str, **params: Any) -> Any:
        return self.rows(sql, **params)[0][0]


# -- the world ---------------------------------------------------------------------------------


class World:
    """Everything the suite starts, in a database and an exchange of its own."""

    def __init__(self, args: argparse.Namespace, node_urls: list[str] | None = None):
        """`node_urls`: a RabbitMQ cluster's AMQP_URL per node (every node's URL, that node's
        first); the replicas are spread over them and the suite connects through the first."""
        self.args = args
        run_id = uuid.uuid4().hex[:8]
        self.db_name = f"kpi_fault_{run_id}"
        self.exchange = f"kpi.fault.{run_id}"
        self.observer = f"{self.exchange}.observer"
        self.log_dir = Path(tempfile.mkdtemp(prefix="kpi-fault-"))
        self.pg_admin = admin_url("FAULT_PG_ADMIN_URL")
        self.node_urls = node_urls or [broker_tools.amqp_url()]
        self.amqp_url = self.node_urls[0]
        self.replicas: list[Replica] = []
        self.unexpected_exits: list[str] = []
        self.sink: FakeSmtpServer | None = None
        self.fake: FakeHasOffers | None = None
        self.broker: Broker | None = None
        self.engine: Engine | None = None
        self.observed: list[tuple[Any, bytes]] = []  # taken off the observer queue so far

    def setup(self, network: Network, seed_sql: str) -> None:
        a = self.args
        say(f"database {self.db_name}, exchange {self.exchange}, logs in {self.log_dir}")
        self.database_url = migrated_database(self.pg_admin, self.db_name)
        self.engine = make_engine(self.database_url)
        self.db = Database(self.engine)
        run_script(self.engine, seed_sql)

        self.network = network
        self.fake = FakeHasOffers(network, network_id="fault", network_token=TOKEN, rate_limit=(1_000_000, 10.0))
        self.fake.calls = TimedCalls()
        self.fake_port = free_port()
        self.start_fake()
        self.sink = FakeSmtpServer().start()

        self.broker = Broker(self.amqp_url, self.exchange)
        self.broker.call(self._declare_observer)
        env = {"DATABASE_URL": self.database_url, "AMQP_URL": self.amqp_url,
               "KPI_EXCHANGE": self.exchange, "KPI_RETRY_DELAY_MS": str(a.retry_delay_ms),
               "KPI_RETRY_LIMIT": str(a.retry_limit), "KPI_STARTUP_ATTEMPTS": "40", "KPI_LOG_LEVEL": "INFO",
               "HASOFFERS_BASE_URL": f"http://127.0.0.1:{self.fake_port}/Apiv3/json",
               "HASOFFERS_NETWORK_ID": "fault", "HASOFFERS_NETWORK_TOKEN": TOKEN, "HASOFFERS_MAX_ATTEMPTS": "2",
               "HASOFFERS_TIMEOUT_SECONDS": "20", "HASOFFERS_RATE_LIMIT_CALLS": "10000", "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(self.sink.port), "SMTP_STARTTLS": "false",
               "SMTP_TIMEOUT_SECONDS": "5", "MAIL_FROM": "kpi@fault.example", "KPI_MIN_CLICKS": "0",
               "KPI_MIN_CONVERSIONS": "0", "KPI_SCHEDULE_METRICS_SECONDS": "0", "KPI_SCHEDULE_REFERENCE_SECONDS": "0",
               # The model runs every reject: the hourly cap (tested on its own) would hold most.
               "KPI_MAX_REJECTS_PER_HOUR": "1000000",
               # Reminders are recorded by the action_runner's ticker: soon after their check.
               "KPI_ACTIONS_TICK_SECONDS": "1"}
        per_service = {"metric_loader": {"KPI_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
                                         "KPI_REPORT_PAGE_SIZE": str(REPORT_PAGE_SIZE)}}
        for service in SERVICES:
            for index in (1, 2):
                node = self.node_urls[len(self.replicas) % len(self.node_urls)]
                replica = Replica(service, index, {**env, **per_service.get(service, {}), "AMQP_URL": node},
                                  self.log_dir)
                replica.start(wait_ready=False)
                self.replicas.append(replica)
        wait_for(lambda: all(r.ready() for r in self.replicas), 60, 0.25, "eight replicas to start")
        say(f"fake HasOffers :{self.fake_port} ({a.offers} offers, {a.affiliates} affiliates), "
            f"SMTP sink :{self.sink.port}, 4 services x 2 replicas running"
            + (f" over {len(self.node_urls)} RabbitMQ nodes" if len(self.node_urls) > 1 else ""))

    def start_fake(self) -> None:
        """Start the fake HasOffers (again, after an outage) on its port, remembering who
        calls and holding a write call when a fault asks for it."""
        if "_serve" not in vars(self.fake):
            serve, calls = self.fake._serve, self.fake.calls

            def remember_caller(request: Any, body: bytes) -> None:
                calls.peer.port = request.client_address[1]
                if b"getStats" in body or "getStats" in request.path:
                    params = parse_qsl(urlsplit(request.path).query) + parse_qsl(body.decode("utf-8", "replace"))
                    calls.report_pages.append((time.time(), tuple(sorted(p for p in params
                                                                         if p[0] != "NetworkToken"))))
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
        """A queue of our own that keeps a copy of every trigger event and operation notice
        (a quorum queue: on a cluster it outlives the loss of a node)."""
        bus.channel.queue_declare(self.observer, durable=True, arguments={"x-queue-type": "quorum"})
        for key in ("trigger.event.*", OPERATION_EXECUTED):
            bus.channel.queue_bind(self.observer, self.exchange, routing_key=key)

    def take_observed(self) -> list[tuple[Any, bytes]]:
        """What reached the observer queue since the last call (kept in `observed` too)."""
        new = self.broker.take_all(self.observer)
        self.observed += new
        return new

    def restart_dead_replicas(self) -> None:
        """A replica that exited without being killed by a fault is started again, and noted."""
        for replica in self.replicas:
            if not replica.in_fault.acquire(blocking=False):
                continue  # a fault thread has it down on purpose and will start it again
            try:
                if not replica.alive():
                    code = replica.process.returncode if replica.process else None
                    self.unexpected_exits.append(f"{replica.name} exited with {code}")
                    replica.start(wait_ready=False)
            finally:
                replica.in_fault.release()

    def load_status(self, request: Envelope) -> str | None:
        rows = self.db.rows("SELECT status FROM load_runs WHERE request_event_id = :e", e=str(request.event_id))
        return rows[0][0] if rows else None

    def activity(self) -> tuple:
        """What the pipeline has written so far, and what it still has open."""
        return tuple(self.db.rows(
            "SELECT (SELECT count(*) FROM metric_values), (SELECT count(*) FROM trigger_checks),"
            " (SELECT count(*) FROM trigger_events), (SELECT count(*) FROM operation_runs),"
            " (SELECT count(*) FROM operation_runs WHERE status = 'pending'),"
            " (SELECT count(*) FROM load_runs WHERE status IN ('requested', 'running'))")[0])

    def queues_empty(self) -> bool:
        for service in SERVICES:
            names = queue_names(self.exchange, service)
            if self.broker.depth(names.work) or self.broker.depth(names.retry):
                return False
        return True

    def stop_replicas(self) -> None:
        terminate_all(self.replicas, timeout=20)

    def teardown(self) -> None:
        self.stop_replicas()
        if self.sink is not None:
            self.sink.stop()
        if self.fake is not None:
            self.fake.stop()
        if self.broker is not None and not self.args.keep:
            try:
                self.broker.call(lambda bus: broker_tools.delete_topology(bus.channel, self.exchange, [self.observer]),
                                 timeout=30)
            except Exception:  # best effort
                pass
            self.broker.close()
        if self.engine is not None:
            self.engine.dispose()
        if not self.args.keep:
            drop_database(self.pg_admin, self.db_name)
