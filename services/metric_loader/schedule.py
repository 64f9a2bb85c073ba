"""The schedule: request every metric and the reference data at fixed intervals.

Time is cut into slots aligned on the epoch (slot = floor(now / interval)), so every
replica computes the same slots. A replica claims a slot by inserting its load run
(UNIQUE (metric_key, schedule_slot)); only the replica whose INSERT went through
publishes the request, so each slot is loaded once however many replicas run. The
request's event_id is the run's request_event_id and its correlation_id the run id:
the handler continues that run instead of creating another.

A request whose publish failed is kept and published again on the next tick. If the
process dies in between, that slot is not loaded; the next slot is (the values are a
sliding window, so the next load covers the same ground).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

from sqlalchemy import Engine
from sqlalchemy.dialects.postgresql import insert

from shared.db import LoadRun
from shared.rabbitmq import Bus
from shared.rabbitmq.outbox import Outbox
from shared.sql import transaction
from shared.events import METRIC_LOAD_REQUESTED, Envelope, MetricLoadRequested, new_event, stable_event_id
from shared.vocabulary import METRIC_KEYS, REFERENCE

logger = logging.getLogger(__name__)


def slot_of(now: float, interval: int) -> datetime:
    return datetime.fromtimestamp(now - now % interval, timezone.utc)


class Schedule:
    def __init__(self, engine: Engine, make_bus: Callable[[], Bus], *, metrics_seconds: int, reference_seconds: int,
                 lookback_hours: int, clock: Callable[[], float] = time.time, tick_seconds: float = 1.0):
        self.engine = engine
        # The reference first: on start-up its request goes out before the metrics'.
        self.intervals = {key: seconds for key, seconds in
                          [(REFERENCE, reference_seconds), *((k, metrics_seconds) for k in METRIC_KEYS)] if seconds}
        self.lookback_hours = lookback_hours
        self.clock = clock
        self.tick_seconds = tick_seconds
        self.stopping = threading.Event()
        self._done: dict[str, datetime] = {}  # key -> last slot this replica dealt with
        self.outbox = Outbox(make_bus)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="metric-loader-schedule", daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        logger.info("schedule on: %s", ", ".join(f"{k} every {s}s" for k, s in self.intervals.items()))
        while not self.stopping.is_set():
            try:
                self.tick()
            except Exception:  # the schedule must outlive a bad tick; the next one tries again
                logger.exception("schedule tick failed")
            self.stopping.wait(self.tick_seconds)
        self.outbox.close()
        logger.info("schedule stopped")

    def tick(self) -> None:
        self.outbox.keep_alive()
        now = self.clock()
        for key, interval in self.intervals.items():
            slot = slot_of(now, interval)
            if self._done.get(key) == slot:
                continue
            event = self.claim(key, slot)  # raises on a database error: the slot is tried again next tick
            self._done[key] = slot
            if event is not None:
                self.outbox.add([event])
        self.outbox.publish_pending()

    def claim(self, key: str, slot: datetime) -> Envelope | None:
        """The request for (key, slot) when this replica claimed it, else None."""
        event_id = stable_event_id(METRIC_LOAD_REQUESTED, key, slot.isoformat())
        with transaction(self.engine) as conn:
            # No conflict target: the slot's unique index and the request id (derived from
            # the slot) both mean that another replica claimed it first.
            run_id = conn.execute(
                insert(LoadRun)
                .values(request_event_id=str(event_id), metric_key=key, lookback_hours=self.lookback_hours,
                        schedule_slot=slot, status="requested")
                .on_conflict_do_nothing()
                .returning(LoadRun.id)
            ).scalar()
        if run_id is None:
            return None
        logger.info("event_id=%s run_id=%d scheduled %s for slot %s", event_id, run_id, key, slot.isoformat())
        return new_event(METRIC_LOAD_REQUESTED, MetricLoadRequested(metric_key=key, lookback_hours=self.lookback_hours),
                         correlation_id=str(run_id), event_id=event_id)
