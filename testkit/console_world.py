"""A network's recorded history for the console's tests, screenshots and benchmark.

seed_console_world() writes, in a migrated database: offers and affiliates with
realistic names, four triggers on three metrics with thresholds of every scope (one of
them introduced halfway through the history), `rounds` checks per (trigger, pair) at a
fixed interval ending now, and the trigger_events and trigger_states that the
event_detector would have derived from them (a state change wherever the status
changes, the state of the latest check), actions with operation runs for the state
changes, and load runs. Values follow a slow wave per pair plus noise, so pairs drift in
and out of PROBLEM. Deterministic: the same arguments give the same rows.

Everything is generated in PostgreSQL (generate_series), so a million checks take
about half a minute.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import text
from sqlalchemy.engine import Connection

BRANDS = ["Nordlight VPN", "Solaris Casino", "FitPulse", "QuickLoan", "StreamMax", "Luma Dating", "CryptoNest",
          "PetPal Box", "TravelMint", "GameVault", "SkinGlow", "HomeChef", "Sparkle Bingo", "Voltix Energy",
          "MoneyWise", "Tiny Tutors"]
KINDS = ["CPA", "CPI", "CPL", "Free trial", "SOI", "DOI", "Deposit"]
PLATFORMS = ["iOS", "Android", "Desktop", "Mobile"]
GEOS = ["US", "UK", "DE", "FR", "BR", "IN", "CA", "AU", "ES", "IT", "NL", "PL"]
PREFIXES = ["Blue Harbor", "Orbit", "Pixel Pier", "Nova", "Apex", "Limetree", "Vertex", "Echo Park", "Summit",
            "Crimson", "Atlas", "Zenith", "Northwind", "Quartz", "Redline", "Silverfox"]
SUFFIXES = ["Media", "Ads", "Traffic", "Digital", "Performance", "Leads", "Reach", "Networks", "Mobile"]
LEGAL = ["Ltd", "GmbH", "LLC", "S.A.", "B.V.", "Inc.", "OÜ", "Sp. z o.o."]

# id, name, metric, operator, general threshold
TRIGGERS = [
    (1, "min CR", "cr", "lt", 0.005),
    (2, "max CR", "cr", "gt", 0.02),
    (3, "negative pacc", "pacc", "lt", 0.0),
    (4, "cap fill", "cap_fill", "gt", 1.0),
]


@dataclass(frozen=True)
class World:
    offers: int
    affiliates: int
    rounds: int
    interval: timedelta
    end: datetime

    @property
    def checks(self) -> int:
        return len(TRIGGERS) * self.offers * self.affiliates * self.rounds


def offer_name(offer_id: int) -> str:
    brand = BRANDS[(offer_id * 7) % len(BRANDS)]
    return (f"{brand} – {KINDS[(offer_id * 3) % len(KINDS)]} {PLATFORMS[offer_id % len(PLATFORMS)]} "
            f"({GEOS[(offer_id * 5) % len(GEOS)]})")


def company(affiliate_id: int) -> str:
    return (f"{PREFIXES[(affiliate_id * 5) % len(PREFIXES)]} {SUFFIXES[(affiliate_id * 7) % len(SUFFIXES)]} "
            f"{LEGAL[affiliate_id % len(LEGAL)]}")


# A pseudo-random number in [-1, 1) from a text key: the first 32 bits of its md5.
_U = "((('x' || substr(md5({key}), 1, 8))::bit(32)::int)::double precision / 2147483648.0)"


def _u(key: str) -> str:
    return _U.format(key=key)


def seed_console_world(conn: Connection, *, offers: int = 8, affiliates: int = 6, rounds: int = 48,
                       interval: timedelta = timedelta(minutes=30), end: datetime | None = None,
                       long_history: int | None = None) -> World:
    """long_history: that many rounds for the pair (offer 1, affiliate 1) instead of `rounds`
    (a pair watched for months, beside a network of recent pairs)."""
    end = (end or datetime.now(timezone.utc)).replace(second=0, microsecond=0)
    end -= timedelta(minutes=end.minute % max(1, int(interval.total_seconds() // 60) or 1))
    world = World(offers, affiliates, rounds, interval, end)
    conn.execute(text("INSERT INTO offers (id, name, status, require_approval) VALUES (:id, :name, 'active', :ra)"),
                 [{"id": o, "name": offer_name(o), "ra": o % 3 == 0} for o in range(1, offers + 1)])
    conn.execute(text("INSERT INTO affiliates (id, company, status) VALUES (:id, :company, 'active')"),
                 [{"id": a, "company": company(a)} for a in range(1, affiliates + 1)])
    conn.execute(text("INSERT INTO categories (id, name) VALUES (3, 'Finance') ON CONFLICT DO NOTHING"))
    conn.execute(text("INSERT INTO offer_categories (offer_id, category_id) "
                      "SELECT o, 3 FROM generate_series(1, :n) o WHERE o % 4 = 3"), {"n": offers})
    conn.execute(text("INSERT INTO triggers (id, name, metric_key, operator, threshold) VALUES "
                      "(:id, :name, :metric, :op, :threshold)"),
                 [dict(zip(("id", "name", "metric", "op", "threshold"), t)) for t in TRIGGERS])
    conn.execute(text("SELECT setval(pg_get_serial_sequence('triggers', 'id'), 100)"))
    # Thresholds of every scope, the ones the checks below record.
    conn.execute(text("""
        INSERT INTO trigger_thresholds (trigger_id, scope, category_id, offer_id, affiliate_id, value)
        SELECT 1, 'offer', NULL::int, o, NULL::int, 0.008::float8 FROM generate_series(1, :offers) o WHERE o % 5 = 0
        UNION ALL
        SELECT 3, 'affiliate', NULL, NULL, a, -20 FROM generate_series(1, :affiliates) a WHERE a % 7 = 0
        UNION ALL
        SELECT 4, 'offer_category', 3, NULL, NULL, 1.2 WHERE EXISTS (SELECT 1 FROM offer_categories)
        UNION ALL
        SELECT 1, 'offer_affiliate', NULL, o, a, 0.003
        FROM generate_series(1, :offers) o, generate_series(1, :affiliates) a WHERE (o * 31 + a) % 17 = 0
    """), {"offers": offers, "affiliates": affiliates})

    key = "c.metric || ':' || p.o || ':' || p.a"
    noise_key = "c.metric || ':' || p.o || ':' || p.a || ':' || r"
    period, phase = _u(key + " || 'q'"), _u(key + " || 'p'")
    wave = f"sin(2 * pi() * r / (8 + 30 * abs({period})) + pi() * {phase})"
    value = {
        "cr": f"greatest(0, 0.012 + 0.009 * {_u(key)} + 0.004 * {wave} + 0.0015 * {_u(noise_key)})",
        "pacc": f"round((40 + 60 * {_u(key)} + 30 * {wave} + 10 * {_u(noise_key)})::numeric, 2)::double precision",
        "cap_fill": f"greatest(0, 0.75 + 0.35 * {_u(key)} + 0.2 * {wave} + 0.05 * {_u(noise_key)})",
    }
    conn.execute(text(f"""
        INSERT INTO trigger_checks (trigger_id, offer_id, affiliate_id, value, operator, threshold, threshold_scope,
                                    status, measured_at, checked_at)
        SELECT c.trigger_id, p.o, p.a, v.value, c.operator, th.threshold, th.scope,
               CASE WHEN (c.operator = 'lt' AND v.value < th.threshold)
                         OR (c.operator = 'gt' AND v.value > th.threshold) THEN 'PROBLEM' ELSE 'OK' END,
               m.measured_at, m.measured_at + interval '40 seconds'
        FROM (VALUES (1, 'cr', 'lt'), (2, 'cr', 'gt'), (3, 'pacc', 'lt'), (4, 'cap_fill', 'gt'))
             AS c(trigger_id, metric, operator)
        CROSS JOIN (SELECT o, a, CASE WHEN o = 1 AND a = 1 THEN :long_rounds ELSE :rounds END AS n
                    FROM generate_series(1, :offers) o, generate_series(1, :affiliates) a) p
        CROSS JOIN LATERAL generate_series(0, p.n - 1) r
        CROSS JOIN LATERAL (SELECT CAST(:end AS timestamptz) - (p.n - 1 - r) * CAST(:step AS interval)
                            AS measured_at) m
        CROSS JOIN LATERAL (SELECT CASE c.metric WHEN 'cr' THEN {value['cr']} WHEN 'pacc' THEN {value['pacc']}
                                   ELSE {value['cap_fill']} END AS value) v
        CROSS JOIN LATERAL (
            SELECT CASE
                WHEN c.trigger_id = 1 AND (p.o * 31 + p.a) % 17 = 0 AND r >= p.n / 2 THEN 0.003
                WHEN c.trigger_id = 1 AND p.o % 5 = 0 THEN 0.008
                WHEN c.trigger_id = 1 THEN 0.005
                WHEN c.trigger_id = 2 THEN 0.02
                WHEN c.trigger_id = 3 AND p.a % 7 = 0 THEN -20
                WHEN c.trigger_id = 3 THEN 0
                WHEN c.trigger_id = 4 AND p.o % 4 = 3 THEN 1.2
                ELSE 1.0 END AS threshold,
            CASE
                WHEN c.trigger_id = 1 AND (p.o * 31 + p.a) % 17 = 0 AND r >= p.n / 2 THEN 'offer_affiliate'
                WHEN c.trigger_id = 1 AND p.o % 5 = 0 THEN 'offer'
                WHEN c.trigger_id = 3 AND p.a % 7 = 0 THEN 'affiliate'
                WHEN c.trigger_id = 4 AND p.o % 4 = 3 THEN 'offer_category'
                ELSE 'general' END AS scope
        ) th
        ORDER BY m.measured_at, c.trigger_id, p.o, p.a
    """), {"offers": offers, "affiliates": affiliates, "rounds": rounds, "long_rounds": long_history or rounds,
           "end": end,
           "step": f"{int(interval.total_seconds())} seconds"})
    # What the event_detector derives: a change where the status differs from the one before.
    conn.execute(text("""
        INSERT INTO trigger_events (trigger_id, offer_id, affiliate_id, previous_status, status, check_id, value,
                                    threshold, measured_at, created_at)
        SELECT trigger_id, offer_id, affiliate_id, previous, status, id, value, threshold, measured_at,
               checked_at + interval '1 second'
        FROM (SELECT c.*, lag(status) OVER (PARTITION BY trigger_id, offer_id, affiliate_id ORDER BY measured_at)
                          AS previous
              FROM trigger_checks c) x
        WHERE (previous IS NULL AND status = 'PROBLEM') OR previous <> status
        ORDER BY measured_at, id
    """))
    conn.execute(text("""
        INSERT INTO trigger_states (trigger_id, offer_id, affiliate_id, status, previous_status, since, measured_at,
                                    check_id, value, threshold, updated_at)
        SELECT DISTINCT ON (c.trigger_id, c.offer_id, c.affiliate_id)
               c.trigger_id, c.offer_id, c.affiliate_id, c.status, e.previous_status,
               coalesce(e.measured_at, first.measured_at), c.measured_at, c.id, c.value, c.threshold,
               c.checked_at + interval '1 second'
        FROM trigger_checks c
        LEFT JOIN LATERAL (SELECT previous_status, measured_at FROM trigger_events e
                           WHERE e.trigger_id = c.trigger_id AND e.offer_id = c.offer_id
                             AND e.affiliate_id = c.affiliate_id
                           ORDER BY measured_at DESC LIMIT 1) e ON true
        CROSS JOIN LATERAL (SELECT min(measured_at) AS measured_at FROM trigger_checks f
                            WHERE f.trigger_id = c.trigger_id AND f.offer_id = c.offer_id
                              AND f.affiliate_id = c.affiliate_id) first
        ORDER BY c.trigger_id, c.offer_id, c.affiliate_id, c.measured_at DESC
    """))
    _seed_actions(conn)
    _seed_loads(conn, world)
    return world


def _seed_actions(conn: Connection) -> None:
    conn.execute(text("""
        INSERT INTO operations (id, name, kind) VALUES
            (1, 'mail the affiliate', 'email_affiliate'),
            (2, 'mail the account manager', 'email_affiliate_manager'),
            (3, 'reject the affiliate', 'reject_affiliate'),
            (4, 'mail the administrators', 'email_administrators');
        INSERT INTO actions (id, name) VALUES (1, 'low CR: warn'), (2, 'CR back: tell'), (3, 'losing money: reject');
        INSERT INTO action_conditions (action_id, trigger_id, trigger_status) VALUES
            (1, 1, 'PROBLEM'), (2, 1, 'OK'), (3, 3, 'PROBLEM');
        INSERT INTO action_operations (action_id, operation_id) VALUES (1, 1), (1, 2), (2, 1), (3, 3), (3, 4);
        SELECT setval(pg_get_serial_sequence('operations', 'id'), 100);
        SELECT setval(pg_get_serial_sequence('actions', 'id'), 100);
    """))
    # One run per (event, action, operation) of the actions whose condition the event meets.
    conn.execute(text("""
        INSERT INTO operation_runs (trigger_event_id, action_id, operation_id, kind, status, attempts, last_error,
                                    detail, created_at, started_at, finished_at)
        SELECT e.id, ao.action_id, ao.operation_id, o.kind, x.status, x.attempts, x.last_error, x.detail,
               e.created_at + interval '1 second', e.created_at + interval '1 second',
               e.created_at + interval '3 seconds'
        FROM trigger_events e
        JOIN action_conditions ac ON ac.trigger_id = e.trigger_id AND ac.trigger_status = e.status
        JOIN action_operations ao ON ao.action_id = ac.action_id
        JOIN operations o ON o.id = ao.operation_id
        CROSS JOIN LATERAL (SELECT CASE
            WHEN e.id % 29 = 0 AND o.kind LIKE 'email%' THEN 'failed'
            WHEN e.offer_id % 3 <> 0 AND o.kind = 'reject_affiliate' THEN 'succeeded'
            WHEN e.affiliate_id % 13 = 0 AND o.kind = 'email_affiliate_manager' THEN 'skipped'
            ELSE 'succeeded' END AS status) s
        CROSS JOIN LATERAL (SELECT s.status,
            CASE s.status WHEN 'failed' THEN 6 ELSE 1 END AS attempts,
            CASE s.status WHEN 'failed' THEN '451 4.3.0 mail server temporarily rejected message' END AS last_error,
            CASE
              WHEN s.status = 'skipped' THEN 'no recipient: the affiliate has no account manager'
              WHEN o.kind = 'reject_affiliate' AND e.offer_id % 3 = 0 THEN 'Offer.setAffiliateApproval rejected'
              WHEN o.kind = 'reject_affiliate' THEN 'Offer.blockAffiliate'
              WHEN s.status = 'succeeded' THEN 'sent to ' || (1 + e.affiliate_id % 3) || ' recipient(s)'
            END AS detail) x
        ORDER BY e.id, ao.action_id, ao.operation_id
    """))


def _seed_loads(conn: Connection, world: World) -> None:
    rows = []
    metrics = ["cr", "pacc", "cap_fill"]
    pairs = world.offers * world.affiliates
    for r, metric in itertools.product(range(world.rounds), metrics):
        at = world.end - (world.rounds - 1 - r) * world.interval
        failed = (r * 7 + len(metric)) % 41 == 0
        rows.append({
            "event": f"load-{r}-{metric}", "metric": metric, "slot": at, "status": "failed" if failed else "succeeded",
            "measured_at": at, "requested": at - timedelta(seconds=20), "started": at - timedelta(seconds=19),
            "finished": at - timedelta(seconds=12 if not failed else 3), "rows": 0 if failed else pairs + r % 17,
            "values": 0 if failed else pairs, "attempts": 6 if failed else 1,
            "error": "HasOffers answered HTTP 503 five times (Report.getStats)" if failed else None,
            "notes": "skipped 2 rows: affiliate_id missing" if r % 11 == 5 and not failed else None,
        })
    conn.execute(text("""
        INSERT INTO load_runs (request_event_id, metric_key, lookback_hours, schedule_slot, status, measured_at,
                               requested_at, started_at, finished_at, rows_read, values_published, error, attempts,
                               notes)
        VALUES (:event, :metric, 24, :slot, :status, :measured_at, :requested, :started, :finished, :rows, :values,
                :error, :attempts, :notes)
    """), rows)
