"""The one module that talks to RabbitMQ.

Topology (DESIGN.md section 1): one topic exchange; per service a durable work queue
`<exchange>.<service>` bound to the routing key it consumes, a retry queue
`<queue>.retry` that holds a message for the configured delay and then dead-letters it back
to the work queue, and a dead-letter queue `<queue>.dead`. Every process declares the
whole topology, so start order does not matter.

Per message: parse and validate the envelope -> run the handler (which commits) ->
publish its outputs with confirms (all of them, then one wait for every confirm) -> ack.
Invalid messages go to the dead queue at once with the reason in a header; retryable
failures go through the retry queue with a count and reach the dead queue after the
retry limit.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions as amqp
from pika.adapters.blocking_connection import BlockingChannel

from shared.events import Envelope, InvalidMessageError, encode, parse_envelope

logger = logging.getLogger(__name__)

# service -> the routing key its queue is bound to
SERVICE_BINDINGS: dict[str, str] = {
    "metric_loader": "metric.load.requested",
    "trigger_checker": "metric.loaded",
    "event_detector": "trigger.checked",
    "action_runner": "trigger.event.*",
}

# Headers this module sets on dead-lettered and retried messages.
H_REASON = "x-kpi-dead-reason"
H_RETRIES = "x-kpi-retry-count"
H_HISTORY = "x-kpi-retry-history"
H_ROUTING_KEY = "x-kpi-original-routing-key"
H_SERVICE = "x-kpi-service"
H_DEAD_AT = "x-kpi-dead-at"

# Errors that mean "the broker went away": reconnect and carry on.
CONNECTION_ERRORS = (
    amqp.AMQPConnectionError,
    amqp.StreamLostError,
    amqp.ConnectionClosedByBroker,
    amqp.ConnectionWrongStateError,
    amqp.ChannelWrongStateError,
    ConnectionError,
    OSError,
)


@dataclass(frozen=True)
class QueueNames:
    work: str
    retry: str
    dead: str


def queue_names(exchange: str, service: str) -> QueueNames:
    """The only place queue names are made."""
    if service not in SERVICE_BINDINGS:
        raise ValueError(f"unknown service {service!r}; known: {', '.join(SERVICE_BINDINGS)}")
    work = f"{exchange}.{service}"
    return QueueNames(work=work, retry=f"{work}.retry", dead=f"{work}.dead")


class RetryableError(Exception):
    """A transient failure (a dependency is down, a rate limit): try the message again later."""


class PublishError(Exception):
    """The broker did not take a message: unroutable (nobody bound) or refused (nacked)."""


class BrokerUnavailableError(Exception):
    pass


@dataclass
class DeadLetter:
    """Part of a message that is invalid and goes to the dead queue on its own."""

    body: bytes
    reason: str


@dataclass
class HandlerResult:
    events: list[Envelope] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    # Published without `mandatory`: notices nobody of ours consumes (operation.executed).
    notices: list[Envelope] = field(default_factory=list)
    # Runs after every output is confirmed and before the ack: record "published" here.
    # If it raises, the message is retried and the handler publishes the same events again.
    after_publish: Callable[[], None] | None = None


Handler = Callable[[Envelope], HandlerResult | None]


def connection_parameters(amqp_url: str, heartbeat: int = 30, name: str = "hasoffers-kpi") -> pika.URLParameters:
    params = pika.URLParameters(amqp_url)
    params.heartbeat = heartbeat
    params.blocked_connection_timeout = 60
    params.connection_attempts = 1
    params.socket_timeout = 5
    # Shown by `rabbitmqctl list_connections client_properties` and the management UI.
    params.client_properties = {"connection_name": f"{name} pid={os.getpid()}"}
    return params


def redact_url(url: str) -> str:
    """The URL without its password, for log lines."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


