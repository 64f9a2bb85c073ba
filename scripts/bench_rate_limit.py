"""Three processes calling one HasOffers network at full speed share its rate limit.

    python -m scripts.bench_rate_limit [--processes 3] [--seconds 30] [--limit 50/10]

Starts the fake HasOffers with its rate limit on (it counts every client of the
network together and records the most calls it saw inside any window), a migrated
database of its own, and N worker processes, each a HasOffersClient whose calls go
through the shared slots in PostgreSQL (shared/hasoffers_rate.py). Each worker calls
Offer.findById as fast as the limit lets it. Prints each worker's calls and the longest
it went without one, the network's peak per window, and the calls the fake refused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass

from shared.db import make_engine
from shared.hasoffers import CallWindow, HasOffersClient, HasOffersUnavailableError
from shared.hasoffers_rate import SharedCallWindow
from testkit.database import admin_url, temporary_database
from testkit.fake_hasoffers.network import generate
from testkit.fake_hasoffers.server import FakeHasOffers

TOKEN = "NETrate-bench-token"
NETWORK = "ratebench"


def worker(base_url: str, database_url: str, start_at: float, seconds: float, calls: int, window: float,
           shared: bool = True) -> None:
    engine = make_engine(database_url)
    # Per process (shared=False): what each process did before the limit was shared.
    call_window = (SharedCallWindow(engine, NETWORK, calls, window, in_flight_seconds=10) if shared
                   else CallWindow(calls, window))
    stamps = []
    # Every worker starts at the same moment, however long its process took to start.
    time.sleep(max(0.0, start_at - time.time()))
    deadline = time.monotonic() + seconds
    with HasOffersClient(base_url, NETWORK, TOKEN, timeout=10, max_attempts=5, call_window=call_window,
                         rate_limit_pause_seconds=0.5) as client:
        started = time.monotonic()
        while time.monotonic() < deadline:
            try:
                client.call("Offer", "findById", {"id": 1})
            except HasOffersUnavailableError:  # refused again and again (the limit not shared)
                continue
            stamps.append(time.monotonic())
    gaps = [b - a for a, b in zip([started, *stamps], stamps)]
    print(json.dumps({"calls": len(stamps), "longest_gap": max(gaps, default=seconds)}), flush=True)
    engine.dispose()


@dataclass
class Result:
    per_process: list[int]
    longest_gaps: list[float]
    peak: int
    refused: int
    seconds: float

    @property
    def total(self) -> int:
        return sum(self.per_process)


def measure(processes: int, seconds: float, calls: int, window: float, shared: bool = True) -> Result:
    fake = FakeHasOffers(generate(1, offers=3, affiliates=3, days=1), network_id=NETWORK, network_token=TOKEN,
                         rate_limit=(calls, window))
    fake.start()
    try:
        with temporary_database(admin_url("KPI_BENCH_PG_ADMIN_URL"), "kpi_rate") as database_url:
            start_at = time.time() + 5 + processes  # time for the workers to start
            command = [sys.executable, "-m", "scripts.bench_rate_limit", "--worker", fake.base_url, database_url,
                       f"{start_at}:{seconds}", f"{calls}/{window}", "shared" if shared else "local"]
            children = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
            outputs = []
            for child in children:
                out, _ = child.communicate(timeout=seconds + 120)
                if child.returncode != 0:
                    raise RuntimeError(f"a worker failed with exit code {child.returncode}")
                outputs.append(json.loads(out.strip().splitlines()[-1]))
        usage = fake.usage()
    finally:
        fake.stop()
    return Result([o["calls"] for o in outputs], [o["longest_gap"] for o in outputs], usage["peak"],
                  usage["refused_rate_limit"], seconds)


def report(result: Result, calls: int, window: float) -> str:
    allowed = calls * result.seconds / window
    lines = [f"{len(result.per_process)} processes for {result.seconds:.0f} s against {calls} calls / {window:g} s:"]
    for i, (n, gap) in enumerate(zip(result.per_process, result.longest_gaps), start=1):
        lines.append(f"  process {i}: {n} calls ({n / max(result.total, 1):.0%}), longest wait {gap:.1f} s")
    lines.append(f"  together: {result.total} calls (the limit allows about {allowed:.0f} in {result.seconds:.0f} s), "
                 f"peak {result.peak} in one {window:g} s window, {result.refused} refused by the network")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_rate_limit")
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--limit", default="50/10", help="CALLS/SECONDS")
    parser.add_argument("--per-process", action="store_true",
                        help="count the limit in each process only (to see the network refuse calls)")
    parser.add_argument("--worker", nargs=5, metavar=("BASE_URL", "DATABASE_URL", "START_AT:SECONDS", "LIMIT", "MODE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        base_url, database_url, timing, limit, mode = args.worker
        start_at, _, seconds = timing.partition(":")
        calls, _, window = limit.partition("/")
        worker(base_url, database_url, float(start_at), float(seconds), int(calls), float(window),
               shared=mode == "shared")
        return 0
    calls, _, window = args.limit.partition("/")
    result = measure(args.processes, args.seconds, int(calls), float(window), shared=not args.per_process)
    print(report(result, int(calls), float(window)))
    return 0 if result.refused == 0 and result.peak <= int(calls) else 1


if __name__ == "__main__":
    sys.exit(main())
