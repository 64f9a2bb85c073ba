"""The report: the faults as injected, the results table and the verdict."""

from __future__ import annotations

import argparse
import time
from collections import Counter

from testkit.fault_suite.checks import Row
from testkit.fault_suite.injectors import FaultRecord

# The details below the table, in this order; shown when the run failed ("duplicates",
# which a passing run may have too, always).
DETAILS = ("lost values", "extra values", "missing runs", "runs with another outcome", "missing calls",
           "unsent mails", "stray mails", "wrong mails", "duplicates", "final runs never announced",
           "trigger events never announced")


def print_report(args: argparse.Namespace, published: Counter, faults: list[FaultRecord], rows: list[Row],
                 timings: dict[str, float], reconnects: int, elapsed: float,
                 title: str = "hasoffers-kpi fault suite") -> bool:
    a = args
    ok = all(row.violations == 0 for row in rows)
    width = max(len(r.check) for r in rows)
    out = ["", "=" * 100, title, "=" * 100,
           f"seed {a.seed}; {a.rounds} rounds; fake network {a.offers} offers x {a.affiliates} affiliates; "
           f"direct pairs pacc {a.pacc_pairs}, gtr {a.gtr_pairs}, cap_fill {a.cap_pairs} ({a.volatile:.0%} volatile); "
           f"4 services x 2 replicas; KPI_RETRY_DELAY_MS {a.retry_delay_ms}, KPI_RETRY_LIMIT {a.retry_limit}",
           "published: " + ", ".join(f"{k} {v}" for k, v in sorted(published.items())),
           "", "Faults injected:"]
    kinds = Counter(r.kind for r in faults)
    out.append("  " + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())))
    for r in sorted(faults, key=lambda r: r.started):
        span = f"{(r.ended or r.started) - r.started:5.1f}s"
        out.append(f"  round {r.round}  {time.strftime('%H:%M:%S', time.gmtime(r.started))}Z  {r.kind:<18} "
                   f"{r.target:<18} {span}  {r.note}")
    out += ["", f"{'check':<{width}}  {'expected':>9}  {'observed':>9}  {'bad':>4}  verdict  note", "-" * 120]
    for r in rows:
        out.append(f"{r.check:<{width}}  {str(r.expected):>9}  {str(r.observed):>9}  {r.violations:>4}  "
                   f"{'ok' if r.violations == 0 else 'FAIL':<7}  {r.note}")
    out.append("-" * 120)
    out.append(f"time to drain after the last fault: {timings.get('drain after the last fault', 0):.1f}s; "
               f"rounds {timings.get('rounds', 0):.1f}s; "
               + (f"cluster up {timings['cluster up']:.1f}s; " if "cluster up" in timings else "")
               + f"in all {elapsed:.1f}s; suite's publisher reconnects {reconnects}")
    details = {name: items for row in rows for name, items in row.details.items()}
    for name in DETAILS:
        items = details.get(name)
        if items and (not ok or name == "duplicates"):
            out.append(f"{name}: {items}")
    out.append(f"VERDICT: {'PASS' if ok else 'FAIL'}")
    print("\n".join(out), flush=True)
    return ok
