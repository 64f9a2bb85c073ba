"""What a check is (DESIGN.md section 4, "Trigger check"): pure functions, no I/O.

The effective threshold of a pair is the most specific one that exists:
offer_affiliate > affiliate > offer > offer_category > the trigger's general one;
among several categories of the offer that have a threshold, the smallest category_id
wins. The status is PROBLEM when `value <operator> threshold` holds, else OK.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from shared.vocabulary import COMPARISONS, CheckScope, Operator, Status


@dataclass
class TriggerRule:
    """An active trigger with the thresholds that may apply to the pairs of one batch."""

    id: int
    name: str
    metric_key: str
    operator: Operator
    general: float | None = None
    offer_affiliate: dict[tuple[int, int], float] = field(default_factory=dict)
    affiliate: dict[int, float] = field(default_factory=dict)
    offer: dict[int, float] = field(default_factory=dict)
    category: dict[int, float] = field(default_factory=dict)
    # Recovery values (DESIGN.md section 6) of the rows above that have one, keyed by
    # (scope, the key in that scope's dict); the general one beside `general`.
    recovery: dict[tuple[str, object], float] = field(default_factory=dict)
    general_recovery: float | None = None


class Threshold(NamedTuple):
    # NamedTuples rather than frozen dataclasses here and below: a batch builds thousands
    # of them, and a frozen dataclass costs three times as much to create.
    value: float
    scope: CheckScope
    # From the same row as the value; None: recovery at the threshold itself.
    recovery: float | None = None


def resolve_threshold(
    rule: TriggerRule, offer_id: int, affiliate_id: int, offer_categories: Collection[int] = ()
) -> Threshold | None:
    """The effective threshold of (offer, affiliate) for `rule`, or None when it has none."""
    recovery = rule.recovery
    if (offer_id, affiliate_id) in rule.offer_affiliate:
        key: object = (offer_id, affiliate_id)
        return Threshold(rule.offer_affiliate[key], "offer_affiliate",  # type: ignore[index]
                         recovery.get(("offer_affiliate", key)) if recovery else None)
    if affiliate_id in rule.affiliate:
        return Threshold(rule.affiliate[affiliate_id], "affiliate",
                         recovery.get(("affiliate", affiliate_id)) if recovery else None)
    if offer_id in rule.offer:
        return Threshold(rule.offer[offer_id], "offer", recovery.get(("offer", offer_id)) if recovery else None)
    if rule.category and offer_categories:
        with_threshold = [category for category in offer_categories if category in rule.category]
        if with_threshold:
            category = min(with_threshold)
            return Threshold(rule.category[category], "offer_category",
                             recovery.get(("offer_category", category)) if recovery else None)
    if rule.general is not None:
        return Threshold(rule.general, "general", rule.general_recovery)
    return None


def evaluate(operator: str, value: float, threshold: float) -> Status:
    """PROBLEM when `value <operator> threshold` holds."""
    return "PROBLEM" if COMPARISONS[operator](value, threshold) else "OK"


class Value(NamedTuple):
    """A metric value as stored (the first arrival of its key wins)."""

    metric_key: str
    offer_id: int
    affiliate_id: int
    measured_at: datetime
    value: float


class Check(NamedTuple):
    trigger_id: int
    value: Value
    threshold: Threshold
    status: Status
    operator: Operator


def check_values(
    rules: Collection[TriggerRule], values: Collection[Value], categories: dict[int, set[int]]
) -> tuple[list[Check], list[tuple[TriggerRule, Value]]]:
    """Every (rule, value) check of a batch, and the (rule, value) pairs skipped for want
    of a threshold. `categories` maps an offer to its categories."""
    by_metric: dict[str, list[TriggerRule]] = {}
    for rule in rules:
        by_metric.setdefault(rule.metric_key, []).append(rule)
    checks: list[Check] = []
    skipped: list[tuple[TriggerRule, Value]] = []
    for value in values:
        for rule in by_metric.get(value.metric_key, ()):
            threshold = resolve_threshold(rule, value.offer_id, value.affiliate_id, categories.get(value.offer_id, ()))
            if threshold is None:
                skipped.append((rule, value))
                continue
            status = evaluate(rule.operator, value.value, threshold.value)
            checks.append(Check(rule.id, value, threshold, status, rule.operator))
    return checks, skipped