def declare_topology(channel: BlockingChannel, exchange: str) -> None:
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    for service, routing_key in SERVICE_BINDINGS.items():
        names = queue_names(exchange, service)
        # A message rejected without requeue (by anyone) still ends in the dead queue.
        channel.queue_declare(
            names.work,
            durable=True,
            arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": names.dead},
        )
        # The delay is set per message (expiration), not as a queue argument, so that
        # processes configured with different delays never disagree on the declaration.
        channel.queue_declare(
            names.retry,
            durable=True,
            arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": names.work},
        )
        channel.queue_declare(names.dead, durable=True)
        channel.queue_bind(names.work, exchange, routing_key=routing_key)


class _Confirms:
    """Publisher confirms, waited for once per batch of messages rather than per message.

    pika's BlockingChannel in confirm mode waits for the broker's ack after every
    message: a round trip and a disk sync on the broker each (~2 ms on the benchmark
    machine), so a trigger.checked message with 300 state changes waited ~0.6 s. The channel
    underneath (pika.channel.Channel, BlockingChannel._impl) calls back on every ack,
    nack and return: we publish the whole batch, then wait until every delivery tag is
    settled. The guarantee is the same: nothing is acked upstream before all is confirmed.
    """

    def __init__(self, channel: BlockingChannel):
        self._channel = channel
        self._impl = channel._impl  # pika.channel.Channel: the non-blocking API (see above)
        self._next_tag = 1
        self._pending: dict[int, str] = {}  # delivery tag -> routing key, unconfirmed
        self._failures: list[str] = []
        selected: list[bool] = []
        self._impl.confirm_delivery(ack_nack_callback=self._on_confirm, callback=lambda _frame: selected.append(True))
        self._wait_until(lambda: bool(selected))
        self._impl.add_on_return_callback(self._on_return)

    def publish(self, exchange: str, routing_key: str, body: bytes, properties: pika.BasicProperties,
                mandatory: bool) -> None:
        self._impl.basic_publish(exchange, routing_key, body, properties=properties, mandatory=mandatory)
        self._pending[self._next_tag] = routing_key
        self._next_tag += 1

    def wait(self) -> None:
        """Return once the broker confirmed every message published so far; PublishError
        if any of them was returned (unroutable) or nacked."""
        self._wait_until(lambda: not self._pending)
        failures, self._failures = self._failures, []
        if failures:
            raise PublishError("; ".join(failures))

    def _wait_until(self, done: Callable[[], bool]) -> None:
        # Processes frames without dispatching deliveries to the consumer callback, and
        # raises when the channel or the connection closes.
        self._channel._flush_output(done)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tags = [t for t in self._pending if t <= method.delivery_tag] if method.multiple else [method.delivery_tag]
        for tag in tags:
            routing_key = self._pending.pop(tag, None)
            if routing_key is not None and isinstance(method, pika.spec.Basic.Nack):
                self._failures.append(f"message to {routing_key!r} was refused by the broker")

    def _on_return(self, _channel: Any, method: Any, _properties: Any, _body: bytes) -> None:
        # A return comes before the ack of its message, so wait() is still waiting for it.
        self._failures.append(f"message to {method.routing_key!r} is unroutable: no queue is bound to it")


