"""Check that docker-compose.yml runs the whole loop with no manual step, and safely.

    python3 scripts/check_compose.py [docker-compose.yml]

Resolves the file with `docker-compose config` (so with its defaults and overrides, as
docker-compose sees it) and checks that the metric_loader's schedule is on by default
(reference hourly, metrics every 15 minutes), that both intervals can be overridden
from the environment, and that every service of ours says which queue type it declares.
Security: the file refuses to resolve without each required secret (naming it), passes
with them set and with the demo's demo.env, has no secret of its own, publishes ports on
127.0.0.1 only, runs Mailpit only in the demo profile and STARTTLS on by default.
Runs with the system python3 and its yaml module (python3-yaml, which the Debian
docker-compose package depends on). Exit 0 = fine; 1 = the reasons, one a line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import yaml

SERVICES = ["metric_loader", "trigger_checker", "event_detector", "action_runner"]
DEFAULTS = {"KPI_SCHEDULE_REFERENCE_SECONDS": "3600", "KPI_SCHEDULE_METRICS_SECONDS": "900"}
# Required, with no default outside the demo (values for the checks only).
SECRETS = {"POSTGRES_PASSWORD": "check-postgres-secret", "RABBITMQ_PASSWORD": "check-rabbitmq-secret",
           "HASOFFERS_NETWORK_ID": "check-network", "HASOFFERS_NETWORK_TOKEN": "check-token-secret",
           "SMTP_HOST": "smtp.check.example",
           **{f"KPI_DB_PASSWORD_{s.upper()}": f"check-db-{s}-secret" for s in [*SERVICES, "console"]},
           **{f"KPI_AMQP_PASSWORD_{s.upper()}": f"check-amqp-{s}-secret" for s in [*SERVICES, "console"]}}
DEMO_ENV = "demo.env"


def compose(path: str, *args: str, env_file: str | None = None, **env: str) -> subprocess.CompletedProcess:
    """`docker-compose config` in an environment holding only PATH, HOME and `env`."""
    base = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    command = ["docker-compose", "-f", path]
    with tempfile.NamedTemporaryFile("w", suffix=".env") as empty:
        # No .env beside the file may fill in what the check leaves out.
        command += ["--env-file", env_file or empty.name, *args, "config"]
        return subprocess.run(command, env={**base, **env}, capture_output=True, text=True)


def resolved(path: str, **env: str) -> dict:
    result = compose(path, **{**SECRETS, **env})
    if result.returncode != 0:
        raise SystemExit(f"{path}: docker-compose config failed: {result.stderr.strip()}")
    return yaml.safe_load(result.stdout)["services"]


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
    return found + security_problems(path)


def security_problems(path: str) -> list[str]:
    found = []
    for name in SECRETS:
        result = compose(path, **{k: v for k, v in SECRETS.items() if k != name})
        if result.returncode == 0:
            found.append(f"resolves without {name}: it must be required outside the demo")
        elif f"{name} is required" not in result.stderr:
            found.append(f"without {name}, docker-compose config does not say so: {result.stderr.strip()[-300:]}")
    services = resolved(path)
    text = yaml.safe_dump(services)
    for name, value in SECRETS.items():
        if name.endswith(("PASSWORD", "TOKEN")) and value not in text:
            found.append(f"{name} is set but used by no service")
    for name in SERVICES + ["console"]:
        url = environment(services, name).get("DATABASE_URL", "")
        password = environment(services, name).get("DATABASE_PASSWORD")
        if f"://kpi_{name}@" not in url or password != SECRETS[f"KPI_DB_PASSWORD_{name.upper()}"]:
            found.append(f"{name}: connects to PostgreSQL as {url.split('://')[-1].split('@')[0]!r}, "
                         f"expected its own role kpi_{name} with KPI_DB_PASSWORD_{name.upper()}")
        url = environment(services, name).get("AMQP_URL", "")
        password = environment(services, name).get("AMQP_PASSWORD")
        if f"://kpi_{name}@" not in url or password != SECRETS[f"KPI_AMQP_PASSWORD_{name.upper()}"]:
            found.append(f"{name}: connects to RabbitMQ as {url.split('://')[-1].split('@')[0]!r}, "
                         f"expected its own user kpi_{name} with KPI_AMQP_PASSWORD_{name.upper()}")
    rabbitmq = services.get("rabbitmq", {})
    if any(k.startswith("RABBITMQ_DEFAULT_") for k in (rabbitmq.get("environment") or {})):
        found.append("rabbitmq: has a default user of its own; its users come from broker_users' definitions")
    if "broker_users" not in (rabbitmq.get("depends_on") or {}):
        found.append("rabbitmq: does not wait for broker_users to write its users")
    migrate_ = services.get("migrate", {})
    if "kpi roles" not in " ".join(map(str, migrate_.get("command") or [])):
        found.append("migrate: does not run `kpi roles` after `kpi migrate`")
    for name in SERVICES + ["console", "migrate"]:
        environment_ = environment(services, name)
        for variable, value in environment_.items():
            if variable.endswith(("PASSWORD", "TOKEN")) and value and value not in SECRETS.values():
                found.append(f"{name}: {variable} has a value of its own ({variable} must come from the environment)")
        if environment_.get("SMTP_STARTTLS") != "true":
            found.append(f"{name}: SMTP_STARTTLS is {environment_.get('SMTP_STARTTLS')!r}, expected 'true' by default")
    for name, service in services.items():
        for port in service.get("ports") or []:
            text_ = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}"
            if not str(text_).startswith("127.0.0.1:"):
                found.append(f"{name}: port {port} is published on every interface, expected 127.0.0.1 only")
    if "demo" not in (services.get("mailpit", {}).get("profiles") or []):
        found.append("mailpit runs outside the demo profile")
    demo_env = os.path.join(os.path.dirname(os.path.abspath(path)), DEMO_ENV)
    demo = compose(path, "--profile", "demo", env_file=demo_env)
    if demo.returncode != 0:
        found.append(f"the demo does not resolve with {DEMO_ENV}: {demo.stderr.strip()[-300:]}")
    return found


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else "docker-compose.yml"
    found = problems(path)
    for problem in found:
        print(f"{path}: {problem}", file=sys.stderr)
    if not found:
        print(f"{path}: the schedule is on (reference every 3600 s, metrics every 900 s, both overridable); "
              "quorum queues; no default secret (each required one named when missing), ports on 127.0.0.1, "
              "STARTTLS on, the demo resolves with demo.env")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
