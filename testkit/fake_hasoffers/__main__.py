"""Run the fake HasOffers on its own (the demo, manual testing).

    python -m testkit.fake_hasoffers --host 127.0.0.1 --port 8090 --seed 1 \\
        --offers 30 --affiliates 40 --network-id demo --token NET...

Prints its base URL (never the token) and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from testkit.fake_hasoffers.network import generate
from testkit.fake_hasoffers.server import FakeHasOffers

logger = logging.getLogger(__name__)


def rate_limit(text: str) -> tuple[int, float]:
    calls, _, seconds = text.partition("/")
    try:
        return int(calls), float(seconds or 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CALLS/SECONDS, e.g. 50/10, not {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m testkit.fake_hasoffers", description="A fake HasOffers Network API.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090, help="0 = any free port")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--offers", type=int, default=20)
    p.add_argument("--affiliates", type=int, default=15)
    p.add_argument("--days", type=int, default=3, help="days of hourly stats, ending with the current hour")
    p.add_argument("--network-id", default=os.environ.get("HASOFFERS_NETWORK_ID", "demo"))
    # Defaults to the environment so that the token need not show in a process list.
    p.add_argument("--token", default=os.environ.get("HASOFFERS_NETWORK_TOKEN", "NETfaketoken"))
    p.add_argument("--rate-limit", type=rate_limit, default=(50, 10.0), metavar="CALLS/SECONDS")
    p.add_argument("--timezone", default="UTC",
                   help="the IANA zone the network reports Stat.date and Stat.hour in (its HASOFFERS_TIMEZONE)")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every API answer")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s fake_hasoffers: %(message)s")
    network = generate(args.seed, offers=args.offers, affiliates=args.affiliates, days=args.days,
                       timezone_name=args.timezone)
    fake = FakeHasOffers(network, network_id=args.network_id, network_token=args.token, rate_limit=args.rate_limit)
    fake.configure(latency=args.latency)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("received %s; stopping", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    base_url = fake.start(args.host, args.port)
    logger.info("network %s: %d offers, %d affiliates, %d stat rows, %d caps, %d goals; stats in %s",
                args.network_id, len(network.offers), len(network.affiliates), len(network.stats), len(network.caps),
                len(network.goals), args.timezone)
    print(base_url, flush=True)
    stopping.wait()
    fake.stop()
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
