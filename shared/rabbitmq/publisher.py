"""Publishing with confirms: the connection every process uses to talk to RabbitMQ.

`Bus` is a connection with a confirming channel and the topology declared. Publishers
(the CLI, the schedule, tests) use it as is; the consumer uses it on its connection
thread. A message is persistent, and a publish returns (or a `batch()` block ends) only
once the broker confirmed it; an unroutable or refused message raises PublishError.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import pika
import pika.exceptions as amqp
from pika.adapters.blocking_connection import BlockingChannel

from shared.events import Envelope, encode
from shared.rabbitmq.topology import QueueOptions, amqp_urls, connection_parameters, declare_topology, redact_url

logger = logging.getLogger(__name__)

# Errors that mean "the broker went away, or closed our channel": reconnect and carry on.
CONNECTION_ERRORS = (
    amqp.AMQPConnectionError,
    amqp.StreamLostError,
    amqp.ConnectionClosedByBroker,
    amqp.ConnectionWrongStateError,
    amqp.ChannelClosed,
    amqp.ChannelWrongStateError,
    ConnectionError,
    OSError,
)


class PublishError(Exception):
    """The broker did not take a message: unroutable (nobody bound) or refused (nacked)."""


class BrokerUnavailableError(Exception):
    pass


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

    `amqp_url` may list several URLs, comma-separated (the nodes of a cluster): a
    connection tries them in turn, and after a lost connection the next attempt starts
    with the URL after the one that was lost, so a node that went away is tried last.
    """

    def __init__(self, amqp_url: str, exchange: str, *, heartbeat: int = 30, name: str = "hasoffers-kpi",
                 queues: QueueOptions = QueueOptions()):
        self.exchange = exchange
        self.name = name
        self.queues = queues
        self._url = amqp_url
        self._urls = amqp_urls(amqp_url)
        self._first = 0  # index in _urls of the URL the next connection tries first
        self._heartbeat = heartbeat
        self.connection: pika.BlockingConnection | None = None
        self.channel: BlockingChannel | None = None
        self.connected_url: str | None = None  # which one (redacted), for log lines
        self._confirms: _Confirms | None = None
        self._batching = False

    def connect(self, declare: bool = True) -> Bus:
        """Connect, open a confirming channel and (unless `declare` is false) declare the
        topology: QueueMismatchError if a queue has other arguments than ours."""
        self.connection = self._open()
        try:
            self.channel = self.connection.channel()
            self._confirms = _Confirms(self.channel)
            if declare:
                declare_topology(self.channel, self.exchange, self.queues)
        except BaseException:
            self.close()
            raise
        return self

    def _open(self) -> pika.BlockingConnection:
        error: BaseException | None = None
        for i in range(len(self._urls)):
            index = (self._first + i) % len(self._urls)
            url = self._urls[index]
            try:
                connection = pika.BlockingConnection(connection_parameters(url, self._heartbeat, self.name))
            except CONNECTION_ERRORS as exc:
                if len(self._urls) > 1:
                    logger.info("RabbitMQ at %s not reachable (%s)", redact_url(url), describe_amqp_error(exc))
                error = exc
                continue
            # Once this connection is lost, the next one starts with the next node.
            self._first = (index + 1) % len(self._urls)
            self.connected_url = redact_url(url)
            return connection
        assert error is not None
        raise error

    def connect_with_retry(self, attempts: int, delay: float = 1.0, declare: bool = True) -> Bus:
        for attempt in range(1, attempts + 1):
            try:
                return self.connect(declare)
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

    def send_as_is(self, queue: str, body: bytes, properties: pika.BasicProperties) -> None:
        """Publish a message with the properties given (a message moved between queues)
        straight to a queue, and wait for the confirm (at the end of the block in batch())."""
        assert self._confirms is not None, "connect() first"
        self._confirms.publish("", queue, body, properties, True)
        if not self._batching:
            self._confirms.wait()

    def queue_depth(self, queue: str) -> int:
        assert self.channel is not None, "connect() first"
        return self.channel.queue_declare(queue, passive=True).method.message_count


def describe_amqp_error(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return text if len(text) < 300 else text[:300] + "..."
