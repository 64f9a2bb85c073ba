"""Threshold resolution and operators (DESIGN.md section 4, "Trigger check"), as pure functions."""

from datetime import datetime, timezone

import pytest

from services.trigger_checker.rules import Threshold, TriggerRule, Value, check_values, evaluate, resolve_threshold


@pytest.mark.parametrize(
    ("operator", "below", "equal", "above"),
    [
        # value <op> threshold holds -> PROBLEM, for value below, equal to and above it
        ("lt", "PROBLEM", "OK", "OK"),
        ("le", "PROBLEM", "PROBLEM", "OK"),
        ("gt", "OK", "OK", "PROBLEM"),
        ("ge", "OK", "PROBLEM", "PROBLEM"),
        ("eq", "OK", "PROBLEM", "OK"),
        ("ne", "PROBLEM", "OK", "PROBLEM"),
    ],
)
@pytest.mark.parametrize("threshold", [0.05, 0.0, -3.5, 1e9])
def test_every_operator_below_at_and_above_the_threshold(operator, below, equal, above, threshold):
    step = max(abs(threshold), 1.0) * 1e-6
    assert evaluate(operator, threshold - step, threshold) == below
    assert evaluate(operator, threshold, threshold) == equal
    assert evaluate(operator, threshold + step, threshold) == above


def test_equality_is_exact_on_doubles():
    assert evaluate("eq", 0.1 + 0.2, 0.3) == "OK"  # 0.30000000000000004 is not 0.3
    assert evaluate("ne", 0.1 + 0.2, 0.3) == "PROBLEM"
    assert evaluate("eq", -0.0, 0.0) == "PROBLEM"  # the same number
    assert evaluate("lt", 0.049999999999999996, 0.05) == "PROBLEM"  # the nearest double below


def test_unknown_operator_is_an_error_not_a_status():
    with pytest.raises(KeyError):
        evaluate("approx", 1.0, 1.0)


def full_rule(**overrides) -> TriggerRule:
    """A rule with a threshold of every scope for offer 2 / affiliate 5 (categories 3 and 9)."""
    values = dict(
        general=0.5,
        offer_affiliate={(2, 5): 0.1},
        affiliate={5: 0.2},
        offer={2: 0.3},
        category={3: 0.4, 9: 0.45},
    )
    values.update(overrides)
    return TriggerRule(1, "min CR", "cr", "lt", **values)


def test_offer_affiliate_beats_every_other_scope():
    assert resolve_threshold(full_rule(), 2, 5, {3, 9}) == Threshold(0.1, "offer_affiliate")


def test_affiliate_beats_offer_category_and_general():
    assert resolve_threshold(full_rule(offer_affiliate={}), 2, 5, {3, 9}) == Threshold(0.2, "affiliate")


def test_offer_beats_category_and_general():
    assert resolve_threshold(full_rule(offer_affiliate={}, affiliate={}), 2, 5, {3, 9}) == Threshold(0.3, "offer")


def test_category_beats_general():
    rule = full_rule(offer_affiliate={}, affiliate={}, offer={})
    assert resolve_threshold(rule, 2, 5, {3, 9}) == Threshold(0.4, "offer_category")


def test_general_is_the_last_resort_even_when_zero():
    rule = full_rule(offer_affiliate={}, affiliate={}, offer={}, category={}, general=0.0)
    assert resolve_threshold(rule, 2, 5, {3, 9}) == Threshold(0.0, "general")


def test_no_threshold_at_all_gives_none():
    rule = full_rule(offer_affiliate={}, affiliate={}, offer={}, category={}, general=None)
    assert resolve_threshold(rule, 2, 5, {3, 9}) is None


def test_scopes_of_other_pairs_do_not_apply():
    rule = full_rule()
    # offer 2 with affiliate 6: the (2, 5) and affiliate-5 thresholds are someone else's
    assert resolve_threshold(rule, 2, 6, {3}) == Threshold(0.3, "offer")
    # offer 7 with affiliate 5: the affiliate's threshold applies to any offer
    assert resolve_threshold(rule, 7, 5, ()) == Threshold(0.2, "affiliate")
    # offer 7, affiliate 6, no categories: only the general one
    assert resolve_threshold(rule, 7, 6, ()) == Threshold(0.5, "general")


def test_among_the_offers_categories_the_smallest_category_id_wins():
    rule = full_rule(offer_affiliate={}, affiliate={}, offer={}, category={9: 0.01, 3: 0.99, 12: 0.0})
    # whatever the order of the categories and whatever their values
    assert resolve_threshold(rule, 2, 5, [12, 9, 3]) == Threshold(0.99, "offer_category")
    assert resolve_threshold(rule, 2, 5, [12, 9]) == Threshold(0.01, "offer_category")


def test_categories_without_a_threshold_are_passed_over():
    rule = full_rule(offer_affiliate={}, affiliate={}, offer={}, category={9: 0.7})
    assert resolve_threshold(rule, 2, 5, [1, 2, 9]) == Threshold(0.7, "offer_category")
    assert resolve_threshold(rule, 2, 5, [1, 2]) == Threshold(0.5, "general")


def test_check_values_checks_every_rule_of_the_metric_and_lists_the_skipped():
    at = datetime(2026, 11, 28, tzinfo=timezone.utc)
    rules = [
        TriggerRule(1, "min CR", "cr", "lt", general=0.05),
        TriggerRule(2, "max CR", "cr", "gt", offer={2: 0.5}),  # no threshold for offer 3
        TriggerRule(3, "cap", "cap_fill", "ge", general=1.0),
    ]
    values = [Value("cr", 2, 5, at, 0.6), Value("cr", 3, 5, at, 0.01)]
    checks, skipped = check_values(rules, values, {})
    assert [(c.trigger_id, c.value.offer_id, c.threshold, c.status) for c in checks] == [
        (1, 2, Threshold(0.05, "general"), "OK"),
        (2, 2, Threshold(0.5, "offer"), "PROBLEM"),
        (1, 3, Threshold(0.05, "general"), "PROBLEM"),
    ]
    assert [(rule.id, value.offer_id) for rule, value in skipped] == [(2, 3)]