class Bus:
    """A connection with a confirming channel and the topology declared.

    Used as is by publishers (CLI, schedule, tests) and by Consumer underneath.
    """

    def __init__(self, amqp_url: str, exchange: str, *, heartbeat: int = 30, name: str = "hasoffers-kpi"):
        self.exchange = exchange
        self.name = name
        self._url = amqp_url
        self._heartbeat = heartbeat
        self.connection: pika.BlockingConnection | None = None
        self.channel: BlockingChannel | None = None
        self._confirms: _Confirms | None = None
        self._batching = False

    def connect(self) -> Bus:
        self.connection = pika.BlockingConnection(connection_parameters(self._url, self._heartbeat, self.name))
        self.channel = self.connection.channel()
        self._confirms = _Confirms(self.channel)
        declare_topology(self.channel, self.exchange)
        return self

    def connect_with_retry(self, attempts: int, delay: float = 1.0) -> Bus:
        for attempt in range(1, attempts + 1):
            try:
                return self.connect()
            except CONNECTION_ERRORS as exc:
                logger.warning(
                    "RabbitMQ not reachable at %s (attempt %d/%d): %s",
                    redact_url(self._url), attempt, attempts, describe_amqp_error(exc),
                )
                self.close()
                if attempt == attempts:
                    raise BrokerUnavailableError(
                        f"RabbitMQ not reachable at {redact_url(self._url)} after {attempts} attempts: "
                        f"{describe_amqp_error(exc)}"
                    ) from None
                time.sleep(min(delay * 2 ** (attempt - 1), 10))
        raise AssertionError("unreachable")

    def __enter__(self) -> Bus:
        return self if self.channel else self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.connection is not None and self.connection.is_open:
            try:
                self.connection.close()
            except Exception:  # closing a broken connection: nothing left to save
                pass
        self.connection = None
        self.channel = None
        self._confirms = None
        self._batching = False

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Publish everything inside the block, then wait once for all the confirms.

        Raises PublishError at the end of the block if any message was unroutable or
        refused (the others may have been delivered: publishers must be idempotent).
        """
        assert self._confirms is not None, "connect() first"
        confirms = self._confirms
        self._batching = True
        try:
            yield
        except BaseException:
            # Settle what was sent so that its returns are not blamed on the next batch.
            self._batching = False
            if self.connection is not None and self.connection.is_open:
                try:
                    confirms.wait()
                except PublishError:
                    pass
            raise
        self._batching = False
        confirms.wait()

    def publish_raw(
        self,
        routing_key: str,
        body: bytes,
        *,
        exchange: str | None = None,
        message_id: str | None = None,
        type: str | None = None,
        headers: dict[str, Any] | None = None,
        mandatory: bool = True,
        expiration_ms: int | None = None,
    ) -> None:
        """Publish one persistent message and wait for the broker's confirm (at the end
        of the block inside `batch()`).

        Raises PublishError when the message is unroutable (with `mandatory`) or nacked.
        """
        assert self._confirms is not None, "connect() first"
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=message_id,
            type=type,
            headers=headers,
            expiration=None if expiration_ms is None else str(expiration_ms),
        )
        self._confirms.publish(self.exchange if exchange is None else exchange, routing_key, body, properties,
                               mandatory)
        if not self._batching:
            self._confirms.wait()

    def publish(self, event: Envelope, *, mandatory: bool = True) -> None:
        self.publish_raw(
            event.type, encode(event), message_id=str(event.event_id), type=event.type, mandatory=mandatory
        )

    def publish_many(self, events: Iterable[Envelope], *, mandatory: bool = True) -> None:
        """Publish every event, then wait once for all the confirms."""
        with nullcontext() if self._batching else self.batch():
            for event in events:
                self.publish(event, mandatory=mandatory)

    def send_to_queue(self, queue: str, body: bytes, *, message_id: str | None, type: str | None,
                      headers: dict[str, Any], expiration_ms: int | None = None) -> None:
        """Publish straight to a queue through the default exchange (retry and dead queues)."""
        self.publish_raw(queue, body, exchange="", message_id=message_id, type=type, headers=headers,
                         expiration_ms=expiration_ms)

    def queue_depth(self, queue: str) -> int:
        assert self.channel is not None, "connect() first"
        return self.channel.queue_declare(queue, passive=True).method.message_count


def describe_amqp_error(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return text if len(text) < 300 else text[:300] + "..."


@dataclass
class Stats:
    """Counters an observer (logs, Prometheus) can read."""

    handled: int = 0
    dead_lettered: int = 0
    retried: int = 0
    failed: int = 0


class Consumer:
    """Consumes one service's work queue until stop() is called.

    Reconnects with back-off when RabbitMQ goes away; gives up (BrokerUnavailableError)
    only when it could never connect at start-up.
    """

    def __init__(
        self,
        *,
        amqp_url: str,
        exchange: str,
        service: str,
        handler: Handler,
        prefetch: int = 4,
        retry_limit: int = 5,
        retry_delay_ms: int = 5000,
        startup_attempts: int = 10,
        heartbeat: int = 30,
        on_outcome: Callable[[str, str, float], None] | None = None,
    ):
        self.names = queue_names(exchange, service)
        self.service = service
        self.handler = handler
        self.prefetch = prefetch
        self.retry_limit = retry_limit
        self.retry_delay_ms = retry_delay_ms
        self.startup_attempts = startup_attempts
        self.bus = Bus(amqp_url, exchange, heartbeat=heartbeat, name=f"hasoffers-kpi {service}")
        self.on_outcome = on_outcome
        self.stats = Stats()
        self.ready = threading.Event()
        self._stopping = threading.Event()
        self._ever_connected = False

    def stop(self) -> None:
        """Ask the loop to end after the message in hand; safe from a signal handler."""
        self._stopping.set()

    def run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                self._consume()
            except BrokerUnavailableError:
                raise
            except CONNECTION_ERRORS as exc:
                self.ready.clear()
                self.bus.close()
                if not self._ever_connected and failures + 1 >= self.startup_attempts:
                    raise BrokerUnavailableError(
                        f"RabbitMQ not reachable after {self.startup_attempts} attempts: {describe_amqp_error(exc)}"
                    ) from None
                failures += 1
                delay = min(0.5 * 2 ** min(failures, 6), 15.0)
                logger.warning("lost RabbitMQ (%s); reconnecting in %.1fs", describe_amqp_error(exc), delay)
                self._stopping.wait(delay)
            else:
                failures = 0
        self.bus.close()
        self.ready.clear()

    def _consume(self) -> None:
        self.bus.connect()
        if not self._ever_connected:
            logger.info("connected; consuming %s", self.names.work)
        else:
            logger.info("reconnected; consuming %s", self.names.work)
        self._ever_connected = True
        channel = self.bus.channel
        assert channel is not None and self.bus.connection is not None
        channel.basic_qos(prefetch_count=self.prefetch)
        tag = channel.basic_consume(self.names.work, self._on_message)
        self.ready.set()
        while not self._stopping.is_set():
            self.bus.connection.process_data_events(time_limit=0.5)
        # Unacked deliveries we still hold go back to the queue when the channel closes.
        channel.basic_cancel(tag)
        self.bus.close()

    # -- one message --------------------------------------------------------------------

    def _on_message(self, channel: BlockingChannel, method: Any, properties: pika.BasicProperties, body: bytes) -> None:
        if self._stopping.is_set():
            # Deliveries keep arriving while we publish; once asked to stop, hand them back
            # untouched so SIGTERM does not wait for the queue to drain.
            channel.basic_nack(method.delivery_tag, requeue=True)
            return
        started = time.monotonic()
        event_id = properties.message_id or "-"
        try:
            envelope = parse_envelope(body)
            event_id = str(envelope.event_id)
            result = self.handler(envelope) or HandlerResult()
            with self.bus.batch():
                for dead in result.dead_letters:
                    self._dead_letter(dead.body, properties, method.routing_key, dead.reason)
                self.bus.publish_many(result.events)
                self.bus.publish_many(result.notices, mandatory=False)
            if result.after_publish is not None:
                result.after_publish()
            outcome = "handled" if not result.dead_letters else "handled_partly"
        except InvalidMessageError as exc:
            self._dead_letter(body, properties, method.routing_key, str(exc))
            outcome = "dead_lettered"
        except CONNECTION_ERRORS:
            raise  # the broker is gone: the delivery stays unacked and comes back
        except Exception as exc:
            outcome = self._retry_or_dead_letter(body, properties, method.routing_key, exc)
        channel.basic_ack(method.delivery_tag)
        elapsed = time.monotonic() - started
        self.stats.handled += 1
        logger.info(
            "message handled event_id=%s type=%s outcome=%s duration_ms=%.1f",
            event_id, properties.type or method.routing_key, outcome, elapsed * 1000,
        )
        if self.on_outcome is not None:
            self.on_outcome(self.service, outcome, elapsed)

    def _retry_or_dead_letter(self, body: bytes, properties: pika.BasicProperties, routing_key: str,
                              exc: Exception) -> str:
        headers = dict(properties.headers or {})
        retries = int(headers.get(H_RETRIES, 0))
        reason = f"{type(exc).__name__}: {exc}"[:1000]
        history = list(headers.get(H_HISTORY, []))
        history.append(f"attempt {retries + 1}: {reason}")
        if retries >= self.retry_limit:
            headers[H_HISTORY] = history
            self._dead_letter(
                body, properties, routing_key, f"gave up after {retries + 1} attempts: {reason}", headers=headers
            )
            return "dead_lettered"
        logger.warning("event_id=%s attempt %d failed, retrying: %s", properties.message_id, retries + 1, reason)
        headers.update({H_RETRIES: retries + 1, H_HISTORY: history, H_ROUTING_KEY: headers.get(H_ROUTING_KEY, routing_key)})
        self.bus.send_to_queue(self.names.retry, body, message_id=properties.message_id, type=properties.type,
                               headers=headers, expiration_ms=self.retry_delay_ms)
        self.stats.retried += 1
        return "retried"

    def _dead_letter(self, body: bytes, properties: pika.BasicProperties, routing_key: str, reason: str,
                     headers: dict[str, Any] | None = None) -> None:
        headers = dict(headers if headers is not None else (properties.headers or {}))
        headers.update({
            H_REASON: reason,
            H_ROUTING_KEY: headers.get(H_ROUTING_KEY, routing_key),
            H_SERVICE: self.service,
            H_DEAD_AT: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        logger.error("event_id=%s dead-lettered: %s", properties.message_id or "-", reason)
        self.bus.send_to_queue(self.names.dead, body, message_id=properties.message_id, type=properties.type,
                               headers=headers)
        self.stats.dead_lettered += 1


def read_dead_letters(bus: Bus, service: str, limit: int = 100) -> list[dict[str, Any]]:
    """Peek at a dead queue without consuming it (messages are requeued)."""
    assert bus.channel is not None
    names = queue_names(bus.exchange, service)
    found: list[dict[str, Any]] = []
    tags = []
    for _ in range(limit):
        method, properties, body = bus.channel.basic_get(names.dead, auto_ack=False)
        if method is None:
            break
        tags.append(method.delivery_tag)
        headers = properties.headers or {}
        found.append({
            "message_id": properties.message_id,
            "type": properties.type,
            "reason": headers.get(H_REASON),
            "routing_key": headers.get(H_ROUTING_KEY),
            "retries": headers.get(H_RETRIES, 0),
            "history": headers.get(H_HISTORY, []),
            "dead_at": headers.get(H_DEAD_AT),
            "body": body.decode("utf-8", errors="replace"),
        })
    for tag in tags:
        bus.channel.basic_nack(tag, requeue=True)
    return found


def replay_dead_letters(bus: Bus, service: str, limit: int | None = None) -> int:
    """Move dead letters back onto the exchange under their original routing key.

    Each message is published (confirmed) before it is acked off the dead queue, so a
    crash in between duplicates it at worst (harmless: handlers are idempotent).
    """
    assert bus.channel is not None
    names = queue_names(bus.exchange, service)
    moved = 0
    while limit is None or moved < limit:
        method, properties, body = bus.channel.basic_get(names.dead, auto_ack=False)
        if method is None:
            break
        headers = properties.headers or {}
        routing_key = headers.get(H_ROUTING_KEY) or SERVICE_BINDINGS[service]
        bus.publish_raw(routing_key, body, message_id=properties.message_id, type=properties.type)
        bus.channel.basic_ack(method.delivery_tag)
        moved += 1
    return moved
