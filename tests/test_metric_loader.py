"""The metric loader as a real process, against the fake HasOffers over real HTTP.

The values it publishes are compared with a computation written here, straight from
the fake's raw StatRows (not with the loader's own code).
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from shared.rabbitmq import queue_names, read_dead_letters
from shared.events import METRIC_LOAD_REQUESTED, MetricLoadRequested, new_event
from shared.vocabulary import METRIC_KEYS
from testkit.fake_hasoffers.network import Network, generate
from testkit.fake_hasoffers.server import FakeHasOffers
from testkit.waiting import wait_for
from tests.support import drain, queue_depth

TOKEN = "NETloader-" + uuid.uuid4().hex
GENERAL_MIN_CLICKS = 20
GENERAL_MIN_CONVERSIONS = 3
CLICK_COST = 0.01


@pytest.fixture
def network() -> Network:
    return generate(11, offers=12, affiliates=10, days=3)


@pytest.fixture
def fake(network):
    fake = FakeHasOffers(network, network_id="net-test", network_token=TOKEN, rate_limit=(10_000, 10.0))
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def loader_env(fake) -> dict[str, str]:
    return {"HASOFFERS_BASE_URL": fake.base_url, "HASOFFERS_NETWORK_ID": "net-test",
            "HASOFFERS_NETWORK_TOKEN": TOKEN, "KPI_REPORT_PAGE_SIZE": "7",
            "KPI_MIN_CLICKS": str(GENERAL_MIN_CLICKS), "KPI_MIN_CONVERSIONS": str(GENERAL_MIN_CONVERSIONS),
            "KPI_CLICK_COST": str(CLICK_COST),
            "HASOFFERS_RATE_LIMIT_CALLS": "10000"}  # the fake network's limit


@pytest.fixture
def loader(start_service, loader_env):
    service = start_service("metric_loader", **loader_env)
    yield service
    assert TOKEN not in service.log(), "the HasOffers token leaked into the log"


def request(bus, metric_key: str, lookback_hours: int = 24, event_id: uuid.UUID | None = None) -> str:
    event = new_event(METRIC_LOAD_REQUESTED, MetricLoadRequested(metric_key=metric_key, lookback_hours=lookback_hours),
                      correlation_id="test", event_id=event_id)
    bus.publish(event)
    return str(event.event_id)


def run_of(db, event_id: str, statuses=("succeeded", "failed")):
    def finished():
        with db.connect() as conn:
            row = conn.execute(text("SELECT * FROM load_runs WHERE request_event_id = :e"), {"e": event_id}).first()
        return row if row is not None and row.status in statuses else None

    return wait_for(finished, 30, what=f"load run of {event_id}")


def loaded(exchange: str) -> list[dict]:
    return [json.loads(body) for _, body in drain(queue_names(exchange, "trigger_checker").work)]


def items_of(messages: list[dict]) -> dict[str, dict[tuple[int, int], float]]:
    out: dict[str, dict[tuple[int, int], float]] = defaultdict(dict)
    for message in messages:
        for item in message["data"]["metrics"]:
            key = (item["offer_id"], item["affiliate_id"])
            assert key not in out[item["metric_key"]], f"{item} published twice"
            out[item["metric_key"]][key] = item["value"]
    return out


# -- the independent computation ------------------------------------------------------------


def settings_from(db) -> dict:
    with db.connect() as conn:
        offers = {r.id: r._asdict() for r in conn.execute(text("SELECT * FROM offers"))}
        categories = {r.id: r.min_clicks for r in conn.execute(text("SELECT * FROM categories"))}
        offer_categories = defaultdict(list)
        for r in conn.execute(text("SELECT * FROM offer_categories")):
            offer_categories[r.offer_id].append(r.category_id)
        caps = {(r.offer_id, r.affiliate_id): r.conversion_cap for r in conn.execute(text("SELECT * FROM conversion_caps"))}
    return {"offers": offers, "categories": categories, "offer_categories": offer_categories, "caps": caps}


def min_clicks_of(s: dict, offer_id: int) -> int:
    offer = s["offers"][offer_id]
    if offer["min_clicks"] is not None:
        return offer["min_clicks"]
    for category_id in sorted(s["offer_categories"][offer_id]):
        if s["categories"].get(category_id) is not None:
            return s["categories"][category_id]
    return GENERAL_MIN_CLICKS


def expected(network: Network, s: dict, measured_at: datetime, lookback_hours: int) -> dict[str, dict]:
    last = measured_at.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
    first = last - timedelta(hours=lookback_hours - 1)
    pairs: dict[tuple[int, int], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in network.stats:
        moment = datetime.strptime(r.date, "%Y-%m-%d").replace(hour=r.hour, tzinfo=timezone.utc)
        offer = s["offers"].get(r.offer_id)
        if not first <= moment <= last or offer is None or not offer["monitoring"]:
            continue
        p = pairs[(r.offer_id, r.affiliate_id)]
        p["all_conversions"] += r.conversions
        p["gross_clicks"] += r.gross_clicks
        p["profit"] += r.revenue - r.payout
        if r.goal_id == 0:
            p["clicks"] += r.clicks
            p["conversions"] += r.conversions
        elif r.goal_id == offer["tracked_goal_id"]:
            p["goal_conversions"] += r.conversions
    out: dict[str, dict] = {key: {} for key in METRIC_KEYS}
    for (o, a), p in pairs.items():
        offer = s["offers"][o]
        minimum = min_clicks_of(s, o)
        min_conversions = offer["min_conversions"] if offer["min_conversions"] is not None else GENERAL_MIN_CONVERSIONS
        if p["clicks"] >= minimum:
            out["cr"][(o, a)] = p["conversions"] / p["clicks"] if p["clicks"] else 0.0
            if p["conversions"] == 0:
                out["clicks_zero_conv"][(o, a)] = p["clicks"]
        if p["gross_clicks"] >= minimum:
            out["pacc"][(o, a)] = p["profit"] - p["gross_clicks"] * CLICK_COST
        if offer["tracked_goal_id"] and p["conversions"] > 0 and p["conversions"] >= min_conversions:
            out["gtr"][(o, a)] = p["goal_conversions"] / p["conversions"]
        if s["caps"].get((o, a), 0) > 0:
            out["cap_fill"][(o, a)] = p["all_conversions"] / (lookback_hours / 24) / s["caps"][(o, a)]
    return out


def configure(db, network: Network) -> dict[str, object]:
    """Local settings of every kind, chosen so that each one makes a difference."""
    with_goals = sorted({g.offer_id for g in network.goals.values()})
    # An offer with a pair that has conversions but no clicks gets a minimum of 0 clicks.
    zero_clicks = next(o for (o, _), kind in sorted(network.profiles.items())
                       if kind == "zero_clicks" and o not in with_goals[:2])
    others = [o for o in network.offers if o not in with_goals and o != zero_clicks]
    chosen = {"monitoring_off": others[0], "tracked": with_goals[0], "untracked": with_goals[1],
              "offer_min_clicks": others[1], "offer_min_conversions": with_goals[0], "zero_clicks": zero_clicks}
    chosen["category"] = next(c for o in others[2:] for c in network.offers[o].category_ids)
    goal = min(g.id for g in network.goals.values() if g.offer_id == chosen["tracked"])
    with db.begin() as conn:
        conn.execute(text("UPDATE offers SET monitoring = false WHERE id = :o"), {"o": chosen["monitoring_off"]})
        conn.execute(text("UPDATE offers SET tracked_goal_id = :g WHERE id = :o"), {"g": goal, "o": chosen["tracked"]})
        # Every other offer with goals tracks its first goal too, except the untracked one.
        conn.execute(text("UPDATE offers o SET tracked_goal_id = (SELECT min(id) FROM goals g WHERE g.offer_id = o.id)"
                          " WHERE tracked_goal_id IS NULL AND id <> :u"), {"u": chosen["untracked"]})
        conn.execute(text("UPDATE offers SET min_clicks = 1000 WHERE id = :o"), {"o": chosen["offer_min_clicks"]})
        conn.execute(text("UPDATE offers SET min_clicks = 0 WHERE id = :o"), {"o": chosen["zero_clicks"]})
        conn.execute(text("UPDATE offers SET min_conversions = 1 WHERE id = :o"),
                     {"o": chosen["offer_min_conversions"]})
        conn.execute(text("UPDATE categories SET min_clicks = 1500 WHERE id = :c"), {"c": chosen["category"]})
    return chosen


# -- tests ----------------------------------------------------------------------------------------


def test_every_metric_equals_an_independent_computation(loader, bus, exchange, db, fake, network):
    reference = run_of(db, request(bus, "reference"))
    assert reference.status == "succeeded", reference.error
    chosen = configure(db, network)
    runs = {key: run_of(db, request(bus, key, lookback_hours=48)) for key in METRIC_KEYS}
    assert {k: r.status for k, r in runs.items()} == {k: "succeeded" for k in METRIC_KEYS}, runs
    messages = loaded(exchange)
    got = items_of(messages)
    s = settings_from(db)

    for key, run in runs.items():
        of_run = [m for m in messages if m["correlation_id"] == str(run.id)]
        stamps = {i["measured_at"] for m in of_run for i in m["data"]["metrics"]}
        utc = run.measured_at.astimezone(timezone.utc)
        assert stamps == ({utc.isoformat().replace("+00:00", "Z")} if of_run else set())
        want = expected(network, s, run.measured_at, 48)[key]
        assert set(got[key]) == set(want), key
        for pair, value in want.items():
            assert got[key][pair] == pytest.approx(value, rel=1e-9, abs=1e-6), (key, pair)
        assert run.values_published == len(want) and run.rows_read > 0 and run.error is None
        assert want, f"{key}: the network should give values"

    # Each local setting made a difference: without it the values would not be the same.
    measured_at = runs["cr"].measured_at

    def without(offer_id: int | None = None, category_id: int | None = None, **change) -> dict[str, dict]:
        changed = {**s, "offers": {**s["offers"]}, "categories": {**s["categories"]}}
        if offer_id is not None:
            changed["offers"][offer_id] = {**s["offers"][offer_id], **change}
        if category_id is not None:
            changed["categories"][category_id] = None
        return expected(network, changed, measured_at, 48)

    assert all(o != chosen["monitoring_off"] for values in got.values() for o, _ in values)
    assert without(chosen["monitoring_off"], monitoring=True)["cr"] != got["cr"]
    assert without(chosen["offer_min_clicks"], min_clicks=None)["cr"] != got["cr"]
    assert without(category_id=chosen["category"])["cr"] != got["cr"]
    assert chosen["tracked"] in {o for o, _ in got["gtr"]}
    assert without(chosen["untracked"], tracked_goal_id=chosen["tracked"])["gtr"] != got["gtr"]
    assert all(s["caps"][p] > 0 for p in got["cap_fill"]) and 0 in s["caps"].values()
    assert any(v < 0 for v in got["pacc"].values()) and any(v == 0 for v in got["cr"].values())
    assert any(v > 1 for v in got["cap_fill"].values())
    zero_pairs = [p for p, kind in network.profiles.items() if kind == "zero_clicks" and p[0] == chosen["zero_clicks"]]
    assert zero_pairs and all(got["cr"][p] == 0.0 for p in zero_pairs)  # conversions, but no clicks
    last = measured_at.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
    window = {(t.strftime("%Y-%m-%d"), t.hour) for t in (last - timedelta(hours=h) for h in range(48))}
    assert any(r.conversions < 0 and (r.date, r.hour) in window and s["offers"][r.offer_id]["monitoring"]
               for r in network.stats), "reversals in the window"
    # Paging: with 7 rows a page, the reports needed many more calls than the window's parts.
    assert fake.requests("Report.getStats") > 3 * len(METRIC_KEYS)


def test_reference_load_upserts_and_keeps_local_settings(loader, bus, db, network):
    assert run_of(db, request(bus, "reference")).status == "succeeded"
    with db.connect() as conn:
        offers = {r.id: r for r in conn.execute(text("SELECT * FROM offers"))}
        assert set(offers) == set(network.offers)
        assert all(offers[i].name == o.name and offers[i].require_approval == o.require_approval
                   and offers[i].status == o.status for i, o in network.offers.items())
        pairs = set(conn.execute(text("SELECT offer_id, category_id FROM offer_categories")).all())
        assert pairs == {(o.id, c) for o in network.offers.values() for c in o.category_ids}
        assert dict(conn.execute(text("SELECT id, name FROM categories")).all()) == {
            c: network.categories[c] for _, c in pairs}
        assert {r.id: r.offer_id for r in conn.execute(text("SELECT * FROM goals"))} == {
            g.id: g.offer_id for g in network.goals.values()}
        caps = dict(((r.offer_id, r.affiliate_id), r.conversion_cap)
                    for r in conn.execute(text("SELECT * FROM conversion_caps")))
        capped_offers = {i for i, o in network.offers.items() if o.status == "active"}
        assert caps == {p: c for p, c in network.caps.items() if p[0] in capped_offers}
        assert {r.id: r.account_manager_id for r in conn.execute(text("SELECT * FROM affiliates"))} == {
            a.id: a.account_manager_id for a in network.affiliates.values()}
        assert {r.id: r.status for r in conn.execute(text("SELECT * FROM affiliate_users"))} == {
            u.id: u.status for u in network.affiliate_users.values()}
        assert {r.id: r.email for r in conn.execute(text("SELECT * FROM employees"))} == {
            e.id: e.email for e in network.employees.values()}

    with db.begin() as conn:
        conn.execute(text("UPDATE offers SET monitoring = false, tracked_goal_id = 77, min_clicks = 5,"
                          " min_conversions = 2 WHERE id = 3"))
        conn.execute(text("UPDATE categories SET min_clicks = 40"))
        conn.execute(text("UPDATE employees SET secondary_email = 'boss@x.example', use_secondary = true"
                          " WHERE id = 1"))
    # The network changes: a renamed offer that now requires approval in other categories,
    # a cap changed, a new affiliate.
    offer = network.offers[3]
    offer.name, offer.require_approval, offer.category_ids = "Renamed", not offer.require_approval, [1]
    capped = next(p for p in network.caps if network.offers[p[0]].status == "active" and p[0] != 3)
    network.caps[capped] = 4242
    network.affiliates[99] = type(network.affiliates[1])(99, "Newcomer", 1)

    assert run_of(db, request(bus, "reference")).status == "succeeded"
    with db.connect() as conn:
        row = conn.execute(text("SELECT * FROM offers WHERE id = 3")).one()
        assert (row.name, row.require_approval) == ("Renamed", offer.require_approval)
        assert (row.monitoring, row.tracked_goal_id, row.min_clicks, row.min_conversions) == (False, 77, 5, 2)
        assert conn.execute(text("SELECT category_id FROM offer_categories WHERE offer_id = 3")).scalars().all() == [1]
        assert set(conn.execute(text("SELECT min_clicks FROM categories")).scalars()) == {40}
        assert conn.execute(text("SELECT conversion_cap FROM conversion_caps WHERE offer_id = :o AND affiliate_id = :a"),
                            {"o": capped[0], "a": capped[1]}).scalar() == 4242
        employee = conn.execute(text("SELECT * FROM employees WHERE id = 1")).one()
        assert (employee.secondary_email, employee.use_secondary) == ("boss@x.example", True)
        assert conn.execute(text("SELECT company FROM affiliates WHERE id = 99")).scalar() == "Newcomer"


def test_a_redelivered_request_does_not_run_again(loader, bus, exchange, db):
    run_of(db, request(bus, "reference"))
    event_id = uuid.uuid4()
    first = run_of(db, request(bus, "cr", event_id=event_id))
    published = loaded(exchange)
    assert first.status == "succeeded" and published
    request(bus, "cr", event_id=event_id)  # the same request again
    wait_for(lambda: loader.log().count(f"event_id={event_id} load of cr already succeeded") == 1,
             what="the duplicate to be skipped")
    assert queue_depth(queue_names(exchange, "trigger_checker").work) == 0
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM load_runs WHERE metric_key = 'cr'")).scalar() == 1


def test_sigterm_finishes_the_load_in_hand_and_leaves_the_others_queued(start_service, loader_env, bus, exchange,
                                                                         db, fake):
    first = start_service("metric_loader", **loader_env, KPI_PREFETCH="4")
    run_of(db, request(bus, "reference"))
    fake.inject("hold", count=1, method="Report.getStats", seconds=60)
    in_hand = request(bus, "cr")
    assert fake.holding.wait(30), "the load never called Report.getStats"
    waiting = [request(bus, "pacc"), request(bus, "gtr")]
    work = queue_names(exchange, "metric_loader").work
    # Both delivered to the busy loader (prefetch 4), not started: nothing ready in the queue.
    wait_for(lambda: queue_depth(work) == 0, what="the loader to hold the other two requests")
    first.stop_soon()
    wait_for(lambda: "stopping after the message in hand" in first.log(), what="the loader to take the SIGTERM")
    fake.release()
    assert first.wait(30) == 0
    assert "stopped" in first.log()
    with db.connect() as conn:
        runs = dict(conn.execute(text("SELECT request_event_id::text, status FROM load_runs "
                                      "WHERE metric_key <> 'reference'")).all())
    assert runs == {in_hand: "succeeded"}, "the load in hand finished; the others never started"
    assert "cr" in items_of(loaded(exchange))
    assert queue_depth(work) == 2, "the requests it held went back to the queue"
    start_service("metric_loader", **loader_env)
    assert [run_of(db, event_id).status for event_id in waiting] == ["succeeded", "succeeded"]
    assert "pacc" in items_of(loaded(exchange))  # (gtr needs tracked goals, which this network lacks)


def test_rate_limit_and_5xx_are_waited_out(loader, bus, exchange, db, fake):
    run_of(db, request(bus, "reference"))
    fake.inject("rate_limit", count=1, method="Report.getStats")
    fake.inject("http_500", count=1, method="Report.getStats", after=1)
    run = run_of(db, request(bus, "clicks_zero_conv"))
    assert run.status == "succeeded" and run.error is None
    assert len(loaded(exchange)) >= 1
    log = loader.log()
    assert "rate limit exceeded" in log and "HTTP 500" in log


def test_a_transient_failure_is_retried_through_the_bus_with_the_same_run(start_service, loader_env, bus, exchange, db,
                                                                           fake):
    service = start_service("metric_loader", **loader_env, HASOFFERS_MAX_ATTEMPTS="1")
    run_of(db, request(bus, "reference"))
    fake.inject("http_500", count=1, method="Report.getStats", after=1)  # page 2 of the first attempt
    run = run_of(db, request(bus, "cr"))
    assert run.status == "succeeded" and run.error is None
    assert "attempt 1 failed, retrying" in service.log()
    messages = loaded(exchange)
    assert {m["correlation_id"] for m in messages} == {str(run.id)}
    assert len({m["event_id"] for m in messages}) == len(messages)
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM load_runs WHERE metric_key = 'cr'")).scalar() == 1
    assert TOKEN not in service.log()


def test_retries_exhausted_fail_the_run_and_dead_letter_the_request(start_service, loader_env, bus, exchange, db, fake):
    service = start_service("metric_loader", **loader_env, HASOFFERS_MAX_ATTEMPTS="1", KPI_RETRY_LIMIT="1")
    run_of(db, request(bus, "reference"))
    fake.inject("http_500", count=100, method="Report.getStats")
    run = run_of(db, request(bus, "pacc"))
    assert run.status == "failed"
    assert run.error.startswith("gave up after 2 attempts: HasOffersUnavailableError: Report.getStats")
    wait_for(lambda: queue_depth(queue_names(exchange, "metric_loader").dead) == 1, what="the dead letter")
    assert queue_depth(queue_names(exchange, "trigger_checker").work) == 0
    assert TOKEN not in service.log()


def test_a_malformed_page_fails_the_run_and_publishes_nothing(loader, bus, exchange, db, fake):
    run_of(db, request(bus, "reference"))
    fake.inject("malformed", count=1, method="Report.getStats", after=2)  # the third page
    run = run_of(db, request(bus, "cr"))
    assert run.status == "failed"
    assert "Report.getStats: response is not JSON" in run.error
    assert run.values_published == 0
    assert queue_depth(queue_names(exchange, "trigger_checker").work) == 0
    assert queue_depth(queue_names(exchange, "metric_loader").dead) == 0  # nothing to retry: it is final


def test_a_wrong_token_fails_readably_and_never_shows_in_the_log(start_service, loader_env, bus, db):
    wrong = "NETwrong-" + uuid.uuid4().hex
    service = start_service("metric_loader", **{**loader_env, "HASOFFERS_NETWORK_TOKEN": wrong,
                                                "KPI_LOG_LEVEL": "DEBUG"})
    run = run_of(db, request(bus, "reference"))
    assert run.status == "failed" and "is not authenticated" in run.error
    assert wrong not in run.error and wrong not in service.log()


def test_two_replicas_load_each_slot_once(start_service, loader_env, bus, exchange, db):
    env = {**loader_env, "KPI_SCHEDULE_METRICS_SECONDS": "2", "KPI_SCHEDULE_REFERENCE_SECONDS": "3"}
    replicas = [start_service("metric_loader", **env) for _ in range(2)]

    def slots_done():
        with db.connect() as conn:
            return conn.execute(text("SELECT count(DISTINCT schedule_slot) FROM load_runs"
                                     " WHERE metric_key = 'cr' AND status = 'succeeded'")).scalar() >= 3

    wait_for(slots_done, 30, interval=0.2, what="three slots of cr")
    for replica in replicas:
        assert replica.terminate() == 0
        # SIGTERM stops the schedule too, after its tick in progress: no slot is left
        # claimed but unlogged or unpublished by an exit in the middle of a tick.
        assert "schedule stopped" in replica.log()
    logs = "".join(r.log() for r in replicas)
    with db.connect() as conn:
        runs = conn.execute(text("SELECT * FROM load_runs ORDER BY id")).all()
    assert runs and all(r.schedule_slot is not None for r in runs)  # the handler used the scheduled run
    assert {r.metric_key for r in runs} == {*METRIC_KEYS, "reference"}
    for run in runs:  # each slot claimed, requested and loaded by one replica only
        assert logs.count(f"run_id={run.id} scheduled {run.metric_key} for slot") == 1
        assert logs.count(f"run_id={run.id} loading") <= 1
    messages = loaded(exchange)
    assert len({m["event_id"] for m in messages}) == len(messages)
    by_run = defaultdict(set)
    for m in messages:
        by_run[m["correlation_id"]] |= {i["measured_at"] for i in m["data"]["metrics"]}
    assert all(len(stamps) == 1 for stamps in by_run.values())
    assert TOKEN not in logs


def test_without_credentials_it_starts_and_every_load_fails_saying_why(start_service, bus, exchange, db):
    service = start_service("metric_loader")  # no HASOFFERS_NETWORK_ID / _TOKEN
    assert "HASOFFERS_NETWORK_ID and HASOFFERS_NETWORK_TOKEN are not set: every load will fail" in service.log()
    run = run_of(db, request(bus, "cr"))
    assert run.status == "failed"
    assert run.error == "HasOffers credentials are not configured (HASOFFERS_NETWORK_ID, HASOFFERS_NETWORK_TOKEN)"
    assert queue_depth(queue_names(exchange, "trigger_checker").work) == 0
    assert queue_depth(queue_names(exchange, "metric_loader").dead) == 0  # final: nothing to retry


@pytest.mark.parametrize("data, reason", [
    ({"metric_key": "nope", "lookback_hours": 24}, "metric_key"),
    ({"metric_key": "cr", "lookback_hours": 0}, "lookback_hours"),
    ({"lookback_hours": 24}, "metric_key: Field required"),
])
def test_an_invalid_load_request_is_dead_lettered_and_loads_nothing(loader, bus, exchange, db, fake, data, reason):
    event = json.loads(new_event(METRIC_LOAD_REQUESTED, MetricLoadRequested(metric_key="cr", lookback_hours=24),
                                 correlation_id="test").model_dump_json())
    event["data"] = data
    bus.publish_raw(METRIC_LOAD_REQUESTED, json.dumps(event).encode())
    dead = queue_names(exchange, "metric_loader").dead
    wait_for(lambda: queue_depth(dead) == 1, what="the dead letter")
    [letter] = read_dead_letters(bus, "metric_loader", 10)
    assert reason in letter["reason"] and json.loads(letter["body"])["data"] == data
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM load_runs")).scalar() == 0
    assert fake.requests("Report.getStats") == 0


def test_the_failed_retried_and_dead_letter_counters_count_a_load_that_gives_up(start_service, loader_env, bus,
                                                                                exchange, db, fake):
    import httpx

    from testkit.ports import free_port

    port = free_port()
    start_service("metric_loader", **loader_env, HASOFFERS_MAX_ATTEMPTS="1", KPI_RETRY_LIMIT="1",
                  KPI_METRICS_PORT=str(port))
    run_of(db, request(bus, "reference"))
    fake.inject("http_500", count=100, method="Report.getStats")
    assert run_of(db, request(bus, "pacc")).status == "failed"
    wait_for(lambda: queue_depth(queue_names(exchange, "metric_loader").dead) == 1, what="the dead letter")

    def counters():
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        found = {}
        for name in ("kpi_messages_failed_total", "kpi_message_retries_total", "kpi_messages_dead_lettered_total"):
            line = next((l for l in text.splitlines() if l.startswith(f'{name}{{service="metric_loader"}}')), None)
            found[name] = float(line.rsplit(" ", 1)[1]) if line else 0.0
        return found

    # The first attempt raised and went to the retry queue; the second, the last, gave up.
    expected = {"kpi_messages_failed_total": 1.0, "kpi_message_retries_total": 1.0,
                "kpi_messages_dead_lettered_total": 1.0}
    wait_for(lambda: counters() == expected, what="the counters")
    assert counters() == expected


def test_a_failed_load_runs_again_through_kpi_dead_replay(start_service, loader_env, service_env, bus, exchange, db,
                                                          fake):
    import os
    import subprocess
    import sys

    from tests.support import ROOT

    start_service("metric_loader", **loader_env, HASOFFERS_MAX_ATTEMPTS="1", KPI_RETRY_LIMIT="0")
    run_of(db, request(bus, "reference"))
    fake.inject("http_500", count=100, method="Report.getStats")
    event_id = request(bus, "pacc")
    assert run_of(db, event_id).status == "failed"
    dead = queue_names(exchange, "metric_loader").dead
    wait_for(lambda: queue_depth(dead) == 1, what="the dead letter")
    fake.clear_faults()  # the cause is fixed

    replay = subprocess.run([sys.executable, "-m", "shared.cli", "dead", "replay", "metric_loader"], cwd=ROOT,
                            env={**os.environ, **service_env}, capture_output=True, text=True, timeout=60)
    assert replay.returncode == 0 and "replayed 1 message(s)" in replay.stdout, replay.stderr
    run = run_of(db, event_id, statuses=("succeeded",))
    assert run.error is None and run.values_published > 0
    assert queue_depth(dead) == 0
    with db.connect() as conn:  # the same run, loaded again, not a second one
        assert conn.execute(text("SELECT count(*) FROM load_runs WHERE metric_key = 'pacc'")).scalar() == 1
    assert {m["correlation_id"] for m in loaded(exchange)} == {str(run.id)}
