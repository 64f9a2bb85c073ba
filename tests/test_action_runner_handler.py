"""action_runner's handler as a function, against the real database, a real local SMTP
server and the fake HasOffers HTTP server (the process-level tests are in test_action_runner.py)."""

from __future__ import annotations

import threading
from datetime import timedelta
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from services.action_runner.execution import RUN_LOCK
from services.action_runner.handler import handle_trigger_event
from services.action_runner.mailer import Mail, MailRejectedError, MailTransientError, SmtpMailer
from shared.handling import RetryableError
from shared.events import (
    OPERATION_EXECUTED,
    InvalidMessageError,
    new_event,
    parse_data,
    parse_envelope,
    stable_event_id,
)
from shared.hasoffers import HasOffersClient
from shared.settings import Settings
from testkit.fake_hasoffers.network import FakeOffer
from testkit.fake_hasoffers.server import FakeHasOffers
from testkit.smtp import FakeSmtpServer
from tests.action_runner_support import (
    FakeMailer,
    fake_network,
    AFFILIATE,
    LONELY_AFFILIATE,
    MEASURED_AT,
    OFFER,
    OFFER_APPROVAL,
    TRIGGER,
    TRIGGER_2,
    add_action,
    add_operation,
    add_trigger_event,
    envelope_of,
    runs,
    set_state,
)

UNKNOWN_OFFER_KNOWN_TO_API = 14
UNKNOWN_OFFER = 15


