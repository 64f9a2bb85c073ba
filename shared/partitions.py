"""Day partitions of metric_values and trigger_checks, made ahead and dropped whole.

Both tables are partitioned by range of measured_at (migration 0010): one partition per
UTC day, `<table>_pYYYYMMDD`, and a default partition, `<table>_default`, for a row of a
day that has none (a value older than the oldest day kept, or a day that was never made).
No accepted row is ever refused for want of a partition.

The trigger_checker, the only writer of both tables, keeps them (`maintain`): at start
and every hour it makes the partitions from yesterday to AHEAD_DAYS ahead, and drops
those whose whole day is older than KPI_RETENTION_DAYS (0: keep everything). A drop is a
catalog change, not a DELETE: a day of any size goes in milliseconds. `kpi partitions`
does the same by hand.

Nothing outside the two tables needs a dropped row: trigger_states and trigger_events
carry the value, threshold and time of their check (migration 0010 copies them into
events recorded without), and operation_runs and action_evaluations reference events.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone

from sqlalchemy import Connection, Engine, text

logger = logging.getLogger(__name__)

PARTITIONED_TABLES = ("metric_values", "trigger_checks")
# Beyond the largest clock skew a value may have (KPI_MAX_CLOCK_SKEW_SECONDS <= 7 days),
# so a day's partition is there before any accepted value of that day.
AHEAD_DAYS = 8
# Serialises the replicas' maintenance (others skip a round rather than wait).
ADVISORY_LOCK_KEY = 0x6B70695F70617274  # "kpi_part"
# How often the trigger_checker's upkeep runs (at start, then every this many seconds).
UPKEEP_SECONDS = 3600
# A partition is created or dropped under a brief lock on its table; waiting longer
# than this behind a long query would stall every writer queued behind the lock.
LOCK_TIMEOUT = "5s"

_DAY_PARTITION = re.compile(r"^(?P<table>metric_values|trigger_checks)_p(?P<day>\d{8})$")


def partition_name(table: str, day: date) -> str:
    return f"{table}_p{day:%Y%m%d}"


def default_partition_name(table: str) -> str:
    return f"{table}_default"


def is_partition(name: str | None) -> bool:
    """A partition's name (the schema comparison and Alembic skip them: only the parent
    tables are in the models)."""
    return bool(name) and (bool(_DAY_PARTITION.match(name)) or name in {  # type: ignore[arg-type]
        default_partition_name(t) for t in PARTITIONED_TABLES})


def day_start(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=timezone.utc)


def create_day_partition(conn: Connection, table: str, day: date) -> None:
    """Create the partition of `day`, moving into it any row of that day the default
    partition holds (PostgreSQL refuses the partition otherwise). One transaction: the
    caller's."""
    name, default = partition_name(table, day), default_partition_name(table)
    low, high = day_start(day).isoformat(), day_start(day + timedelta(days=1)).isoformat()
    in_day = f"measured_at >= '{low}' AND measured_at < '{high}'"
    stray = f"{name}_stray"
    has_default = conn.execute(text("SELECT to_regclass(:name) IS NOT NULL"), {"name": default}).scalar()
    if has_default:
        conn.execute(text(f"CREATE TEMPORARY TABLE {stray} (LIKE {default}) ON COMMIT DROP"))
        conn.execute(text(f"WITH moved AS (DELETE FROM {default} WHERE {in_day} RETURNING *) "
                          f"INSERT INTO {stray} SELECT * FROM moved"))
    conn.execute(text(f"CREATE TABLE {name} PARTITION OF {table} FOR VALUES FROM ('{low}') TO ('{high}')"))
    if has_default:
        conn.execute(text(f"INSERT INTO {table} SELECT * FROM {stray}"))


def create_default_partition(conn: Connection, table: str) -> None:
    conn.execute(text(f"CREATE TABLE {default_partition_name(table)} PARTITION OF {table} DEFAULT"))


@dataclass(frozen=True)
class Partitions:
    """A table's day partitions (by day) and the rows its default partition holds."""

    table: str
    days: list[date]
    default_rows: int


