"""Day partitions of metric_values and trigger_checks: made ahead (idempotent, by
replicas racing), rows of a day without a partition kept in the default one and moved
when the day gets its partition, whole days dropped past retention with nothing that
names a dropped check losing what it shows."""

from __future__ import annotations

import json
import threading
from datetime import date, datetime, timedelta, timezone

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from shared import cli, partitions
from shared.db import make_engine
from shared.recorded import trigger_event_message
from testkit.database import temporary_database
from testkit.waiting import wait_for
from tests.support import PG_ADMIN_URL

DAY = timedelta(days=1)


@pytest.fixture
def fresh() -> Iterator[Engine]:
    """A database of its own: these tests create and drop the partitions themselves."""
    with temporary_database(PG_ADMIN_URL, "kpi_part") as url:
        engine = make_engine(url)
        yield engine
        engine.dispose()


def _at(day: date, hour: int = 12) -> datetime:
    return partitions.day_start(day) + timedelta(hours=hour)


def _value(conn, measured_at: datetime, offer_id: int = 1) -> int:
    return conn.execute(text(
        "INSERT INTO metric_values (metric_key, offer_id, affiliate_id, value, measured_at) "
        "VALUES ('cr', :o, 1, 0.5, :m) RETURNING id"), {"o": offer_id, "m": measured_at}).scalar()


def _where(conn, table: str, row_id: int) -> str:
    return conn.execute(text(f"SELECT tableoid::regclass::text FROM {table} WHERE id = :id"), {"id": row_id}).scalar()


def test_ensure_makes_the_days_ahead_once_even_when_replicas_race(fresh: Engine):
    today = datetime.now(timezone.utc).date() + 30 * DAY  # beyond what the migration made
    results: list = []
    start = threading.Barrier(4)

    def replica() -> None:
        start.wait()
        results.append(partitions.ensure(fresh, today))

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    made = [r for r in results if r]
    assert len(results) == 4 and len(made) >= 1
    # Whichever replica got there made each partition; the others made none of them again.
    names = [name for r in made for name in r]
    assert len(names) == len(set(names))
    with fresh.connect() as conn:
        for table in partitions.PARTITIONED_TABLES:
            days = partitions.day_partitions(conn, table)
            assert {today + n * DAY for n in range(-1, partitions.AHEAD_DAYS + 1)} <= set(days)
    assert partitions.ensure(fresh, today) == []


def test_a_day_without_partition_goes_to_default_and_moves_when_its_partition_is_made(fresh: Engine):
    later = datetime.now(timezone.utc).date() + 20 * DAY
    with fresh.begin() as conn:
        row_id = _value(conn, _at(later))
        assert _where(conn, "metric_values", row_id) == "metric_values_default"
    partitions.ensure(fresh, later)
    with fresh.connect() as conn:
        assert _where(conn, "metric_values", row_id) == partitions.partition_name("metric_values", later)
        assert conn.execute(text("SELECT count(*) FROM metric_values_default")).scalar() == 0


