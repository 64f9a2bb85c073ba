"""`kpi`: the operator's command line.

    kpi migrate                      create or upgrade the schema
    kpi roles [--prefix P] [--login] the services' PostgreSQL roles and their grants (after every migrate)
    kpi broker permissions|definitions|declare   a RabbitMQ user per service with only its permissions
    kpi seed FILE.sql                run a SQL file (triggers, thresholds, actions...)
    kpi load cr|pacc|...|reference|all [--lookback-hours N]
    kpi status                       pairs in PROBLEM, counts per trigger
    kpi triggers                     triggers with their thresholds
    kpi dead list SERVICE            what is in a service's dead queue, and why
    kpi dead replay SERVICE          put dead letters back on the exchange
    kpi web [--host H] [--port P]    the operators' console (HTTP Basic: KPI_WEB_USER, KPI_WEB_PASSWORD)
    kpi queues upgrade               redeclare the queues as configured (classic -> quorum)
    kpi partitions list|ensure|prune day partitions of metric_values, trigger_checks; KPI_RETENTION_DAYS
    kpi silence add|list|end         silences: operations of matching events are recorded `silenced`
    kpi held list|release|discard    rejects held by KPI_MAX_REJECTS_PER_HOUR
    kpi backtest --from TS [--to TS] what the current rules would have done with the stored values
    kpi explain --trigger NAME --offer ID --affiliate ID   why a pair is in its state, what acted on it

Exit codes: 0 ok, 2 bad arguments or input, 3 RabbitMQ or PostgreSQL unreachable.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError as AlembicError
from pydantic import ValidationError
from sqlalchemy import Engine, Select, func, literal, select
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from shared import held, migrate, partitions, roles, silences
from shared.rabbitmq import (
    CONNECTION_ERRORS, SERVICE_BINDINGS, BrokerUnavailableError, Bus, PublishError, QueueMismatchError,
    dead_letter_count,
    read_dead_letters, replay_dead_letters,
)
from shared.rabbitmq.migration import UpgradeError, upgrade_queues
from shared.db import Trigger, TriggerState, TriggerThreshold, make_engine
from shared.events import METRIC_LOAD_REQUESTED, MetricLoadRequested, new_event
from shared.service import queue_options
from shared.settings import ConfigurationError, Settings, load_settings
from shared.sql import run_script
from shared.vocabulary import METRIC_KEYS, REFERENCE

EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def _engine(settings: Settings) -> Engine:
    engine = make_engine(settings.database_url.get_secret_value())
    try:
        with engine.connect() as conn:
            conn.execute(select(literal(1)))
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        raise CliError(f"PostgreSQL not reachable at {engine.url.render_as_string(hide_password=True)}: {reason}",
                       EXIT_UNREACHABLE) from None
    return engine


def _bus(settings: Settings, declare: bool = True) -> Bus:
    bus = Bus(settings.amqp_url.get_secret_value(), settings.kpi_exchange, name="hasoffers-kpi cli",
              queues=queue_options(settings))
    try:
        return bus.connect_with_retry(attempts=2, delay=0.5, declare=declare)
    except BrokerUnavailableError as exc:
        raise CliError(str(exc), EXIT_UNREACHABLE) from None
    except QueueMismatchError as exc:
        raise CliError(str(exc)) from None


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> None:
    _engine(settings).dispose()
    try:
        migrate.upgrade(settings.database_url.get_secret_value())
    except (AlembicError, RevisionError) as exc:  # e.g. a database at a revision this version does not know
        raise CliError(f"migration failed: {_first_line(exc)}") from None
    print("schema is at the latest revision")


def cmd_roles(settings: Settings, args: argparse.Namespace) -> None:
    if args.list:
        _table(["role", "writes"], [[roles.role_name(args.prefix, role), writes] for role, writes in roles.describe()])
        return
    try:
        roles.check_prefix(args.prefix)
        passwords = {role: roles.password_from_env(role) for role in roles.ROLES}
        engine = _engine(settings)
        try:
            with engine.begin() as conn:
                applied = roles.apply(conn, args.prefix, passwords, login=args.login)
        finally:
            engine.dispose()
    except roles.RolesError as exc:
        raise CliError(str(exc)) from None
    for role in applied:
        print(f"{role.role}: {'created' if role.created else 'exists'}, "
              f"{'may log in' if role.login else 'no login (no KPI_DB_PASSWORD_* given)'}; grants replaced")


def cmd_broker(settings: Settings, args: argparse.Namespace) -> None:
    from shared.rabbitmq import permissions

    if args.action == "permissions":
        print(permissions.script(settings.kpi_exchange, args.vhost, args.prefix), end="")
    elif args.action == "declare":
        _bus(settings).close()  # connecting declares the whole topology (as an administrator)
        print(f"declared the exchange {settings.kpi_exchange} and every service's queues")
    else:
        try:
            passwords = {role: permissions.password_from_env(role) for role in [*permissions.USERS, "admin"]}
        except ValueError as exc:
            raise CliError(str(exc)) from None
        missing = [f"KPI_AMQP_PASSWORD_{role.upper()}" for role, password in passwords.items() if password is None]
        if missing:
            raise CliError(f"set {', '.join(missing)} (or their _FILE)")
        users = {role: (args.prefix + role, passwords[role]) for role in permissions.USERS}
        body = json.dumps(permissions.definitions(settings.kpi_exchange, users, args.vhost,
                                                  admin=(args.admin_user, passwords["admin"])), indent=2)
        if args.output:
            path = Path(args.output)
            temporary = path.with_name(path.name + ".tmp")
            temporary.write_text(body + "\n", encoding="utf-8")
            temporary.chmod(0o644)  # read by the broker's own user; it holds salted hashes only
            temporary.replace(path)
            print(f"wrote {path}: {len(users)} service users and {args.admin_user}")
        else:
            print(body)


def cmd_seed(settings: Settings, args: argparse.Namespace) -> None:
    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"no such file: {path}")
    try:
        sql = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise CliError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    engine = _engine(settings)
    try:
        run_script(engine, sql)
    except Exception as exc:
        raise CliError(f"{path}: {str(exc).strip()}") from None
    finally:
        engine.dispose()
    print(f"loaded {path}")


def cmd_load(settings: Settings, args: argparse.Namespace) -> None:
    keys = [*METRIC_KEYS, REFERENCE] if args.what == "all" else [args.what]
    try:
        requests = [MetricLoadRequested(metric_key=key, lookback_hours=args.lookback_hours) for key in keys]
    except ValidationError as exc:
        raise CliError(f"invalid request: {exc.errors()[0]['msg']}") from None
    with _bus(settings) as bus:
        for request in requests:
            event = new_event(METRIC_LOAD_REQUESTED, request, correlation_id="cli")
            bus.publish(event)
            print(f"requested {request.metric_key} (look-back {request.lookback_hours} h) event_id={event.event_id}")


def _problems_query(limit: int) -> Select:
    s = TriggerState
    return (
        select(Trigger.name, s.offer_id, s.affiliate_id, s.value, s.threshold, s.since)
        .select_from(s).join(Trigger, Trigger.id == s.trigger_id)
        .where(s.status == "PROBLEM")
        .order_by(Trigger.name, s.since, s.offer_id, s.affiliate_id)
        .limit(limit)
    )


def _counts_query() -> Select:
    s = TriggerState
    return (
        select(Trigger.name, Trigger.metric_key, Trigger.active,
               func.count().filter(s.status == "PROBLEM").label("problem"),
               func.count().filter(s.status == "OK").label("ok"), Trigger.for_checks, Trigger.recovery_threshold)
        .outerjoin(s, s.trigger_id == Trigger.id)
        .group_by(Trigger.id).order_by(Trigger.name)
    )


def cmd_status(settings: Settings, args: argparse.Namespace) -> None:
    engine = _engine(settings)
    with engine.connect() as conn:
        problems = conn.execute(_problems_query(args.limit)).all()
        counts = conn.execute(_counts_query()).all()
        in_force = silences.listing(conn)
    engine.dispose()
    if args.json:
        print(json.dumps({
            "problems": [{"trigger": r[0], "offer_id": r[1], "affiliate_id": r[2], "value": r[3],
                          "threshold": r[4], "since": r[5].isoformat()} for r in problems],
            "triggers": [{"trigger": r[0], "metric": r[1], "active": r[2], "problem": r[3], "ok": r[4],
                          "for_checks": r[5], "recovery": r[6]} for r in counts],
            "silences": [_silence_json(x) for x in in_force],
        }, indent=2))
        return
    print(f"Pairs in PROBLEM ({len(problems)}{'+' if len(problems) == args.limit else ''}):")
    _table(["trigger", "offer", "affiliate", "value", "threshold", "since"],
           [[r[0], r[1], r[2], _num(r[3]), _num(r[4]), r[5].strftime("%Y-%m-%d %H:%M:%S%z")] for r in problems])
    print("\nPer trigger:")
    _table(["trigger", "metric", "active", "for checks", "recovery", "PROBLEM", "OK"],
           [[r[0], r[1], r[2], r[5], _num(r[6]), r[3], r[4]] for r in counts])
    if in_force:
        print()
        _print_silences(in_force)


def _triggers_query() -> Select:
    t, h = Trigger, TriggerThreshold
    return (
        select(t.id, t.name, t.metric_key, t.operator, t.threshold, t.active,
               h.scope, h.category_id, h.offer_id, h.affiliate_id, h.value, t.for_checks, t.recovery_threshold,
               h.recovery_value)
        .outerjoin(h, h.trigger_id == t.id)
        .order_by(t.name, h.scope, h.category_id, h.offer_id, h.affiliate_id)
    )


def cmd_triggers(settings: Settings, args: argparse.Namespace) -> None:
    engine = _engine(settings)
    with engine.connect() as conn:
        rows = conn.execute(_triggers_query()).all()
    out = []
    for r in rows:
        target = {"offer_category": f"category {r[7]}", "offer": f"offer {r[8]}", "affiliate": f"affiliate {r[9]}",
                  "offer_affiliate": f"offer {r[8]} / affiliate {r[9]}"}.get(r[6], "")
        out.append([r[0], r[1], r[2], r[3], _num(r[4]), _num(r[12]), r[11], "yes" if r[5] else "no", r[6] or "",
                    target, _num(r[10]), _num(r[13])])
    _table(["id", "trigger", "metric", "op", "general", "recovery", "for checks", "active", "scope", "target",
            "value", "recovery"], out)
    with engine.connect() as conn:
        in_force = silences.listing(conn)
    engine.dispose()
    if in_force:
        print()
        _print_silences(in_force)


def cmd_dead(settings: Settings, args: argparse.Namespace) -> None:
    with _bus(settings) as bus:
        if args.action == "list":
            total = dead_letter_count(bus, args.service)
            letters = read_dead_letters(bus, args.service, args.limit)
            if args.json:
                print(json.dumps(letters, indent=2, default=str))
                if len(letters) < total:
                    print(f"kpi: {len(letters)} of {total} dead letter(s) shown (--limit)", file=sys.stderr)
                return
            shown = f"; the first {len(letters)} shown (--limit)" if len(letters) < total else ""
            print(f"{total} dead letter(s) in {bus.exchange}.{args.service}.dead{shown}")
            for letter in letters:
                print(f"- {letter['message_id']} {letter['routing_key']} at {letter['dead_at']}: {letter['reason']}")
        else:
            try:
                moved = replay_dead_letters(bus, args.service, args.limit)
            except PublishError as exc:
                raise CliError(f"replay stopped: {_first_line(exc)}; the letters not replayed are still in "
                               f"{bus.exchange}.{args.service}.dead (a letter leaves it only once its copy "
                               "is confirmed on the work queue)") from None
            print(f"replayed {moved} message(s) from {bus.exchange}.{args.service}.dead")


def cmd_web(settings: Settings, args: argparse.Namespace) -> None:
    from shared.console import server
    from shared.logs import configure_logging

    if not 0 < args.port < 65536:
        raise CliError(f"--port must be from 1 to 65535, not {args.port}")
    try:
        credentials = server.credentials_for(settings, args.host, args.no_auth)
    except server.ConsoleConfigError as exc:
        raise CliError(str(exc)) from None
    _engine(settings).dispose()
    configure_logging("console", settings.kpi_log_level, settings.kpi_log_json)
    server.serve(settings, server.console_engine(settings), args.host, args.port, credentials)


def cmd_queues(settings: Settings, args: argparse.Namespace) -> None:
    # The upgrade finds what differs by declarations the broker refuses: not warnings.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    bus = _bus(settings, declare=False)
    try:
        report = upgrade_queues(bus)
    except UpgradeError as exc:
        raise CliError(str(exc)) from None
    except CONNECTION_ERRORS as exc:
        raise CliError(f"RabbitMQ went away during the upgrade ({type(exc).__name__}: {exc}); run it again: "
                       "it goes on where it stopped", EXIT_UNREACHABLE) from None
    finally:
        bus.close()
    for queue in report.queues:
        change = "as configured" if queue.change is None else f"redeclared ({queue.change})"
        moved = f", {queue.moved} message(s) kept" if queue.moved else ""
        print(f"{queue.queue}: {change}{moved}")
    print(f"queues of {bus.exchange}: {bus.queues.describe()}; {len(report.changed)} redeclared, "
          f"{sum(q.moved for q in report.queues)} message(s) moved")


def cmd_partitions(settings: Settings, args: argparse.Namespace) -> None:
    retention = settings.kpi_retention_days if args.retention_days is None else args.retention_days
    engine = _engine(settings)
    try:
        now = datetime.now(timezone.utc)
        if args.action in ("ensure", "prune"):
            if args.action == "ensure":
                made = partitions.ensure(engine, now.date())
                done = None if made is None else f"created {len(made)} partition(s)"
            else:
                pruned = partitions.prune(engine, retention, now)
                done = None if pruned is None else (
                    f"retention {retention} day(s): dropped {len(pruned.dropped)} partition(s), "
                    f"deleted {pruned.default_rows_deleted} row(s) of the default partitions")
            if done is None:
                raise CliError("another process is maintaining the partitions right now; run it again")
            print(done)
        with engine.connect() as conn:
            tables = partitions.describe(conn)
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps({"retention_days": retention, "tables": [
            {"table": t.table, "days": [d.isoformat() for d in t.days], "default_rows": t.default_rows}
            for t in tables]}))
        return
    _table(["table", "partitions", "oldest day", "newest day", "rows in default"],
           [[t.table, len(t.days), t.days[0] if t.days else "-", t.days[-1] if t.days else "-", t.default_rows]
            for t in tables])
    print(f"KPI_RETENTION_DAYS={retention}" + (" (keep everything)" if retention == 0 else ""))


# -- silences and held rejects ---------------------------------------------------------------


def _operator_name(args: argparse.Namespace) -> str:
    """Who does it, for created_by / decided_by: --by, else the login name."""
    return args.by or os.environ.get("SUDO_USER") or os.environ.get("USER") or getpass.getuser() or "cli"


def _silence_json(row: dict) -> dict:
    return {**row, **{k: row[k].isoformat() for k in ("starts_at", "ends_at", "created_at")}}


def _print_silences(rows: list[dict]) -> None:
    print(f"Silences ({len(rows)}):")
    _table(["id", "trigger", "offer", "affiliate", "from", "until", "in force", "reason", "by"],
           [[r["id"], r["trigger"] or "any", r["offer_id"] or "any", r["affiliate_id"] or "any",
             f"{r['starts_at']:%Y-%m-%d %H:%M}", f"{r['ends_at']:%Y-%m-%d %H:%M}", "yes" if r["in_force"] else "no",
             r["reason"][:60], r["created_by"]] for r in rows])


def cmd_silence(settings: Settings, args: argparse.Namespace) -> None:
    engine = _engine(settings)
    try:
        with engine.begin() as conn:
            if args.action == "add":
                if (args.duration is None) == (args.until is None):
                    raise CliError("give exactly one of --for DURATION or --until TIME")
                now = conn.execute(select(func.now())).scalar_one()
                ends = (now + silences.parse_duration(args.duration)) if args.duration else silences.parse_time(
                    args.until)
                silence_id = silences.add(conn, trigger=args.trigger, offer_id=args.offer, affiliate_id=args.affiliate,
                                          ends_at=ends, reason=args.reason or "", created_by=_operator_name(args))
                print(f"silence {silence_id} added, in force until {ends.isoformat()}")
            elif args.action == "list":
                rows = silences.listing(conn, include_ended=args.all)
                if args.json:
                    print(json.dumps([_silence_json(r) for r in rows], indent=2))
                elif rows:
                    _print_silences(rows)
                else:
                    print("no silence in force" + ("" if args.all else " (--all lists ended ones too)"))
            else:
                if not args.ids:
                    raise CliError("name the silences to end: kpi silence end ID...")
                ended = silences.end(conn, args.ids)
                print(f"ended silence(s) {', '.join(map(str, ended))}" if ended else "nothing to end: already ended")
    except silences.SilenceError as exc:
        raise CliError(str(exc)) from None
    finally:
        engine.dispose()


def cmd_held(settings: Settings, args: argparse.Namespace) -> None:
    if args.action != "list" and not args.all and not args.ids:
        raise CliError(f"name the held runs (kpi held {args.action} ID...) or pass --all")
    if args.action != "list" and args.all and args.ids:
        raise CliError("give run ids or --all, not both")
    engine = _engine(settings)
    try:
        if args.action == "list":
            with engine.connect() as conn:
                rows = held.listing(conn)
            if args.json:
                print(json.dumps(rows, indent=2, default=str))
            elif not rows:
                print("no held reject")
            else:
                print(f"Held rejects ({len(rows)}):")
                _table(["run", "trigger", "offer", "affiliate", "value", "threshold", "measured at", "held"],
                       [[r["id"], r["trigger"], r["offer_id"], r["affiliate_id"], _num(r["value"]),
                         _num(r["threshold"]), f"{r['measured_at']:%Y-%m-%d %H:%M}",
                         f"{r['finished_at']:%Y-%m-%d %H:%M}" if r["finished_at"] else ""] for r in rows])
            return
        ids = None if args.all else args.ids
        if args.action == "discard":
            with engine.begin() as conn:
                done = held.discard(conn, ids, _operator_name(args))
            print(f"discarded {len(done)} run(s){': ' + ', '.join(map(str, done)) if done else ''}")
            return
        with engine.begin() as conn:
            done, events = held.release(conn, ids, _operator_name(args))
        print(f"released {len(done)} run(s){': ' + ', '.join(map(str, done)) if done else ''}")
        if not events:
            return
        # After the commit, so the action_runner finds them pending. Should this fail, an
        # action_runner's ticker announces released runs nobody has run within a minute.
        try:
            with _bus(settings) as bus:
                bus.publish_many(events)
            print("an action_runner runs them now")
        except (CliError, PublishError, *CONNECTION_ERRORS) as exc:
            print(f"kpi: warning: not announced now ({exc}); an action_runner runs them within a minute",
                  file=sys.stderr)
    except held.HeldError as exc:
        raise CliError(str(exc)) from None
    finally:
        engine.dispose()


# -- backtest and explain -----------------------------------------------------------------------


def _time(text: str, flag: str) -> datetime:
    try:
        return silences.parse_time(text)
    except silences.SilenceError:
        raise CliError(f"invalid {flag} {text!r}: use ISO 8601, e.g. 2026-11-25T00:00:00Z") from None


def cmd_backtest(settings: Settings, args: argparse.Namespace) -> None:
    from shared import backtest

    start = _time(args.start, "--from")
    engine = _engine(settings)
    try:
        with engine.connect() as conn:
            end = _time(args.end, "--to") if args.end else conn.execute(select(func.now())).scalar_one()
            if end <= start:
                raise CliError(f"--to ({end.isoformat()}) must be after --from ({start.isoformat()})")
            # Read-only: the replay writes nothing, and this transaction could not if it tried.
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            result = backtest.run(conn, start, end, settings.kpi_max_rejects_per_hour)
            conn.rollback()
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
        return
    summary = result.summary()
    print(f"Backtest of {result.values} stored value(s) measured from {start.isoformat()} to {end.isoformat()} "
          f"({result.checks} checks) through the current rules:")
    by_status = Counter(change["status"] for change in result.state_changes)
    print(f"  state changes: {summary['state_changes']} "
          f"({by_status.get('PROBLEM', 0)} to PROBLEM, {by_status.get('OK', 0)} to OK)")
    ops = Counter((op["kind"], op["outcome"]) for op in result.operations)
    _table(["operation", "would run", "held", "skipped", "silenced"],
           [[kind, ops[kind, "would_run"], ops[kind, "held"], ops[kind, "skipped"], ops[kind, "silenced"]]
            for kind in sorted({k for k, _ in ops})])
    rejected = summary["rejected_affiliates"]
    print(f"  affiliates that would be rejected: {len(rejected)}"
          + (": " + ", ".join(f"offer {o} / affiliate {a}" for o, a in rejected[:20]) if rejected else "")
          + (" ..." if len(rejected) > 20 else ""))


def cmd_explain(settings: Settings, args: argparse.Namespace) -> None:
    from shared import explain

    engine = _engine(settings)
    try:
        with engine.connect() as conn:
            report = explain.explain(conn, args.trigger, args.offer, args.affiliate)
    except explain.ExplainError as exc:
        raise CliError(str(exc)) from None
    finally:
        engine.dispose()
    print(json.dumps(report, indent=2, default=str) if args.json else explain.as_text(report))


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def _table(header: list[str], rows: list[list[object]]) -> None:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for i, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kpi", description="Operate hasoffers-kpi.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="create or upgrade the schema").set_defaults(run=cmd_migrate)
    roles_ = sub.add_parser("roles", help="create the services' PostgreSQL roles and grant each what it may do "
                                          "(passwords from KPI_DB_PASSWORD_<ROLE>); after every migrate")
    roles_.add_argument("--prefix", default=roles.DEFAULT_PREFIX, help="role names are <prefix><service>")
    roles_.add_argument("--login", action="store_true",
                        help="every role may log in, with or without a password (certificate or peer auth)")
    roles_.add_argument("--list", action="store_true", help="print the roles and what each may write")
    roles_.set_defaults(run=cmd_roles)
    broker = sub.add_parser("broker", help="print the rabbitmqctl commands that make a user per service with "
                                           "only its permissions (passwords from KPI_AMQP_PASSWORD_<ROLE>)")
    broker.add_argument("action", choices=["permissions", "definitions", "declare"],
                        help="permissions: rabbitmqctl commands; definitions: the same as RabbitMQ definitions "
                             "(users with salted hashes, for load_definitions at boot), with an administrator "
                             "(KPI_AMQP_PASSWORD_ADMIN); declare: the topology, as an administrator")
    broker.add_argument("--admin-user", default="kpi")
    broker.add_argument("--output", help="(definitions) write to this file instead of printing")
    broker.add_argument("--vhost", default="/")
    broker.add_argument("--prefix", default="kpi_", help="user names are <prefix><service>")
    broker.set_defaults(run=cmd_broker)
    seed = sub.add_parser("seed", help="run a SQL file against the database")
    seed.add_argument("file")
    seed.set_defaults(run=cmd_seed)
    load = sub.add_parser("load", help="request a load of one metric, the reference data, or all")
    load.add_argument("what", choices=[*METRIC_KEYS, REFERENCE, "all"])
    load.add_argument("--lookback-hours", type=int, default=None)
    load.set_defaults(run=cmd_load)
    status = sub.add_parser("status", help="pairs in PROBLEM and counts per trigger")
    status.add_argument("--limit", type=int, default=50)
    status.add_argument("--json", action="store_true")
    status.set_defaults(run=cmd_status)
    sub.add_parser("triggers", help="triggers with their thresholds").set_defaults(run=cmd_triggers)
    dead = sub.add_parser("dead", help="list or replay a service's dead-letter queue")
    dead.add_argument("action", choices=["list", "replay"])
    dead.add_argument("service", choices=list(SERVICE_BINDINGS))
    dead.add_argument("--limit", type=int, default=None)
    dead.add_argument("--json", action="store_true")
    dead.set_defaults(run=cmd_dead)
    web = sub.add_parser("web", help="serve the operators' console")
    web.add_argument("--host", default="127.0.0.1")
    web.add_argument("--port", type=int, default=8080)
    web.add_argument("--no-auth", action="store_true", help="no authentication (only with --host 127.0.0.1)")
    web.set_defaults(run=cmd_web)
    queues = sub.add_parser("queues", help="redeclare the queues as configured (KPI_QUEUE_TYPE, KPI_DELIVERY_LIMIT), "
                                           "moving their messages; stop the services first")
    queues.add_argument("action", choices=["upgrade"])
    queues.set_defaults(run=cmd_queues)
    partitions_ = sub.add_parser("partitions", help="the day partitions of metric_values and trigger_checks: "
                                                    "list, create ahead, or drop those past retention")
    partitions_.add_argument("action", choices=["list", "ensure", "prune"])
    partitions_.add_argument("--retention-days", type=int, default=None,
                             help="(prune) days to keep; default KPI_RETENTION_DAYS; 0 keeps everything")
    partitions_.add_argument("--json", action="store_true")
    partitions_.set_defaults(run=cmd_partitions)
    silence = sub.add_parser("silence", help="add, list or end silences")
    silence.add_argument("action", choices=["add", "list", "end"])
    silence.add_argument("ids", nargs="*", type=int, help="(end) the silences to end")
    silence.add_argument("--trigger", help="(add) the trigger's name; any trigger when left out")
    silence.add_argument("--offer", type=int, help="(add) an offer id; any offer when left out")
    silence.add_argument("--affiliate", type=int, help="(add) an affiliate id; any affiliate when left out")
    silence.add_argument("--for", dest="duration", help="(add) how long, e.g. 30m, 2h, 1d")
    silence.add_argument("--until", help="(add) until when (ISO 8601; UTC unless it says otherwise)")
    silence.add_argument("--reason", help="(add) why: required")
    silence.add_argument("--by", help="who adds it (default: the login name)")
    silence.add_argument("--all", action="store_true", help="(list) ended silences too")
    silence.add_argument("--json", action="store_true")
    silence.set_defaults(run=cmd_silence)
    held_ = sub.add_parser("held", help="list, release or discard rejects held by the hourly cap")
    held_.add_argument("action", choices=["list", "release", "discard"])
    held_.add_argument("ids", nargs="*", type=int, help="the held runs (operation_runs ids)")
    held_.add_argument("--all", action="store_true", help="every held run")
    held_.add_argument("--by", help="who decides (default: the login name)")
    held_.add_argument("--json", action="store_true")
    held_.set_defaults(run=cmd_held)
    backtest = sub.add_parser("backtest", help="replay stored values through the current rules (no side effect)")
    backtest.add_argument("--from", dest="start", required=True, help="ISO 8601 (UTC unless it says otherwise)")
    backtest.add_argument("--to", dest="end", help="ISO 8601; default now")
    backtest.add_argument("--json", action="store_true")
    backtest.set_defaults(run=cmd_backtest)
    explain_ = sub.add_parser("explain", help="a pair's state, thresholds, checks, changes and actions")
    explain_.add_argument("--trigger", required=True, help="the trigger's name")
    explain_.add_argument("--offer", type=int, required=True)
    explain_.add_argument("--affiliate", type=int, required=True)
    explain_.add_argument("--json", action="store_true")
    explain_.set_defaults(run=cmd_explain)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # What goes wrong is said once, as the `kpi: error:` line below; the libraries' log
    # lines (a connection attempt that failed, say) would only repeat it. `kpi web`
    # configures logging of its own.
    logging.getLogger().addHandler(logging.NullHandler())
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        print(f"kpi: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if getattr(args, "lookback_hours", 0) is None:
        args.lookback_hours = settings.kpi_lookback_hours
    if args.command == "dead" and args.limit is None and args.action == "list":
        args.limit = 100
    try:
        args.run(settings, args)
    except CliError as exc:
        print(f"kpi: error: {exc}", file=sys.stderr)
        return exc.code
    except OperationalError as exc:  # the server went away in the middle of the command
        print(f"kpi: error: PostgreSQL: {_first_line(getattr(exc, 'orig', None) or exc)}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except SQLAlchemyError as exc:
        print(f"kpi: database error: {_first_line(getattr(exc, 'orig', None) or exc)}", file=sys.stderr)
        return EXIT_USAGE
    except CONNECTION_ERRORS as exc:
        print(f"kpi: error: RabbitMQ connection lost ({type(exc).__name__}: {_first_line(exc)}); "
              "nothing was lost, run it again", file=sys.stderr)
        return EXIT_UNREACHABLE
    except PublishError as exc:
        print(f"kpi: error: RabbitMQ refused a message: {_first_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _first_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