def day_partitions(conn: Connection, table: str) -> list[date]:
    names = conn.scalars(text(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = to_regclass(:table)"), {"table": table})
    days = []
    for name in names:
        found = _DAY_PARTITION.match(name)
        if found:
            days.append(datetime.strptime(found["day"], "%Y%m%d").date())
    return sorted(days)


def describe(conn: Connection) -> list[Partitions]:
    out = []
    for table in PARTITIONED_TABLES:
        default_rows = conn.execute(text(f"SELECT count(*) FROM {default_partition_name(table)}")).scalar()
        out.append(Partitions(table, day_partitions(conn, table), default_rows or 0))
    return out


def _locked(conn: Connection) -> bool:
    conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
    return bool(conn.execute(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY}).scalar())


def ensure(engine: Engine, today: date, ahead_days: int = AHEAD_DAYS) -> list[str] | None:
    """Make the missing partitions of yesterday .. today + ahead_days. Returns the names
    made, or None when another process is doing it now."""
    wanted = [today + timedelta(days=n) for n in range(-1, ahead_days + 1)]
    made = []
    with engine.begin() as conn:
        if not _locked(conn):
            return None
        for table in PARTITIONED_TABLES:
            have = set(day_partitions(conn, table))
            for day in wanted:
                if day not in have:
                    create_day_partition(conn, table, day)
                    made.append(partition_name(table, day))
    if made:
        logger.info("partitions created: %s", ", ".join(made))
    return made


@dataclass(frozen=True)
class Pruned:
    dropped: list[str]
    default_rows_deleted: int


def prune(engine: Engine, retention_days: int, now: datetime) -> Pruned | None:
    """Drop the partitions whose whole day is older than now - retention_days, and delete
    the default partition's rows older than that. None when another process is at it."""
    if retention_days <= 0:
        return Pruned([], 0)
    cutoff = now - timedelta(days=retention_days)
    dropped, deleted = [], 0
    with engine.begin() as conn:
        if not _locked(conn):
            return None
        for table in PARTITIONED_TABLES:
            for day in day_partitions(conn, table):
                if day_start(day + timedelta(days=1)) <= cutoff:
                    conn.execute(text(f"DROP TABLE {partition_name(table, day)}"))
                    dropped.append(partition_name(table, day))
            deleted += conn.execute(text(f"DELETE FROM {default_partition_name(table)} WHERE measured_at < :cutoff"),
                                    {"cutoff": cutoff}).rowcount
    if dropped or deleted:
        logger.info("retention %d days: dropped %s; deleted %d rows of the default partitions",
                    retention_days, ", ".join(dropped) or "no partition", deleted)
    return Pruned(dropped, deleted)


def retained_since(conn: Connection, table: str = "trigger_checks") -> datetime | None:
    """The start of the oldest day partition: rows before it are gone (or were never
    there), which the console says instead of drawing an empty chart."""
    days = day_partitions(conn, table)
    return day_start(days[0]) if days else None


def maintain(engine: Engine, retention_days: int, now: datetime | None = None) -> None:
    """One round of the trigger_checker's upkeep: partitions ahead, then retention."""
    now = now or datetime.now(timezone.utc)
    ensure(engine, now.date())
    prune(engine, retention_days, now)


def start_upkeep(engine: Engine, retention_days: int, every_seconds: float = UPKEEP_SECONDS) -> threading.Event:
    """Run `maintain` now and then every `every_seconds` on a daemon thread; set the
    returned event to stop it. A failed round (a lock not had in time, the database away)
    is logged and tried again next round: rows meanwhile land in the default partition."""
    stopping = threading.Event()

    def run() -> None:
        while True:
            try:
                maintain(engine, retention_days)
            except Exception:  # the upkeep must outlive a bad round
                logger.exception("partition upkeep failed; trying again in %ds", every_seconds)
            if stopping.wait(every_seconds):
                return

    threading.Thread(target=run, name="partition-upkeep", daemon=True).start()
    return stopping
