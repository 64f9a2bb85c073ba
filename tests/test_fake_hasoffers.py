"""The fake HasOffers: network generation, and the read methods over real HTTP."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import defaultdict
from datetime import datetime, timezone

import httpx
import pytest

from shared.hasoffers import HasOffersApiError, HasOffersClient, HasOffersUnavailableError
from testkit.fake_hasoffers.network import Network, StatRow, generate
from testkit.fake_hasoffers.server import FakeHasOffers
from tests.support import ROOT

TOKEN = "NETfake-read-tests-token"
NOW = datetime(2026, 11, 28, 10, 30, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def network() -> Network:
    return generate(3, offers=12, affiliates=10, days=3, now=NOW)


@pytest.fixture(scope="module")
def fake(network):
    fake = FakeHasOffers(network, network_id="n1", network_token=TOKEN, rate_limit=(10_000, 10.0))
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def client(fake):
    with HasOffersClient(fake.base_url, "n1", TOKEN, timeout=5, max_attempts=2, backoff_seconds=0.01) as client:
        yield client


def raw(fake: FakeHasOffers, query: str) -> dict:
    """A GET with a hand-written query string, to check the parameter syntaxes themselves."""
    answer = httpx.get(f"{fake.base_url}?NetworkId=n1&NetworkToken={TOKEN}&{query}", timeout=5)
    assert answer.status_code == 200
    return answer.json()["response"]


# -- generation ---------------------------------------------------------------------------


def test_generation_is_deterministic_and_has_every_kind_of_trouble(network):
    again = generate(3, offers=12, affiliates=10, days=3, now=NOW)
    assert again == network
    assert generate(4, offers=12, affiliates=10, days=3, now=NOW) != network

    offers = network.offers.values()
    assert {o.status for o in offers} >= {"active", "paused"}
    assert any(o.require_approval for o in offers) and not all(o.require_approval for o in offers)
    assert any(o.category_ids for o in offers) and any(not o.category_ids for o in offers)
    with_goals = {g.offer_id for g in network.goals.values()}
    assert with_goals and len(with_goals) < len(network.offers)
    assert {u.status for u in network.affiliate_users.values()} >= {"active", "blocked"}
    assert any(a.account_manager_id for a in network.affiliates.values())
    assert all(a.account_manager_id in network.employees for a in network.affiliates.values()
               if a.account_manager_id is not None)
    assert 0 in network.caps.values() and any(c > 0 for c in network.caps.values())

    hours = {(r.date, r.hour) for r in network.stats}
    assert len(hours) > 48 and max(hours) == ("2026-11-28", 10) and min(hours) >= ("2026-11-25", 11)
    clicks: dict[tuple[int, int], int] = defaultdict(int)
    conversions: dict[tuple[int, int], int] = defaultdict(int)
    for r in network.stats:
        assert r.gross_clicks >= r.clicks
        if r.goal_id:
            assert r.clicks == 0 and network.goals[r.goal_id].offer_id == r.offer_id
        else:
            clicks[(r.offer_id, r.affiliate_id)] += r.clicks
            conversions[(r.offer_id, r.affiliate_id)] += r.conversions
    rates = {p: conversions[p] / c for p, c in clicks.items() if c >= 50}
    assert any(rate < 0.005 for rate in rates.values()), "a pair under 0.5 % CR"
    assert any(rate > 0.30 for rate in rates.values()), "a pair over 30 % CR"
    assert any(c >= 500 and conversions[p] == 0 for p, c in clicks.items()), "many clicks, no conversion"
    assert any(r.conversions < 0 for r in network.stats), "reversals"
    assert any(r.clicks == 0 and r.goal_id == 0 for r in network.stats), "rows without clicks"
    days = 3
    assert any(cap and conversions[p] / days > cap for p, cap in network.caps.items()), "a blown cap"


# -- Report.getStats ------------------------------------------------------------------------


def sums(rows: list[StatRow], key) -> dict:
    out: dict = defaultdict(lambda: [0, 0, 0.0])
    for r in rows:
        total = out[key(r)]
        total[0] += r.clicks
        total[1] += r.conversions
        total[2] += r.profit
    return out


def test_get_stats_groups_sums_and_pages(client, fake, network):
    params = {"fields": ["Stat.offer_id", "Stat.affiliate_id", "Stat.clicks", "Stat.conversions", "Stat.profit"],
              "groups": ["Stat.offer_id", "Stat.affiliate_id"],
              "filters": {"Stat.goal_id": {"conditional": "EQUAL_TO", "values": ["0"]},
                          "Stat.date": {"conditional": "BETWEEN", "values": ["2026-11-26", "2026-11-27"]}}}
    rows = list(client.get_stats(params, page_size=9))
    kept = [r for r in network.stats if r.goal_id == 0 and "2026-11-26" <= r.date <= "2026-11-27"]
    expected = sums(kept, lambda r: (r.offer_id, r.affiliate_id))
    assert len(rows) == len(expected) > 9
    for row in rows:
        assert all(isinstance(v, str) for v in row.values())  # numbers as strings
        clicks, conversions, profit = expected[(int(row["offer_id"]), int(row["affiliate_id"]))]
        assert (int(row["clicks"]), int(row["conversions"])) == (clicks, conversions)
        assert float(row["profit"]) == pytest.approx(profit, abs=0.006)
    # Pages are ordered by the groups and carry the paging fields.
    assert [(int(r["offer_id"]), int(r["affiliate_id"])) for r in rows] == sorted(expected)
    page = fake_call(client, {**params, "limit": 9, "page": 2})
    assert (page["page"], page["current"], page["count"], page["pageCount"]) == (
        2, 9, len(expected), -(-len(expected) // 9))
    assert fake_call(client, {**params, "limit": 9, "page": 999})["data"] == []


def fake_call(client, params):
    return client.call("Report", "getStats", params)


@pytest.mark.parametrize("query, keep", [
    ("filters[Stat.hour][conditional]=LESS_THAN&filters[Stat.hour][values]=3", lambda r: r.hour < 3),
    ("filters[Stat.hour][conditional]=LESS_THAN_OR_EQUAL_TO&filters[Stat.hour][values][]=3", lambda r: r.hour <= 3),
    ("filters[Stat.hour][conditional]=GREATER_THAN&filters[Stat.hour][values][0]=20", lambda r: r.hour > 20),
    ("filters[Stat.hour][conditional]=GREATER_THAN_OR_EQUAL_TO&filters[Stat.hour][values]=20",
     lambda r: r.hour >= 20),
    ("filters[Stat.offer_id][conditional]=EQUAL_TO&filters[Stat.offer_id][values][]=2"
     "&filters[Stat.offer_id][values][]=5", lambda r: r.offer_id in (2, 5)),
    ("filters[Stat.offer_id][conditional]=NOT_EQUAL_TO&filters[Stat.offer_id][values][0]=2"
     "&filters[Stat.offer_id][values][1]=5", lambda r: r.offer_id not in (2, 5)),
    ("filters[Stat.date][conditional]=BETWEEN&filters[Stat.date][values][]=2026-11-26"
     "&filters[Stat.date][values][]=2026-11-26&filters[Stat.hour][conditional]=BETWEEN"
     "&filters[Stat.hour][values][]=5&filters[Stat.hour][values][]=7",
     lambda r: r.date == "2026-11-26" and 5 <= r.hour <= 7),
    ("filters[Stat.goal_id]=0", lambda r: r.goal_id == 0),
    ("filters[Stat.goal_id][conditional]=NOT_NULL", lambda r: True),
    ("filters[Stat.goal_id][conditional]=NULL", lambda r: False),
])
def test_get_stats_filters(fake, network, query, keep):
    response = raw(fake, "Target=Report&Method=getStats&fields[]=Stat.clicks&fields[]=Stat.conversions"
                         f"&groups[]=Stat.offer_id&{query}")
    assert response["status"] == 1, response
    expected = sums([r for r in network.stats if keep(r)], lambda r: r.offer_id)
    got = {int(r["Stat"]["offer_id"]): (int(r["Stat"]["clicks"]), int(r["Stat"]["conversions"]))
           for r in response["data"]["data"]}
    assert got == {o: (c, v) for o, (c, v, _) in expected.items()}


def test_get_stats_sums_filters_sort_totals_and_errors(fake, network):
    query = ("Target=Report&Method=getStats&fields[]=Stat.clicks&fields[]=Stat.gross_clicks&groups[]=Stat.offer_id"
             "&filters[Stat.clicks][conditional]=GREATER_THAN&filters[Stat.clicks][values]=3000"
             "&sort[Stat.clicks]=desc&totals=1")
    data = raw(fake, query)["data"]
    clicks = [int(r["Stat"]["clicks"]) for r in data["data"]]
    per_offer = sums(network.stats, lambda r: r.offer_id)
    assert clicks == sorted((c for c, _, _ in per_offer.values() if c > 3000), reverse=True) and clicks
    assert int(data["totals"]["Stat"]["clicks"]) == sum(clicks)

    bad = raw(fake, "Target=Report&Method=getStats&fields[]=Stat.nonsense")
    assert bad["status"] == -1 and "Invalid field" in bad["errorMessage"]
    bad = raw(fake, "Target=Report&Method=getStats&groups[]=Stat.offer_id")
    assert bad["status"] == -1 and "fields" in bad["errorMessage"]
    bad = raw(fake, "Target=Report&Method=getStats&fields[]=Stat.clicks"
                    "&filters[Stat.hour][conditional]=SOMETIMES&filters[Stat.hour][values]=1")
    assert bad["status"] == -1 and "conditional" in bad["errorMessage"]


def test_get_stats_by_date_hour_and_goal(client, network):
    rows = list(client.get_stats({"fields": ["Stat.conversions"],
                                  "groups": ["Stat.goal_id", "Stat.date", "Stat.hour"],
                                  "filters": {"Stat.goal_id": {"conditional": "NOT_EQUAL_TO", "values": 0}}}))
    expected = sums([r for r in network.stats if r.goal_id], lambda r: (r.goal_id, r.date, r.hour))
    assert {(int(r["goal_id"]), r["date"], int(r["hour"])): int(r["conversions"]) for r in rows} == {
        k: v[1] for k, v in expected.items()}


# -- find* ------------------------------------------------------------------------------------


def test_offer_find_all_shapes(client, fake, network):
    data = client.call("Offer", "findAll", {"contain": ["OfferCategory"]})
    assert set(data) == {str(i) for i in network.offers}
    for key, record in data.items():
        offer = network.offers[int(key)]
        assert record["Offer"]["id"] == key and record["Offer"]["name"] == offer.name
        assert record["Offer"]["require_approval"] == ("1" if offer.require_approval else "0")
        if offer.category_ids:
            assert sorted(record["OfferCategory"]) == [str(c) for c in offer.category_ids]
            assert all(c["name"] == network.categories[int(c["id"])] for c in record["OfferCategory"].values())
        else:
            assert record["OfferCategory"] == []
    assert "OfferCategory" not in client.call("Offer", "findAll")["1"]

    paged = client.call("Offer", "findAll", {"limit": 4, "page": 2, "filters": {"status": "active"},
                                             "fields": ["id", "status"], "sort": {"id": "asc"}})
    active = sorted(i for i, o in network.offers.items() if o.status == "active")
    assert (paged["page"], paged["count"], paged["pageCount"]) == (2, len(active), -(-len(active) // 4))
    assert sorted(int(k) for k in paged["data"]) == active[4:8]
    assert all(set(r["Offer"]) == {"id", "status"} for r in paged["data"].values())
    assert [r["Offer"]["id"] for r in client.find_all("Offer", {"filters": {"id": {"GREATER_THAN": 9}}},
                                                      page_size=2)] == ["10", "11", "12"]
    assert client.call("Offer", "findAll", {"filters": {"status": "nonexistent"}}) == []
    assert client.call("Offer", "findAll", {"filters": {"status": "nonexistent"}, "limit": 10}) == {
        "page": 1, "current": 0, "count": 0, "pageCount": 0, "data": []}
    with pytest.raises(HasOffersApiError, match="Invalid filter field"):
        client.call("Offer", "findAll", {"filters": {"colour": "red"}})


def test_other_find_methods(client, network):
    goals = {r["Goal"]["id"]: r["Goal"] for r in client.find_all("Goal", page_size=4)}
    assert goals == {str(g.id): {"id": str(g.id), "offer_id": str(g.offer_id), "name": g.name, "status": g.status}
                     for g in network.goals.values()}
    affiliates = list(client.find_all("Affiliate"))
    assert len(affiliates) == len(network.affiliates)
    for record in affiliates:
        a = network.affiliates[int(record["Affiliate"]["id"])]
        manager = record["Affiliate"]["account_manager_id"]
        assert (None if manager is None else int(manager)) == a.account_manager_id
    one = client.call("Affiliate", "findById", {"id": 3})
    assert one["Affiliate"]["company"] == network.affiliates[3].company
    assert client.call("Affiliate", "findById", {"id": 999}) is None
    users = client.call("AffiliateUser", "findAll", {"filters": {"status": "blocked"}})
    assert {int(k) for k in users} == {u.id for u in network.affiliate_users.values() if u.status == "blocked"}
    employees = client.call("Employee", "findAll")
    assert {int(k): r["Employee"]["email"] for k, r in employees.items()} == {
        e.id: e.email for e in network.employees.values()}


def test_conversion_caps(client, network):
    offer_id, _ = next(iter(sorted(network.caps)))
    caps = client.call("Offer", "getConversionCaps", {"id": offer_id})
    got = {int(r["OfferConversionCap"]["affiliate_id"]): int(r["OfferConversionCap"]["conversion_cap"])
           for r in caps.values()}
    assert got == {a: c for (o, a), c in network.caps.items() if o == offer_id}
    uncapped = next(i for i in network.offers if not any(o == i for o, _ in network.caps))
    assert client.call("Offer", "getConversionCaps", {"id": uncapped}) == []
    with pytest.raises(HasOffersApiError, match="Failed to hydrate"):
        client.call("Offer", "getConversionCaps", {"id": 9999})


def test_faults_can_wait_for_a_later_call(fake):
    # A client that does not retry, so that the 500 itself shows, on exactly the second call.
    with HasOffersClient(fake.base_url, "n1", TOKEN, timeout=5, max_attempts=1, backoff_seconds=0.01) as once:
        fake.inject("http_500", count=1, method="Goal.findAll", after=1)
        try:
            once.call("Goal", "findAll")  # the first call goes through
            with pytest.raises(HasOffersUnavailableError, match="500"):
                once.call("Goal", "findAll")
            once.call("Goal", "findAll")  # the fault was used up
        finally:
            leftover = fake.pending_faults()
            fake.clear_faults()  # the fake is shared by this module's tests
    assert leftover == []


def test_rate_limit_answers_like_the_real_api():
    fake = FakeHasOffers(Network(), network_id="n1", network_token=TOKEN, rate_limit=(3, 10.0))
    fake.start()
    try:
        answers = [httpx.get(f"{fake.base_url}?NetworkId=n1&NetworkToken={TOKEN}&Target=Goal&Method=findAll",
                             timeout=5).json()["response"] for _ in range(4)]
    finally:
        fake.stop()
    assert [a["status"] for a in answers] == [1, 1, 1, -1]
    assert "API usage exceeded rate limit" in answers[3]["errorMessage"]


# -- standalone ------------------------------------------------------------------------------


def test_runs_standalone_and_stops_on_sigterm():
    token = "NETstandalone-secret-token"
    process = subprocess.Popen(
        [sys.executable, "-m", "testkit.fake_hasoffers", "--host", "127.0.0.1", "--port", "0", "--seed", "5",
         "--offers", "6", "--affiliates", "4", "--network-id", "demo", "--token", token],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base_url = process.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/Apiv3/json")
        with HasOffersClient(base_url, "demo", token, timeout=5) as client:
            assert len(client.call("Offer", "findAll")) == 6
        answer = httpx.get(base_url.replace("/Apiv3/json", "/_fake/requests"), timeout=5).json()
        assert answer == {"Offer.findAll": 1}
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
    output = process.stdout.read() + process.stderr.read()
    assert "stopped" in output and token not in output
