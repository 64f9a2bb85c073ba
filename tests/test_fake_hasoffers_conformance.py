"""The fake HasOffers read by an independent, published client (pyoffers, from PyPI).

pyoffers was written against the real API: it sends GET query strings with NetworkId,
model-prefixed sorts (`sort[Offer.id]=asc`), `filters[status]=active`, and parses the
envelope, paging and id-keyed records its own way. If the fake's answers drifted from
the real shapes, these reads would fail or come back different from the network.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pyoffers import api as pyoffers_api

from testkit.fake_hasoffers.network import Network, generate
from testkit.fake_hasoffers.server import FakeHasOffers



TOKEN = "NETconformance-token"


@pytest.fixture(scope="module")
def network() -> Network:
    return generate(8, offers=14, affiliates=9, days=1)


@pytest.fixture(scope="module")
def api(network) -> Iterator:
    fake = FakeHasOffers(network, network_id="conf", network_token=TOKEN, rate_limit=(10_000, 10.0))
    fake.start()
    yield pyoffers_api.HasOffersAPI(endpoint=fake.base_url, network_token=TOKEN, network_id="conf", retries=2,
                                    retry_timeout=0)
    fake.stop()


def test_offer_find_by_id_and_not_found(api, network):
    offer = api.offers.find_by_id(3)
    assert (int(offer.id), offer.name, offer.status) == (3, network.offers[3].name, network.offers[3].status)
    assert api.offers.find_by_id(999) is None


def test_offer_find_all_with_contain_sort_filters_and_pages(api, network):
    active = sorted(i for i, o in network.offers.items() if o.status == "active")
    offers = api.offers.find_all(status="active", sort=["-id"], contain=["OfferCategory"])
    assert [int(o.id) for o in offers] == sorted(active, reverse=True)
    with_categories = [o for o in offers if network.offers[int(o.id)].category_ids]
    assert with_categories
    for offer in with_categories:
        categories = offer.offercategory if isinstance(offer.offercategory, list) else [offer.offercategory]
        assert sorted(int(c.id) for c in categories) == network.offers[int(offer.id)].category_ids
    pages = [api.offers.find_all(sort=["id"], limit=5, page=p) for p in (1, 2, 3)]
    assert [int(o.id) for page in pages for o in page] == sorted(network.offers)
    assert api.offers.find_all(id__gt=1000) == []


def test_goals_affiliates_and_users(api, network):
    assert sorted(int(g.id) for g in api.goals.find_all()) == sorted(network.goals)
    affiliates = api.affiliates.find_all(sort=["id"])
    assert [(int(a.id), a.company) for a in affiliates] == [(i, a.company) for i, a in sorted(network.affiliates.items())]
    assert api.affiliates.find_by_id(2).company == network.affiliates[2].company
    users = api.affiliate_users.find_all(affiliate_id=2)
    assert sorted(u.email for u in users) == sorted(u.email for u in network.affiliate_users.values()
                                                    if u.affiliate_id == 2)


def test_report_get_stats_through_the_raw_call(api, network):
    rows = api._call("Report", "getStats", single_result=False, raw=True,
                     fields=["Stat.offer_id", "Stat.clicks"], groups=["Stat.offer_id"],
                     sort={"Stat.offer_id": "asc"}, limit=100, page=1)
    want = {}
    for r in network.stats:
        want[r.offer_id] = want.get(r.offer_id, 0) + r.clicks
    assert {int(r["Stat"]["offer_id"]): int(r["Stat"]["clicks"]) for r in rows} == want


def test_an_error_reaches_the_client_as_its_exception(api):
    with pytest.raises(pyoffers_api.HasOffersException):
        api._call("Offer", "findById", id=-1)
