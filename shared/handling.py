"""The contract between the bus and a handler, with no broker in it.

A handler is a plain function `handler(envelope, delivery) -> HandlerResult | None`: it
validates, does its work and commits, and returns what should be published. It never
acks, never publishes and never imports pika; `shared.rabbitmq` does that around it,
in the order validate -> handle (commit) -> publish with confirms -> after_publish -> ack.

How a handler says what happened:
- return a HandlerResult: its events are published (with `mandatory`), its notices
  without, its dead letters go to the service's dead queue; then the message is acked;
- raise InvalidMessageError (shared.events): the message can never be handled and goes
  to the dead queue at once;
- raise RetryableError (or anything else): the message comes back through the retry
  queue, and goes to the dead queue after KPI_RETRY_LIMIT retries.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.events import Envelope


# The key of a batch dead letter's body that lists every invalid item's reasons
# (shared.batch); `kpi dead replay` takes it out again, so the message is as it was.
REASONS_KEY = "x_kpi_dead_reasons"


class RetryableError(Exception):
    """A transient failure (a dependency is down, a rate limit): try the message again later."""


@dataclass
class DeadLetter:
    """Part of a message (or the whole of it) that goes to the dead queue on its own.

    `reason` is what a person reads first; the bus bounds it in the header. Where a
    message had many reasons (one per invalid item), `body` carries them all.
    """

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


@dataclass(frozen=True)
class Delivery:
    """How many times this message has been tried, as far as the broker can tell.

    `attempt` counts from 1. A service that keeps state per message (load_runs,
    operation_runs) also counts the attempts that ended in a crash or a lost
    connection, which the broker cannot see: `at_attempt` merges that count in.
    """

    attempt: int = 1
    max_attempts: int = 6  # KPI_RETRY_LIMIT + 1
    redelivered: bool = False

    @property
    def is_last(self) -> bool:
        """After this attempt fails, the message goes to the dead queue."""
        return self.attempt >= self.max_attempts

    @property
    def exhausted(self) -> bool:
        """Every allowed attempt was used before this one: give up without trying."""
        return self.attempt > self.max_attempts

    def at_attempt(self, recorded: int) -> Delivery:
        """This delivery, counted as attempt `recorded` if the service's own record is ahead."""
        if recorded <= self.attempt:
            return self
        return Delivery(attempt=recorded, max_attempts=self.max_attempts, redelivered=self.redelivered)


Handler = Callable[["Envelope", Delivery], "HandlerResult | None"]


def dumps_safely(value: Any, _depth: int = 0) -> str:
    """JSON of anything a message held, NaN included; a part nested too deeply to encode
    again is replaced by a note instead of failing the dead letter."""
    try:
        return json.dumps(value)
    except (RecursionError, ValueError, TypeError):
        if _depth < 8 and isinstance(value, list):
            return "[" + ",".join(dumps_safely(item, _depth + 1) for item in value) + "]"
        if _depth < 8 and isinstance(value, dict):
            return "{" + ",".join(f"{json.dumps(str(k))}:{dumps_safely(v, _depth + 1)}"
                                  for k, v in value.items()) + "}"
        return json.dumps("(not encodable again: nested too deeply)")
