"""The fault suite's reference model (testkit/fault_suite/model.py) against the rules of
DESIGN.md sections 4 and 8, on cases small enough to follow by hand."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

from testkit.fake_hasoffers.network import StatRow, generate
from testkit.fault_suite import model as fm

T0 = datetime(2026, 11, 27, tzinfo=timezone.utc)
PEOPLE = fm.People(users={1: ("a@aff.example", "b@aff.example")},
                   managers={1: "m@net.example", 2: None, 5: "m5@net.example"},
                   admins=("ops@network.example",), require_approval={3: False, 10: False, 11: True})


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def test_states_change_only_on_a_newer_check_with_another_status():
    model = fm.Model(PEOPLE)
    model.apply_round([("pacc", 10, 1, 5.0)], at(0))  # first seen OK: a state, no event
    model.apply_round([("pacc", 10, 1, -5.0)], at(10))  # OK -> PROBLEM (negative pacc only)
    model.apply_round([("pacc", 10, 1, -6.0)], at(20))  # same status: measured_at moves, since stays
    model.apply_round([("pacc", 10, 1, 9.0)], at(5))  # older than the state: checked, nothing else
    assert model.events == {(fm.NEG_PACC, 10, 1, at(10)): ("OK", "PROBLEM")}
    assert model.states[(fm.NEG_PACC, 10, 1)] == fm.State("PROBLEM", at(10), at(20))
    assert model.checks[(fm.NEG_PACC, 10, 1, at(5))] == "OK"
    assert (fm.PACC_WATCH, 10, 1, at(0)) not in model.checks  # inactive trigger: no check


def test_first_arrival_wins_and_scoped_thresholds_apply():
    model = fm.Model(PEOPLE)
    model.apply_round([("pacc", 10, 3, -30.0)], at(0))  # affiliate 3's deep-loss threshold is -40
    model.apply_round([("pacc", 10, 3, -50.0)], at(0))  # the same key again: ignored
    assert model.values == {("pacc", 10, 3, at(0)): -30.0}
    assert model.checks[(fm.DEEP_LOSS, 10, 3, at(0))] == "OK"
    assert model.checks[(fm.NEG_PACC, 10, 3, at(0))] == "PROBLEM"


def test_the_two_condition_action_fires_once_per_episode():
    model = fm.Model(PEOPLE)
    model.apply_round([("cap_fill", 10, 1, 1.7)], at(0))  # both PROBLEM at once: one firing
    model.apply_round([("cap_fill", 10, 1, 1.1)], at(10))  # overshoot back to OK
    model.apply_round([("cap_fill", 10, 1, 1.8)], at(20))  # overshoot again: a new episode
    model.apply_round([("cap_fill", 10, 1, 1.9)], at(30))  # no change: nothing
    rejects = sorted(ts for (action, op, _, _, ts, _) in model.runs if action == 10 and op == fm.REJECT)
    assert rejects == [at(0), at(20)]
    assert model.runs[(10, fm.REJECT, 10, 1, at(0), 0)].call == ("Offer.blockAffiliate", 10, 1, None)
    assert model.runs[(9, fm.APPROVE, 10, 1, at(10), 0)].call == ("Offer.setAffiliateApproval", 10, 1, "approved")


def test_runs_without_a_recipient_are_skipped_and_gated_offers_are_rejected_by_approval():
    model = fm.Model(PEOPLE)
    model.apply_round([("cap_fill", 11, 2, 1.1)], at(0))  # affiliate 2: no users, no manager
    assert model.runs[(6, fm.MAIL_MGR, 11, 2, at(0), 0)] == fm.RunExpectation("email_affiliate_manager", "skipped")
    model.apply_round([("cap_fill", 11, 2, 0.5)], at(10))
    assert model.runs[(7, fm.MAIL_AFF, 11, 2, at(10), 0)].status == "skipped"
    model.apply_round([("cap_fill", 11, 1, 2.0)], at(0))
    assert model.runs[(10, fm.REJECT, 11, 1, at(0), 0)].call == ("Offer.setAffiliateApproval", 11, 1, "rejected")
    assert model.runs[(10, fm.MAIL_ADMINS_REJECT, 11, 1, at(0), 0)].recipients == ("ops@network.example",)
    assert model.runs[(6, fm.MAIL_MGR, 11, 1, at(0), 0)].digest  # the manager's mails go out as digests


def test_debounce_enters_problem_after_two_problem_checks_in_a_row():
    model = fm.Model(PEOPLE)
    for minutes, value in [(0, 0.01), (10, 0.5), (20, 0.01), (30, 0.02), (40, 0.03)]:  # low goal ratio: < 0.05
        model.apply_round([("gtr", 10, 1, value)], at(minutes))
    assert model.states[(fm.LOW_GTR, 10, 1)] == fm.State("PROBLEM", at(30), at(40))
    assert {k: v for k, v in model.events.items() if k[0] == fm.LOW_GTR} == {
        (fm.LOW_GTR, 10, 1, at(30)): ("OK", "PROBLEM")}
    model = fm.Model(PEOPLE)
    model.apply_round([("gtr", 10, 2, 0.01)], at(0))  # a new pair's first PROBLEM decides nothing yet
    assert model.states[(fm.LOW_GTR, 10, 2)] == fm.State(None, None, at(0))
    model.apply_round([("gtr", 10, 2, 0.02)], at(10))
    assert model.events[(fm.LOW_GTR, 10, 2, at(10))] == (None, "PROBLEM")


def test_hysteresis_recovers_only_past_the_recovery_value_of_the_thresholds_row():
    model = fm.Model(PEOPLE)
    for minutes, value in [(0, 0.9), (10, 0.75), (20, 0.69)]:  # high goal ratio: > 0.8, recovery 0.7
        model.apply_round([("gtr", 10, 1, value)], at(minutes))
    assert model.checks[(fm.HIGH_GTR, 10, 1, at(10))] == "OK"  # the check is OK, the pair stays PROBLEM
    assert [k[3] for k in model.events if k[0] == fm.HIGH_GTR] == [at(0), at(20)]
    for minutes, value in [(0, -45.0), (10, -35.0), (20, -25.0)]:  # affiliate 3: < -40, recovery -30
        model.apply_round([("pacc", 10, 3, value)], at(minutes))
    assert [(k[3], v) for k, v in model.events.items() if k[0] == fm.DEEP_LOSS] == [
        (at(0), (None, "PROBLEM")), (at(20), ("PROBLEM", "OK"))]


def test_silenced_runs_have_no_side_effect():
    model = fm.Model(PEOPLE)
    model.apply_round([("pacc", 10, 5, -5.0), ("gtr", 3, 1, 0.01)], at(0))
    model.apply_round([("gtr", 3, 1, 0.01)], at(10))
    assert model.runs[(3, fm.MAIL_ADMINS, 10, 5, at(0), 0)] == fm.RunExpectation("email_administrators", "silenced")
    assert model.runs[(5, fm.MAIL_AFF, 3, 1, at(10), 0)].status == "silenced"  # low goal ratio on offer 3


def test_reminders_repeat_the_mails_while_the_episode_lasts():
    model = fm.Model(PEOPLE)
    values = [-5.0, -5.0, -5.0, -6.0, -7.0, -8.0, 5.0, -1.0]  # loss alert: reminders 20 minutes apart
    for r, value in enumerate(values):
        if r != 4:  # the pair misses a round: the reminder waits for its next check
            model.apply_round([("pacc", 10, 1, value)], at(10 * r))
    reminders = sorted((ts, repeat) for (action, op, _, _, ts, repeat) in model.runs if action == 3)
    assert reminders == [(at(0), 0), (at(0), 1), (at(0), 2), (at(70), 0)]  # at 20, 50; a new episode at 70
    assert model.firings[(3, 10, 1, ((fm.NEG_PACC, at(0)),))].last_run_at == at(50)
    # The two-condition action repeats its mail, never its reject.
    model.apply_round([("cap_fill", 10, 1, 2.0)], at(0))
    model.apply_round([("cap_fill", 10, 1, 2.0)], at(20))
    assert (10, fm.MAIL_ADMINS_REJECT, 10, 1, at(0), 1) in model.runs
    assert (10, fm.REJECT, 10, 1, at(0), 1) not in model.runs


def test_cr_values_sum_goal_zero_rows_of_the_window():
    day = at(0).strftime("%Y-%m-%d")
    stats = [StatRow(1, 2, 0, day, 5, clicks=10, conversions=1), StatRow(1, 2, 0, day, 6, clicks=30, conversions=1),
             StatRow(1, 2, 7, day, 6, conversions=5),  # a goal row: not cr's
             StatRow(1, 3, 0, day, 6, clicks=0, conversions=2),  # no clicks: 0
             StatRow(2, 2, 0, day, 6, clicks=5, conversions=5),  # offer not loaded
             StatRow(1, 4, 0, day, 1, clicks=5, conversions=5)]  # outside the window
    assert fm.cr_values(stats, {1}, at(7 * 60 + 30), 3) == {(1, 2): 2 / 40, (1, 3): 0.0}


def test_the_plan_is_deterministic_and_covers_each_metric():
    network = generate(3, offers=4, affiliates=5, days=1)
    plans = [fm.plan_rounds(random.Random(1), network, 3, {"pacc": 10, "cap_fill": 6}, 0.5, 0.0, T0)
             for _ in range(2)]
    assert plans[0] == plans[1]
    assert [len(r) for r in plans[0].rounds] == [16, 16, 16]
    assert plans[0].stamps == [at(0), at(10), at(20)]