def test_retention_drops_whole_days_and_what_named_their_checks_keeps_its_facts(fresh: Engine):
    today = datetime.now(timezone.utc).date()
    now = partitions.day_start(today) + timedelta(hours=12)
    # Ten days kept: the cutoff falls at noon of edge_day, which is kept (part of it is newer).
    old_day, edge_day, kept_day = today - 12 * DAY, today - 10 * DAY, today - 9 * DAY
    with fresh.begin() as conn:
        for day in (old_day, edge_day, kept_day):
            partitions.create_day_partition(conn, "metric_values", day)
            partitions.create_day_partition(conn, "trigger_checks", day)
        trigger_id = conn.execute(text("INSERT INTO triggers (name, metric_key, operator, threshold) "
                                       "VALUES ('low cr', 'cr', 'lt', 1) RETURNING id")).scalar()
        old_value, kept_value = _value(conn, _at(old_day)), _value(conn, _at(kept_day))
        edge_value = _value(conn, _at(edge_day, hour=13))
        stray = _value(conn, _at(today - 40 * DAY), offer_id=2)  # no partition: the default one
        check_id = conn.execute(text(
            "INSERT INTO trigger_checks (trigger_id, offer_id, affiliate_id, value, operator, threshold, status, "
            "measured_at) VALUES (:t, 1, 1, 0.5, 'lt', 1, 'PROBLEM', :m) RETURNING id"),
            {"t": trigger_id, "m": _at(old_day)}).scalar()
        event_id = conn.execute(text(
            "INSERT INTO trigger_events (trigger_id, offer_id, affiliate_id, previous_status, status, check_id, "
            "value, threshold, measured_at) VALUES (:t, 1, 1, 'OK', 'PROBLEM', :c, 0.5, 1, :m) RETURNING id"),
            {"t": trigger_id, "c": check_id, "m": _at(old_day)}).scalar()
        conn.execute(text(
            "INSERT INTO trigger_states (trigger_id, offer_id, affiliate_id, status, since, measured_at, check_id, "
            "value, threshold) VALUES (:t, 1, 1, 'PROBLEM', :m, :m, :c, 0.5, 1)"),
            {"t": trigger_id, "c": check_id, "m": _at(old_day)})

    pruned = partitions.prune(fresh, 10, now)
    assert pruned is not None
    assert set(pruned.dropped) == {partitions.partition_name(t, old_day) for t in partitions.PARTITIONED_TABLES}
    assert pruned.default_rows_deleted == 1
    with fresh.connect() as conn:
        ids = set(conn.scalars(text("SELECT id FROM metric_values")))
        assert old_value not in ids and stray not in ids and {kept_value, edge_value} <= ids
        assert conn.execute(text("SELECT count(*) FROM trigger_checks")).scalar() == 0
        message = trigger_event_message(conn, event_id)
        assert message is not None
        assert (message.value, message.threshold, message.status, message.check_id) == (0.5, 1.0, "PROBLEM",
                                                                                         check_id)
        state = conn.execute(text("SELECT status, value, threshold FROM trigger_states")).one()
        assert tuple(state) == ("PROBLEM", 0.5, 1.0)
        assert partitions.retained_since(conn) == partitions.day_start(edge_day)
    assert partitions.prune(fresh, 10, now) == partitions.Pruned([], 0)
    assert partitions.prune(fresh, 0, now + 1000 * DAY) == partitions.Pruned([], 0)  # 0 keeps everything


def test_kpi_partitions_prune_and_list(fresh: Engine, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", fresh.url.render_as_string(hide_password=False))
    today = datetime.now(timezone.utc).date()
    with fresh.begin() as conn:
        partitions.create_day_partition(conn, "metric_values", today - 5 * DAY)
    assert cli.main(["partitions", "prune", "--retention-days", "3"]) == 0
    out = capsys.readouterr().out
    assert "dropped 1 partition(s)" in out and "metric_values" in out
    assert cli.main(["partitions", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    days = {t["table"]: t["days"] for t in listed["tables"]}
    assert (today - 5 * DAY).isoformat() not in days["metric_values"]
    assert (today + partitions.AHEAD_DAYS * DAY).isoformat() in days["trigger_checks"]


def test_the_trigger_checker_keeps_the_partitions_from_its_start(db: Engine, start_service):
    """The upkeep runs in the service: at start it drops a day past KPI_RETENTION_DAYS and
    has the days ahead made (here: recreates a dropped one)."""
    today = datetime.now(timezone.utc).date()
    old_day, ahead_day = today - 100 * DAY, today + partitions.AHEAD_DAYS * DAY
    with db.begin() as conn:
        if old_day not in partitions.day_partitions(conn, "metric_values"):
            partitions.create_day_partition(conn, "metric_values", old_day)
        conn.execute(text(f"DROP TABLE IF EXISTS {partitions.partition_name('trigger_checks', ahead_day)}"))
    start_service("trigger_checker", KPI_RETENTION_DAYS="30")

    def kept() -> bool:
        with db.connect() as conn:
            return (old_day not in partitions.day_partitions(conn, "metric_values")
                    and ahead_day in partitions.day_partitions(conn, "trigger_checks"))

    wait_for(kept, 60, what="the trigger_checker's upkeep to drop the old day and make the day ahead")
