"""Long handlers and hostile input: each defect of the hardening review, at the level where it was.

Real processes against the real broker and database where the defect was in a service;
the bus's Consumer where it was in the bus.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, quote_plus

import pytest
from sqlalchemy import text

from shared.events import METRIC_LOAD_REQUESTED, METRIC_LOADED, TRIGGER_CHECKED, MetricLoadRequested, new_event
from shared.handling import REASONS_KEY, Delivery, RetryableError
from shared.hasoffers import HasOffersClient, HasOffersResponseError
from shared.rabbitmq import H_HISTORY, H_REASON, H_RETRIES, Bus, Consumer, queue_names, replay_dead_letters
from shared.rabbitmq.headers import REASON_MAX
from testkit.broker import consuming
from testkit.fake_hasoffers.network import generate
from testkit.fake_hasoffers.server import FakeHasOffers
from testkit.smtp import FakeSmtpServer
from testkit.waiting import wait_for
from tests.action_runner_support import AFFILIATE, OFFER, add_action, add_operation, add_trigger_event, envelope_of
from tests.support import AMQP_URL, ROOT, drain, queue_depth

NOW = datetime.now(timezone.utc).replace(microsecond=0)
TOKEN = "NET+hardening/" + uuid.uuid4().hex[:8] + "=x y"


def item(offer_id: int = 1, affiliate_id: int = 1, value: float = 0.5, measured_at: object = None) -> dict:
    when = measured_at if measured_at is not None else (NOW - timedelta(hours=1)).isoformat()
    return {"metric_key": "cr", "offer_id": offer_id, "affiliate_id": affiliate_id, "value": value,
            "measured_at": when}


def envelope(type_: str, data: dict) -> dict:
    return {"event_id": str(uuid.uuid4()), "type": type_, "schema_version": 1,
            "occurred_at": NOW.isoformat(), "correlation_id": "test", "causation_id": None, "data": data}


def publish_json(bus: Bus, routing_key: str, body: dict | str, **kwargs) -> str:
    raw = body if isinstance(body, str) else json.dumps(body)
    message_id = body["event_id"] if isinstance(body, dict) else str(uuid.uuid4())
    bus.publish_raw(routing_key, raw.encode(), message_id=message_id, **kwargs)
    return message_id


def dead_letters(exchange: str, service: str) -> list[tuple[object, dict | bytes]]:
    out = []
    for properties, body in drain(queue_names(exchange, service).dead):
        try:
            out.append((properties, json.loads(body)))
        except (ValueError, RecursionError):
            out.append((properties, body))
    return out


def trigger(db, name: str = "min CR", metric: str = "cr", operator: str = "lt", threshold: float = 0.1) -> int:
    with db.begin() as conn:
        return conn.execute(text("INSERT INTO triggers (name, metric_key, operator, threshold) "
                                 "VALUES (:n, :m, :o, :t) RETURNING id"),
                            {"n": name, "m": metric, "o": operator, "t": threshold}).scalar_one()


def checked_messages(exchange: str) -> list[dict]:
    return [json.loads(body) for _, body in drain(queue_names(exchange, "event_detector").work)]


# -- 1. long handlers keep their connection; no message loops forever -----------------------


def test_a_handler_longer_than_several_heartbeats_keeps_its_connection(bus, exchange, caplog):
    """With a 1 s heartbeat, a 6 s handler: RabbitMQ would close a connection that missed
    two heartbeats, and the message would come back; it must be handled once."""
    calls = []

    def slow(envelope, delivery):
        calls.append((envelope.event_id, delivery.attempt, delivery.redelivered))
        time.sleep(6)

    consumer = Consumer(amqp_url=AMQP_URL, exchange=exchange, service="trigger_checker", handler=slow, heartbeat=1)
    with consuming(consumer):
        event = new_event(METRIC_LOADED, {"metrics": [item()]})
        bus.publish(event)
        wait_for(lambda: consumer.stats.handled == 1, 20, what="the slow message to be handled")
        time.sleep(2.5)  # a lost connection would show now as a redelivery
    assert calls == [(event.event_id, 1, False)]
    assert "reconnect" not in caplog.text
    names = queue_names(exchange, "trigger_checker")
    assert queue_depth(names.work) == 0 and queue_depth(names.retry) == 0 and queue_depth(names.dead) == 0


@pytest.fixture
def fake():
    network = generate(11, offers=12, affiliates=10, days=3)
    fake = FakeHasOffers(network, network_id="net-hard", network_token=TOKEN, rate_limit=(10_000, 10.0))
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def loader_env(fake) -> dict[str, str]:
    return {"HASOFFERS_BASE_URL": fake.base_url, "HASOFFERS_NETWORK_ID": "net-hard", "HASOFFERS_NETWORK_TOKEN": TOKEN,
            "KPI_REPORT_PAGE_SIZE": "7", "HASOFFERS_MAX_ATTEMPTS": "1", "HASOFFERS_RATE_LIMIT_CALLS": "10000"}


def load_request(bus: Bus, metric_key: str = "cr", headers: dict | None = None) -> str:
    event = new_event(METRIC_LOAD_REQUESTED, MetricLoadRequested(metric_key=metric_key, lookback_hours=24),
                      correlation_id="test")
    from shared.events import encode

    bus.publish_raw(METRIC_LOAD_REQUESTED, encode(event), message_id=str(event.event_id), type=METRIC_LOAD_REQUESTED,
                    headers=headers)
    return str(event.event_id)


def load_run(db, event_id: str):
    with db.connect() as conn:
        return conn.execute(text("SELECT * FROM load_runs WHERE request_event_id = :e"), {"e": event_id}).first()


def finished_run(db, event_id: str, timeout: float = 60):
    return wait_for(lambda: (lambda r: r if r is not None and r.status in ("succeeded", "failed") else None)(
        load_run(db, event_id)), timeout, what=f"the load run of {event_id} to finish")


def reference_loaded(db, bus, start_service, loader_env) -> None:
    loader = start_service("metric_loader", **loader_env)
    assert finished_run(db, load_request(bus, "reference")).status == "succeeded"
    loader.terminate()


def test_a_load_lasting_many_heartbeats_completes_once_and_reads_each_page_once(db, bus, exchange, start_service,
                                                                                fake, loader_env):
    reference_loaded(db, bus, start_service, loader_env)
    fake.inject("slow", count=8, method="Report.getStats", seconds=1.5)  # 12 s in all: 6 heartbeats of 2 s
    loader = start_service("metric_loader", **loader_env, KPI_HEARTBEAT_SECONDS="2")
    before = fake.requests("Report.getStats")
    slow = finished_run(db, load_request(bus, "cr"))
    pages = fake.requests("Report.getStats") - before
    assert slow.status == "succeeded" and slow.attempts == 1, slow
    assert pages >= 8  # the load really was slow for 8 of its pages

    fast = finished_run(db, load_request(bus, "cr"))  # the same load without delays: the pages of one pass
    assert fast.status == "succeeded"
    assert fake.requests("Report.getStats") - before - pages == pages, "a page was read twice in the slow load"
    assert "reconnect" not in loader.log() and "lost RabbitMQ" not in loader.log()
    batches = [m for m in drain(queue_names(exchange, "trigger_checker").work)]
    assert len({json.loads(body)["event_id"] for _, body in batches}) == len(batches)  # each batch once


def test_a_load_interrupted_at_every_attempt_ends_in_the_dead_queue(db, bus, exchange, start_service, fake,
                                                                    loader_env):
    """A crash in the middle of a load is an attempt too: the run fails and the request is
    dead-lettered after KPI_RETRY_LIMIT + 1 starts instead of starting again forever."""
    reference_loaded(db, bus, start_service, loader_env)
    fake.inject("slow", count=1000, method="Report.getStats", seconds=5)
    env = {**loader_env, "KPI_RETRY_LIMIT": "1"}
    event_id = load_request(bus, "cr")
    for attempt in (1, 2):
        loader = start_service("metric_loader", **env)
        wait_for(lambda: f"attempt {attempt}/2" in loader.log(), what=f"start {attempt} of the load")
        loader.kill()  # kill -9 in the middle of the load
    fake.reset()
    loader = start_service("metric_loader", **env)
    run = finished_run(db, event_id)
    assert run.status == "failed" and run.attempts == 3
    assert "gave up after 2 attempts: every one was interrupted" in run.error
    [(properties, body)] = dead_letters(exchange, "metric_loader")
    assert properties.message_id == event_id and "every one was interrupted" in properties.headers[H_REASON]
    assert queue_depth(queue_names(exchange, "metric_loader").work) == 0


# -- 2. oversized reasons never reach a header ------------------------------------------


def test_a_batch_of_a_thousand_reasons_is_dead_lettered_with_a_short_header(db, bus, exchange, start_service):
    trigger(db)
    checker = start_service("trigger_checker")
    hostile = envelope(METRIC_LOADED, {"metrics": [item(offer_id=7, value=0.01)] + [{}] * 999})
    huge_key = envelope(METRIC_LOADED, {"metrics": [item(offer_id=8, value=0.01), {**item(offer_id=9),
                                                                                   "k" * 200_000: 1}]})
    publish_json(bus, METRIC_LOADED, hostile)
    publish_json(bus, METRIC_LOADED, huge_key)
    behind = new_event(METRIC_LOADED, {"metrics": [item(offer_id=10, value=0.01)]})
    bus.publish(behind)  # the queue behind them is not blocked
    wait_for(lambda: checker.log().count("message handled") == 3, what="all three messages handled")

    checked = {c["offer_id"] for m in checked_messages(exchange) for c in m["data"]["checks"]}
    assert checked == {7, 8, 10}  # every valid item was checked and its check published
    letters = {p.message_id: (p, body) for p, body in dead_letters(exchange, "trigger_checker")}
    assert set(letters) == {hostile["event_id"], huge_key["event_id"]}
    for properties, body in letters.values():
        assert len(properties.headers[H_REASON]) <= REASON_MAX
        assert "more characters" in properties.headers[H_REASON]
    properties, body = letters[hostile["event_id"]]
    assert properties.headers[H_REASON].startswith("data.metrics.1.metric_key: Field required; ")
    assert len(body["data"]["metrics"]) == 999 and len(body[REASONS_KEY]) == 999 * 5  # five missing fields each
    properties, body = letters[huge_key["event_id"]]
    assert [r[:40] for r in body[REASONS_KEY]] == ["data.metrics.1." + "k" * 25]
    assert checker.process.poll() is None


def test_checks_of_deleted_triggers_are_dead_lettered_with_a_short_header(db, bus, exchange, start_service):
    first, second = trigger(db, "min CR"), trigger(db, "max CR", operator="gt", threshold=0.9)
    checker, detector = start_service("trigger_checker"), start_service("event_detector")
    bus.publish(new_event(METRIC_LOADED, {"metrics": [item(offer_id=o, affiliate_id=a, value=0.5)
                                                      for o in range(1, 21) for a in range(1, 51)]}))
    wait_for(lambda: queue_depth(queue_names(exchange, "event_detector").work) == 0
             and "message handled" in detector.log(), what="the checks handled")
    with db.connect() as conn:
        checks = conn.execute(text("SELECT id, trigger_id, offer_id, affiliate_id, measured_at FROM trigger_checks")).all()
    assert len(checks) == 2000
    survivor = trigger(db, "low CR", threshold=0.6)  # a trigger the operator keeps
    bus.publish(new_event(METRIC_LOADED, {"metrics": [item(offer_id=99, value=0.5)]}))
    wait_for(lambda: detector.log().count("message handled") == 2, what="the survivor's check")
    with db.connect() as conn:
        kept = conn.execute(text("SELECT id, measured_at FROM trigger_checks WHERE trigger_id = :t"),
                            {"t": survivor}).one()
    detector.terminate()
    # An operator deletes both triggers while a trigger.checked naming their checks waits.
    items = [{"check_id": c.id, "trigger_id": c.trigger_id, "trigger_name": "x", "metric_key": "cr",
              "offer_id": c.offer_id, "affiliate_id": c.affiliate_id, "value": 0.5, "operator": "lt",
              "threshold": 0.1, "status": "OK", "measured_at": c.measured_at.isoformat()} for c in checks]
    items.append({**items[0], "check_id": kept.id, "trigger_id": survivor, "offer_id": 99, "affiliate_id": 1,
                  "measured_at": kept.measured_at.isoformat()})
    with db.begin() as conn:
        conn.execute(text("DELETE FROM triggers WHERE id IN (:a, :b)"), {"a": first, "b": second})
    message = new_event(TRIGGER_CHECKED, {"checks": items})
    bus.publish(message)
    detector = start_service("event_detector")
    wait_for(lambda: "message handled" in detector.log(), what="the stale trigger.checked")
    [(properties, body)] = dead_letters(exchange, "event_detector")
    assert properties.message_id == str(message.event_id)
    assert len(properties.headers[H_REASON]) <= REASON_MAX
    assert len(body["data"]["checks"]) == 2000 and len(body[REASONS_KEY]) == 2000
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM trigger_states WHERE trigger_id = :t"),
                            {"t": survivor}).scalar_one() == 1


# -- 3. hostile x-kpi headers ----------------------------------------------------------------


@pytest.mark.parametrize("hostile", [
    {H_RETRIES: "abc"},
    {H_RETRIES: -1_000_000},
    {H_RETRIES: 10**12},
    {H_HISTORY: ["x" * 100_000]},
    {H_HISTORY: "not a list", H_REASON: 12, "x-kpi-original-routing-key": ["not", "a", "key"]},
])
def test_hostile_retry_headers_neither_crash_the_service_nor_buy_retries(db, bus, exchange, start_service, fake,
                                                                         loader_env, hostile):
    reference_loaded(db, bus, start_service, loader_env)
    fake.inject("http_500", count=1000, method="Report.getStats")
    loader = start_service("metric_loader", **loader_env, KPI_RETRY_LIMIT="2", KPI_RETRY_DELAY_MS="50")
    event_id = load_request(bus, "cr", headers=hostile)
    run = finished_run(db, event_id)
    assert run.status == "failed" and run.attempts <= 3
    [(properties, _)] = wait_for(lambda: dead_letters(exchange, "metric_loader"), what="the dead letter")
    assert properties.message_id == event_id
    assert properties.headers[H_RETRIES] <= 2
    assert all(len(entry) <= 300 for entry in properties.headers.get(H_HISTORY, []))
    assert loader.process.poll() is None, loader.log()


# -- 4, 5, 6. timestamps that overflow or freeze, and deep nesting ------------------------------


def test_timestamps_out_of_range_are_invalid_items_and_the_rest_is_checked(db, bus, exchange, start_service):
    trigger(db)
    checker = start_service("trigger_checker")
    message = envelope(METRIC_LOADED, {"metrics": [
        item(offer_id=1, value=0.01),
        item(offer_id=2, measured_at="0001-01-01T00:00:00+01:00"),
        item(offer_id=3, measured_at="9999-12-31T23:59:59-01:00"),
        item(offer_id=4, measured_at="9999-06-01T00:00:00Z"),
        item(offer_id=5, measured_at="1999-12-31T23:59:59Z"),
        item(offer_id=6, measured_at=(NOW + timedelta(hours=2)).isoformat()),
    ]})
    publish_json(bus, METRIC_LOADED, message)
    wait_for(lambda: "message handled" in checker.log(), what="the batch")
    assert "retrying" not in checker.log()
    [(properties, body)] = dead_letters(exchange, "trigger_checker")
    assert [m["offer_id"] for m in body["data"]["metrics"]] == [2, 3, 4, 5, 6]
    assert all(".measured_at: must be between" in reason for reason in body[REASONS_KEY])
    assert [c["offer_id"] for m in checked_messages(exchange) for c in m["data"]["checks"]] == [1]


def test_a_value_from_the_far_future_cannot_freeze_its_pair(db, bus, exchange, start_service):
    trigger(db)
    checker, detector = start_service("trigger_checker"), start_service("event_detector")
    for when, value in [(NOW - timedelta(hours=3), 0.01), (datetime(9999, 1, 1, tzinfo=timezone.utc), 0.5),
                        (NOW - timedelta(hours=1), 0.5)]:
        bus.publish(new_event(METRIC_LOADED, {"metrics": [item(value=value, measured_at=when.isoformat())]}))
    wait_for(lambda: detector.log().count("message handled") == 2, what="the two valid checks")
    with db.connect() as conn:
        assert conn.execute(text("SELECT status FROM trigger_states")).scalar_one() == "OK"
    assert len(dead_letters(exchange, "trigger_checker")) == 1


def nested(depth: int) -> str:
    """JSON text nested `depth` levels deep (too deep for Python's json to write)."""
    return "[" * depth + "1" + "]" * depth


def test_deeply_nested_items_are_dead_lettered_and_the_valid_ones_go_on(db, bus, exchange, start_service):
    trigger(db)
    checker = start_service("trigger_checker")
    partly = envelope(METRIC_LOADED, {"metrics": [item(offer_id=1, value=0.01), {**item(offer_id=2),
                                                                                 "value": "PLACEHOLDER"}]})
    publish_json(bus, METRIC_LOADED, json.dumps(partly).replace('"PLACEHOLDER"', nested(1000)))
    too_deep = envelope(METRIC_LOADED, {"metrics": [{**item(offer_id=3, value=0.01), "extra": "PLACEHOLDER"}]})
    publish_json(bus, METRIC_LOADED, json.dumps(too_deep).replace('"PLACEHOLDER"', nested(1100)))
    wait_for(lambda: checker.log().count("message handled") == 2, what="both messages")
    assert "retrying" not in checker.log()
    assert [c["offer_id"] for m in checked_messages(exchange) for c in m["data"]["checks"]] == [1]
    letters = dead_letters(exchange, "trigger_checker")
    assert len(letters) == 2
    reasons = sorted(p.headers[H_REASON] for p, _ in letters)
    assert "nested too deeply" in reasons[0] or "nested too deeply" in reasons[1]


# -- 7. the action_runner reads what it says from the database ------------------------------------


def test_a_forged_trigger_event_cannot_put_its_words_in_an_email(world, bus, start_service):
    smtp = FakeSmtpServer().start()
    try:
        with world.begin() as conn:
            add_action(conn, [(1, "PROBLEM")], [add_operation(conn, "email_affiliate")])
            recorded = add_trigger_event(conn, value=0.01, threshold=0.05)
        start_service("action_runner", **smtp.env)
        forged = recorded.model_copy(update={"trigger_name": "Your account is suspended: call +1 555 0100",
                                             "value": 123456.0, "threshold": 7.0, "previous_status": None})
        bus.publish(envelope_of(forged))
        [mail] = wait_for(smtp.mails, what="the mail")
    finally:
        smtp.stop()
    body = mail.part("html")
    assert "suspended" not in mail.message["Subject"] + body
    assert "min CR" in mail.message["Subject"] and "123456" not in body
    assert "0.01" in body and "0.05" in body and "OK &rarr; PROBLEM" in body
    assert (recorded.offer_id, recorded.affiliate_id) == (OFFER, AFFILIATE)


# -- 8, 9. data from the API: NUL characters, and the token in every form --------------------------


def test_a_nul_in_a_company_name_is_cleaned_and_the_reference_load_succeeds(db, bus, start_service, fake,
                                                                             loader_env):
    affiliate = next(iter(fake.network.affiliates.values()))
    affiliate.company = "Bad\x00Co"
    loader = start_service("metric_loader", **loader_env)
    run = finished_run(db, load_request(bus, "reference"))
    assert run.status == "succeeded", run.error
    assert "removed NUL characters from 1 text field" in run.notes
    with db.connect() as conn:
        assert conn.execute(text("SELECT company FROM affiliates WHERE id = :i"),
                            {"i": affiliate.id}).scalar_one() == "BadCo"
        assert conn.execute(text("SELECT count(*) FROM affiliates")).scalar_one() == len(fake.network.affiliates)
    assert loader.process.poll() is None


class EchoingServer:
    """Answers every call with an HTML page that echoes the request body (as some proxies' errors do)."""

    def __enter__(self) -> str:
        class Echo(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                page = b"<html>bad request: " + body + b"</html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/Apiv3/json"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_error_that_echoes_the_request_never_shows_the_token_in_any_encoding():
    with EchoingServer() as url, HasOffersClient(url, "net", TOKEN, max_attempts=1) as client:
        with pytest.raises(HasOffersResponseError) as caught:
            client.call("Offer", "findAll", {"filters": {"name": TOKEN}})
    message = str(caught.value)
    assert "not JSON" in message and "***" in message
    for form in (TOKEN, quote_plus(TOKEN), quote(TOKEN, safe=""), quote_plus(TOKEN).lower()):
        assert form not in message


# -- 10. a replay moves what was there, once -------------------------------------------------------


def test_replay_moves_the_dead_letters_that_were_there_and_not_its_own_output(bus, exchange):
    names = queue_names(exchange, "trigger_checker")
    for _ in range(300):
        bus.publish_raw(METRIC_LOADED, b"not json")
    consumer = Consumer(amqp_url=AMQP_URL, exchange=exchange, service="trigger_checker",
                        handler=lambda e, d: None, prefetch=50)
    with consuming(consumer):
        wait_for(lambda: queue_depth(names.dead) == 300, what="300 dead letters")
        moved = replay_dead_letters(bus, "trigger_checker")  # while they die again behind it
        wait_for(lambda: queue_depth(names.work) == 0 and queue_depth(names.dead) == 300, what="them dead again")
        assert consumer.stats.dead_lettered == 600
    assert moved == 300


# -- 11. kpi seed on a file it cannot read ---------------------------------------------------------


@pytest.mark.parametrize("content, expected", [(b"INSERT INTO x VALUES ('\xff\xfe');", "not UTF-8 text"),
                                               (None, "cannot read it")])
def test_kpi_seed_on_an_unreadable_file_exits_2_with_one_line(service_env, tmp_path, content, expected):
    if content is None:
        path = "/proc/self/mem"  # a file that exists and fails to read (EIO), even for root
    else:
        path = tmp_path / "seed.sql"
        path.write_bytes(content)
    result = subprocess.run([sys.executable, "-m", "shared.cli", "seed", str(path)], cwd=ROOT,
                            env={**os.environ, **service_env}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- 12. a message of another type is invalid for the service, not transient -------------------------


@pytest.mark.parametrize("service, routing_key, wrong_type", [
    ("metric_loader", METRIC_LOAD_REQUESTED, METRIC_LOADED),
    ("trigger_checker", METRIC_LOADED, TRIGGER_CHECKED),
    ("event_detector", TRIGGER_CHECKED, METRIC_LOADED),
    ("action_runner", "trigger.event.problem", METRIC_LOAD_REQUESTED),
])
def test_a_message_of_another_type_is_dead_lettered_at_once(db, bus, exchange, start_service, service, routing_key,
                                                            wrong_type):
    running = start_service(service)
    message = envelope(wrong_type, {"metric_key": "cr", "lookback_hours": 24} if wrong_type == METRIC_LOAD_REQUESTED
                       else {"metrics": [item()]} if wrong_type == METRIC_LOADED else {"checks": []})
    publish_json(bus, routing_key, message)
    [(properties, _)] = wait_for(lambda: dead_letters(exchange, service), what="the dead letter")
    assert f"{service} does not handle messages of type '{wrong_type}'" in properties.headers[H_REASON]
    assert "retrying" not in running.log() and running.process.poll() is None


# -- the contract between the bus and a handler ----------------------------------------------------


def test_delivery_counts_the_attempts_the_service_recorded():
    first = Delivery(attempt=1, max_attempts=3)
    assert not first.is_last and not first.exhausted
    assert first.at_attempt(3).is_last and not first.at_attempt(3).exhausted
    assert first.at_attempt(4).exhausted and first.at_attempt(4).attempt == 4
    assert Delivery(attempt=3, max_attempts=3).at_attempt(1).attempt == 3  # never counts down


def test_a_failing_handler_with_a_retry_count_of_abc_is_retried_to_the_limit(bus, exchange):
    attempts = []

    def failing(envelope, delivery):
        attempts.append(delivery.attempt)
        raise RetryableError("down")

    consumer = Consumer(amqp_url=AMQP_URL, exchange=exchange, service="trigger_checker", handler=failing,
                        retry_limit=2, retry_delay_ms=20)
    with consuming(consumer):
        event = new_event(METRIC_LOADED, {"metrics": [item()]})
        from shared.events import encode

        bus.publish_raw(METRIC_LOADED, encode(event), message_id=str(event.event_id), headers={H_RETRIES: "abc"})
        wait_for(lambda: queue_depth(queue_names(exchange, "trigger_checker").dead) == 1, what="the dead letter")
    assert attempts == [1, 2, 3]
