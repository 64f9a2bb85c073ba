"""Everything that talks to RabbitMQ: topology, publishing with confirms, the consume
loop, dead-letter tools. Handlers never import this package (see shared.handling)."""

from shared.rabbitmq.consumer import Consumer, Stats
from shared.rabbitmq.dead_letters import dead_letter_count, read_dead_letters, replay_dead_letters
from shared.rabbitmq.headers import H_HISTORY, H_REASON, H_RETRIES, H_ROUTING_KEY
from shared.rabbitmq.publisher import CONNECTION_ERRORS, BrokerUnavailableError, Bus, PublishError
from shared.rabbitmq.topology import SERVICE_BINDINGS, QueueMismatchError, QueueNames, QueueOptions, queue_names

__all__ = [
    "CONNECTION_ERRORS", "H_HISTORY", "H_REASON", "H_RETRIES", "H_ROUTING_KEY", "SERVICE_BINDINGS",
    "BrokerUnavailableError", "Bus", "Consumer", "PublishError", "QueueMismatchError", "QueueNames", "QueueOptions",
    "Stats", "dead_letter_count",
    "queue_names", "read_dead_letters", "replay_dead_letters",
]
