"""Silences, protected affiliates, the reject cap, held runs, digests and reminders, through
the action_runner's handler and ticker against the real database and the fake HasOffers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import text

from services.action_runner.handler import handle_trigger_event
from services.action_runner.ticker import Ticker
from shared import held, silences
from shared.events import parse_data
from shared.hasoffers import HasOffersClient
from shared.settings import Settings
from testkit import ROOT
from testkit.waiting import wait_for
from testkit.fake_hasoffers.network import FakeAffiliate, FakeOffer, Network
from testkit.fake_hasoffers.server import FakeHasOffers
from tests.action_runner_support import (
    AFFILIATE, LONELY_AFFILIATE, MEASURED_AT, OFFER, OFFER_APPROVAL, TRIGGER, TRIGGER_2, FakeMailer, add_action,
    add_operation, add_trigger_event, envelope_of, runs, set_state,
)

# More affiliates than the support world has: rejects for many pairs.
AFFILIATES = range(40, 46)


@pytest.fixture(scope="module")
def fake_api() -> Iterator[FakeHasOffers]:
    network = Network(offers={OFFER: FakeOffer(OFFER, "Summer"), OFFER_APPROVAL: FakeOffer(OFFER_APPROVAL, "Gated",
                                                                                           require_approval=True)},
                      affiliates={a: FakeAffiliate(a, f"Aff {a}") for a in [AFFILIATE, LONELY_AFFILIATE, *AFFILIATES]})
    fake = FakeHasOffers(network)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def api(fake_api: FakeHasOffers) -> Iterator[HasOffersClient]:
    fake_api.reset()
    client = HasOffersClient(fake_api.base_url, fake_api.network_id, fake_api.network_token, max_attempts=1)
    yield client
    client.close()


def settings(**overrides) -> Settings:
    return Settings(_env_file=None, mail_from="kpi@kpi.example", kpi_retry_limit=2, **overrides)


def run(world, event, mailer, api=None, **overrides):
    return handle_trigger_event(envelope_of(event), engine=world, mailer=mailer, hasoffers=api,
                                settings=settings(**overrides))


def action(world, kinds, conditions=((TRIGGER, "PROBLEM"),), repeat_minutes=None, digest_minutes=None) -> int:
    with world.begin() as conn:
        ops = [add_operation(conn, kind) for kind in kinds]
        if digest_minutes:
            conn.execute(text("UPDATE operations SET digest_minutes = :d WHERE id = ANY(:ids)"),
                         {"d": digest_minutes, "ids": ops})
        action_id = add_action(conn, list(conditions), ops)
        conn.execute(text("UPDATE actions SET repeat_minutes = :r WHERE id = :a"), {"r": repeat_minutes, "a": action_id})
        return action_id


def event(world, **kwargs):
    with world.begin() as conn:
        for affiliate in AFFILIATES:
            conn.execute(text("INSERT INTO affiliates (id, company) VALUES (:a, 'x') ON CONFLICT DO NOTHING"),
                         {"a": affiliate})
        return add_trigger_event(conn, **kwargs)


def statuses(world) -> list[tuple[str, str]]:
    return [(r["kind"], r["status"]) for r in runs(world)]


# -- silences --------------------------------------------------------------------------------


def add_silence(world, **kwargs) -> int:
    with world.begin() as conn:
        now = conn.execute(text("SELECT now()")).scalar_one()
        return silences.add(conn, ends_at=now + timedelta(hours=1), reason="maintenance", created_by="ops",
                            **{"trigger": None, "offer_id": None, "affiliate_id": None, **kwargs})


def test_a_matching_silence_records_every_run_silenced_and_nothing_happens(world, api, fake_api):
    action(world, ["email_affiliate", "reject_affiliate"])
    silence_id = add_silence(world, trigger="min CR", offer_id=OFFER)
    mailer = FakeMailer()
    result = run(world, event(world), mailer, api)
    assert statuses(world) == [("email_affiliate", "silenced"), ("reject_affiliate", "silenced")]
    assert all(f"silence #{silence_id}" in r["detail"] and "maintenance" in r["detail"] for r in runs(world))
    assert mailer.sent == [] and fake_api.write_calls() == []
    assert sorted(parse_data(n).outcome for n in result.notices) == ["silenced", "silenced"]


@pytest.mark.parametrize("silence", [{"trigger": "zero conv"}, {"offer_id": OFFER_APPROVAL},
                                     {"affiliate_id": LONELY_AFFILIATE}])
def test_a_silence_for_something_else_silences_nothing(world, api, silence):
    action(world, ["email_affiliate"])
    add_silence(world, **silence)
    mailer = FakeMailer()
    run(world, event(world), mailer, api)
    assert statuses(world) == [("email_affiliate", "succeeded")] and len(mailer.sent) == 1


def test_an_ended_silence_silences_nothing(world, api):
    action(world, ["email_affiliate"])
    with world.begin() as conn:
        silences.end(conn, [add_silence(world)])
    run(world, event(world), FakeMailer(), api)
    assert statuses(world) == [("email_affiliate", "succeeded")]


@pytest.mark.parametrize("args, message", [
    (["--trigger", "nope", "--for", "1h", "--reason", "x"], "no trigger named 'nope'"),
    (["--for", "1h"], "a silence needs a reason"),
    (["--until", "2000-01-01T00:00:00Z", "--reason", "x"], "before it starts"),
    (["--for", "soon", "--reason", "x"], "invalid duration 'soon'"),
    (["--reason", "x"], "exactly one of --for DURATION or --until TIME"),
])
def test_kpi_silence_add_refuses_bad_input_with_one_line(world, service_env, args, message):
    result = kpi(service_env, "silence", "add", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_kpi_silence_add_list_end(world, service_env):
    added = kpi(service_env, "silence", "add", "--trigger", "min CR", "--offer", str(OFFER), "--for", "2h",
                "--reason", "known issue", "--by", "ann")
    assert added.returncode == 0, added.stderr
    listed = json.loads(kpi(service_env, "silence", "list", "--json").stdout)
    assert [(s["trigger"], s["offer_id"], s["reason"], s["created_by"], s["in_force"]) for s in listed] == [
        ("min CR", OFFER, "known issue", "ann", True)]
    assert kpi(service_env, "silence", "end", str(listed[0]["id"])).returncode == 0
    assert json.loads(kpi(service_env, "silence", "list", "--json").stdout) == []
    assert "known issue" in kpi(service_env, "silence", "list", "--all").stdout


def kpi(env, *args):
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)


# -- protected affiliates and the reject cap --------------------------------------------------------


def test_a_protected_affiliate_is_never_rejected_but_still_hears_and_is_approved(world, api, fake_api):
    action(world, ["reject_affiliate", "email_affiliate", "approve_affiliate"])
    with world.begin() as conn:
        conn.execute(text("UPDATE affiliates SET protected = true WHERE id = :a"), {"a": AFFILIATE})
    mailer = FakeMailer()
    run(world, event(world), mailer, api)
    by_kind = {r["kind"]: r for r in runs(world)}
    assert (by_kind["reject_affiliate"]["status"], by_kind["reject_affiliate"]["detail"]) == ("skipped",
                                                                                              "protected affiliate")
    assert by_kind["email_affiliate"]["status"] == by_kind["approve_affiliate"]["status"] == "succeeded"
    assert [c["method"] for c in fake_api.write_calls()] == ["Offer.setAffiliateApproval"]
    assert fake_api.write_calls()[0]["status"] == "approved"


def test_rejects_beyond_the_hourly_cap_are_held_and_the_first_hold_is_recorded_once(world, api, fake_api):
    action(world, ["reject_affiliate"])
    for affiliate in AFFILIATES:
        run(world, event(world, affiliate_id=affiliate), FakeMailer(), api, kpi_max_rejects_per_hour=4)
    assert [r["status"] for r in runs(world)] == ["succeeded"] * 4 + ["held"] * 2
    assert len(fake_api.write_calls("Offer.blockAffiliate")) == 4
    assert "4 rejects in the last 60 minutes reached KPI_MAX_REJECTS_PER_HOUR (4)" in runs(world)[-1]["detail"]
    with world.connect() as conn:
        alerts = conn.execute(text("SELECT held_run_id FROM reject_cap_alerts")).scalars().all()
    assert alerts == [runs(world)[4]["id"]]
    mailer = FakeMailer()
    for _ in range(2):  # any number of ticks, of any replica: one email
        tick(world, mailer, kpi_max_rejects_per_hour=4)
    [alert] = mailer.sent
    assert alert.recipients == ("ops@net.example",) and "Rejects held" in alert.subject
    assert f"reject run {alerts[0]} is held, 2 held in all" in alert.text


def test_a_cap_of_zero_holds_every_reject(world, api, fake_api):
    action(world, ["reject_affiliate"])
    run(world, event(world), FakeMailer(), api, kpi_max_rejects_per_hour=0)
    assert statuses(world) == [("reject_affiliate", "held")] and fake_api.write_calls() == []


def test_a_released_run_runs_once_even_released_twice_and_a_discarded_one_never(world, api, fake_api):
    action(world, ["reject_affiliate"])
    events = [event(world, affiliate_id=a) for a in AFFILIATES[:3]]
    for e in events:
        run(world, e, FakeMailer(), api, kpi_max_rejects_per_hour=0)
    first, second, third = (r["id"] for r in runs(world))
    with world.begin() as conn:
        released, announced = held.release(conn, [first], "ann")
    with world.begin() as conn:
        again, _ = held.release(conn, [first], "bob")  # a second operator, too late
        discarded = held.discard(conn, [second], "bob")
    assert (released, again, discarded) == ([first], [], [second])
    assert [parse_data(e).trigger_event_id for e in announced] == [events[0].trigger_event_id]
    for _ in range(2):  # delivered twice
        run(world, events[0], FakeMailer(), api, kpi_max_rejects_per_hour=0)  # the cap no longer applies
    assert [(r["id"], r["status"]) for r in runs(world)] == [(first, "succeeded"), (second, "discarded"),
                                                             (third, "held")]
    assert len(fake_api.write_calls()) == 1
    with world.connect() as conn:
        decided = conn.execute(text("SELECT id, decided_by FROM operation_runs WHERE decided_by IS NOT NULL "
                                    "ORDER BY id")).all()
    assert [tuple(r) for r in decided] == [(first, "ann"), (second, "bob")]
    with pytest.raises(held.HeldError, match="no operation run with id 999"):
        with world.begin() as conn:
            held.release(conn, [999], "ann")


# -- digests and reminders ----------------------------------------------------------------------


def tick(world, mailer, **overrides) -> list:
    ticker = Ticker(world, mailer, lambda: None, settings(**overrides))  # type: ignore[arg-type]
    out = []
    for digest_id in ticker.due_digests():
        out += ticker.send_digest(digest_id)
    ticker.send_alerts()
    return out


def close_digests(world) -> None:
    """The window passes (digest_minutes is minutes of the wall clock)."""
    with world.begin() as conn:
        conn.execute(text("UPDATE digests SET closes_at = now() - interval '1 second' WHERE status = 'open'"))


def test_a_digest_carries_every_pair_of_its_window_in_one_email(world, api):
    action(world, ["email_administrators"], digest_minutes=10)
    mailer = FakeMailer()
    events = [event(world, affiliate_id=a, value=0.01 + a / 1000) for a in AFFILIATES[:4]]
    for e in events:
        run(world, e, mailer, api)
    assert mailer.sent == [] and statuses(world) == [("email_administrators", "pending")] * 4
    assert tick(world, mailer) == []  # the window is still open
    close_digests(world)
    notices = tick(world, mailer)
    [mail] = mailer.sent
    assert mail.recipients == ("ops@net.example",) and mail.digest_runs == tuple(r["id"] for r in runs(world))
    for e in events:
        assert f"#{e.affiliate_id}" in mail.html
    with world.connect() as conn:
        carried = conn.execute(text("SELECT status, message_id FROM operation_runs")).all()
    assert carried == [("succeeded", mail.message_id)] * 4
    assert sorted(parse_data(n).operation_run_id for n in notices) == [r["id"] for r in runs(world)]
    assert tick(world, mailer) == [] and len(mailer.sent) == 1  # sent once
    run(world, event(world, affiliate_id=AFFILIATES[5]), mailer, api)  # after the window: a new digest
    with world.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM digests WHERE status = 'open'")).scalar_one() == 1


def test_a_replica_starting_announces_the_recent_digests_again(world, api):
    """A replica that dies between closing a digest and publishing its notices takes them
    with it: the next ticker to start announces them again, under the same event ids."""
    action(world, ["email_administrators"], digest_minutes=10)
    mailer = FakeMailer()
    for a in AFFILIATES[:3]:
        run(world, event(world, affiliate_id=a), mailer, api)
    close_digests(world)
    lost = tick(world, mailer)  # the notices, never published
    assert len(lost) == 3
    again = Ticker(world, mailer, lambda: None, settings()).notices_of_recent_digests()  # type: ignore[arg-type]
    assert sorted(n.event_id for n in again) == sorted(n.event_id for n in lost)
    assert [parse_data(n).outcome for n in again] == ["succeeded"] * 3
    with world.begin() as conn:  # older than an hour: not any more
        conn.execute(text("UPDATE digests SET closes_at = now() - interval '2 hours'"))
    assert Ticker(world, mailer, lambda: None, settings()).notices_of_recent_digests() == []  # type: ignore[arg-type]


def test_reminders_repeat_the_emails_while_the_episode_lasts_and_stop_with_it(world, api):
    action(world, ["email_administrators", "reject_affiliate"], repeat_minutes=30)
    mailer = FakeMailer()
    first = event(world)
    run(world, first, mailer, api)
    check_ids = iter(range(900, 999))

    def check(minutes: int) -> None:
        with world.begin() as conn:
            conn.execute(text(
                "INSERT INTO trigger_checks (id, trigger_id, offer_id, affiliate_id, value, operator, threshold, "
                "status, measured_at) VALUES (:id, :t, :o, :a, 0.01, 'lt', 0.05, 'PROBLEM', :m)"),
                {"id": next(check_ids), "t": TRIGGER, "o": OFFER, "a": AFFILIATE,
                 "m": MEASURED_AT + timedelta(minutes=minutes)})
            # ...and the event_detector folds it in (same status: only measured_at moves).
            conn.execute(text("UPDATE trigger_states SET measured_at = :m WHERE trigger_id = :t AND offer_id = :o "
                              "AND affiliate_id = :a"),
                         {"t": TRIGGER, "o": OFFER, "a": AFFILIATE, "m": MEASURED_AT + timedelta(minutes=minutes)})

    ticker = Ticker(world, mailer, lambda: None, settings())  # type: ignore[arg-type]
    check(15)
    assert ticker.record_reminders() == []  # too early
    check(31)
    check(45)
    [announce] = ticker.record_reminders()
    assert parse_data(announce).trigger_event_id == first.trigger_event_id
    run(world, first, mailer, api)  # the announcement, delivered
    assert ticker.record_reminders() == []  # the next one is due 30 minutes after the check at 31
    check(62)
    ticker.record_reminders()
    run(world, first, mailer, api)
    with world.connect() as conn:
        reminders = conn.execute(text("SELECT kind, repeat, status, measured_at FROM operation_runs ORDER BY id")).all()
    assert [(k, r, s) for k, r, s, _ in reminders] == [
        ("email_administrators", 0, "succeeded"), ("reject_affiliate", 0, "succeeded"),
        ("email_administrators", 1, "succeeded"), ("email_administrators", 2, "succeeded")]
    assert [m for *_, m in reminders][2:] == [MEASURED_AT + timedelta(minutes=31), MEASURED_AT + timedelta(minutes=62)]
    assert len({mail.message_id for mail in mailer.sent}) == 3  # each reminder a message of its own
    with world.begin() as conn:  # the episode ends: the pair is OK
        set_state(conn, TRIGGER, OFFER, AFFILIATE, "OK")
    check(100)
    assert ticker.record_reminders() == []


def test_each_evaluation_is_recorded_with_the_reason_it_did_not_fire(world, api):
    both = action(world, ["email_administrators"], conditions=[(TRIGGER, "PROBLEM"), (TRIGGER_2, "PROBLEM")])
    alone = action(world, ["email_administrators"])
    e = event(world)
    run(world, e, FakeMailer(), api)
    with world.connect() as conn:
        rows = dict(conn.execute(text("SELECT action_id, reason FROM action_evaluations")).all())
    assert rows == {both: "condition (zero conv, PROBLEM) does not hold: the pair has no state under it",
                    alone: "every condition holds"}


def test_two_action_runners_racing_for_the_last_slots_run_exactly_the_cap(world, bus, start_service, fake_api):
    """Six rejects, a cap of three, two replicas, each call held open a second: whoever
    asks when, exactly three run and three are held."""
    action(world, ["reject_affiliate"])
    fake_api.reset()
    fake_api.inject("slow", count=6, method="Offer.blockAffiliate", seconds=1.0)
    env = {"HASOFFERS_BASE_URL": fake_api.base_url, "HASOFFERS_NETWORK_ID": fake_api.network_id,
           "HASOFFERS_NETWORK_TOKEN": fake_api.network_token, "KPI_MAX_REJECTS_PER_HOUR": "3", "KPI_PREFETCH": "1"}
    # Every grant takes a while to write: a replica that counted without waiting for the
    # other's decision would count too few and run a fourth reject.
    with world.begin() as conn:
        conn.execute(text("CREATE FUNCTION slow_grant() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                          "PERFORM pg_sleep(0.3); RETURN NEW; END $$"))
        conn.execute(text("CREATE TRIGGER slow_grant BEFORE UPDATE OF cap_granted_at ON operation_runs "
                          "FOR EACH ROW EXECUTE FUNCTION slow_grant()"))
    try:
        replicas = [start_service("action_runner", **env) for _ in range(2)]
        for affiliate in AFFILIATES:
            bus.publish(envelope_of(event(world, affiliate_id=affiliate)))
        final = wait_for(lambda: (lambda r: r if len(r) == 6 and all(x["status"] != "pending" for x in r) else None)(
            runs(world)), 30, what="six final runs")
    finally:
        with world.begin() as conn:
            conn.execute(text("DROP TRIGGER slow_grant ON operation_runs; DROP FUNCTION slow_grant()"))
    assert sorted(r["status"] for r in final) == ["held"] * 3 + ["succeeded"] * 3
    assert len(fake_api.write_calls("Offer.blockAffiliate")) == 3
    assert all(r.log().count("message handled") >= 1 for r in replicas), "both replicas took a share"
