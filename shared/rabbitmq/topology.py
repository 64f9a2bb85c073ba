"""Names on the broker, and the topology every process declares (DESIGN.md section 1).

One topic exchange; per service a durable work queue `<exchange>.<service>` bound to
the routing key it consumes, a retry queue `<queue>.retry` that holds a message for its
delay and then dead-letters it back to the work queue, and a dead-letter queue
`<queue>.dead`. Every process declares the whole topology, so start order does not
matter and a publisher never meets a missing queue.

Queues are quorum queues by default (`KPI_QUEUE_TYPE`): replicated over the nodes of a
RabbitMQ cluster, so a node lost is not its messages lost. A quorum work queue gives a
message back to the dead queue after `KPI_DELIVERY_LIMIT` returns to the queue (a
consumer that crashed or lost its connection while holding it): the last guard against
a message that kills every process that takes it. Every process must declare the same
arguments: RabbitMQ refuses a declaration that differs from the queue it has, and
`kpi queues upgrade` (shared/rabbitmq/migration.py) moves existing queues over.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

import pika
import pika.exceptions as amqp
from pika.adapters.blocking_connection import BlockingChannel

logger = logging.getLogger(__name__)

# service -> the routing key its queue is bound to. Each service's service.py states
# its own key too; shared.service checks that the two agree at start-up.
SERVICE_BINDINGS: dict[str, str] = {
    "metric_loader": "metric.load.requested",
    "trigger_checker": "metric.loaded",
    "event_detector": "trigger.checked",
    "action_runner": "trigger.event.*",
}

MAX_ROUTING_KEY = 255  # AMQP shortstr

QueueType = Literal["quorum", "classic"]
DEFAULT_QUEUE_TYPE: QueueType = "quorum"
DEFAULT_DELIVERY_LIMIT = 20


@dataclass(frozen=True)
class QueueOptions:
    """How this deployment's queues are declared (KPI_QUEUE_TYPE, KPI_DELIVERY_LIMIT)."""

    queue_type: QueueType = DEFAULT_QUEUE_TYPE
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT

    def describe(self) -> str:
        if self.queue_type == "quorum":
            return f"quorum queues (delivery limit {self.delivery_limit})"
        return "classic queues"


class QueueMismatchError(Exception):
    """A queue exists with other arguments than this process declares (another queue
    type, another delivery limit): a configuration error, not a broker outage."""

    def __init__(self, queue: str, detail: str):
        super().__init__(
            f"queue {queue} exists with other arguments than this process declares ({detail}); "
            "stop the services and run `kpi queues upgrade` with the new settings, or set KPI_QUEUE_TYPE "
            "and KPI_DELIVERY_LIMIT to what the queues have")
        self.queue = queue
        self.detail = detail


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


def holding_queue(queue: str) -> str:
    """Where `kpi queues upgrade` keeps a queue's messages while it is redeclared."""
    return f"{queue}.upgrade"


def queue_arguments(names: QueueNames, queue: str, options: QueueOptions) -> dict[str, Any]:
    """The arguments `queue` (one of `names`) is declared with: the only place they are made."""
    if queue == names.work:
        # A message rejected without requeue (by anyone), or returned more than the
        # delivery limit allows, ends in the dead queue.
        arguments: dict[str, Any] = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": names.dead}
    elif queue == names.retry:
        # The delay is set per message (expiration), not as a queue argument, so that
        # processes configured with different delays never disagree on the declaration.
        # A quorum queue expires messages at its head only; every message of a
        # deployment waits the same delay, so none waits behind a longer one.
        arguments = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": names.work}
    elif queue == names.dead:
        # No delivery limit here: `kpi dead list` hands every letter back, and each
        # return counts as a delivery.
        return {"x-queue-type": "quorum"} if options.queue_type == "quorum" else {}
    else:
        raise ValueError(f"{queue} is not one of {names}")
    if options.queue_type == "quorum":
        arguments["x-queue-type"] = "quorum"
        # Dead-lettering confirmed by the target queue (RabbitMQ falls back to
        # at-most-once, silently, unless the overflow is reject-publish; without a
        # length limit nothing is ever rejected).
        arguments["x-dead-letter-strategy"] = "at-least-once"
        arguments["x-overflow"] = "reject-publish"
        if queue == names.work:
            arguments["x-delivery-limit"] = options.delivery_limit
    return arguments


def topic_matches(binding: str, routing_key: str) -> bool:
    """AMQP topic matching: `*` is one word, `#` zero or more."""

    def match(pattern: list[str], words: list[str]) -> bool:
        if not pattern:
            return not words
        head, rest = pattern[0], pattern[1:]
        if head == "#":
            return any(match(rest, words[i:]) for i in range(len(words) + 1))
        return bool(words) and head in ("*", words[0]) and match(rest, words[1:])

    return match(binding.split("."), routing_key.split("."))


