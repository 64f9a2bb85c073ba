"""action_runner as a real process: RabbitMQ, PostgreSQL, a local SMTP server (aiosmtpd) and
the fake HasOffers HTTP server, all real. Rows are seeded with SQL, events published on the
test's exchange."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import text

from shared.rabbitmq import H_REASON, Bus, queue_names
from shared.events import OPERATION_EXECUTED, new_event
from testkit.fake_hasoffers.server import FakeHasOffers
from testkit.ports import free_port
from testkit.processes import ServiceProcess
from testkit.smtp import FakeSmtpServer
from testkit.waiting import wait_for
from tests.action_runner_support import (
    fake_network,
    AFFILIATE,
    LONELY_AFFILIATE,
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
from tests.support import drain, queue_depth

SERVICE = "action_runner"


@pytest.fixture
def smtp() -> Iterator[FakeSmtpServer]:
    server = FakeSmtpServer().start()
    yield server
    server.stop()


@pytest.fixture
def fake_api() -> Iterator[FakeHasOffers]:
    fake = FakeHasOffers(fake_network())
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def notices(bus: Bus, exchange: str) -> Callable[[], list[dict]]:
    """Everything published as operation.executed on the test exchange, so far."""
    queue = f"{exchange}.test.notices"
    assert bus.channel is not None
    bus.channel.queue_declare(queue, arguments={"x-expires": 60_000})
    bus.channel.queue_bind(queue, exchange, routing_key=OPERATION_EXECUTED)
    seen: list[dict] = []

    def read() -> list[dict]:
        seen.extend({"message_id": p.message_id, **json.loads(body)} for p, body in drain(queue))
        return list(seen)

    return read


@pytest.fixture
def start(start_service, smtp, fake_api) -> Callable[..., ServiceProcess]:
    def start_runner(**env: str) -> ServiceProcess:
        return start_service(SERVICE, **{
            **smtp.env, "HASOFFERS_BASE_URL": fake_api.base_url, "HASOFFERS_NETWORK_ID": fake_api.network_id,
            "HASOFFERS_NETWORK_TOKEN": fake_api.network_token, **env,
        })

    return start_runner


def handled(service: ServiceProcess) -> int:
    """Deliveries done and acked: a delivery sent through the retry queue (it met runs
    another delivery holds, which with several workers may be in the same process) is not."""
    return service.log().count("outcome=handled")


def final_runs(engine, count: int) -> list[dict]:
    return wait_for(lambda: (lambda r: r if len(r) == count and all(x["status"] != "pending" for x in r) else None)(
        runs(engine)), what=f"{count} final operation runs")


def seed(world, kinds, conditions=((TRIGGER, "PROBLEM"),), active=True, **templates) -> int:
    with world.begin() as conn:
        return add_action(conn, list(conditions), [add_operation(conn, k, **templates) for k in kinds], active=active)


def trigger_event(world, **kwargs):
    with world.begin() as conn:
        return add_trigger_event(conn, **kwargs)


def test_each_kind_does_exactly_its_effect_and_announces_it(world, start, bus, smtp, fake_api, notices):
    everything = seed(world, ["email_affiliate", "email_affiliate_manager", "email_administrators",
                              "approve_affiliate", "reject_affiliate"])
    seed(world, ["email_administrators"], active=False)
    both = seed(world, ["email_administrators"], conditions=[(TRIGGER, "PROBLEM"), (TRIGGER_2, "PROBLEM")])
    service = start()

    open_offer = trigger_event(world)  # TRIGGER_2 has no state: `both` does not fire
    bus.publish(envelope_of(open_offer))
    first = final_runs(world, 5)
    assert {r["action_id"] for r in first} == {everything}

    with world.begin() as conn:
        set_state(conn, TRIGGER_2, OFFER_APPROVAL, AFFILIATE, "PROBLEM")
    gated_offer = trigger_event(world, offer_id=OFFER_APPROVAL)
    bus.publish(envelope_of(gated_offer))
    all_runs = final_runs(world, 11)
    assert {r["action_id"] for r in all_runs[5:]} == {everything, both}
    assert all(r["status"] == "succeeded" and r["attempts"] == 1 for r in all_runs)

    by_subject = sorted((tuple(m.rcpt_tos), m.message["Subject"].split(": offer ")[1][:2]) for m in smtp.mails())
    assert by_subject == sorted([
        (("ann@aff.example", "bob@aff.example"), "12"), (("manager@net.example",), "12"), (("ops@net.example",), "12"),
        (("ann@aff.example", "bob@aff.example"), "13"), (("manager@net.example",), "13"), (("ops@net.example",), "13"),
        (("ops@net.example",), "13"),  # the two-condition action, now that both hold
    ])
    assert fake_api.write_calls() == [
        {"method": "Offer.setAffiliateApproval", "offer_id": OFFER, "affiliate_id": AFFILIATE, "status": "approved",
         "notes": None},
        {"method": "Offer.blockAffiliate", "offer_id": OFFER, "affiliate_id": AFFILIATE},
        {"method": "Offer.setAffiliateApproval", "offer_id": OFFER_APPROVAL, "affiliate_id": AFFILIATE,
         "status": "approved", "notes": None},
        {"method": "Offer.setAffiliateApproval", "offer_id": OFFER_APPROVAL, "affiliate_id": AFFILIATE,
         "status": "rejected", "notes": "hasoffers-kpi: trigger min CR is PROBLEM (cr = 0.01)"},
    ]

    published = wait_for(lambda: (lambda n: n if len(n) == 11 else None)(notices()), what="11 notices")
    assert {n["data"]["operation_run_id"] for n in published} == {r["id"] for r in all_runs}
    assert {n["data"]["outcome"] for n in published} == {"succeeded"}
    assert all(n["message_id"] == n["event_id"] and n["type"] == OPERATION_EXECUTED for n in published)
    assert "outcome=handled" in service.log()


def test_the_same_event_delivered_twice_acts_once(world, start, bus, smtp, fake_api, notices):
    seed(world, ["email_administrators", "approve_affiliate"])
    service = start()
    envelope = envelope_of(trigger_event(world))
    bus.publish(envelope)
    bus.publish(envelope)
    wait_for(lambda: handled(service) == 2, what="both deliveries handled")
    assert [(r["status"], r["attempts"]) for r in runs(world)] == [("succeeded", 1), ("succeeded", 1)]
    assert len(smtp.mails()) == 1 and smtp.data_commands == 1
    assert len(fake_api.write_calls()) == 1
    # Each delivery announces the final runs; the ids say they are the same two notices.
    assert len({n["event_id"] for n in wait_for(lambda: notices() if len(notices()) == 4 else None)}) == 2


def test_two_replicas_with_the_same_event_act_once(world, start, bus, smtp, exchange):
    seed(world, ["email_administrators", "email_affiliate"])
    first, second = start(), start()
    # The replica that got its delivery first holds the event's runs while its first mail
    # is in the SMTP server; the mail goes through only once the other replica has met
    # the held runs and let them be.
    smtp.hold_until = lambda: "being handled elsewhere" in first.log() + second.log()
    smtp.hold_seconds = 120  # a deadline for a stuck test, not a timing assumption: the barrier lifts it
    work = queue_names(exchange, SERVICE).work
    assert bus.channel is not None
    wait_for(lambda: bus.channel.queue_declare(work, passive=True).method.consumer_count == 2,
             what="both replicas consuming")  # so that each gets one of the two deliveries
    envelope = envelope_of(trigger_event(world))
    bus.publish(envelope)
    bus.publish(envelope)
    wait_for(lambda: handled(first) + handled(second) == 2, what="both deliveries handled")
    final_runs(world, 2)
    assert sorted(tuple(m.rcpt_tos) for m in smtp.mails()) == [("ann@aff.example", "bob@aff.example"),
                                                                ("ops@net.example",)]
    # A replica met the runs the other one held in its send, and let them be.
    assert "being handled elsewhere" in first.log() + second.log()
    assert smtp.holds_timed_out == 0, "a mail went out before the other replica met the held runs"


def test_values_are_escaped_and_a_subject_cannot_inject_a_header(world, start, bus, smtp):
    seed(world, ["email_affiliate"], subject="Hi {offer-name}\r\nBcc: evil@x", body="<p>Offer: {offer-name}</p>")
    start()
    bus.publish(envelope_of(trigger_event(world)))
    [mail] = wait_for(smtp.mails, what="the mail")
    assert mail.rcpt_tos == ["ann@aff.example", "bob@aff.example"]
    headers = mail.raw.split(b"\r\n\r\n")[0]
    assert "Bcc" not in mail.message.keys() and not any(line.startswith(b"Bcc") for line in headers.splitlines())
    assert mail.message["Subject"] == "Hi Summer <script>alert(1)</script> & Co Bcc: evil@x"
    html = mail.part("html")
    assert "<p>Offer: Summer &lt;script&gt;alert(1)&lt;/script&gt; &amp; Co</p>" in html
    assert "<script>" not in html
    assert mail.part("plain").startswith("Offer: Summer <script>")  # plain text is never markup


def test_smtp_down_then_up_sends_the_mail_once(world, start, bus, exchange):
    port = free_port()  # nobody listens yet: connection refused
    seed(world, ["email_administrators"])
    start(SMTP_PORT=str(port), KPI_RETRY_LIMIT="50", KPI_RETRY_DELAY_MS="100")
    bus.publish(envelope_of(trigger_event(world)))
    wait_for(lambda: runs(world) and runs(world)[0]["attempts"] >= 2, what="two failed attempts")
    assert "Connection refused" in runs(world)[0]["last_error"] or "Errno 111" in runs(world)[0]["last_error"]

    server = FakeSmtpServer(port=port).start()
    try:
        [run] = final_runs(world, 1)
        assert run["status"] == "succeeded" and run["attempts"] >= 3
        assert len(wait_for(server.mails, what="the mail")) == 1
    finally:
        server.stop()
    assert queue_depth(queue_names(exchange, SERVICE).dead) == 0


def test_hasoffers_rate_limit_then_success_is_one_effective_call(world, start, bus, fake_api):
    seed(world, ["approve_affiliate"])
    fake_api.inject("rate_limit", 2, "Offer.setAffiliateApproval")
    # One HTTP attempt per delivery: the bus's own retry (not the client's) gets it through.
    start(HASOFFERS_MAX_ATTEMPTS="1")
    bus.publish(envelope_of(trigger_event(world)))
    [run] = final_runs(world, 1)
    assert (run["status"], run["attempts"]) == ("succeeded", 3)
    assert "rate limit" in run["last_error"]
    assert len(fake_api.write_calls("Offer.setAffiliateApproval")) == 1


def test_after_the_retry_limit_the_run_fails_and_the_event_is_dead_lettered(world, start, bus, exchange, notices):
    seed(world, ["email_administrators"])
    start(SMTP_PORT=str(free_port()), KPI_RETRY_LIMIT="2")
    envelope = envelope_of(trigger_event(world))
    bus.publish(envelope)
    [run] = final_runs(world, 1)
    assert (run["status"], run["attempts"]) == ("failed", 3)
    assert run["detail"].startswith("gave up after 3 attempts: MailTransientError")
    dead = queue_names(exchange, SERVICE).dead
    wait_for(lambda: queue_depth(dead) == 1, what="the event in the dead queue")
    [(properties, body)] = drain(dead)
    assert properties.message_id == str(envelope.event_id)
    assert "gave up after 3 attempts" in properties.headers[H_REASON]
    assert json.loads(body)["data"]["trigger_event_id"] == run["trigger_event_id"]
    assert [n["data"]["outcome"] for n in wait_for(notices, what="the notice")] == ["failed"]


def test_permanent_failures_are_recorded_not_retried(world, start, bus, exchange, fake_api, smtp):
    seed(world, ["approve_affiliate", "email_affiliate", "email_affiliate_manager"])
    service = start()
    bus.publish(envelope_of(trigger_event(world, affiliate_id=LONELY_AFFILIATE)))  # unknown to HasOffers too
    done = final_runs(world, 3)
    assert [(r["status"], r["attempts"]) for r in done] == [("failed", 1), ("skipped", 1), ("skipped", 1)]
    assert "Failed to hydrate rows" in done[0]["last_error"]
    assert done[1]["detail"] == "affiliate 8 has no active user"
    assert done[2]["detail"] == "affiliate 8 has no account manager"
    wait_for(lambda: handled(service) == 1, what="the delivery handled")
    assert "outcome=retried" not in service.log()
    assert fake_api.request_count.get("Offer.setAffiliateApproval") == 1
    assert smtp.data_commands == 0 and queue_depth(queue_names(exchange, SERVICE).dead) == 0


def test_dry_run_records_everything_as_skipped_and_nothing_leaves(world, start, bus, fake_api, smtp, notices):
    seed(world, ["email_affiliate", "email_administrators", "approve_affiliate", "reject_affiliate"])
    start(ACTIONS_DRY_RUN="true")
    bus.publish(envelope_of(trigger_event(world)))
    done = final_runs(world, 4)
    assert [(r["status"], r["detail"]) for r in done] == [("skipped", "dry run")] * 4
    assert smtp.data_commands == 0 and smtp.mails() == []
    assert fake_api.request_count == {} and fake_api.write_calls() == []
    assert len(wait_for(lambda: notices() if len(notices()) == 4 else None)) == 4


def test_an_event_without_its_trigger_events_row_goes_to_the_dead_queue(world, start, bus, exchange):
    seed(world, ["email_administrators"])
    start()
    event = trigger_event(world)
    bus.publish(new_event("trigger.event.problem", event.model_copy(update={"trigger_event_id": 999_999})))
    dead = queue_names(exchange, SERVICE).dead
    wait_for(lambda: queue_depth(dead) == 1, what="the dead letter")
    [(properties, _)] = drain(dead)
    assert "trigger_event 999999 does not exist" in properties.headers[H_REASON]
    with world.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM operation_runs")).scalar_one() == 0
