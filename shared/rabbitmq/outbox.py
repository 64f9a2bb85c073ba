"""Events a background thread (the schedule, the action_runner's ticker) has decided to
publish, published on a connection of its own and kept until the broker confirms them.

What could not be published yet stays queued, in order, and is tried again at the next
call; the connection is dropped on any error and made again when next needed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from shared.events import Envelope
from shared.rabbitmq.publisher import CONNECTION_ERRORS, Bus, PublishError

logger = logging.getLogger(__name__)


class Outbox:
    def __init__(self, make_bus: Callable[[], Bus], *, mandatory: Callable[[Envelope], bool] = lambda event: True):
        self.make_bus = make_bus
        self.mandatory = mandatory
        self.pending: list[Envelope] = []
        self._bus: Bus | None = None

    def add(self, events: Iterable[Envelope]) -> None:
        self.pending.extend(events)

    def publish_pending(self) -> None:
        while self.pending:
            event = self.pending[0]
            try:
                if self._bus is None:
                    self._bus = self.make_bus().connect()
                self._bus.publish(event, mandatory=self.mandatory(event))
            except (*CONNECTION_ERRORS, PublishError) as exc:
                logger.warning("event_id=%s not published yet (%s); trying again", event.event_id, exc)
                self.close()
                return
            self.pending.pop(0)

    def keep_alive(self) -> None:
        """Answer the broker's heartbeats: a blocking connection only does so when used."""
        if self._bus is None or self._bus.connection is None:
            return
        try:
            self._bus.connection.process_data_events(time_limit=0)
        except CONNECTION_ERRORS:
            self.close()

    def close(self) -> None:
        if self._bus is not None:
            self._bus.close()
        self._bus = None
