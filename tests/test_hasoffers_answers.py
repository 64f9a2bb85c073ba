"""HasOffers answers a client must not take at face value: writes answered `data: false`,
report rows that move between unsorted pages, empty reports in every shape, the echo."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timezone

import httpx
import pytest

from services.action_runner.handler import handle_trigger_event
from shared.hasoffers import HasOffersClient, HasOffersUnavailableError, HasOffersWriteRefusedError
from shared.settings import Settings
from testkit.fake_hasoffers.network import FakeOffer, Network, StatRow
from testkit.fake_hasoffers.server import FakeHasOffers
from tests.action_runner_support import (
    AFFILIATE, OFFER, OFFER_APPROVAL, FakeMailer, add_action, add_operation, add_trigger_event, envelope_of,
    fake_network, runs,
)

TOKEN = "NETanswers-token"


@pytest.fixture(scope="module")
def fake_api() -> Iterator[FakeHasOffers]:
    fake = FakeHasOffers(fake_network(), network_id="answers", network_token=TOKEN, rate_limit=(10_000, 10.0))
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def api(fake_api: FakeHasOffers) -> Iterator[HasOffersClient]:
    fake_api.reset()
    fake_api.network = fake_network()
    fake_api.configure(latency=0, empty_shape="paged")
    with HasOffersClient(fake_api.base_url, "answers", TOKEN, max_attempts=3, backoff_seconds=0,
                         rate_limit_pause_seconds=0) as client:
        yield client


# -- writes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [False, None, "", 0, "0", [], {}, "maybe"])
@pytest.mark.parametrize("method", ["Offer.setAffiliateApproval", "Offer.blockAffiliate"])
def test_a_write_answered_without_confirmation_is_refused(api, fake_api, method, data):
    fake_api.inject("data", 1, method, data=data)
    with pytest.raises(HasOffersWriteRefusedError, match=f"{method}.*did not confirm the change"):
        if method == "Offer.blockAffiliate":
            api.block_affiliate(OFFER, AFFILIATE)
        else:
            api.set_affiliate_approval(OFFER, AFFILIATE, "approved")
    assert fake_api.requests(method) == 1, "not retried"


@pytest.mark.parametrize("data", [True, 1, "1", "true", {"OfferAffiliateApproval": {"id": "9", "status": "approved"}}])
def test_a_write_that_says_it_was_applied_is_accepted(api, fake_api, data):
    fake_api.inject("data", 1, "Offer.setAffiliateApproval", data=data)
    assert api.set_affiliate_approval(OFFER, AFFILIATE, "approved") == data


def one_action(world, kind: str) -> None:
    with world.begin() as conn:
        add_action(conn, [(1, "PROBLEM")], [add_operation(conn, kind)])


@pytest.mark.parametrize(("kind", "offer", "method"), [
    ("approve_affiliate", OFFER, "Offer.setAffiliateApproval"),
    ("reject_affiliate", OFFER, "Offer.blockAffiliate"),
    ("reject_affiliate", OFFER_APPROVAL, "Offer.setAffiliateApproval"),
])
def test_an_operation_answered_false_fails_with_the_reason_and_is_not_retried(world, api, fake_api, kind, offer,
                                                                              method):
    one_action(world, kind)
    with world.begin() as conn:
        event = add_trigger_event(conn, offer_id=offer)
    fake_api.inject("data", 1, method, data=False)
    settings = Settings(_env_file=None, mail_from="kpi@kpi.example", kpi_retry_limit=2)
    result = handle_trigger_event(envelope_of(event), engine=world, mailer=FakeMailer(), hasoffers=api,
                                  settings=settings)
    [run] = runs(world)
    assert (run["status"], run["attempts"]) == ("failed", 1)
    assert method in run["detail"] and "did not confirm the change" in run["detail"]
    assert result.dead_letters == [] and fake_api.write_calls() == []
    # Delivered again: the run has its outcome; the network is not asked again.
    handle_trigger_event(envelope_of(event), engine=world, mailer=FakeMailer(), hasoffers=api, settings=settings)
    assert fake_api.requests(method) == 1 and runs(world)[0]["status"] == "failed"


# -- reports --------------------------------------------------------------------------------


def report_network() -> Network:
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    stats = [StatRow(o, a, 0, day, h, clicks=o * 100 + a, conversions=a % 3)
             for o in (1, 2, 3) for a in range(1, 31) for h in (0, 1)]
    return Network(offers={o: FakeOffer(o, f"Offer {o}") for o in (1, 2, 3)}, stats=stats)


REPORT = {"fields": ["Stat.clicks", "Stat.conversions"], "groups": ["Stat.offer_id", "Stat.affiliate_id"]}


def test_unsorted_pages_overlap_and_the_client_reads_each_row_once(api, fake_api):
    fake_api.network = report_network()
    # Without a sort the fake, like a live database, orders each page's query anew:
    # paging through it by hand meets some rows twice and misses others.
    seen = []
    for page in range(1, 10):
        data = api.call("Report", "getStats", {**REPORT, "limit": 10, "page": page})
        seen += [(r["Stat"]["offer_id"], r["Stat"]["affiliate_id"]) for r in data["data"]]
    assert len(seen) == 90 and len(set(seen)) < 90
    # The client asks for a stable order and keys rows by their groups.
    rows = list(api.get_stats(REPORT, page_size=10))
    assert sorted((int(r["offer_id"]), int(r["affiliate_id"])) for r in rows) == [
        (o, a) for o in (1, 2, 3) for a in range(1, 31)]
    assert all(int(r["clicks"]) == 2 * (int(r["offer_id"]) * 100 + int(r["affiliate_id"])) for r in rows)


def test_a_row_met_again_on_a_later_page_is_counted_once(api, fake_api):
    fake_api.network = report_network()
    calls = []
    original = api.call

    def call(target, method, params=None):
        data = original(target, method, params)
        calls.append(params)
        if method == "getStats" and params["page"] == 2:
            first = original(target, method, {**params, "page": 1})
            data = {**data, "data": first["data"][-1:] + data["data"]}  # the last row of page 1 again
        return data

    api.call = call
    rows = list(api.get_stats(REPORT, page_size=40))
    assert all(p["sort"] == {"Stat.offer_id": "asc", "Stat.affiliate_id": "asc"} for p in calls)
    assert len(rows) == 90
    assert len({(r["offer_id"], r["affiliate_id"]) for r in rows}) == 90


@pytest.mark.parametrize("shape", ["paged", "list", "object", "null"])
def test_an_empty_report_reads_as_empty_in_every_shape(api, fake_api, shape):
    fake_api.network = report_network()
    fake_api.configure(empty_shape=shape)
    params = {**REPORT, "filters": {"Stat.offer_id": {"conditional": "EQUAL_TO", "values": ["99"]}}}
    if shape != "paged":
        assert api.call("Report", "getStats", {**params, "limit": 5}) == {"list": [], "object": {}, "null": None}[shape]
    assert list(api.get_stats(params, page_size=5)) == []


def test_the_echo_carries_the_keys_of_real_answers_and_never_the_token(fake_api):
    answer = fake_api._answer("Offer.findById", {"NetworkId": "answers", "NetworkToken": TOKEN, "Target": "Offer",
                                                 "Method": "findById", "id": "12"})
    echo = answer["request"]
    assert {k: echo[k] for k in ("Target", "Format", "Service", "Version", "Method", "NetworkId", "id")} == {
        "Target": "Offer", "Format": "json", "Service": "HasOffers", "Version": "2", "Method": "findById",
        "NetworkId": "answers", "id": "12"}
    assert "NetworkToken" not in echo


# -- the endpoint -----------------------------------------------------------------------------


class ToTheFake(httpx.BaseTransport):
    """Sends every request to the local fake, keeping the URL's host in the Host header
    (the network's own API host does not resolve here)."""

    def __init__(self, port: int):
        self.inner, self.port, self.urls = httpx.HTTPTransport(), port, []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.urls.append(str(request.url))
        request.url = request.url.copy_with(scheme="http", host="127.0.0.1", port=self.port)
        return self.inner.handle_request(request)


def test_the_network_host_form_names_the_network_without_the_deprecated_parameter(api, fake_api):
    transport = ToTheFake(int(fake_api.base_url.split(":")[2].split("/")[0]))
    with HasOffersClient("https://{network_id}.api.hasoffers.com/Apiv3/json", "answers", TOKEN, max_attempts=1,
                         transport=transport) as client:
        assert client.find_offer(OFFER)["Offer"]["id"] == str(OFFER)
    assert transport.urls == ["https://answers.api.hasoffers.com/Apiv3/json"]
    # A URL without the placeholder (a proxy, the legacy shared host) carries NetworkId.
    with HasOffersClient(fake_api.base_url, "answers", TOKEN, max_attempts=1) as client:
        assert client._query == {"NetworkId": "answers"}


def test_latency_slows_every_answer_and_a_short_timeout_gives_up_retryably(api, fake_api):
    fake_api.configure(latency=0.4)
    started = time.monotonic()
    assert api.find_offer(OFFER) is not None
    assert time.monotonic() - started >= 0.4
    with HasOffersClient(fake_api.base_url, "answers", TOKEN, timeout=0.1, max_attempts=2,
                         backoff_seconds=0) as impatient, pytest.raises(HasOffersUnavailableError, match="timeout"):
        impatient.find_offer(OFFER)
