"""Names on the broker, and the topology every process declares (DESIGN.md section 1).

One topic exchange; per service a durable work queue `<exchange>.<service>` bound to
the routing key it consumes, a retry queue `<queue>.retry` that holds a message for its
delay and then dead-letters it back to the work queue, and a dead-letter queue
`<queue>.dead`. Every process declares the whole topology, so start order does not
matter and a publisher never meets a missing queue.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pika
from pika.adapters.blocking_connection import BlockingChannel

# service -> the routing key its queue is bound to. Each service's service.py states
# its own key too; shared.service checks that the two agree at start-up.
SERVICE_BINDINGS: dict[str, str] = {
    "metric_loader": "metric.load.requested",
    "trigger_checker": "metric.loaded",
    "event_detector": "trigger.checked",
    "action_runner": "trigger.event.*",
}

MAX_ROUTING_KEY = 255  # AMQP shortstr


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
