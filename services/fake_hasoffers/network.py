"""The fake network's data: offers, affiliates, people, caps, goals and raw stats."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FakeOffer:
    id: int
    name: str
    status: str = "active"
    require_approval: bool = False
    category_ids: list[int] = field(default_factory=list)


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


@dataclass
class FakeGoal:
    id: int
    offer_id: int
    name: str
    status: str = "active"


@dataclass
class StatRow:
    """One hour of one (offer, affiliate, goal): what Report.getStats aggregates."""

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
    # (offer_id, affiliate_id) -> daily conversion cap
    caps: dict[tuple[int, int], int] = field(default_factory=dict)
    affiliates: dict[int, FakeAffiliate] = field(default_factory=dict)
    affiliate_users: dict[int, FakeAffiliateUser] = field(default_factory=dict)
    employees: dict[int, FakeEmployee] = field(default_factory=dict)
    stats: list[StatRow] = field(default_factory=list)
