"""The fake network's data: offers, affiliates, people, caps, goals and raw stats.

`generate(seed, ...)` builds a deterministic network: the same seed gives the same
offers, people, caps and traffic. The traffic is laid out over the `days * 24` hours
that end with the hour containing `now` (default: the current hour), so only the
dates move with the clock. Stat.date and Stat.hour are in the network's `timezone`
(UTC unless given), as a real network reports them: the hours are real hours, named
by the local wall clock, so an autumn daylight-saving day has two rows for its
repeated hour (the report sums them) and a spring one none for its missing hour.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo


@dataclass
class FakeOffer:
    id: int
    name: str
    status: str = "active"
    require_approval: bool = False
    category_ids: list[int] = field(default_factory=list)
    default_payout: float = 1.0
    max_payout: float = 1.5  # what the advertiser pays the network per conversion (revenue)


@dataclass
class FakeAffiliate:
    id: int
    company: str
    account_manager_id: int | None = None
    status: str = "active"


@dataclass
class FakeAffiliateUser:
    id: int
    affiliate_id: int
    email: str
    status: str = "active"


@dataclass
class FakeEmployee:
    id: int
    email: str
    status: str = "active"
    first_name: str = ""
    last_name: str = ""


@dataclass
class FakeGoal:
    id: int
    offer_id: int
    name: str
    status: str = "active"


@dataclass
class StatRow:
    """One hour of one (offer, affiliate, goal): what Report.getStats aggregates.

    Clicks belong to the default conversion (goal_id 0); a goal row carries only the
    goal's conversions and money, as HasOffers reports them.
    """

    offer_id: int
    affiliate_id: int
    goal_id: int  # 0 = default conversions
    date: str  # YYYY-MM-DD
    hour: int
    clicks: int = 0
    gross_clicks: int = 0
    conversions: int = 0
    payout: float = 0.0
    revenue: float = 0.0

    @property
    def profit(self) -> float:
        return self.revenue - self.payout


@dataclass
class Network:
    offers: dict[int, FakeOffer] = field(default_factory=dict)
    categories: dict[int, str] = field(default_factory=dict)
    goals: dict[int, FakeGoal] = field(default_factory=dict)
    # (offer_id, affiliate_id) -> daily conversion cap; 0 means "no cap" in HasOffers
    caps: dict[tuple[int, int], int] = field(default_factory=dict)
    affiliates: dict[int, FakeAffiliate] = field(default_factory=dict)
    affiliate_users: dict[int, FakeAffiliateUser] = field(default_factory=dict)
    employees: dict[int, FakeEmployee] = field(default_factory=dict)
    stats: list[StatRow] = field(default_factory=list)
    # What kind of traffic generate() gave each pair: lets a test or the demo find
    # a pair that breaches a given threshold without recomputing the metrics.
    profiles: dict[tuple[int, int], str] = field(default_factory=dict)


# -- generation ------------------------------------------------------------------------

CATEGORY_NAMES = ["Ads", "Finance", "Dating", "Games", "Health", "Shopping", "Travel", "Utilities"]
OFFER_WORDS = ["Kyzoo", "Blipster", "Quanta", "Zenbit", "Lumio", "Vexa", "Orbly", "Pingo", "Trello", "Mavu",
               "Nimbi", "Sparko", "Dexly", "Fjord", "Gravo", "Hoopa"]
COMPANY_WORDS = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Stark", "Wayne", "Tyrell",
                 "Cyberdyne", "Soylent", "Wonka", "Gringotts", "Oscorp", "Aperture"]
FIRST_NAMES = ["Ann", "Bob", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivan", "Jo"]
LAST_NAMES = ["Smith", "Berg", "Novak", "Rossi", "Kim", "Silva", "Weber", "Dubois"]
GOAL_NAMES = ["LEAD", "SALE", "DEPOSIT", "INSTALL", "REGISTRATION"]

# Traffic profiles: (weight, clicks per active hour, conversion rate). The odd ones are
# there so that typical thresholds trigger: min CR 0.5 %, max CR 30 %, many clicks
# without a conversion, reversals, conversions without clicks, a blown cap, and
# pairs too small to pass a minimum of clicks.
PROFILES: dict[str, tuple[float, tuple[int, int], tuple[float, float]]] = {
    "normal": (0.42, (5, 60), (0.01, 0.08)),
    "low_cr": (0.12, (30, 120), (0.0005, 0.004)),
    "high_cr": (0.08, (2, 15), (0.35, 0.6)),
    "zero_conv": (0.10, (20, 80), (0.0, 0.0)),
    "reversals": (0.07, (5, 40), (0.02, 0.06)),
    "trickle": (0.10, (0, 2), (0.05, 0.2)),
    "zero_clicks": (0.05, (0, 0), (0.0, 0.0)),
    "cap_buster": (0.06, (40, 120), (0.1, 0.2)),
}


def generate(seed: int, *, offers: int = 20, affiliates: int = 15, employees: int | None = None,
             categories: int = 6, days: int = 3, active_pairs: float = 0.6, active_hours: float = 0.6,
             now: datetime | None = None, timezone_name: str = "UTC") -> Network:
    """A deterministic network: ids run from 1 (offers, affiliates, categories, ...)."""
    rng = random.Random(seed)
    network = Network()
    n_employees = employees if employees is not None else max(3, affiliates // 5)
    n_categories = max(1, min(categories, len(CATEGORY_NAMES)))

    network.categories = {i: CATEGORY_NAMES[i - 1] for i in range(1, n_categories + 1)}
    for i in range(1, n_employees + 1):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        network.employees[i] = FakeEmployee(i, f"{first.lower()}.{last.lower()}{i}@network.example",
                                            "active" if rng.random() > 0.1 else "disabled", first, last)

    paused, pending = _spread(rng, offers, 0.1), _spread(rng, offers, 0.04)
    approval, goals = _spread(rng, offers, 0.35), _spread(rng, offers, 0.4)
    for i in range(1, offers + 1):
        status = "paused" if paused[i - 1] else "pending" if pending[i - 1] else "active"
        payout = round(rng.uniform(0.5, 20.0), 2)
        network.offers[i] = FakeOffer(
            id=i, name=f"{rng.choice(OFFER_WORDS)} {i}", status=status, require_approval=approval[i - 1],
            category_ids=sorted(rng.sample(range(1, n_categories + 1), rng.choice([0, 1, 1, 2]))),
            default_payout=payout, max_payout=round(payout * rng.uniform(1.05, 1.6), 2),
        )

    goal_id = 0
    for offer_id in network.offers:
        if goals[offer_id - 1]:  # some offers have goals, most do not
            for name in rng.sample(GOAL_NAMES, rng.randint(1, 3)):
                goal_id += 1
                network.goals[goal_id] = FakeGoal(goal_id, offer_id, name,
                                                  "active" if rng.random() > 0.1 else "deleted")

    user_id = 0
    unmanaged = _spread(rng, affiliates, 0.2)
    for i in range(1, affiliates + 1):
        company = f"{rng.choice(COMPANY_WORDS)} {i}"
        manager = None if unmanaged[i - 1] else rng.randint(1, n_employees)
        network.affiliates[i] = FakeAffiliate(i, company, manager, "active" if rng.random() > 0.08 else "pending")
        for _ in range(rng.randint(1, 3)):
            user_id += 1
            # The second user of an affiliate is often blocked: every network has a few.
            roll = rng.random() * (0.5 if user_id % 4 == 2 else 1)
            status = "blocked" if roll < 0.15 else "deleted" if roll < 0.2 else "active"
            slug = company.split()[0].lower()
            network.affiliate_users[user_id] = FakeAffiliateUser(user_id, i, f"user{user_id}@{slug}{i}.example",
                                                                 status)

    zone = ZoneInfo(timezone_name)
    local_end = (now or datetime.now(timezone.utc)).astimezone(zone).replace(minute=0, second=0, microsecond=0)
    end = local_end.astimezone(timezone.utc)
    # Real hours (stepped in UTC), each named by the network's wall clock.
    hours = [(end - timedelta(hours=h)).astimezone(zone) for h in range(days * 24 - 1, -1, -1)]
    names = list(PROFILES)
    weights = [PROFILES[n][0] for n in names]
    # Every profile once (in a random order) before the weighted draw: even a small
    # network has each kind of trouble.
    first = rng.sample(names, len(names))
    caps = _CapMaker()
    for offer_id, offer in network.offers.items():
        offer_goals = [g for g in network.goals.values() if g.offer_id == offer_id]
        for affiliate_id in network.affiliates:
            if rng.random() >= active_pairs:
                continue
            profile = first.pop() if first else rng.choices(names, weights)[0]
            network.profiles[(offer_id, affiliate_id)] = profile
            _traffic(rng, network, offer, affiliate_id, offer_goals, profile, hours, active_hours, days, caps)
    return network


def _spread(rng: random.Random, n: int, share: float) -> list[bool]:
    """n flags, round(n * share) of them set (at least one once n >= 3), shuffled."""
    count = min(n, max(round(n * share), 1 if n >= 3 else 0))
    flags = [True] * count + [False] * (n - count)
    rng.shuffle(flags)
    return flags


class _CapMaker:
    """Every fifth cap is 0 ("no cap" in HasOffers), so that every network has one."""

    def __init__(self) -> None:
        self.made = 0

    def __call__(self, value: int) -> int:
        self.made += 1
        return 0 if self.made % 5 == 2 else value


def _traffic(rng: random.Random, network: Network, offer: FakeOffer, affiliate_id: int, goals: list[FakeGoal],
             profile: str, hours: list[datetime], active_hours: float, days: int, caps: _CapMaker) -> None:
    _, (lo, hi), (cr_lo, cr_hi) = PROFILES[profile]
    cr = rng.uniform(cr_lo, cr_hi)
    goal_rates = {g.id: (0.0 if rng.random() < 0.25 else rng.uniform(0.01, 0.6)) for g in goals}
    daily_conversions = 0
    for moment in hours:
        if rng.random() >= active_hours:
            continue
        clicks = rng.randint(lo, hi)
        expected = clicks * cr
        conversions = int(expected) + (1 if rng.random() < expected - int(expected) else 0)
        if profile == "reversals" and rng.random() < 0.3:
            conversions = -rng.randint(1, 5)
        elif profile == "zero_clicks":
            # Postbacks without a click in the window: late conversions and reversals.
            conversions = rng.choice([-3, -1, 1, 2])
        row = StatRow(offer.id, affiliate_id, 0, moment.strftime("%Y-%m-%d"), moment.hour, clicks=clicks,
                      gross_clicks=clicks + rng.randint(0, clicks // 4 + 1) if clicks else 0,
                      conversions=conversions, payout=round(conversions * offer.default_payout, 2),
                      revenue=round(conversions * offer.max_payout, 2))
        network.stats.append(row)
        daily_conversions += max(conversions, 0)
        for goal_id, rate in goal_rates.items():
            goal_conversions = int(max(conversions, 0) * rate + rng.random())
            if goal_conversions:
                payout = round(offer.default_payout / 2, 2)
                network.stats.append(StatRow(offer.id, affiliate_id, goal_id, row.date, row.hour,
                                             conversions=goal_conversions, payout=round(goal_conversions * payout, 2),
                                             revenue=round(goal_conversions * payout * 1.3, 2)))
    per_day = daily_conversions / max(days, 1)
    if profile == "cap_buster":  # a cap well below what the pair converts per day
        network.caps[(offer.id, affiliate_id)] = max(1, int(per_day / rng.uniform(1.5, 3)))
    elif rng.random() < 0.3:  # some headroom, or not much
        network.caps[(offer.id, affiliate_id)] = caps(max(1, int(per_day * rng.uniform(0.9, 4))))
