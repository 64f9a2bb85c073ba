"""The reference load reads conversion caps with the offers, not with a call per offer."""

from __future__ import annotations

import math

import pytest
from sqlalchemy import text

from services.metric_loader import reference
from shared.hasoffers import HasOffersClient
from testkit.fake_hasoffers.network import generate
from testkit.fake_hasoffers.server import FakeHasOffers

TOKEN = "NETcaps-token"
PAGE = 25


@pytest.fixture
def network():
    return generate(21, offers=70, affiliates=60, days=1)


def stored_caps(db) -> dict[tuple[int, int], int]:
    with db.connect() as conn:
        return {(r.offer_id, r.affiliate_id): r.conversion_cap
                for r in conn.execute(text("SELECT * FROM conversion_caps"))}


def run_load(db, network, refused: set[str]) -> tuple[dict[str, int], str | None]:
    fake = FakeHasOffers(network, network_id="caps", network_token=TOKEN, rate_limit=(10_000, 10.0))
    fake.refused_contains = refused
    fake.start()
    try:
        with HasOffersClient(fake.base_url, "caps", TOKEN, max_attempts=1) as client:
            _, notes = reference.load(client, db, PAGE)
        with fake.lock:
            return dict(fake.request_count), notes
    finally:
        fake.stop()


def test_caps_come_with_the_offers_in_a_few_calls(db, network):
    calls, _ = run_load(db, network, set())
    active = {o for o, offer in network.offers.items() if offer.status == "active"}
    want = {pair: cap for pair, cap in network.caps.items() if pair[0] in active}
    assert stored_caps(db) == want and any(cap == 0 for cap in want.values()) and want
    assert "Offer.getConversionCaps" not in calls
    assert calls["Offer.findAll"] == math.ceil(len(network.offers) / PAGE)
    # Every call the load made: one per page of each model.
    pages = {"Offer.findAll": len(network.offers), "Goal.findAll": len(network.goals),
             "Affiliate.findAll": len(network.affiliates), "AffiliateUser.findAll": len(network.affiliate_users),
             "Employee.findAll": len(network.employees)}
    assert calls == {m: math.ceil(n / PAGE) for m, n in pages.items()}


def test_a_network_that_refuses_the_contain_gets_a_call_per_offer_and_the_same_caps(db, network):
    calls, _ = run_load(db, network, {"OfferConversionCap"})
    active = {o for o, offer in network.offers.items() if offer.status == "active"}
    assert stored_caps(db) == {pair: cap for pair, cap in network.caps.items() if pair[0] in active}
    assert calls["Offer.getConversionCaps"] == len(active)
