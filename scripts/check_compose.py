"""Check that docker-compose.yml runs the whole loop with no manual step.

    python3 scripts/check_compose.py [docker-compose.yml]

Resolves the file with `docker-compose config` (so with its defaults and overrides, as
docker-compose sees it) and checks that the metric_loader's schedule is on by default
(reference hourly, metrics every 15 minutes), that both intervals can be overridden
from the environment, and that every service of ours says which queue type it declares.
Runs with the system python3 and its yaml module (python3-yaml, which the Debian
docker-compose package depends on). Exit 0 = fine; 1 = the reasons, one a line.
"""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

SERVICES = ["metric_loader", "trigger_checker", "event_detector", "action_runner"]
DEFAULTS = {"KPI_SCHEDULE_REFERENCE_SECONDS": "3600", "KPI_SCHEDULE_METRICS_SECONDS": "900"}


def resolved(path: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in DEFAULTS and k != "KPI_QUEUE_TYPE"}
    out = subprocess.run(["docker-compose", "-f", path, "config"], env={**clean, **env}, check=True,
                         capture_output=True, text=True).stdout
    return yaml.safe_load(out)["services"]


def environment(services: dict, name: str) -> dict[str, str]:
    return {k: str(v) for k, v in (services[name].get("environment") or {}).items()}


def problems(path: str) -> list[str]:
    found = []
    services = resolved(path)
    loader = environment(services, "metric_loader")
    for variable, default in DEFAULTS.items():
        if loader.get(variable) != default:
            found.append(f"metric_loader: {variable} is {loader.get(variable)!r}, expected {default!r} by default")
    overridden = environment(resolved(path, KPI_SCHEDULE_REFERENCE_SECONDS="7200", KPI_SCHEDULE_METRICS_SECONDS="60"),
                             "metric_loader")
    for variable, value in (("KPI_SCHEDULE_REFERENCE_SECONDS", "7200"), ("KPI_SCHEDULE_METRICS_SECONDS", "60")):
        if overridden.get(variable) != value:
            found.append(f"metric_loader: {variable} cannot be overridden from the environment")
    for name in SERVICES:
        queue_type = environment(services, name).get("KPI_QUEUE_TYPE")
        if queue_type != "quorum":
            found.append(f"{name}: KPI_QUEUE_TYPE is {queue_type!r}, expected 'quorum' by default")
    return found


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else "docker-compose.yml"
    found = problems(path)
    for problem in found:
        print(f"{path}: {problem}", file=sys.stderr)
    if not found:
        print(f"{path}: the schedule is on (reference every 3600 s, metrics every 900 s, both overridable); "
              "quorum queues")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
