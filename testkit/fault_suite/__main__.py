"""Run the fault suite: `python -m testkit.fault_suite [--help]` (scripts/fault-suite wraps it)."""

from __future__ import annotations

import argparse
import sys
import time

from testkit.fault_suite import checks, cluster
from testkit.fault_suite.report import print_report
from testkit.fault_suite.scenario import Scenario
from testkit.fault_suite.world import STARTED, World, say


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/fault-suite",
                                description="Fault-injection suite: nothing is lost or doubled.")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--offers", type=int, default=25)
    p.add_argument("--affiliates", type=int, default=40)
    p.add_argument("--pacc-pairs", type=int, default=1000)
    p.add_argument("--gtr-pairs", type=int, default=800)
    p.add_argument("--cap-pairs", type=int, default=700)
    p.add_argument("--volatile", type=float, default=0.12, help="share of pairs whose level changes")
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--retry-delay-ms", type=int, default=750)
    p.add_argument("--retry-limit", type=int, default=40)
    p.add_argument("--barrier-timeout", type=float, default=150, help="a round's barrier gives up after this long "
                   "without progress")
    p.add_argument("--drain-timeout", type=float, default=150, help="the drain gives up after this long without "
                   "activity")
    p.add_argument("--skip-broker-restart", action="store_true", help="do not restart RabbitMQ")
    p.add_argument("--skip-db-restart", action="store_true", help="do not restart PostgreSQL")
    p.add_argument("--keep", action="store_true", help="keep the database and the queues for inspection")
    p.add_argument("--skip-cluster", action="store_true",
                   help="no cluster round (it runs where it can: as root with rabbitmq-server installed)")
    p.add_argument("--cluster-rounds", type=int, default=4)
    return p


def main() -> int:
    args = parser().parse_args()
    world = World(args)
    scenario = Scenario(args, world)
    ok = False
    try:
        scenario.setup()
        scenario.run()
        rows = checks.verify(args, scenario.model, world, scenario.faults, scenario.poison,
                             scenario.barrier_timeouts, scenario.long_load)
        ok = print_report(args, scenario.published, scenario.faults.records, rows, scenario.timings,
                          world.broker.retries, time.monotonic() - STARTED)
    except Exception as exc:
        say(f"FAILED: {type(exc).__name__}: {exc}; logs are in {world.log_dir}")
        raise
    finally:
        world.teardown()
    say(f"main run finished in {time.monotonic() - STARTED:.1f}s; logs in {world.log_dir}")
    if not args.skip_cluster:
        problem = cluster.unavailable()
        if problem is not None:
            say(f"no cluster round: {problem}")
        else:
            ok = cluster.run(args) and ok
            say(f"finished in {time.monotonic() - STARTED:.1f}s")
    print(f"VERDICT (everything): {'PASS' if ok else 'FAIL'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
