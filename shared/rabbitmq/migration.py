"""`kpi queues upgrade`: redeclare a deployment's queues with new arguments (classic to
quorum, another delivery limit, back to classic) without losing a message.

RabbitMQ cannot change a queue's type or arguments in place: the queue must be deleted
and declared again. For each queue whose declaration differs from the settings, its
messages are moved to a holding queue `<queue>.upgrade` (a quorum queue), the queue is
deleted and declared anew, and the messages are moved back. Every move publishes a
batch with confirms and only then acks it off the source, so an interruption (a crash,
a lost connection, Ctrl-C) leaves each message in one queue or, for the batch in hand,
in both: running the command again finishes the job, and nothing is deleted that holds
a message not yet copied. The state is in the broker alone (which queues differ, which
holding queues hold messages), so a rerun needs no record of the first run.

Order, per service:
1. the dead queue;
2. the retry queue's messages are parked in its holding queue whenever the work queue
   is redeclared: a message expiring from the retry queue while the work queue does not
   exist would be dead-lettered to nowhere, and lost;
3. the work queue, unbound from the exchange first, so that nothing arrives in a queue
   that is about to be deleted (a publisher meanwhile finds no queue: a mandatory
   publish is returned to it as unroutable, to be tried again);
4. the retry queue is declared and its messages come back, with their delay (which
   starts again).

The services must be stopped: a queue with a consumer is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions as amqp
from pika.adapters.blocking_connection import BlockingChannel

from shared.rabbitmq.headers import H_DELIVERY_COUNT
from shared.rabbitmq.publisher import Bus
from shared.rabbitmq.topology import (
    SERVICE_BINDINGS, QueueNames, QueueOptions, declare_topology, describe_mismatch, holding_queue, mismatch_detail,
    queue_arguments, queue_names,
)

logger = logging.getLogger(__name__)

# A moved message's expiration, kept here while it waits in a holding queue (which has no
# dead-lettering: an expiring message would be dropped there).
H_EXPIRATION = "x-kpi-upgrade-expiration"
HOLDING_ARGUMENTS = {"x-queue-type": "quorum"}
BATCH = 500


class UpgradeError(Exception):
    """The upgrade cannot go on (the services are running, a queue would not empty)."""


@dataclass
class QueueReport:
    queue: str
    change: str | None = None  # "x-queue-type is classic on the broker, quorum here", or None: as configured
    moved: int = 0  # messages that came back to it from its holding queue


@dataclass
class UpgradeReport:
    queues: list[QueueReport] = field(default_factory=list)

    @property
    def changed(self) -> list[QueueReport]:
        return [q for q in self.queues if q.change is not None]


# Called after every step with (step, queue): a test stops the upgrade there.
Checkpoint = Callable[[str, str], None]


def upgrade_queues(bus: Bus, *, batch: int = BATCH, checkpoint: Checkpoint | None = None) -> UpgradeReport:
    """Make every queue of `bus.exchange` match `bus.queues`; `bus` is connected with
    `connect(declare=False)`."""
    return _Upgrade(bus, batch, checkpoint or (lambda step, queue: None)).run()


class _Upgrade:
    def __init__(self, bus: Bus, batch: int, checkpoint: Checkpoint):
        assert bus.channel is not None and bus.connection is not None, "connect(declare=False) first"
        self.bus = bus
        self.channel: BlockingChannel = bus.channel
        self.options: QueueOptions = bus.queues
        self.batch = batch
        self.checkpoint = checkpoint
        self.report = UpgradeReport()

    def run(self) -> UpgradeReport:
        exchange = self.bus.exchange
        every = [queue_names(exchange, service) for service in SERVICE_BINDINGS]
        busy = [f"{queue} ({count})" for names in every for queue in (names.work, names.retry, names.dead)
                if (count := self._consumers(queue))]
        if busy:
            raise UpgradeError(f"stop the services first: consumers on {', '.join(busy)}")
        self.channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        for service, names in zip(SERVICE_BINDINGS, every):
            self._service(names, SERVICE_BINDINGS[service])
        declare_topology(self.channel, exchange, self.options)
        return self.report

    def _service(self, names: QueueNames, routing_key: str) -> None:
        self._queue(names, names.dead)
        work = QueueReport(names.work, self._differs(names, names.work))
        retry = QueueReport(names.retry, self._differs(names, names.retry))
        if work.change is not None or retry.change is not None:
            self._move(names.retry, holding_queue(names.retry), park=True)
            if retry.change is not None:
                self._delete(names.retry, retry.change)
        if work.change is not None:
            self.channel.queue_unbind(names.work, self.bus.exchange, routing_key=routing_key)
            self.checkpoint("unbound", names.work)
            self._move(names.work, holding_queue(names.work), park=True)
            self._delete(names.work, work.change)
        work.moved += self._restore(names, names.work)
        self.channel.queue_bind(names.work, self.bus.exchange, routing_key=routing_key)
        retry.moved += self._restore(names, names.retry)
        self.report.queues += [work, retry]

    def _queue(self, names: QueueNames, queue: str) -> None:
        report = QueueReport(queue, self._differs(names, queue))
        if report.change is not None:
            self._move(queue, holding_queue(queue), park=True)
            self._delete(queue, report.change)
        report.moved += self._restore(names, queue)
        self.report.queues.append(report)

    def _reconnect(self) -> None:
        """A new connection once a queue is deleted: RabbitMQ 3.10 keeps, per channel, what
        type a queue of a given name has, and a channel that used the classic queue crashes
        (541 INTERNAL_ERROR) when it publishes to the quorum queue of the same name."""
        self.bus.close()
        self.bus.connect(declare=False)
        assert self.bus.channel is not None
        self.channel = self.bus.channel

    # -- what is on the broker ----------------------------------------------------------

    def _probe(self) -> BlockingChannel:
        """A channel of its own for a declaration that may fail (a failure closes it)."""
        assert self.bus.connection is not None
        return self.bus.connection.channel()

    def _consumers(self, queue: str) -> int:
        probe = self._probe()
        try:
            return probe.queue_declare(queue, passive=True).method.consumer_count
        except amqp.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return 0
            raise
        finally:
            if probe.is_open:
                probe.close()

    def _depth(self, queue: str) -> tuple[int, int] | None:
        """(messages, consumers), or None if the queue does not exist."""
        probe = self._probe()
        try:
            method = probe.queue_declare(queue, passive=True).method
            return method.message_count, method.consumer_count
        except amqp.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return None
            raise
        finally:
            if probe.is_open:
                probe.close()

    def _differs(self, names: QueueNames, queue: str) -> str | None:
        """What differs between `queue` on the broker and the settings; None if nothing
        does. A queue that does not exist is declared as configured."""
        probe = self._probe()
        try:
            probe.queue_declare(queue, durable=True, arguments=queue_arguments(names, queue, self.options))
            return None
        except amqp.ChannelClosedByBroker as exc:
            detail = mismatch_detail(exc)
            if detail is None:
                raise
            return describe_mismatch(self.channel, names, queue, self.options, detail)
        finally:
            if probe.is_open:
                probe.close()

    # -- moving messages ----------------------------------------------------------------

    def _move(self, source: str, target: str, *, park: bool) -> int:
        """Move every message of `source` to `target`, a batch at a time: published with
        confirms, then acked. Parking (to a holding queue) keeps a message's expiration
        in a header; restoring puts it back."""
        if park:
            self.channel.queue_declare(target, durable=True, arguments=HOLDING_ARGUMENTS)
        moved = 0
        while True:
            taken: list[tuple[int, pika.BasicProperties, bytes]] = []
            while len(taken) < self.batch:
                method, properties, body = self.channel.basic_get(source, auto_ack=False)
                if method is None:
                    break
                taken.append((method.delivery_tag, properties, body))
            if not taken:
                return moved
            with self.bus.batch():
                for _tag, properties, body in taken:
                    self.bus.send_as_is(target, body, _moved(properties, park))
            self.channel.basic_ack(taken[-1][0], multiple=True)
            moved += len(taken)
            logger.info("%s: %d message(s) moved to %s", source, moved, target)
            self.checkpoint("moved", source)

    def _restore(self, names: QueueNames, queue: str) -> int:
        """Move the holding queue's messages (if any) back to `queue`, then delete it."""
        holding = holding_queue(queue)
        if self._depth(holding) is None:
            return 0
        self.channel.queue_declare(queue, durable=True, arguments=queue_arguments(names, queue, self.options))
        moved = self._move(holding, queue, park=False)
        self._delete(holding, None)
        return moved

    def _delete(self, queue: str, change: str | None) -> None:
        """Delete `queue` once it is empty and nobody consumes it.

        A classic queue is deleted with if-empty and if-unused, which the broker checks
        atomically; quorum queues support neither, so for them the check comes just
        before (nothing publishes to the queue by then: see the module's docstring).
        """
        self.checkpoint("before delete", queue)
        classic = change is not None and change.startswith("x-queue-type is classic on the broker")
        for _ in range(100):
            depth = self._depth(queue)
            if depth is None:
                return
            messages, consumers = depth
            if consumers:
                raise UpgradeError(f"stop the services first: {consumers} consumer(s) on {queue}")
            if messages:
                self._move(queue, holding_queue(queue), park=True)
                continue
            probe = self._probe()
            try:
                if classic:
                    probe.queue_delete(queue, if_empty=True, if_unused=True)
                else:
                    probe.queue_delete(queue)
            except amqp.ChannelClosedByBroker as exc:
                if exc.reply_code != 406:
                    raise
                continue  # a message arrived meanwhile: move it too
            finally:
                if probe.is_open:
                    probe.close()
            logger.info("%s deleted", queue)
            self._reconnect()
            self.checkpoint("deleted", queue)
            return
        raise UpgradeError(f"{queue} keeps receiving messages: stop whatever publishes to it and run again")


def _moved(properties: pika.BasicProperties, park: bool) -> pika.BasicProperties:
    """The message's properties as they go to the next queue: everything kept but the
    broker's delivery count (the target counts afresh) and, in a holding queue, the
    expiration."""
    headers: dict[str, Any] = dict(properties.headers) if isinstance(properties.headers, dict) else {}
    headers.pop(H_DELIVERY_COUNT, None)
    expiration = properties.expiration
    if park:
        if expiration is not None:
            headers[H_EXPIRATION] = expiration
            expiration = None
    elif H_EXPIRATION in headers:
        value = headers.pop(H_EXPIRATION)
        expiration = value.decode() if isinstance(value, bytes) else str(value)
    return pika.BasicProperties(
        content_type=properties.content_type, content_encoding=properties.content_encoding,
        headers=headers or None, delivery_mode=properties.delivery_mode, priority=properties.priority,
        correlation_id=properties.correlation_id, reply_to=properties.reply_to, expiration=expiration,
        message_id=properties.message_id, timestamp=properties.timestamp, type=properties.type,
        app_id=properties.app_id, cluster_id=properties.cluster_id,
    )
