"""The demo's ending: the operators' console over the demo's database, then a backtest of
the demo's own history and an explain of one rejected pair, each by the `kpi` command an
operator would type (run as `python -m shared.cli`)."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy import Engine, text

from testkit import ROOT
from testkit.ports import free_port, port_open
from testkit.processes import ServiceProcess
from testkit.waiting import wait_for

CONSOLE_PORT = 8080  # the compose service's; another free port when it is taken
EXPLAIN_LINES = 24   # the explain is printed up to this many lines


@dataclass(frozen=True)
class Console:
    process: ServiceProcess
    url: str
    user: str
    password: str
    password_made_here: bool  # not from KPI_WEB_PASSWORD: printed, so a person can log in


def start_console(env: dict[str, str], log_dir: Path, spawn: Callable[[ServiceProcess], None]) -> Console:
    """`kpi web` on 127.0.0.1 with HTTP Basic: KPI_WEB_USER / KPI_WEB_PASSWORD from the
    environment, else `demo` and a password made for this run. spawn() registers the
    process, so the demo stops it with the services."""
    user = os.environ.get("KPI_WEB_USER") or "demo"
    password = os.environ.get("KPI_WEB_PASSWORD") or ""
    made_here = not password
    password = password or secrets.token_urlsafe(12)
    for port in ([CONSOLE_PORT] if not port_open(CONSOLE_PORT) else []) + [free_port()]:
        process = ServiceProcess("console", {**env, "KPI_WEB_USER": user, "KPI_WEB_PASSWORD": password}, log_dir,
                                 module="shared.cli", args=["web", "--host", "127.0.0.1", "--port", str(port)],
                                 log_name=f"console-{port}.log")
        spawn(process)
        process.start(wait_ready=False)
        wait_for(lambda: port_open(port) or not process.alive(), 30, 0.25, "the console to listen")
        if process.alive():  # else another process took the port meanwhile: the next one
            return Console(process, f"http://127.0.0.1:{port}/", user, password, made_here)
    raise RuntimeError(f"the console did not start:\n{process.log()[-2000:]}")


def console_lines(console: Console) -> list[str]:
    """What the console answers, checked as a person would: the problems page's JSON twin
    with the credentials, and 401 without them."""
    with httpx.Client(base_url=console.url, timeout=10) as client:
        refused = client.get("/").status_code
        problems = client.get("/api/problems", auth=(console.user, console.password))
    problems.raise_for_status()
    total = problems.json()["total"]
    login = f"user {console.user}, " + (f"password {console.password} (made for this run)"
                                        if console.password_made_here else "password from KPI_WEB_PASSWORD")
    return [f"Console: {console.url} ({login})",
            f"  it answers: {total} pairs in PROBLEM on {console.url}; {refused} without the password;"
            " also /silences, /held, /loads, /dead"]


def kpi(env: dict[str, str], *args: str) -> str:
    """Run `kpi ARGS` against the demo's database; its output (it must succeed)."""
    result = subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=ROOT, env={**os.environ, **env},
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"kpi {' '.join(args)} exited {result.returncode}: {result.stderr.strip()[-500:]}")
    return result.stdout


def backtest_and_explain(engine: Engine, env: dict[str, str]) -> str:
    """`kpi backtest` over every value the demo stored, beside what the services did, and
    `kpi explain` of a pair the services rejected (or, without one, of a pair in PROBLEM)."""
    with engine.connect() as conn:
        start = conn.execute(text("SELECT min(measured_at) FROM metric_values")).scalar()
        changes = conn.execute(text("SELECT count(*) FROM trigger_events")).scalar()
        rejects = conn.execute(text(
            "SELECT count(*) FROM operation_runs WHERE kind = 'reject_affiliate' AND status = 'succeeded'")).scalar()
        pair = conn.execute(text("""
            SELECT t.name, e.offer_id, e.affiliate_id, r.kind = 'reject_affiliate' AS rejected
            FROM trigger_events e JOIN triggers t ON t.id = e.trigger_id
            LEFT JOIN operation_runs r ON r.trigger_event_id = e.id AND r.kind = 'reject_affiliate'
                                       AND r.status = 'succeeded'
            WHERE e.status = 'PROBLEM'
            ORDER BY (r.id IS NULL), r.id, e.id LIMIT 1""")).first()
    out = ["=" * 72]
    if start is None:
        return "\n".join(out + ["Backtest: no value stored, nothing to replay", "=" * 72])
    since = start.isoformat()
    out.append(f"$ kpi backtest --from {since}")
    out += ["  " + line for line in _compact(kpi(env, "backtest", "--from", since).rstrip().splitlines())]
    out.append(f"  the services recorded: {changes} state changes, {rejects} affiliates rejected")
    if pair is not None:
        trigger, offer_id, affiliate_id, rejected = pair
        out.append(f"$ kpi explain --trigger '{trigger}' --offer {offer_id} --affiliate {affiliate_id}"
                   + ("" if rejected else "   (no reject ran: a pair in PROBLEM)"))
        lines = _compact(kpi(env, "explain", "--trigger", trigger, "--offer", str(offer_id),
                             "--affiliate", str(affiliate_id)).rstrip().splitlines())
        out += ["  " + line for line in lines[:EXPLAIN_LINES]]
        if len(lines) > EXPLAIN_LINES:
            out.append(f"  ... {len(lines) - EXPLAIN_LINES} more lines")
    out.append("=" * 72)
    return "\n".join(out)


def _compact(lines: list[str]) -> list[str]:
    """Timestamps to the second without the +00:00 (all UTC), values to 6 digits."""
    return [re.sub(r"\b\d+\.\d{7,}", lambda m: f"{float(m.group()):.6g}",
                   re.sub(r"(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)(?:\.\d+)?\+00:00", r"\1 \2", line))
            for line in lines]
