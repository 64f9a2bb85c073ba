"""The reference load of a big network, against the fake with its rate limit on.

    python -m scripts.bench_reference [--offers 2000] [--affiliates 5000] [--per-offer]

Runs services.metric_loader.reference.load (the code the loader runs) over a fake
network of that size whose rate limit is on (50 calls / 10 s), through the shared call
slots in a database of its own. Prints the calls by method and the API time they cost
at the limit, computed from the call count (calls x 10 s / 50: the wall time on a
loaded machine says more about the machine). --per-offer also loads a network that
refuses `contain[]=OfferConversionCap` (caps read with a call per offer) with the
limit lifted, to show what the contain saves.
"""

from __future__ import annotations

import argparse
import sys
import time

from services.metric_loader import reference
from shared.db import make_engine
from shared.hasoffers import HasOffersClient
from shared.hasoffers_rate import SharedCallWindow
from testkit.database import admin_url, temporary_database
from testkit.fake_hasoffers.network import Network, generate
from testkit.fake_hasoffers.server import FakeHasOffers

TOKEN = "NETreference-bench"
CALLS, WINDOW = 50, 10.0
TARGET_SECONDS = 120


def load(network: Network, *, per_offer: bool, rate_limit: tuple[int, float]) -> tuple[dict[str, int], float, int]:
    """(calls by method, wall seconds, calls the network refused)"""
    fake = FakeHasOffers(network, network_id="big", network_token=TOKEN, rate_limit=rate_limit)
    if per_offer:
        fake.refused_contains = {"OfferConversionCap"}
    fake.start()
    try:
        with temporary_database(admin_url("KPI_BENCH_PG_ADMIN_URL"), "kpi_reference") as url:
            engine = make_engine(url)
            try:
                window = SharedCallWindow(engine, "big", rate_limit[0], rate_limit[1])
                with HasOffersClient(fake.base_url, "big", TOKEN, timeout=120, call_window=window) as client:
                    started = time.monotonic()
                    reference.load(client, engine, 1000)
                    wall = time.monotonic() - started
            finally:
                engine.dispose()
        with fake.lock:
            counts = dict(fake.request_count)
        return counts, wall, fake.usage()["refused_rate_limit"]
    finally:
        fake.stop()


def api_seconds(calls: int) -> float:
    return calls * WINDOW / CALLS


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_reference")
    parser.add_argument("--offers", type=int, default=2000)
    parser.add_argument("--affiliates", type=int, default=5000)
    parser.add_argument("--per-offer", action="store_true", help="also measure caps read offer by offer")
    args = parser.parse_args()
    network = generate(1, offers=args.offers, affiliates=args.affiliates, days=1, active_pairs=0.0005)
    print(f"network: {len(network.offers)} offers, {len(network.affiliates)} affiliates, "
          f"{len(network.affiliate_users)} affiliate users, {len(network.goals)} goals, {len(network.caps)} caps")
    counts, wall, refused = load(network, per_offer=False, rate_limit=(CALLS, WINDOW))
    total = sum(counts.values())
    print(f"reference load, caps contained in Offer.findAll, rate limit {CALLS}/{WINDOW:g}s on:")
    print("  calls: " + ", ".join(f"{m} {n}" for m, n in sorted(counts.items())) + f"; {total} in all")
    print(f"  API time at the limit: {api_seconds(total):.1f} s (target < {TARGET_SECONDS} s); "
          f"wall {wall:.1f} s; {refused} calls refused by the network")
    ok = api_seconds(total) < TARGET_SECONDS and refused == 0
    if args.per_offer:
        counts, wall, _ = load(network, per_offer=True, rate_limit=(10_000, WINDOW))
        slow = sum(counts.values())
        print("the same network refusing the contain (caps read offer by offer), rate limit lifted:")
        print("  calls: " + ", ".join(f"{m} {n}" for m, n in sorted(counts.items())) + f"; {slow} in all")
        print(f"  API time at the limit: {api_seconds(slow):.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
