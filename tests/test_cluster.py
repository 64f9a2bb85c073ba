"""The pipeline on a real 3-node RabbitMQ cluster loses a node mid-stream and nothing is
lost or doubled.

Three extra nodes are booted on this machine and clustered (scripts/rabbit_cluster.py;
the machine's own node is not touched). Two trigger_checker and two event_detector
replicas run, each given every node's URL starting with a different node. The queues
are quorum queues declared through node 1, so node 1 leads them all. A stream of
metric.loaded batches goes in, round after round; in the middle of a round node 1 is
killed (kill -9 of its Erlang VM): its queue leaders, the replicas connected to it and
the test's own publisher all lose it. Afterwards every value is stored once, every
check made once, the states and state changes are those of a reference computed here,
every state change was published, and no queue holds anything.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from shared.events import METRIC_LOADED, new_event
from shared.rabbitmq import CONNECTION_ERRORS, SERVICE_BINDINGS, Bus, PublishError, queue_names
from scripts import rabbit_cluster
from testkit.waiting import wait_for
from tests.trigger_scenario import (
    ExpectedCheck, Model, actual_checks, actual_events, actual_states, as_model_events, at, published_events,
)

pytestmark = pytest.mark.cluster

TRIGGERS = {"low CR": ("lt", 0.3), "high CR": ("gt", 0.7)}  # on cr; gtr values are stored, never checked
OFFERS, AFFILIATES, ROUNDS, BATCH = range(1, 11), range(1, 16), 8, 30
KILL_ROUND = 3
LEVELS = [0.1, 0.3, 0.5, 0.7, 0.9]  # 0.3 and 0.7 sit on the thresholds: OK


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    problem = rabbit_cluster.missing_requirement()
    if problem is not None and "not installed" in problem:
        pytest.skip(f"no RabbitMQ cluster test: {problem}")
    if problem is not None:
        pytest.fail(f"the RabbitMQ cluster test cannot run: {problem}")
    port_base, dist_base = rabbit_cluster.free_port_bases(3)
    tag = uuid.uuid4().hex[:6]
    cluster = rabbit_cluster.RabbitCluster(nodes=3, base=Path(f"/tmp/kpi-rabbit-cluster-{tag}"),
                                           prefix=f"kpi{tag}-n", port_base=port_base, dist_base=dist_base)
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()


def rounds() -> list[dict[tuple[str, int, int], float]]:
    """Per round, the value of every (metric, offer, affiliate): 70 % of the pairs keep one
    level, the others draw a new one every round, so states go both ways."""
    rng = random.Random(16)
    pairs = [(o, a) for o in OFFERS for a in AFFILIATES]
    steady = {pair: rng.choice(LEVELS) for pair in pairs if rng.random() < 0.7}
    return [{**{("cr", o, a): steady.get((o, a), rng.choice(LEVELS)) for o, a in pairs},
             **{("gtr", o, a): rng.choice(LEVELS) for o, a in pairs}} for _ in range(ROUNDS)]


def reference(values: list[dict]) -> tuple[dict, Model]:
    """Every check and the state changes they make, round after round (DESIGN.md section 4)."""
    checks, model = {}, Model()
    for hour, round_values in enumerate(values):
        for (metric, offer, affiliate), value in round_values.items():
            if metric != "cr":
                continue
            for name, (op, threshold) in TRIGGERS.items():
                problem = value < threshold if op == "lt" else value > threshold
                check = ExpectedCheck(value, threshold, "PROBLEM" if problem else "OK")
                checks[name, offer, affiliate, hour] = check
                model.feed((name, offer, affiliate, hour), check)
    return checks, model


class Publisher:
    """Publishes with confirms through whichever node answers, again after a lost node
    (the same event id: a copy is harmless)."""

    def __init__(self, urls: str, exchange: str):
        self.bus = Bus(urls, exchange, name="cluster test")
        self.failovers = 0

    def publish(self, event) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.bus.channel is None:
                    self.bus.connect()
                self.bus.publish(event)
                return
            except (*CONNECTION_ERRORS, PublishError):
                if time.monotonic() > deadline:
                    raise
                self.failovers += 1
                self.bus.close()
                time.sleep(0.2)


def test_losing_a_node_mid_stream_loses_and_doubles_nothing(cluster, db, exchange, start_service):
    started = time.monotonic()
    with db.begin() as conn:
        ids = {name: conn.execute(text(
            "INSERT INTO triggers (name, metric_key, operator, threshold) VALUES (:n, 'cr', :o, :t) RETURNING id"),
            {"n": name, "o": op, "t": threshold}).scalar_one() for name, (op, threshold) in TRIGGERS.items()}
    values = rounds()
    checks, model = reference(values)

    publisher = Publisher(cluster.urls_from(1), exchange)
    publisher.bus.connect()  # declares every queue through node 1: it leads them all
    env = {"KPI_RETRY_LIMIT": "10", "KPI_RETRY_DELAY_MS": "200", "KPI_STARTUP_ATTEMPTS": "5"}
    replicas = [start_service(service, AMQP_URL=cluster.urls_from(node), **env) for service, node in
                [("trigger_checker", 1), ("trigger_checker", 2), ("event_detector", 3), ("event_detector", 1)]]

    rng = random.Random(17)
    kill_seconds = None
    for hour, round_values in enumerate(values):
        items = [{"metric_key": m, "offer_id": o, "affiliate_id": a, "value": v, "measured_at": at(hour).isoformat()}
                 for (m, o, a), v in round_values.items()]
        rng.shuffle(items)
        batches = [new_event(METRIC_LOADED, {"metrics": items[i:i + BATCH]}, correlation_id=f"round-{hour}")
                   for i in range(0, len(items), BATCH)]
        for n, batch in enumerate(batches):
            if hour == KILL_ROUND and n == len(batches) // 2:
                kill_seconds = time.monotonic()
                cluster.kill(1)
            publisher.publish(batch)
        # One round at a time: a check older than its pair's state changes nothing, so the
        # outcome is exact only if each pair's rounds arrive in order.
        wait_for(lambda: states_at(db, hour) == len(TRIGGERS) * len(OFFERS) * len(AFFILIATES), 60,
                 interval=0.1, what=f"round {hour} to reach trigger_states")
        if hour == KILL_ROUND:
            kill_seconds = time.monotonic() - kill_seconds

    # Every state change is published once at least (a copy has the same event id).
    published: list = []
    action_runner = queue_names(exchange, "action_runner").work
    wait_for(lambda: published_ids(publisher, action_runner, published) == event_ids(db), 30,
             what="every trigger event to be published")

    assert actual_checks(db) == checks
    assert actual_states(db) == model.states
    assert Counter(actual_events(db)) == Counter(model.events) and model.events
    assert Counter(as_model_events(published_events(published), {v: k for k, v in ids.items()})) == \
        Counter(model.events)
    with db.connect() as conn:
        stored = conn.execute(text("SELECT count(*), count(DISTINCT (metric_key, offer_id, affiliate_id, measured_at)) "
                                   "FROM metric_values")).one()
    assert tuple(stored) == (2 * ROUNDS * len(OFFERS) * len(AFFILIATES),) * 2

    # Nothing left anywhere, and the replicas of the lost node carried on elsewhere.
    for service in SERVICE_BINDINGS:
        names = queue_names(exchange, service)
        for queue in (names.work, names.retry, names.dead):
            assert publisher.bus.queue_depth(queue) == 0, queue
    for replica in replicas:
        assert replica.process.poll() is None, replica.log()
    for replica in (replicas[0], replicas[3]):
        assert f"reconnected to amqp://guest:***@127.0.0.1:{cluster.port(2)}/%2F" in replica.log(), replica.log()
    publisher.bus.close()
    print(f"\ncluster test: {ROUNDS} rounds, {len(checks)} checks, {len(model.events)} state changes; "
          f"cluster up in {cluster.timings['up']:.1f}s; the round with the lost node took {kill_seconds:.1f}s; "
          f"publisher failovers {publisher.failovers}; test body {time.monotonic() - started:.1f}s")


def states_at(db, hour: int) -> int:
    with db.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM trigger_states WHERE measured_at = :t"),
                            {"t": at(hour)}).scalar_one()


def event_ids(db) -> set[int]:
    with db.connect() as conn:
        return set(conn.execute(text("SELECT id FROM trigger_events")).scalars())


def published_ids(publisher: Publisher, queue: str, published: list) -> set[int]:
    """Take what reached the action_runner's queue (nobody consumes it here)."""
    channel = publisher.bus.channel
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        published.append((properties, body))
    return {json.loads(body)["data"]["trigger_event_id"] for _, body in published}
