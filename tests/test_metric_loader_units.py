"""The metric loader's parts as functions: the window, the values, the batches, the handler."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from services.metric_loader import computation
from services.metric_loader.handler import LoaderConfig, handle_load_requested
from services.metric_loader.computation import OfferSettings, Totals
from services.metric_loader.schedule import Schedule
from shared.handling import HandlerResult
from shared.events import (
    METRIC_LOAD_REQUESTED, MetricLoaded, MetricLoadRequested, encode, new_event, parse_data, parse_envelope,
)
from shared.hasoffers import HasOffersClient, HasOffersResponseError
from shared.vocabulary import METRIC_KEYS, REFERENCE
from testkit.fake_hasoffers.network import FakeOffer, Network, StatRow
from testkit.fake_hasoffers.server import FakeHasOffers

TOKEN = "NETunits-token"


def covered(filters: list[dict], moment: datetime) -> int:
    """How many of the filters select this report hour (evaluated here, independently)."""
    def holds(spec: dict, value) -> bool:
        values = spec["values"]
        if spec["conditional"] == "EQUAL_TO":
            return str(value) in values
        assert spec["conditional"] == "BETWEEN"
        low, high = values
        return (low <= value <= high) if isinstance(value, str) else (int(low) <= value <= int(high))

    day, hour = moment.strftime("%Y-%m-%d"), moment.hour
    return sum(1 for f in filters if holds(f["Stat.date"], day) and ("Stat.hour" not in f or holds(f["Stat.hour"], hour)))


@pytest.mark.parametrize("lookback", [1, 2, 5, 23, 24, 25, 47, 48, 49, 72, 24 * 31])
@pytest.mark.parametrize("clock", ["00:00", "00:59", "07:30", "23:10", "23:59"])
def test_the_window_filters_select_each_hour_of_the_look_back_exactly_once(lookback, clock):
    hour, minute = map(int, clock.split(":"))
    measured_at = datetime(2026, 3, 1, hour, minute, 17, tzinfo=timezone.utc)  # after a short February
    start, end = computation.window(measured_at, lookback)
    filters = computation.window_filters(start, end)
    assert 1 <= len(filters) <= 3
    inside = {end - timedelta(hours=h) for h in range(lookback)}
    assert end == measured_at.replace(minute=0, second=0) and len(inside) == lookback
    moment = start - timedelta(hours=30)
    while moment <= end + timedelta(hours=30):
        assert covered(filters, moment) == (1 if moment in inside else 0), moment
        moment += timedelta(hours=1)


def settings(offer_id: int = 1, min_clicks: int = 0, min_conversions: int = 0, goal: int | None = None):
    return {offer_id: OfferSettings(offer_id, min_clicks, min_conversions, goal)}


def totals_of(key: str, rows: list[dict], offers) -> Totals:
    totals = Totals(sums={})
    computation.accumulate(totals, key, rows, offers)
    return totals


def test_values_follow_the_contract():
    offers = settings(min_clicks=10, min_conversions=2, goal=5)
    rows = [{"offer_id": "1", "affiliate_id": "1", "clicks": "10", "conversions": "-1", "gross_clicks": "12",
             "profit": "3.50"},
            {"offer_id": "1", "affiliate_id": "1", "clicks": "0", "conversions": "2", "gross_clicks": "0",
             "profit": "-1.25"},
            {"offer_id": "1", "affiliate_id": "2", "clicks": "9", "conversions": "0", "gross_clicks": "15",
             "profit": "0"},
            {"offer_id": "7", "affiliate_id": "2", "clicks": "99", "conversions": "0"}]  # not monitored
    cr = computation.values("cr", totals_of("cr", rows, offers), offers, {}, 24, 0.1)
    assert cr == [(1, 1, 0.1)]  # (−1 + 2) / 10; pair (1, 2) is under 10 clicks
    pacc = computation.values("pacc", totals_of("pacc", rows, offers), offers, {}, 24, 0.1)
    assert pacc == [(1, 1, pytest.approx(2.25 - 1.2)), (1, 2, pytest.approx(-1.5))]
    zero = computation.values("clicks_zero_conv", totals_of("clicks_zero_conv", rows, offers), offers, {}, 24, 0.1)
    assert zero == []  # (1, 2) has no conversion but too few clicks

    goal_rows = [{"offer_id": "1", "affiliate_id": a, "goal_id": g, "conversions": c}
                 for a, g, c in [("1", "0", "4"), ("1", "5", "1"), ("1", "6", "9"), ("2", "0", "1"),
                                 ("3", "5", "3"), ("4", "0", "0")]]
    gtr = computation.values("gtr", totals_of("gtr", goal_rows, offers), offers, {}, 24, 0)
    assert gtr == [(1, 1, 0.25)]  # other goals ignored; 1 default conversion < 2; none at all; zero

    caps = {(1, 1): 10, (1, 2): 0}
    cap_rows = [{"offer_id": "1", "affiliate_id": "1", "conversions": "30"},
                {"offer_id": "1", "affiliate_id": "2", "conversions": "30"}]
    assert computation.values("cap_fill", totals_of("cap_fill", cap_rows, offers), offers, caps, 72, 0) == [(1, 1, 1.0)]


def test_zero_clicks_give_a_rate_of_zero_when_the_minimum_allows():
    offers = settings(min_clicks=0)
    rows = [{"offer_id": "1", "affiliate_id": "3", "clicks": "0", "conversions": "-2"}]
    assert computation.values("cr", totals_of("cr", rows, offers), offers, {}, 24, 0) == [(1, 3, 0.0)]


@pytest.mark.parametrize("row, message", [
    ({"offer_id": "1", "affiliate_id": "1", "clicks": "many", "conversions": "1"}, "clicks is not a number: 'many'"),
    ({"offer_id": "1", "affiliate_id": "1", "clicks": "NaN", "conversions": "1"}, "clicks is not finite"),
    ({"affiliate_id": "1", "clicks": "1", "conversions": "1"}, "offer_id is not a number: 'None'"),
])
def test_an_unreadable_row_is_a_readable_error(row, message):
    with pytest.raises(HasOffersResponseError, match=message):
        totals_of("cr", [row], settings())


# -- the handler as a function ------------------------------------------------------------------


@pytest.fixture
def big_fake():
    """One offer, 2 500 affiliates with traffic in the current hour."""
    now = datetime.now(timezone.utc)
    stats = [StatRow(1, a, 0, now.strftime("%Y-%m-%d"), now.hour, clicks=40, gross_clicks=40, conversions=a % 3)
             for a in range(1, 2501)]
    fake = FakeHasOffers(Network(offers={1: FakeOffer(1, "Big")}, stats=stats), network_id="n",
                         network_token=TOKEN, rate_limit=(10_000, 10.0))
    fake.start()
    yield fake
    fake.stop()


def test_the_handler_publishes_batches_of_1000_with_one_measured_at_and_stable_ids(db, big_fake):
    with db.begin() as conn:
        conn.execute(text("INSERT INTO offers (id, name) VALUES (1, 'Big')"))
    config = LoaderConfig(page_size=900, min_clicks=10)
    request = new_event(METRIC_LOAD_REQUESTED, MetricLoadRequested(metric_key="cr", lookback_hours=2))
    with HasOffersClient(big_fake.base_url, "n", TOKEN, max_attempts=1) as client:
        result = handle_load_requested(request, engine=db, client=client, config=config)
        assert [len(e.data["metrics"]) for e in result.events] == [1000, 1000, 500]
        for event in result.events:  # valid on the wire
            data = parse_data(parse_envelope(encode(event)))
            assert isinstance(data, MetricLoaded) and event.causation_id == str(request.event_id)
        stamps = {item["measured_at"] for e in result.events for item in e.data["metrics"]}
        assert len(stamps) == 1
        values = {item["affiliate_id"]: item["value"] for e in result.events for item in e.data["metrics"]}
        assert values[3] == 0 and values[4] == 1 / 40 and values[5] == 2 / 40

        # Delivered again before the batches were confirmed: the same batches again.
        retried = handle_load_requested(request, engine=db, client=client, config=config)
        assert [(e.event_id, e.data) for e in retried.events] == [(e.event_id, e.data) for e in result.events]
        with db.connect() as conn:
            assert conn.execute(text("SELECT status FROM load_runs")).scalar() == "running"
        retried.after_publish()  # what the consumer does once they are confirmed
        # Delivered again after that: the run succeeded, nothing to do.
        assert handle_load_requested(request, engine=db, client=client, config=config) == HandlerResult()
        # Replayed after it failed: the same run again, with the same ids and measured_at.
        with db.begin() as conn:
            conn.execute(text("UPDATE load_runs SET status = 'failed'"))
        again = handle_load_requested(request, engine=db, client=client, config=config)
        again.after_publish()
    assert [e.event_id for e in again.events] == [e.event_id for e in result.events]
    assert again.events[0].data == result.events[0].data
    with db.connect() as conn:
        run = conn.execute(text("SELECT * FROM load_runs")).one()
    assert (run.status, run.rows_read, run.values_published) == ("succeeded", 2500, 2500)
    assert {e.correlation_id for e in result.events} == {str(run.id)}


# -- the schedule --------------------------------------------------------------------------------


class FlakyBus:
    """Stands in for shared.rabbitmq.Bus: refuses the first `failures` publishes."""

    def __init__(self, sent: list, failures: int):
        self.sent, self.failures, self.connection = sent, failures, None

    def connect(self) -> "FlakyBus":
        return self

    def publish(self, event, *, mandatory: bool = True) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker gone")
        self.sent.append(event)

    def close(self) -> None:
        pass


def test_the_schedule_claims_each_slot_once_and_publishes_until_it_went_out(db):
    now = [1_000_000.0]
    sent: list = []
    flaky = [FlakyBus(sent, failures=1)]
    replicas = [Schedule(db, lambda: flaky.pop() if flaky else FlakyBus(sent, 0), metrics_seconds=60,
                         reference_seconds=3600, lookback_hours=12, clock=lambda: now[0]) for _ in range(2)]
    replicas[0].tick()  # claims the slots of all six, cannot publish
    replicas[1].tick()  # finds them claimed
    assert sent == []
    replicas[0].tick()  # same slots: publishes what is pending
    assert sorted(e.data["metric_key"] for e in sent) == sorted([*METRIC_KEYS, REFERENCE])
    now[0] += 60  # the next metrics slot; the reference slot is still the same
    for replica in reversed(replicas):
        replica.tick()
    with db.connect() as conn:
        runs = conn.execute(text("SELECT * FROM load_runs ORDER BY id")).all()
    assert len(runs) == len(sent) == 11
    for run, event in zip(runs, sent):
        assert (str(event.event_id), event.correlation_id) == (run.request_event_id, str(run.id))
        assert (event.data["metric_key"], event.data["lookback_hours"]) == (run.metric_key, 12)
        assert run.status == "requested" and run.schedule_slot.timestamp() % 60 == 0


# -- the report's offer filter and the id bound ----------------------------------------------------


def _offers(n: int) -> dict[int, OfferSettings]:
    return {i: OfferSettings(offer_id=i, min_clicks=0, min_conversions=0) for i in range(1, n + 1)}


def test_up_to_500_offers_are_filtered_on_the_server_and_more_are_dropped_here():
    period = {"Stat.date": {"conditional": "BETWEEN", "values": ["2026-11-01", "2026-11-01"]}}
    few = computation.report_params("cr", period, _offers(computation.OFFER_FILTER_LIMIT))
    assert few["filters"]["Stat.offer_id"]["values"] == [str(i) for i in range(1, 501)]
    many_offers = _offers(computation.OFFER_FILTER_LIMIT + 1)
    many = computation.report_params("cr", period, many_offers)
    assert "Stat.offer_id" not in many["filters"]  # the request would be huge: every offer comes back
    del many_offers[7]  # monitoring off: its rows come back unfiltered and are dropped here
    totals = Totals(sums={})
    rows = [{"offer_id": str(o), "affiliate_id": "3", "clicks": "10", "conversions": "1"} for o in (6, 7, 8, 999)]
    computation.accumulate(totals, "cr", rows, many_offers)
    assert totals.rows == 4
    assert sorted(totals.sums) == [(6, 3), (8, 3)]


def test_ids_above_the_int4_range_are_dropped_not_stored():
    bound = 2**31 - 1
    offers = {o: OfferSettings(offer_id=o, min_clicks=0, min_conversions=0) for o in (1, bound, bound + 1)}
    rows = [{"offer_id": str(o), "affiliate_id": str(a), "clicks": "10", "conversions": "1"}
            for o, a in [(1, 5), (bound, bound), (bound + 1, 5), (1, bound + 1), (1, 0)]]
    totals = Totals(sums={})
    computation.accumulate(totals, "cr", rows, offers)
    assert sorted(totals.sums) == [(1, 5), (bound, bound)]
