"""metric_values and trigger_checks partitioned by day of measured_at

DESIGN.md section 9: both tables grow by every load, so they become range-partitioned by
measured_at, one partition per UTC day (`<table>_pYYYYMMDD`) and a default partition
(`<table>_default`) for a day that has none; shared/partitions.py makes days ahead and
drops those past KPI_RETENTION_DAYS.

An existing database is converted with its rows: each table is renamed, a partitioned
table made in its place (same columns, defaults, checks, id sequence), a partition made
for each day that has rows in the last PARTITIONED_HISTORY_DAYS (older rows go to the
default partition) and for yesterday .. AHEAD_DAYS ahead, the rows copied, the keys
built. A partitioned table's unique keys must hold its partition key, so the primary
key becomes (id, measured_at); ids still come from one sequence, and the natural keys
already held measured_at. Nothing has a foreign key to either table.

Events recorded without a value or threshold of their own (before migration 0002) get
their check's now, and so do states: once a check's day is dropped, the rows that name
it keep what they showed.

Revision ID: 0010
Revises: 0008
"""
from alembic import op


revision = '0010'
down_revision = '0008'
branch_labels = None
depends_on = None

AHEAD_DAYS = 8
PARTITIONED_HISTORY_DAYS = 400

TABLES = {
    'metric_values': {
        'unique': ('uq_metric_values_metric_key_offer_id_affiliate_id_measured_at',
                   'metric_key, offer_id, affiliate_id, measured_at'),
        'foreign_keys': [('fk_metric_values_metric_key_metrics', 'metric_key', 'metrics (key)', '')],
    },
    'trigger_checks': {
        'unique': ('uq_trigger_checks_trigger_id_offer_id_affiliate_id_measured_at',
                   'trigger_id, offer_id, affiliate_id, measured_at'),
        'foreign_keys': [('fk_trigger_checks_trigger_id_triggers', 'trigger_id', 'triggers (id)',
                          ' ON DELETE CASCADE')],
    },
}


def _keys(table: str, primary_key: str) -> None:
    spec = TABLES[table]
    unique_name, unique_columns = spec['unique']
    op.execute(f"ALTER TABLE {table} ADD CONSTRAINT pk_{table} PRIMARY KEY ({primary_key})")
    op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {unique_name} UNIQUE ({unique_columns})")
    for name, column, target, action in spec['foreign_keys']:
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} FOREIGN KEY ({column}) REFERENCES {target}{action}")


def _drop_keys(table: str, relation: str) -> None:
    """Free the key names (their indexes' names are unique in the schema)."""
    op.execute(f"ALTER TABLE {relation} DROP CONSTRAINT pk_{table}")
    op.execute(f"ALTER TABLE {relation} DROP CONSTRAINT {TABLES[table]['unique'][0]}")


def _partition(table: str, source: str) -> None:
    # The days that need a partition: those with recent rows, and yesterday .. ahead.
    op.execute(f"""
        DO $$
        DECLARE day date;
        BEGIN
          FOR day IN
            SELECT DISTINCT (measured_at AT TIME ZONE 'UTC')::date FROM {source}
             WHERE measured_at >= now() - interval '{PARTITIONED_HISTORY_DAYS} days'
            UNION
            SELECT d::date FROM generate_series((now() AT TIME ZONE 'UTC')::date - 1,
                                                (now() AT TIME ZONE 'UTC')::date + {AHEAD_DAYS},
                                                interval '1 day') AS d
          LOOP
            EXECUTE format('CREATE TABLE %I PARTITION OF {table} FOR VALUES FROM (%L) TO (%L)',
                           '{table}_p' || to_char(day, 'YYYYMMDD'),
                           (day::timestamp AT TIME ZONE 'UTC'), ((day + 1)::timestamp AT TIME ZONE 'UTC'));
          END LOOP;
        END $$""")
    op.execute(f"CREATE TABLE {table}_default PARTITION OF {table} DEFAULT")


def upgrade() -> None:
    # What an event or a state shows must not depend on a check that retention may drop.
    op.execute("UPDATE trigger_events e SET value = coalesce(e.value, c.value), "
               "threshold = coalesce(e.threshold, c.threshold) FROM trigger_checks c "
               "WHERE c.id = e.check_id AND (e.value IS NULL OR e.threshold IS NULL)")
    op.execute("UPDATE trigger_states s SET value = coalesce(s.value, c.value), "
               "threshold = coalesce(s.threshold, c.threshold) FROM trigger_checks c "
               "WHERE c.id = s.check_id AND (s.value IS NULL OR s.threshold IS NULL)")
    for table in TABLES:
        old = f"{table}_unpartitioned"
        op.execute(f"ALTER TABLE {table} RENAME TO {old}")
        _drop_keys(table, old)
        op.execute(f"CREATE TABLE {table} (LIKE {old} INCLUDING DEFAULTS INCLUDING CONSTRAINTS) "
                   f"PARTITION BY RANGE (measured_at)")
        op.execute(f"ALTER SEQUENCE {table}_id_seq OWNED BY {table}.id")
        _partition(table, old)
        op.execute(f"INSERT INTO {table} SELECT * FROM {old}")
        op.execute(f"DROP TABLE {old}")
        # Built after the copy: one sort per partition instead of an insert per row.
        _keys(table, "id, measured_at")
        op.execute(f"ANALYZE {table}")


def downgrade() -> None:
    for table in TABLES:
        old = f"{table}_partitioned"
        op.execute(f"ALTER TABLE {table} RENAME TO {old}")
        op.execute(f"CREATE TABLE {table} (LIKE {old} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
        op.execute(f"ALTER SEQUENCE {table}_id_seq OWNED BY {table}.id")
        op.execute(f"INSERT INTO {table} SELECT * FROM {old}")
        op.execute(f"DROP TABLE {old}")  # with its partitions and keys, whose names are then free
        _keys(table, "id")
        op.execute(f"ANALYZE {table}")
