"""Benchmark: load and publish a 100,000-row report from the fake HasOffers.

    .venv/bin/python -m scripts.bench_loader [--rows 100000] [--repeat 3] [--page-size 10000]

The fake runs in a child process (its own interpreter, as the real API would be), with
one (offer, affiliate) pair per report row. Measured, best of --repeat:
- baseline: just reading the report (Report.getStats, every page) with the client;
- loader: the metric_loader handler (read, compute, record the run, build the batches)
  plus publishing the batches with confirms to a throw-away exchange.
Prints rows/s for both and their ratio, and the loader's peak memory: this process's
peak RSS over a load, less its RSS before it (the fake serves from a process of its own).
With `--rows 1000000` that is what a million-row report costs: its pages are read one at a
time (the client yields rows page by page), the per-pair sums and the values are what stay.
Needs the local PostgreSQL and RabbitMQ; creates and drops its own database and exchange.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import statistics
import sys
import time
import uuid
from datetime import datetime, timezone

from sqlalchemy import text

from services.metric_loader import computation
from services.metric_loader.handler import LoaderConfig, handle_load_requested, monitored_offers
from shared.db import make_engine
from shared.events import METRIC_LOAD_REQUESTED, MetricLoadRequested, new_event
from shared.hasoffers import HasOffersClient
from shared.rabbitmq import Bus, queue_names
from testkit import broker
from testkit.database import admin_url, drop_database, migrated_database
from testkit.fake_hasoffers.network import FakeOffer, Network, StatRow
from testkit.fake_hasoffers.server import FakeHasOffers
from testkit.ports import free_port

TOKEN = "NETbench" + uuid.uuid4().hex[:8]
OFFERS = 400


def serve_fake(port: int, rows: int, ready: multiprocessing.Event) -> None:  # type: ignore[valid-type]
    now = datetime.now(timezone.utc)
    day, hour = now.strftime("%Y-%m-%d"), now.hour
    affiliates = -(-rows // OFFERS)
    stats = [StatRow(o, a, 0, day, hour, clicks=50 + (o * a) % 200, gross_clicks=60, conversions=(o + a) % 7,
                     payout=1.0, revenue=1.5)
             for o in range(1, OFFERS + 1) for a in range(1, affiliates + 1)][:rows]
    network = Network(offers={o: FakeOffer(o, f"Offer {o}") for o in range(1, OFFERS + 1)}, stats=stats)
    fake = FakeHasOffers(network, network_id="bench", network_token=TOKEN, rate_limit=(100_000, 10.0))
    fake.start("127.0.0.1", port)
    ready.set()
    while True:
        time.sleep(3600)


def _status_mb(field: str) -> float:
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


def peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def reset_peak_rss() -> float:
    """Start VmHWM afresh at the current RSS (Linux: clear_refs 5); the current RSS."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return _status_mb("VmRSS")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--page-size", type=int, default=10_000)
    args = parser.parse_args()

    pg_admin = admin_url("BENCH_PG_ADMIN_URL")
    amqp_url = broker.amqp_url()
    name = f"kpi_bench_{uuid.uuid4().hex[:8]}"
    exchange = f"kpi.bench.{uuid.uuid4().hex[:8]}"
    port = free_port()
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=serve_fake, args=(port, args.rows, ready), daemon=True)
    server.start()
    engine = bus = client = None
    try:
        engine = make_engine(migrated_database(pg_admin, name))
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO offers (id, name) SELECT g, 'Offer ' || g FROM generate_series(1, :n) g"),
                         {"n": OFFERS})
        bus = Bus(amqp_url, exchange, name="hasoffers-kpi bench").connect()
        if not ready.wait(120):
            raise RuntimeError("the fake did not start")
        client = HasOffersClient(f"http://127.0.0.1:{port}/Apiv3/json", "bench", TOKEN, timeout=120)
        config = LoaderConfig(page_size=args.page_size)

        offers = monitored_offers(engine, config)
        start, end = computation.window(datetime.now(timezone.utc), 24)
        params_list = [computation.report_params("cr", period, offers)
                       for period in computation.window_filters(start, end)]

        def read_only() -> int:
            return sum(1 for params in params_list for _ in client.get_stats(params, page_size=args.page_size))

        warm = read_only()  # the fake aggregates each query once, then serves pages from memory
        assert warm == args.rows, f"the report has {warm} rows, expected {args.rows}"

        baseline, loads, publishes, values, peaks = [], [], [], 0, []
        for _ in range(args.repeat):
            began = time.perf_counter()
            read_only()
            baseline.append(time.perf_counter() - began)

            request = new_event(METRIC_LOAD_REQUESTED, MetricLoadRequested(metric_key="cr", lookback_hours=24))
            before = reset_peak_rss()
            began = time.perf_counter()
            result = handle_load_requested(request, engine=engine, client=client, config=config)
            handled = time.perf_counter()
            bus.publish_many(result.events)
            if result.after_publish is not None:
                result.after_publish()  # as the consumer does: the run is marked succeeded
            done = time.perf_counter()
            loads.append(done - began)
            peaks.append(peak_rss_mb() - before)
            publishes.append(done - handled)
            values = sum(len(e.data["metrics"]) for e in result.events)
            bus.channel.queue_purge(queue_names(exchange, "trigger_checker").work)

        best_read, best_load = min(baseline), min(loads)
        print(f"report: {args.rows} rows, {len(params_list)} window part(s), page size {args.page_size}, "
              f"{values} values in {-(-values // 1000)} messages")
        print(f"baseline (read only):   {best_read:6.2f} s  {args.rows / best_read:10,.0f} rows/s")
        print(f"loader (read+publish):  {best_load:6.2f} s  {args.rows / best_load:10,.0f} rows/s"
              f"   (of which publishing {statistics.median(publishes):.2f} s)")
        print(f"ratio loader/baseline:  {best_load / best_read:6.2f}x")
        print(f"loader peak memory:     {max(peaks):6.0f} MB over its RSS before the load "
              f"({peak_rss_mb():.0f} MB peak RSS of this process in all)")
        return 0
    finally:
        if client is not None:
            client.close()
        if bus is not None:
            broker.delete_topology(bus.channel, exchange)
            bus.close()
        if engine is not None:
            engine.dispose()
        server.terminate()
        drop_database(pg_admin, name)


if __name__ == "__main__":
    sys.exit(main())
