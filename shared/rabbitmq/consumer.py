"""The consume loop: one service's work queue, a handler per message, manual acks.

Two threads, as pika's own threaded-consumer example does it:
- the connection thread (`run`) owns the connection: it receives deliveries, answers the
  broker's heartbeats and runs every publish and ack, handed to it with
  `add_callback_threadsafe`. It never runs a handler, so a handler of any length never
  costs the service its connection;
- the worker thread runs handlers one message at a time, in delivery order.

Per message: parse and check the envelope -> run the handler (which commits) -> publish
its outputs with confirms -> after_publish -> ack. Invalid messages go to the dead
queue at once with the reason; any other failure goes through the retry queue with a
count and reaches the dead queue after the retry limit. The failure path never raises:
what cannot be published is rejected to the broker's own dead-lettering instead.

If the connection drops while a handler runs, the handler finishes, its outputs are
published on the next connection (the handler's work is committed, and redelivery is
harmless), and the ack is skipped: the broker redelivers that delivery to whoever is
consuming, and the handler, idempotent, finds the work done.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import pika

from shared.events import Envelope, InvalidMessageError, parse_envelope
from shared.handling import Delivery, Handler, HandlerResult
from shared.profiling import profiled
from shared.rabbitmq import headers as h
from shared.rabbitmq.publisher import CONNECTION_ERRORS, BrokerUnavailableError, Bus, describe_amqp_error
from shared.rabbitmq.topology import QueueOptions, consumes, queue_names, routing_key_for

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Stats:
    """Counters an observer (logs, Prometheus) can read."""

    handled: int = 0
    dead_lettered: int = 0
    retried: int = 0
    failed: int = 0


@dataclass(frozen=True)
class _Incoming:
    """A delivery as the connection thread received it, for the worker."""

    generation: int  # which connection it came on: its ack is only valid there
    delivery_tag: int
    routing_key: str
    redelivered: bool
    properties: pika.BasicProperties
    body: bytes


class _ConnectionLost(Exception):
    """The connection a broker call was meant for is gone."""


class Consumer:
    """Consumes one service's work queue until stop() is called.

    Reconnects with back-off when RabbitMQ goes away (to the next node, when AMQP_URL
    lists several); gives up (BrokerUnavailableError) only when it could never connect at
    start-up. A queue declared with other arguments (QueueMismatchError) ends run().
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
        queues: QueueOptions = QueueOptions(),
        on_outcome: Callable[[str, str, float], None] | None = None,
        profile_dir: str | None = None,
        workers: int = 1,
    ):
        self.names = queue_names(exchange, service)
        self.service = service
        self.handler = handler
        self.prefetch = prefetch
        self.retry_limit = retry_limit
        self.retry_delay_ms = retry_delay_ms
        self.startup_attempts = startup_attempts
        self.bus = Bus(amqp_url, exchange, heartbeat=heartbeat, name=f"hasoffers-kpi {service}", queues=queues)
        self.on_outcome = on_outcome
        self.profile_dir = profile_dir  # KPI_PROFILE: each thread's CPU profile written there (shared.profiling)
        # Messages handled at once, each on a worker thread of its own (KPI_WORKERS): for
        # handlers that mostly wait (SMTP, HTTP, commits), whose replicas may run side by side.
        self.workers = workers
        self.stats = Stats()
        self.ready = threading.Event()
        self._stopping = threading.Event()
        self._ever_connected = False
        self._incoming: queue.Queue[_Incoming] = queue.Queue()
        self._in_hand = 0  # messages the workers hold (under _state)
        self._state = threading.Lock()
        self._generation = 0  # bumped by every new connection
        self._live = False  # the connection of _generation is up and consuming
        self._calls: set[Future[Any]] = set()  # broker calls handed to the connection thread
        self._workers_running = 0  # under _state
        self._worker_done = threading.Event()  # every worker has ended

    def stop(self) -> None:
        """Ask the loop to end after the message in hand; safe from a signal handler."""
        self._stopping.set()

    # -- the connection thread ------------------------------------------------------------

    def run(self) -> None:
        with profiled(self.profile_dir, self.service, "connection"):
            self._run()

    def _run(self) -> None:
        self._workers_running = self.workers
        for number in range(1, self.workers + 1):
            name = "worker" if number == 1 else f"worker-{number}"
            threading.Thread(target=self._work, args=(name,), name=f"{self.service}-{name}", daemon=True).start()
        failures = 0
        try:
            while not self._finished():
                try:
                    self._consume()
                except CONNECTION_ERRORS as exc:
                    self._connection_lost()
                    if not self._ever_connected and failures + 1 >= self.startup_attempts:
                        raise BrokerUnavailableError(
                            f"RabbitMQ not reachable after {self.startup_attempts} attempts: "
                            f"{describe_amqp_error(exc)}"
                        ) from None
                    failures += 1
                    delay = min(0.5 * 2 ** min(failures, 6), 15.0)
                    logger.warning("lost RabbitMQ (%s); reconnecting in %.1fs", describe_amqp_error(exc), delay)
                    self._stopping.wait(delay)
                else:
                    failures = 0
        finally:
            self._stopping.set()
            self._connection_lost()
            self._worker_done.wait(30)

    def _finished(self) -> bool:
        # A worker may still need the connection to publish and ack the message in hand.
        return self._stopping.is_set() and not self._busy()

    def _busy(self) -> bool:
        with self._state:
            return self._in_hand > 0

    def _consume(self) -> None:
        self.bus.connect()
        channel, connection = self.bus.channel, self.bus.connection
        assert channel is not None and connection is not None
        channel.basic_qos(prefetch_count=self.prefetch)
        with self._state:
            self._generation += 1
            generation = self._generation
            self._live = True
        tag = channel.basic_consume(
            self.names.work, lambda ch, method, properties, body: self._receive(generation, method, properties, body))
        logger.info("%s to %s; consuming %s", "reconnected" if self._ever_connected else "connected",
                    self.bus.connected_url, self.names.work)
        self._ever_connected = True
        self.ready.set()
        while not self._finished():
            connection.process_data_events(time_limit=0.2)
        # Unacked deliveries we still hold go back to the queue when the channel closes.
        channel.basic_cancel(tag)
        self._connection_lost()

    def _receive(self, generation: int, method: Any, properties: pika.BasicProperties, body: bytes) -> None:
        if self._stopping.is_set():
            # Once asked to stop, hand deliveries back untouched so SIGTERM does not wait
            # for the queue to drain.
            assert self.bus.channel is not None
            self.bus.channel.basic_nack(method.delivery_tag, requeue=True)
            return
        self._incoming.put(_Incoming(generation, method.delivery_tag, method.routing_key, bool(method.redelivered),
                                     properties, body))

    def _connection_lost(self) -> None:
        with self._state:
            self._live = False
            calls, self._calls = self._calls, set()
        self.ready.clear()
        for call in calls:
            if not call.done():
                call.set_exception(_ConnectionLost())
        self.bus.close()

    def _on_connection(self, fn: Callable[[], T], generation: int | None = None) -> T:
        """Run fn on the connection thread and return its result (called by the worker).

        With `generation`, only on that connection (an ack belongs to the channel its
        delivery came on): _ConnectionLost if it is gone. Without, on whichever
        connection is up, waiting for one: publishing again after a lost connection is
        harmless, so a call cut short is made again on the next one.
        """
        while True:
            with self._state:
                current, live = self._generation, self._live
                connection = self.bus.connection
            if generation is not None and (current != generation or not live):
                raise _ConnectionLost()
            if not live or connection is None:
                if self._stopping.is_set() and not self._busy():
                    raise _ConnectionLost()
                time.sleep(0.05)
                continue
            future: Future[T] = Future()

            def call(future: Future[T] = future, current: int = current) -> None:
                if future.done():
                    return
                if self._generation != current:
                    future.set_exception(_ConnectionLost())
                    return
                try:
                    future.set_result(fn())
                except CONNECTION_ERRORS:
                    future.set_exception(_ConnectionLost())
                    raise  # the connection thread reconnects
                except BaseException as exc:  # the caller decides what it means
                    future.set_exception(exc)

            with self._state:
                if self._generation != current or not self._live:
                    continue
                self._calls.add(future)
            try:
                connection.add_callback_threadsafe(call)
            except Exception:  # closed in the meantime
                with self._state:
                    self._calls.discard(future)
                continue
            try:
                return future.result()
            except _ConnectionLost:
                if generation is not None:
                    raise
                logger.info("connection lost during a broker call; trying again on the next one")
            finally:
                with self._state:
                    self._calls.discard(future)

    # -- the worker thread ---------------------------------------------------------------

    def _work(self, name: str) -> None:
        try:
            with profiled(self.profile_dir, self.service, name):
                self._work_until_stopped()
        finally:
            with self._state:
                self._workers_running -= 1
                if self._workers_running == 0:
                    self._worker_done.set()

    def _work_until_stopped(self) -> None:
        while not self._stopping.is_set():
            try:
                incoming = self._incoming.get(timeout=0.2)
            except queue.Empty:
                continue
            if self._stopping.is_set():
                break  # not started: the broker hands it back when the channel closes
            with self._state:
                stale = incoming.generation != self._generation
                if not stale:
                    self._in_hand += 1
            if stale:
                # Came on a connection that is gone: the broker delivers it again.
                continue
            try:
                self._handle(incoming)
            except Exception:  # a bug in this module: never let the worker die
                logger.exception("event_id=%s could not be handled", incoming.properties.message_id or "-")
            finally:
                with self._state:
                    self._in_hand -= 1

    def _handle(self, incoming: _Incoming) -> None:
        started = time.monotonic()
        properties = incoming.properties
        event_id = str(properties.message_id or "-")[:100]
        headers = properties.headers if isinstance(properties.headers, dict) else {}
        retries = h.retries_so_far(headers, self.retry_limit, redelivered=incoming.redelivered)
        try:
            envelope = self._parse(incoming.body)
            event_id = str(envelope.event_id)
            delivery = Delivery(attempt=retries + 1, max_attempts=self.retry_limit + 1,
                                redelivered=incoming.redelivered)
            result = self.handler(envelope, delivery) or HandlerResult()
            self._on_connection(lambda: self._publish(incoming, headers, retries, result))
            if result.after_publish is not None:
                result.after_publish()
            outcome = "handled" if not result.dead_letters else "handled_partly"
        except InvalidMessageError as exc:
            outcome = self._fail(incoming, headers, retries, str(exc), retry=False, dead_body=exc.dead_body)
        except _ConnectionLost:
            logger.warning("event_id=%s not finished: RabbitMQ is gone and the service is stopping; "
                           "the broker delivers it again", event_id)
            return
        except Exception as exc:
            outcome = self._fail(incoming, headers, retries, f"{type(exc).__name__}: {exc}", retry=True)
        if outcome is None:
            return
        try:
            self._on_connection(lambda: self._ack(incoming.delivery_tag), generation=incoming.generation)
        except _ConnectionLost:
            logger.warning("event_id=%s handled (%s) but its delivery was lost with the connection; the broker "
                           "delivers it again and the handler finds the work done", event_id, outcome)
            return
        elapsed = time.monotonic() - started
        self.stats.handled += 1
        logger.info(
            "message handled event_id=%s type=%s outcome=%s duration_ms=%.1f",
            event_id, str(properties.type or incoming.routing_key)[:100], outcome, elapsed * 1000,
        )
        if self.on_outcome is not None:
            self.on_outcome(self.service, outcome, elapsed)

    def _parse(self, body: bytes) -> Envelope:
        envelope = parse_envelope(body)
        if not consumes(self.service, envelope.type):
            raise InvalidMessageError(f"{self.service} does not handle messages of type {envelope.type!r}")
        return envelope

    def _fail(self, incoming: _Incoming, headers: dict[str, Any], retries: int, reason: str,
              retry: bool, dead_body: bytes | None = None) -> str | None:
        """Retry or dead-letter; the outcome, or None when the service is stopping without a broker."""
        try:
            return self._on_connection(
                lambda: self._retry_or_dead_letter(incoming, headers, retries, reason, retry, dead_body))
        except _ConnectionLost:
            return None

    # -- on the connection thread (through _on_connection) --------------------------------

    def _origin(self, incoming: _Incoming, headers: dict[str, Any]) -> str:
        """The routing key the message was first published with, as far as it can be trusted."""
        return (routing_key_for(self.service, headers.get(h.H_ROUTING_KEY), incoming.routing_key,
                                incoming.properties.type)
                or h.bounded(incoming.routing_key, 200))

    def _publish(self, incoming: _Incoming, headers: dict[str, Any], retries: int, result: HandlerResult) -> None:
        with self.bus.batch():
            for dead in result.dead_letters:
                self._send_dead(incoming, dead.body, h.dead_headers(
                    headers, self._origin(incoming, headers), self.service, dead.reason, retries), dead.reason)
            self.bus.publish_many(result.events)
            self.bus.publish_many(result.notices, mandatory=False)

    def _ack(self, delivery_tag: int) -> None:
        assert self.bus.channel is not None
        self.bus.channel.basic_ack(delivery_tag)

    def _retry_or_dead_letter(self, incoming: _Incoming, headers: dict[str, Any], retries: int, reason: str,
                              retry: bool, dead_body: bytes | None = None) -> str:
        origin = self._origin(incoming, headers)
        try:
            if not retry:
                self._send_dead(incoming, dead_body or incoming.body,
                                h.dead_headers(headers, origin, self.service, reason, retries), reason)
                return "dead_lettered"
            if retries >= self.retry_limit:
                history = h.history_of(headers) + [h.bounded(f"attempt {retries + 1}: {reason}",
                                                             h.HISTORY_ENTRY_MAX)]
                reason = f"gave up after {retries + 1} attempts: {reason}"
                self._send_dead(incoming, incoming.body, h.dead_headers(headers, origin, self.service, reason,
                                                                        retries, history), reason)
                return "dead_lettered"
            logger.warning("event_id=%s attempt %d failed, retrying: %s", _message_id(incoming), retries + 1,
                           h.bounded(reason, 500))
            self.bus.send_to_queue(self.names.retry, incoming.body, message_id=_message_id(incoming),
                                   type=_type(incoming), headers=h.retry_headers(headers, origin, retries, reason),
                                   expiration_ms=self.retry_delay_ms)
            self.stats.retried += 1
            return "retried"
        except CONNECTION_ERRORS:
            raise
        except Exception as exc:
            # The broker refused what we built (it should not happen: everything is
            # bounded). Never loop on it: the queue's own dead-lettering takes the message,
            # without our headers.
            logger.error("event_id=%s could not be retried or dead-lettered (%s); rejecting it to %s",
                         _message_id(incoming), describe_amqp_error(exc), self.names.dead)
            assert self.bus.channel is not None
            self.bus.channel.basic_reject(incoming.delivery_tag, requeue=False)
            self.stats.dead_lettered += 1
            return "rejected"

    def _send_dead(self, incoming: _Incoming, body: bytes, headers: dict[str, Any], reason: str) -> None:
        logger.error("event_id=%s dead-lettered: %s", _message_id(incoming), h.bounded(reason, 500))
        self.bus.send_to_queue(self.names.dead, body, message_id=_message_id(incoming), type=_type(incoming),
                               headers=headers)
        self.stats.dead_lettered += 1


def _message_id(incoming: _Incoming) -> str | None:
    value = incoming.properties.message_id
    return None if value is None else str(value)[:200]


def _type(incoming: _Incoming) -> str | None:
    value = incoming.properties.type
    return None if value is None else str(value)[:200]

