"""The HasOffers client over real HTTP against the fake server."""

import logging
import time

import pytest

from shared.hasoffers import (
    HasOffersApiError, HasOffersClient, HasOffersResponseError, HasOffersUnavailableError, encode_params,
)
from testkit.fake_hasoffers.network import FakeAffiliate, FakeOffer, Network
from testkit.fake_hasoffers.server import FakeHasOffers, parse_params

TOKEN = "NETs3cr3t-token-value"


@pytest.fixture
def fake():
    network = Network(offers={1: FakeOffer(1, "Kyzoo", require_approval=True, category_ids=[3, 5])},
                      affiliates={7: FakeAffiliate(7, "Acme")})
    fake = FakeHasOffers(network, network_id="net1", network_token=TOKEN)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def client(fake):
    client = HasOffersClient(fake.base_url, "net1", TOKEN, timeout=2, max_attempts=3, backoff_seconds=0.01,
                             rate_limit_pause_seconds=0.01)
    yield client
    client.close()


def test_brackets_round_trip():
    params = {"fields": ["Stat.clicks", "Stat.offer_id"], "filters": {"Stat.date": {
        "conditional": "GREATER_THAN_OR_EQUAL_TO", "values": ["2026-11-01"]}}, "sort": {"id": "asc"}, "flag": True}
    pairs = encode_params(params)
    assert ("filters[Stat.date][conditional]", "GREATER_THAN_OR_EQUAL_TO") in pairs
    assert ("fields[]", "Stat.clicks") in pairs and ("flag", "1") in pairs
    assert parse_params(pairs) == {**params, "flag": "1"}


def test_find_by_id_parses_the_envelope(client):
    offer = client.find_offer(1)
    assert offer["Offer"]["require_approval"] == "1"
    assert sorted(offer["OfferCategory"]) == ["3", "5"]
    assert client.find_offer(999) is None


def test_api_error_is_permanent_and_readable(client, fake):
    with pytest.raises(HasOffersApiError, match="Failed to hydrate rows"):
        client.block_affiliate(1, 12345)
    assert fake.write_calls() == []


def test_rate_limit_is_waited_out_then_one_effective_call(client, fake):
    fake.inject("rate_limit", count=2)
    assert client.set_affiliate_approval(1, 7, "rejected", notes="min CR") is True
    assert fake.write_calls() == [{"method": "Offer.setAffiliateApproval", "offer_id": 1, "affiliate_id": 7,
                                   "status": "rejected", "notes": "min CR"}]


def test_http_5xx_is_retried(client, fake):
    fake.inject("http_500", count=2)
    assert client.block_affiliate(1, 7) is True
    assert len(fake.write_calls("Offer.blockAffiliate")) == 1


def test_persistent_5xx_gives_a_retryable_error(client, fake):
    fake.inject("http_500", count=10)
    with pytest.raises(HasOffersUnavailableError, match="gave up after 3 attempts: HTTP 500"):
        client.block_affiliate(1, 7)


def test_timeout_is_retried(fake):
    fake.inject("slow", count=1, seconds=1.5)
    with HasOffersClient(fake.base_url, "net1", TOKEN, timeout=0.5, max_attempts=3, backoff_seconds=0.01) as client:
        assert client.block_affiliate(1, 7) is True


def test_malformed_body_is_a_readable_permanent_error(client, fake):
    fake.inject("malformed")
    with pytest.raises(HasOffersResponseError, match="not JSON"):
        client.find_offer(1)


def test_the_server_enforces_the_real_rate_limit(fake):
    fake.rate_limit_calls = 5
    with HasOffersClient(fake.base_url, "net1", TOKEN, max_attempts=1) as client:
        for _ in range(5):
            client.find_offer(1)
        with pytest.raises(HasOffersUnavailableError, match="rate limit"):
            client.find_offer(1)


def test_bad_credentials(fake):
    with HasOffersClient(fake.base_url, "net1", "NETwrong", max_attempts=1) as client:
        with pytest.raises(HasOffersApiError, match="is not authenticated") as info:
            client.find_offer(1)
        assert "NETwrong" not in str(info.value)
    with HasOffersClient(fake.base_url, "other", TOKEN, max_attempts=1) as client:
        with pytest.raises(HasOffersApiError, match="Network id is not valid"):
            client.find_offer(1)


def test_the_token_never_reaches_a_log_line_or_an_error(fake, caplog):
    caplog.set_level(logging.DEBUG)
    fake.inject("http_500", count=1)
    fake.inject("rate_limit", count=1)
    errors = []
    with HasOffersClient(fake.base_url, "net1", TOKEN, timeout=1, max_attempts=3, backoff_seconds=0.01,
                         rate_limit_pause_seconds=0.01) as client:
        client.find_offer(1)
        fake.inject("http_500", count=5)
        with pytest.raises(HasOffersUnavailableError) as info:
            client.find_offer(1)
        errors.append(repr(info.value))
    with HasOffersClient("http://127.0.0.1:1/Apiv3/json", "net1", TOKEN, timeout=1, max_attempts=2,
                         backoff_seconds=0.01) as client:
        with pytest.raises(HasOffersUnavailableError) as info:
            client.find_offer(1)
        errors.append(repr(info.value))
    assert caplog.records  # the retries were logged...
    assert TOKEN not in caplog.text  # ...without the token
    assert all(TOKEN not in e for e in errors)


def test_the_client_stays_under_the_rate_limit_instead_of_hitting_it(fake):
    fake.rate_limit_calls, fake.rate_limit_window = 5, 1.0
    with HasOffersClient(fake.base_url, "net1", TOKEN, max_attempts=1, calls_per_window=5,
                         window_seconds=1.0) as client:
        started = time.monotonic()
        for _ in range(12):
            client.find_offer(1)  # max_attempts=1: one rate-limit answer would raise
        elapsed = time.monotonic() - started
    assert elapsed >= 2.0  # 12 calls at 5 per second need two waits