class SimulatedCrashError(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way catches it."""


@pytest.fixture(scope="module")
def fake_api() -> Iterator[FakeHasOffers]:
    fake = FakeHasOffers(fake_network(
        FakeOffer(UNKNOWN_OFFER_KNOWN_TO_API, "Remote", require_approval=True)))
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def api(fake_api: FakeHasOffers) -> Iterator[HasOffersClient]:
    fake_api.reset()
    client = HasOffersClient(fake_api.base_url, fake_api.network_id, fake_api.network_token, max_attempts=1,
                             backoff_seconds=0, rate_limit_pause_seconds=0)
    yield client
    client.close()


@pytest.fixture
def mailer() -> FakeMailer:
    return FakeMailer()


def settings(**overrides) -> Settings:
    return Settings(_env_file=None, mail_from="kpi@kpi.example", kpi_retry_limit=2, **overrides)


def run(world, envelope, mailer, api=None, **overrides):
    return handle_trigger_event(envelope, engine=world, mailer=mailer, hasoffers=api, settings=settings(**overrides))


def one_action(world, *kinds, conditions=((TRIGGER, "PROBLEM"),), active=True, **templates):
    with world.begin() as conn:
        ops = [add_operation(conn, kind, **templates) for kind in kinds]
        return add_action(conn, list(conditions), ops, active=active)


def new_trigger_event(world, **kwargs):
    with world.begin() as conn:
        return add_trigger_event(conn, **kwargs)


# -- who gets what --------------------------------------------------------------------------


def test_each_email_kind_goes_to_its_recipients_once_per_run(world, mailer):
    one_action(world, "email_affiliate", "email_affiliate_manager", "email_administrators")
    event = new_trigger_event(world)

    result = run(world, envelope_of(event), mailer)

    assert [m.recipients for m in mailer.sent] == [
        ("ann@aff.example", "bob@aff.example"), ("manager@net.example",), ("ops@net.example",)]
    assert [(r["status"], r["attempts"]) for r in runs(world)] == [("succeeded", 1)] * 3
    assert runs(world)[0]["detail"] == "sent to ann@aff.example, bob@aff.example"
    assert all(r["started_at"] and r["finished_at"] for r in runs(world))
    notices = [parse_data(n) for n in result.notices]
    assert [(n.kind, n.outcome) for n in notices] == [
        ("email_affiliate", "succeeded"), ("email_affiliate_manager", "succeeded"),
        ("email_administrators", "succeeded")]
    assert {n.type for n in result.notices} == {OPERATION_EXECUTED}
    assert result.events == [] and result.dead_letters == []


def test_the_manager_gets_the_secondary_address_when_asked(world, mailer):
    with world.begin() as conn:
        conn.execute(text("UPDATE employees SET use_secondary = true"))
    one_action(world, "email_affiliate_manager")
    run(world, envelope_of(new_trigger_event(world)), mailer)
    assert [m.recipients for m in mailer.sent] == [("manager.backup@net.example",)]


def test_an_operation_without_recipient_is_skipped_with_the_reason(world, mailer):
    with world.begin() as conn:
        conn.execute(text("UPDATE administrators SET active = false"))
    one_action(world, "email_affiliate", "email_affiliate_manager", "email_administrators")
    event = new_trigger_event(world, affiliate_id=LONELY_AFFILIATE)

    result = run(world, envelope_of(event), mailer)

    assert mailer.sent == []
    assert [(r["status"], r["detail"]) for r in runs(world)] == [
        ("skipped", "affiliate 8 has no active user"),
        ("skipped", "affiliate 8 has no account manager"),
        ("skipped", "there is no active administrator"),
    ]
    assert [parse_data(n).outcome for n in result.notices] == ["skipped"] * 3


def test_unusable_addresses_are_left_out_and_named(world, mailer):
    with world.begin() as conn:
        conn.execute(text("UPDATE affiliate_users SET email = 'x@y\r\nBcc: evil@x' WHERE id = 70"))
    one_action(world, "email_affiliate")
    run(world, envelope_of(new_trigger_event(world)), mailer)
    assert [m.recipients for m in mailer.sent] == [("bob@aff.example",)]
    assert "ignored unusable address(es): 'x@y\\r\\nBcc: evil@x'" in runs(world)[0]["detail"]


def test_the_mail_is_rendered_from_the_operation_templates(world, mailer):
    one_action(world, "email_affiliate", subject="{trigger-name}\r\nBcc: evil@x", body="<p>{offer-name}</p>")
    run(world, envelope_of(new_trigger_event(world)), mailer)
    [mail] = mailer.sent
    assert mail.subject == "min CR Bcc: evil@x"
    assert mail.html == "<p>Summer &lt;script&gt;alert(1)&lt;/script&gt; &amp; Co</p>"
    assert mail.message_id.endswith("@kpi.example>")


# -- when an action fires -------------------------------------------------------------------


def test_an_action_with_two_conditions_fires_only_when_both_hold(world, mailer):
    action = one_action(world, "email_administrators", conditions=[(TRIGGER, "PROBLEM"), (TRIGGER_2, "PROBLEM")])

    first = new_trigger_event(world)  # TRIGGER_2 has no state for the pair
    run(world, envelope_of(first), mailer)
    assert runs(world) == [] and mailer.sent == []

    with world.begin() as conn:
        set_state(conn, TRIGGER_2, OFFER, AFFILIATE, "OK")
    second = new_trigger_event(world, previous="PROBLEM", status="OK")
    third = new_trigger_event(world)  # TRIGGER_2 is OK: still does not hold
    for event in (second, third):
        run(world, envelope_of(event), mailer)
    assert runs(world) == []

    # TRIGGER_2 goes to PROBLEM while TRIGGER is in PROBLEM: the condition on TRIGGER is read from its state.
    fourth = new_trigger_event(world, trigger_id=TRIGGER_2, value=900.0, threshold=500.0)
    run(world, envelope_of(fourth), mailer)
    assert [(r["trigger_event_id"], r["action_id"]) for r in runs(world)] == [(fourth.trigger_event_id, action)]
    assert len(mailer.sent) == 1


def test_two_events_completing_the_same_conjunction_fire_the_action_once(world, mailer):
    """Both conditions' events arrive after both states are in PROBLEM: one firing, one mail."""
    action = one_action(world, "email_administrators", conditions=[(TRIGGER, "PROBLEM"), (TRIGGER_2, "PROBLEM")])
    first = new_trigger_event(world)
    second = new_trigger_event(world, trigger_id=TRIGGER_2, value=900.0, threshold=500.0)
    for event in (first, second, first, second):
        run(world, envelope_of(event), mailer)
    assert [(r["trigger_event_id"], r["action_id"]) for r in runs(world)] == [(first.trigger_event_id, action)]
    assert len(mailer.sent) == 1

    # TRIGGER_2 recovers and breaks again later: a new episode, a new firing.
    later = MEASURED_AT + timedelta(hours=1)
    with world.begin() as conn:
        conn.execute(text("UPDATE trigger_states SET since = :m, measured_at = :m WHERE trigger_id = :t"),
                     {"m": later, "t": TRIGGER_2})
        third = add_trigger_event(conn, trigger_id=TRIGGER_2, value=800.0, threshold=500.0, measured_at=later)
    run(world, envelope_of(third), mailer)
    assert [r["trigger_event_id"] for r in runs(world)] == [first.trigger_event_id, third.trigger_event_id]
    assert len(mailer.sent) == 2


def test_only_active_actions_with_a_matching_condition_fire(world, mailer):
    one_action(world, "email_administrators", active=False)
    one_action(world, "email_administrators", conditions=[(TRIGGER, "OK")])
    one_action(world, "email_administrators", conditions=[(TRIGGER_2, "PROBLEM")])
    # Contradictory: the event's own trigger cannot be both PROBLEM and OK.
    one_action(world, "email_administrators", conditions=[(TRIGGER, "PROBLEM"), (TRIGGER, "OK")])
    with world.begin() as conn:
        set_state(conn, TRIGGER_2, OFFER, AFFILIATE, "PROBLEM")
    run(world, envelope_of(new_trigger_event(world)), mailer)
    assert runs(world) == [] and mailer.sent == []


def test_an_ok_event_fires_the_actions_on_ok(world, mailer):
    action = one_action(world, "email_administrators", conditions=[(TRIGGER, "OK")])
    run(world, envelope_of(new_trigger_event(world, status="OK", previous="PROBLEM", value=0.2)), mailer)
    assert [r["action_id"] for r in runs(world)] == [action]
    assert mailer.sent[0].subject.startswith("[KPI] min CR is OK")


# -- exactly once ---------------------------------------------------------------------------


def test_a_redelivered_event_repeats_nothing_and_keeps_its_decision(world, mailer):
    one_action(world, "email_administrators", conditions=[(TRIGGER, "PROBLEM"), (TRIGGER_2, "PROBLEM")])
    with world.begin() as conn:
        set_state(conn, TRIGGER_2, OFFER, AFFILIATE, "PROBLEM")
    envelope = envelope_of(new_trigger_event(world))
    first = run(world, envelope, mailer)
    before = runs(world)

    with world.begin() as conn:  # the condition no longer holds, but the event was already decided
        set_state(conn, TRIGGER_2, OFFER, AFFILIATE, "OK")
    second = run(world, envelope, mailer)

    assert len(mailer.sent) == 1
    assert runs(world) == before and len(before) == 1
    # The notices are published again (a crash may have lost them) under the same ids.
    assert [n.event_id for n in second.notices] == [n.event_id for n in first.notices]
    assert first.notices[0].event_id == stable_event_id(OPERATION_EXECUTED, before[0]["trigger_event_id"],
                                                        before[0]["action_id"], before[0]["operation_id"])


def test_two_replicas_with_the_same_event_send_once(world):
    one_action(world, "email_administrators", "email_affiliate")
    envelope = envelope_of(new_trigger_event(world))
    sending = threading.Event()
    release = threading.Event()
    mailer = FakeMailer()

    def slow_send(mail: Mail) -> None:
        sending.set()
        assert release.wait(10)

    mailer.before_send = slow_send
    first = threading.Thread(target=run, args=(world, envelope, mailer))
    first.start()
    assert sending.wait(10)
    # The first replica holds the run it is sending; the second skips it, takes the next one,
    # and does not ack: its delivery comes back until the held run is final.
    mailer.before_send = lambda mail: None
    with pytest.raises(RetryableError, match="being handled by another delivery"):
        run(world, envelope, mailer)
    release.set()
    first.join(10)

    assert sorted(m.recipients for m in mailer.sent) == [("ann@aff.example", "bob@aff.example"), ("ops@net.example",)]
    assert [r["status"] for r in runs(world)] == ["succeeded", "succeeded"]
    again = run(world, envelope, mailer)  # the second delivery, back from the retry queue
    assert sorted(parse_data(n).kind for n in again.notices) == ["email_administrators", "email_affiliate"]
    assert len(mailer.sent) == 2


def test_a_run_held_by_a_delivery_that_is_then_lost_is_not_stranded(world, mailer):
    # Found by the fault suite: replica A held a run when RabbitMQ restarted, so the
    # broker handed A's delivery to replica B, which found the run locked and acked. A then
    # finished the run but had no delivery left to announce it; had A's attempt failed (or
    # had A died), the run would have stayed pending for good.
    one_action(world, "email_administrators")
    envelope = envelope_of(new_trigger_event(world))
    failing = FakeMailer()
    failing.failures.append(MailTransientError("451 try later"))
    with pytest.raises(RetryableError):
        run(world, envelope, failing)  # the run exists, still pending after a failed attempt
    [held] = runs(world)
    with world.connect() as replica_a:  # A is in the middle of it (it holds the run's claim)...
        replica_a.execute(text("SELECT pg_advisory_lock(:ns, :id)"), {"ns": RUN_LOCK, "id": held["id"]})
        with pytest.raises(RetryableError, match=f"run {held['id']} is being handled by another delivery"):
            run(world, envelope, mailer)  # B does not ack
        replica_a.execute(text("SELECT pg_advisory_unlock_all()"))  # ...and A never finishes: it died
    result = run(world, envelope, mailer)  # B's delivery comes back
    assert len(mailer.sent) == 1
    assert [(r["status"], r["attempts"]) for r in runs(world)] == [("succeeded", 2)]
    assert [parse_data(n).operation_run_id for n in result.notices] == [held["id"]]


def test_a_crash_after_sending_before_commit_gives_at_most_one_duplicate(world, mailer):
    one_action(world, "email_administrators")
    envelope = envelope_of(new_trigger_event(world))

    def crash(mail: Mail) -> None:
        raise SimulatedCrashError()

    mailer.after_send = crash
    with pytest.raises(SimulatedCrashError):
        run(world, envelope, mailer)
    # The outcome was not committed and the claim died with the "process"; the attempt
    # was counted before the side effect, so a run that keeps crashing cannot loop.
    assert [(r["status"], r["attempts"]) for r in runs(world)] == [("pending", 1)]

    mailer.after_send = lambda mail: None
    run(world, envelope, mailer)  # the redelivery
    run(world, envelope, mailer)
    assert len(mailer.sent) == 2  # the crash cost one duplicate, and only one
    assert mailer.sent[0].message_id == mailer.sent[1].message_id
    assert [(r["status"], r["attempts"]) for r in runs(world)] == [("succeeded", 2)]


def test_a_run_that_crashes_its_process_at_every_attempt_gives_up(world, mailer):
    """kpi_retry_limit=2: three attempts begin and none finishes; the fourth gives up
    without sending, and the event goes to the dead queue."""
    one_action(world, "email_administrators")
    envelope = envelope_of(new_trigger_event(world))

    def crash(mail: Mail) -> None:
        raise SimulatedCrashError()

    mailer.after_send = crash
    for _ in range(3):
        with pytest.raises(SimulatedCrashError):
            run(world, envelope, mailer)
    result = run(world, envelope, mailer)
    assert len(mailer.sent) == 3
    [failed] = runs(world)
    assert (failed["status"], failed["attempts"]) == ("failed", 4)
    assert "gave up after 3 attempts: each was interrupted" in failed["detail"]
    [dead] = result.dead_letters
    assert "each was interrupted" in dead.reason
    assert [parse_data(n).outcome for n in result.notices] == ["failed"]


# -- failures -------------------------------------------------------------------------------


def test_a_transient_failure_is_recorded_and_retried(world, mailer):
    one_action(world, "email_administrators")
    envelope = envelope_of(new_trigger_event(world))
    mailer.failures = [MailTransientError("ConnectionRefusedError: [Errno 111] Connection refused")]

    with pytest.raises(RetryableError, match="Connection refused"):
        run(world, envelope, mailer)
    [pending] = runs(world)
    assert (pending["status"], pending["attempts"]) == ("pending", 1)
    assert "Connection refused" in pending["last_error"]

    result = run(world, envelope, mailer)
    assert len(mailer.sent) == 1
    assert [(r["status"], r["attempts"]) for r in runs(world)] == [("succeeded", 2)]
    assert [parse_data(n).outcome for n in result.notices] == ["succeeded"]


def test_after_the_retry_limit_the_run_fails_and_the_event_goes_to_the_dead_queue(world, mailer):
    one_action(world, "email_administrators", "email_affiliate")
    envelope = envelope_of(new_trigger_event(world))
    mailer.failures = [MailTransientError("SMTP 451: try later")] * 10

    for _ in range(2):  # retry limit 2: three deliveries in all
        with pytest.raises(RetryableError):
            run(world, envelope, mailer)
    result = run(world, envelope, mailer)

    assert mailer.sent == []
    assert [(r["status"], r["attempts"]) for r in runs(world)] == [("failed", 3), ("failed", 3)]
    assert runs(world)[0]["detail"] == "gave up after 3 attempts: MailTransientError: SMTP 451: try later"
    [dead] = result.dead_letters
    assert "gave up after 3 attempts" in dead.reason
    assert parse_envelope(dead.body) == envelope
    assert [parse_data(n).outcome for n in result.notices] == ["failed", "failed"]

    again = run(world, envelope, mailer)  # a final run is never tried again
    assert len(mailer.failures) == 4 and again.dead_letters == []

    # The operator's way to try again: reset the runs, replay the event.
    with world.begin() as conn:
        conn.execute(text("UPDATE operation_runs SET status = 'pending', attempts = 0 WHERE status = 'failed'"))
    mailer.failures = []
    replayed = run(world, envelope, mailer)
    assert len(mailer.sent) == 2 and [r["status"] for r in runs(world)] == ["succeeded", "succeeded"]
    assert [parse_data(n).outcome for n in replayed.notices] == ["succeeded", "succeeded"]


def test_a_rejected_mail_fails_at_once(world, mailer):
    one_action(world, "email_administrators")
    mailer.failures = [MailRejectedError("SMTP 550: no such user")]
    result = run(world, envelope_of(new_trigger_event(world)), mailer)
    assert [(r["status"], r["attempts"], r["last_error"]) for r in runs(world)] == [
        ("failed", 1, "SMTP 550: no such user")]
    assert result.dead_letters == []


def test_dry_run_records_skipped_and_sends_nothing(world, mailer, api, fake_api):
    one_action(world, "email_affiliate", "approve_affiliate", "reject_affiliate")
    result = run(world, envelope_of(new_trigger_event(world)), mailer, api, actions_dry_run=True)
    assert mailer.sent == [] and fake_api.write_calls() == []
    assert [(r["status"], r["detail"], r["attempts"]) for r in runs(world)] == [("skipped", "dry run", 0)] * 3
    assert [parse_data(n).outcome for n in result.notices] == ["skipped"] * 3


# -- invalid messages -----------------------------------------------------------------------


def test_an_event_without_its_trigger_events_row_is_invalid(world, mailer):
    one_action(world, "email_administrators")
    event = new_trigger_event(world)
    ghost = event.model_copy(update={"trigger_event_id": event.trigger_event_id + 100})
    with pytest.raises(InvalidMessageError, match=f"trigger_event {ghost.trigger_event_id} does not exist"):
        run(world, envelope_of(ghost), mailer)
    other_pair = event.model_copy(update={"affiliate_id": LONELY_AFFILIATE})
    with pytest.raises(InvalidMessageError, match="but the message says"):
        run(world, envelope_of(other_pair), mailer)
    assert runs(world) == [] and mailer.sent == []


def test_a_type_that_contradicts_the_status_is_invalid(world, mailer):
    event = new_trigger_event(world)
    envelope = new_event("trigger.event.ok", event)
    with pytest.raises(InvalidMessageError, match="trigger.event.ok event with status PROBLEM"):
        run(world, envelope, mailer)


# -- HasOffers ------------------------------------------------------------------------------


def test_approve_calls_set_affiliate_approval(world, mailer, api, fake_api):
    one_action(world, "approve_affiliate")
    run(world, envelope_of(new_trigger_event(world)), mailer, api)
    assert fake_api.write_calls() == [{"method": "Offer.setAffiliateApproval", "offer_id": OFFER,
                                       "affiliate_id": AFFILIATE, "status": "approved", "notes": None}]
    assert runs(world)[0]["status"] == "succeeded"


def test_reject_on_an_offer_requiring_approval_rejects_with_the_trigger_name(world, mailer, api, fake_api):
    one_action(world, "reject_affiliate")
    run(world, envelope_of(new_trigger_event(world, offer_id=OFFER_APPROVAL)), mailer, api)
    [call] = fake_api.write_calls()
    assert (call["method"], call["status"], call["offer_id"]) == ("Offer.setAffiliateApproval", "rejected",
                                                                  OFFER_APPROVAL)
    assert "min CR" in call["notes"]


def test_reject_on_an_open_offer_blocks(world, mailer, api, fake_api):
    one_action(world, "reject_affiliate")
    run(world, envelope_of(new_trigger_event(world)), mailer, api)
    assert fake_api.write_calls() == [{"method": "Offer.blockAffiliate", "offer_id": OFFER, "affiliate_id": AFFILIATE}]


def test_reject_on_an_offer_not_loaded_yet_asks_the_api(world, mailer, api, fake_api):
    one_action(world, "reject_affiliate")
    run(world, envelope_of(new_trigger_event(world, offer_id=UNKNOWN_OFFER_KNOWN_TO_API)), mailer, api)
    assert [c["status"] for c in fake_api.write_calls("Offer.setAffiliateApproval")] == ["rejected"]

    run(world, envelope_of(new_trigger_event(world, offer_id=UNKNOWN_OFFER)), mailer, api)
    assert runs(world)[-1]["status"] == "failed"
    assert runs(world)[-1]["detail"] == f"offer {UNKNOWN_OFFER} is unknown locally and to HasOffers"
    assert len(fake_api.write_calls()) == 1


def test_a_hasoffers_error_fails_the_run_without_retry(world, mailer, api, fake_api):
    one_action(world, "approve_affiliate")
    result = run(world, envelope_of(new_trigger_event(world, affiliate_id=LONELY_AFFILIATE)), mailer, api)
    [failed] = runs(world)
    assert (failed["status"], failed["attempts"]) == ("failed", 1)
    assert "Failed to hydrate rows" in failed["detail"] and "Failed to hydrate rows" in failed["last_error"]
    assert result.dead_letters == [] and fake_api.write_calls() == []


def test_hasoffers_unavailable_is_retried(world, mailer, api, fake_api):
    one_action(world, "approve_affiliate")
    envelope = envelope_of(new_trigger_event(world))
    fake_api.inject("http_500", 1, "Offer.setAffiliateApproval")
    with pytest.raises(RetryableError, match="HTTP 500"):
        run(world, envelope, mailer, api)
    run(world, envelope, mailer, api)
    assert len(fake_api.write_calls()) == 1
    assert [(r["status"], r["attempts"]) for r in runs(world)] == [("succeeded", 2)]


def test_without_hasoffers_credentials_api_operations_fail_clearly(world, mailer):
    one_action(world, "approve_affiliate")
    run(world, envelope_of(new_trigger_event(world)), mailer, None)
    assert "HasOffers is not configured" in runs(world)[0]["detail"]


# -- the SMTP mailer against a real server --------------------------------------------------


def test_smtp_mailer_sends_and_sorts_failures():
    server = FakeSmtpServer().start()
    mailer = SmtpMailer("127.0.0.1", server.port, sender="kpi@kpi.example", starttls=False, timeout=5)
    mail = Mail(recipients=("a@x.example", "b@x.example"), subject="s", html="<p>h</p>", text="h\n",
                message_id="<kpi-1@kpi.example>", run_id=1)
    try:
        assert mailer.send(mail) == ""
        [received] = server.mails()
        assert received.rcpt_tos == ["a@x.example", "b@x.example"]
        assert received.message["Subject"] == "s" and received.message["X-KPI-Operation-Run"] == "1"

        server.replies = ["451 4.3.0 try again later"]
        with pytest.raises(MailTransientError, match="451"):
            mailer.send(mail)
        server.replies = ["554 5.7.1 rejected"]
        with pytest.raises(MailRejectedError, match="554"):
            mailer.send(mail)
    finally:
        server.stop()
    with pytest.raises(MailTransientError, match="Connection refused|ConnectionRefused"):
        mailer.send(mail)


def test_smtp_mailer_never_shows_its_password():
    server = FakeSmtpServer().start()  # offers no AUTH: login fails
    mailer = SmtpMailer("127.0.0.1", server.port, sender="kpi@kpi.example", user="kpi", password="pw-s3cret",
                        starttls=False, timeout=5)
    try:
        with pytest.raises(MailTransientError) as caught:
            mailer.send(Mail(("a@x.example",), "s", "<p>h</p>", "h", "<kpi-1@kpi.example>", 1))
    finally:
        server.stop()
    assert "pw-s3cret" not in str(caught.value) and "pw-s3cret" not in repr(mailer)