def consumes(service: str, routing_key: object) -> bool:
    """Whether `routing_key` (a type, a header value: anything) is one this service handles."""
    return (isinstance(routing_key, str) and 0 < len(routing_key) <= MAX_ROUTING_KEY
            and topic_matches(SERVICE_BINDINGS[service], routing_key))


def routing_key_for(service: str, *candidates: object) -> str | None:
    """The first candidate that is a routing key this service consumes: where a dead
    letter of the service goes back to when it is replayed."""
    for candidate in candidates:
        if consumes(service, candidate):
            return candidate  # type: ignore[return-value]
    binding = SERVICE_BINDINGS[service]
    return None if "*" in binding or "#" in binding else binding


def amqp_urls(amqp_url: str) -> list[str]:
    """AMQP_URL is one URL or several, comma-separated (the nodes of a cluster), tried in
    turn. A comma inside a password is written %2C."""
    urls = [url.strip() for url in amqp_url.split(",") if url.strip()]
    if not urls:
        raise ValueError("AMQP_URL is empty")
    return urls


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
    """The URL (or URLs) without its password, for log lines."""
    if "," in url:
        return ",".join(redact_url(part) for part in url.split(","))
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


ACCESS_REFUSED = 403
NOT_FOUND = 404


def declare_topology(channel: BlockingChannel, exchange: str, options: QueueOptions = QueueOptions()) -> None:
    """Declare the exchange, every service's queues and the bindings, on a channel of
    their own (`channel` stays open whatever the broker refuses).

    A user with a service's own permissions (shared/rabbitmq/permissions.py) may not
    declare the other services' queues: for those it checks that they exist and says so
    in the log when they do not yet. QueueMismatchError if a queue exists with other
    arguments.
    """
    declaring = channel.connection.channel()
    try:
        declaring.exchange_declare(exchange, exchange_type="topic", durable=True)
        for service, routing_key in SERVICE_BINDINGS.items():
            names = queue_names(exchange, service)
            try:
                for queue in (names.work, names.retry, names.dead):
                    declare_queue(declaring, names, queue, options)
                declaring.queue_bind(names.work, exchange, routing_key=routing_key)
            except amqp.ChannelClosedByBroker as exc:
                if exc.reply_code != ACCESS_REFUSED:
                    raise
                declaring = channel.connection.channel()
                declaring = _check_declared(declaring, names)
    finally:
        if declaring.is_open:
            declaring.close()


def _check_declared(channel: BlockingChannel, names: QueueNames) -> BlockingChannel:
    """Passive declarations (no permission needed) of a service's queues that this user
    may not declare; a fresh channel if the broker closed this one."""
    try:
        channel.queue_declare(names.work, passive=True)
    except amqp.ChannelClosedByBroker as exc:
        if exc.reply_code != NOT_FOUND:
            raise
        logger.warning("queue %s is not declared yet and this user may not declare it: messages for it are "
                       "returned until its service (or an administrator) declares it", names.work)
        return channel.connection.channel()
    return channel


def declare_queue(channel: BlockingChannel, names: QueueNames, queue: str, options: QueueOptions) -> None:
    try:
        channel.queue_declare(queue, durable=True, arguments=queue_arguments(names, queue, options))
    except amqp.ChannelClosedByBroker as exc:
        detail = mismatch_detail(exc)
        if detail is None:
            raise
        raise QueueMismatchError(queue, describe_mismatch(channel, names, queue, options, detail)) from None


def describe_mismatch(channel: BlockingChannel, names: QueueNames, queue: str, options: QueueOptions,
                      detail: str) -> str:
    """What differs, in the operator's terms: RabbitMQ names the first argument that
    differs in its own order (`x-overflow` before `x-queue-type`), so a queue of the
    other type is recognised by declaring it as that type (on a channel of its own)."""
    other = QueueOptions("classic" if options.queue_type == "quorum" else "quorum", options.delivery_limit)
    probe = channel.connection.channel()
    try:
        probe.queue_declare(queue, durable=True, arguments=queue_arguments(names, queue, other))
    except amqp.ChannelClosedByBroker:
        return detail
    finally:
        if probe.is_open:
            probe.close()
    return f"x-queue-type is {other.queue_type} on the broker, {options.queue_type} here"


_INEQUIVALENT = re.compile(r"inequivalent arg '([^']+)' for queue '[^']*' in vhost '[^']*': "
                           r"received (.*) but current is (.*)$")


def mismatch_detail(exc: amqp.ChannelClosedByBroker) -> str | None:
    """What differs, from RabbitMQ's 406 on a queue declaration; None for any other error."""
    if exc.reply_code != 406:
        return None
    match = _INEQUIVALENT.search(exc.reply_text or "")
    if match is None:
        return None
    argument, received, current = match.groups()

    def value(text: str) -> str:
        if text == "none":
            return "classic" if argument == "x-queue-type" else "not set"
        found = re.fullmatch(r"(?:the value )?'(.*)'(?: of type '[^']*')?", text)
        return found.group(1) if found else text

    return f"{argument} is {value(current)} on the broker, {value(received)} here"
