"""The look-back window in the network's time zone, daylight-saving days included.

For each zone and moment, the fake network's stats are labelled in that zone, the
loader reads them over HTTP, and its values are compared with a computation written
here: a label (date, hour) is in the window when one of the real hours it can name
(both, on the repeated autumn hour) starts inside the look-back, which ends with the
end of the network-local hour containing measured_at.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from services.metric_loader import computation
from services.metric_loader.computation import OfferSettings
from services.metric_loader.handler import LoaderConfig, read_values
from shared.hasoffers import HasOffersClient
from testkit.fake_hasoffers.network import Network, generate
from testkit.fake_hasoffers.server import FakeHasOffers

TOKEN = "NETzones-token"
CLICK_COST = 0.02
MIN_CLICKS = 5

MOMENTS = [
    # New York, spring forward: 02:00-03:00 does not exist on 2026-03-08.
    ("America/New_York", datetime(2026, 3, 8, 7, 20, tzinfo=timezone.utc)),  # 03:20 EDT, just after the gap
    ("America/New_York", datetime(2026, 3, 8, 16, 5, tzinfo=timezone.utc)),
    ("America/New_York", datetime(2026, 3, 9, 3, 59, tzinfo=timezone.utc)),  # the day after, the gap 25 h back
    # New York, fall back: 01:00-02:00 happens twice on 2026-11-01.
    ("America/New_York", datetime(2026, 11, 1, 5, 30, tzinfo=timezone.utc)),  # 01:30 EDT, the first one
    ("America/New_York", datetime(2026, 11, 1, 6, 30, tzinfo=timezone.utc)),  # 01:30 EST, the second one
    ("America/New_York", datetime(2026, 11, 1, 19, 45, tzinfo=timezone.utc)),
    ("Europe/Moscow", datetime(2026, 6, 10, 21, 10, tzinfo=timezone.utc)),  # 00:10 the next day in Moscow
    ("Asia/Kolkata", datetime(2026, 6, 10, 18, 40, tzinfo=timezone.utc)),  # 00:10 IST: hours at :30 UTC
    ("Asia/Kolkata", datetime(2026, 6, 10, 10, 15, tzinfo=timezone.utc)),  # 15:45 IST
    ("UTC", datetime(2026, 6, 10, 10, 15, tzinfo=timezone.utc)),
]
METRICS = ("cr", "clicks_zero_conv", "pacc", "cap_fill")


def real_hours(date: str, hour: int, zone: ZoneInfo) -> set[datetime]:
    """The UTC starts of the real hours a network in `zone` labels (date, hour)."""
    naive = datetime.strptime(date, "%Y-%m-%d").replace(hour=hour)
    starts = set()
    for fold in (0, 1):
        local = naive.replace(tzinfo=zone, fold=fold)
        if local.astimezone(timezone.utc).astimezone(zone).replace(tzinfo=None) == naive:  # not in a gap
            starts.add(local.astimezone(timezone.utc))
    return starts


def expected(network: Network, zone: ZoneInfo, measured_at: datetime, lookback_hours: int) -> dict[str, dict]:
    local = measured_at.astimezone(zone)
    hour_end = measured_at - timedelta(minutes=local.minute, seconds=local.second,
                                       microseconds=local.microsecond) + timedelta(hours=1)
    first = hour_end - timedelta(hours=lookback_hours)
    pairs: dict[tuple[int, int], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in network.stats:
        if not any(first <= start < hour_end for start in real_hours(r.date, r.hour, zone)):
            continue
        p = pairs[(r.offer_id, r.affiliate_id)]
        p["all_conversions"] += r.conversions
        p["gross_clicks"] += r.gross_clicks
        p["profit"] += r.revenue - r.payout
        if r.goal_id == 0:
            p["clicks"] += r.clicks
            p["conversions"] += r.conversions
    out: dict[str, dict] = {key: {} for key in METRICS}
    for pair, p in pairs.items():
        if p["clicks"] >= MIN_CLICKS:
            out["cr"][pair] = p["conversions"] / p["clicks"] if p["clicks"] else 0.0
            if p["conversions"] == 0:
                out["clicks_zero_conv"][pair] = p["clicks"]
        if p["gross_clicks"] >= MIN_CLICKS:
            out["pacc"][pair] = p["profit"] - p["gross_clicks"] * CLICK_COST
        if network.caps.get(pair, 0) > 0:
            out["cap_fill"][pair] = p["all_conversions"] / (lookback_hours / 24) / network.caps[pair]
    return out


@pytest.mark.parametrize("lookback", [24, 5])
@pytest.mark.parametrize(("zone_name", "measured_at"), MOMENTS, ids=[f"{z}-{m:%m%dT%H%M}" for z, m in MOMENTS])
def test_values_follow_the_network_local_window(zone_name, measured_at, lookback):
    zone = ZoneInfo(zone_name)
    # Traffic in every hour up to measured_at's own, so that a window shifted by the zone's
    # offset (or by a daylight-saving hour) would read other values.
    network = generate(5, offers=4, affiliates=6, days=3, active_pairs=0.9, active_hours=1.0, now=measured_at,
                       timezone_name=zone_name)
    offers = {i: OfferSettings(i, MIN_CLICKS, 0) for i in network.offers}
    caps = {pair: cap for pair, cap in network.caps.items() if cap > 0}
    fake = FakeHasOffers(network, network_id="zones", network_token=TOKEN, rate_limit=(10_000, 10.0))
    fake.start()
    config = LoaderConfig(click_cost=CLICK_COST, min_clicks=MIN_CLICKS, page_size=9, timezone=zone_name)
    want = expected(network, zone, measured_at, lookback)
    try:
        with HasOffersClient(fake.base_url, "zones", TOKEN, max_attempts=1) as client:
            for key in METRICS:
                _, got = read_values(client, config, key, lookback, measured_at, offers, caps)
                got_values = {(o, a): v for o, a, v in got}
                assert set(got_values) == set(want[key]), key
                for pair, value in want[key].items():
                    assert got_values[pair] == pytest.approx(value, rel=1e-9, abs=1e-9), (key, pair)
    finally:
        fake.stop()
    assert want["cr"] and want["cap_fill"], "the network should give values"
    # The newest local hour is in the window and has traffic (a UTC window would miss it
    # or read an hour that has none yet west of Greenwich).
    start, end = computation.window(measured_at, lookback, zone)
    newest = (end.strftime("%Y-%m-%d"), end.hour)
    assert newest == (measured_at.astimezone(zone).strftime("%Y-%m-%d"), measured_at.astimezone(zone).hour)
    assert any((r.date, r.hour) == newest and r.clicks for r in network.stats)


@pytest.mark.parametrize(("zone_name", "measured_at", "labels"), [
    # 24 real hours ending 2026-03-08 03:xx EDT: 03 back to 03 the day before, without 02 (absent).
    ("America/New_York", datetime(2026, 3, 8, 7, 20, tzinfo=timezone.utc), 24),
    # Ending 2026-11-01 01:xx EST: the repeated 01 is one label, so 23 labels cover 24 hours.
    ("America/New_York", datetime(2026, 11, 1, 6, 30, tzinfo=timezone.utc), 23),
    ("Asia/Kolkata", datetime(2026, 6, 10, 18, 40, tzinfo=timezone.utc), 24),
])
def test_the_filters_name_the_local_hours_of_daylight_saving_days(zone_name, measured_at, labels):
    zone = ZoneInfo(zone_name)
    start, end = computation.window(measured_at, 24, zone)
    moments = [(end.astimezone(timezone.utc) - timedelta(hours=h)).astimezone(zone) for h in range(24)]
    named = {(m.strftime("%Y-%m-%d"), m.hour) for m in moments}
    assert len(named) == labels
    filters = computation.window_filters(start, end)
    day = start.replace(minute=0)
    selected = set()
    for h in range(-30, 60):  # every wall-clock label around the window, gaps included
        naive = (day.replace(tzinfo=None) + timedelta(hours=h))
        label = (naive.strftime("%Y-%m-%d"), naive.hour)
        for f in filters:
            d, hr = f["Stat.date"], f.get("Stat.hour")
            in_day = (label[0] in d["values"]) if d["conditional"] == "EQUAL_TO" else d["values"][0] <= label[0] <= d["values"][1]
            in_hour = hr is None or ((str(label[1]) in hr["values"]) if hr["conditional"] == "EQUAL_TO"
                                     else int(hr["values"][0]) <= label[1] <= int(hr["values"][1]))
            if in_day and in_hour:
                selected.add(label)
    real = {lb for lb in selected if real_hours(lb[0], lb[1], zone)}
    assert real == named
