"""The network's API rate limit, counted in PostgreSQL for every process that calls it.

HasOffers allows a network `calls` calls in any `seconds` (50 in 10), however many
loader replicas and action_runners make them. hasoffers_call_slots holds one row per
allowed call. A call takes the slot whose last use is the oldest, if that use has left
the window (FOR UPDATE SKIP LOCKED: two processes never take the same slot), marks it
in flight, and stamps it again when its answer is in: the network counted the call no
later than that, so no window the network can see holds more than `calls` of ours.
All times are the database's clock, the one clock every process shares.

A slot in flight counts as used until `in_flight_seconds` (the HTTP timeout) after it
was taken, so a process that dies mid-call frees its slot by itself. A process that
finds no free slot sleeps until the oldest one leaves the window, plus a little random
jitter so that waiting processes take turns rather than one always winning.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from sqlalchemy import Engine, text

from shared.sql import connection, transaction

logger = logging.getLogger(__name__)

_SEED = text("""
    INSERT INTO hasoffers_call_slots (network_id, slot, used_at)
    SELECT :network, g, '-infinity' FROM generate_series(0, :calls - 1) AS g
    ON CONFLICT DO NOTHING
""")

_TAKE = text("""
    UPDATE hasoffers_call_slots s
       SET used_at = clock_timestamp() + make_interval(secs => :in_flight)
      FROM (SELECT slot FROM hasoffers_call_slots
             WHERE network_id = :network AND slot < :calls
               AND used_at <= clock_timestamp() - make_interval(secs => :seconds)
             ORDER BY used_at LIMIT 1
             FOR UPDATE SKIP LOCKED) AS free
     WHERE s.network_id = :network AND s.slot = free.slot
    RETURNING s.slot
""")

_NEXT_FREE = text("""
    SELECT extract(epoch FROM min(used_at) + make_interval(secs => :seconds) - clock_timestamp())
      FROM hasoffers_call_slots WHERE network_id = :network AND slot < :calls
""")

_DONE = text("UPDATE hasoffers_call_slots SET used_at = clock_timestamp() WHERE network_id = :network AND slot = :slot")


class SharedCallWindow:
    """CallWindow (shared/hasoffers.py) over hasoffers_call_slots."""

    def __init__(self, engine: Engine, network_id: str, calls: int = 50, seconds: float = 10.0, *,
                 in_flight_seconds: float = 30.0, sleep: Callable[[float], None] = time.sleep,
                 max_wait_step: float = 1.0):
        self.engine, self.network_id, self.calls, self.seconds = engine, network_id, calls, seconds
        self.in_flight_seconds = in_flight_seconds
        self._sleep = sleep
        self._max_wait_step = max_wait_step
        self._seeded = False
        self.waited_seconds = 0.0  # how long this process waited for a slot, all told

    def _params(self) -> dict[str, object]:
        return {"network": self.network_id, "calls": self.calls, "seconds": self.seconds,
                "in_flight": self.in_flight_seconds}

    def acquire(self) -> int:
        params = self._params()
        if not self._seeded:
            with transaction(self.engine) as conn:
                conn.execute(_SEED, params)
            self._seeded = True
        while True:
            with transaction(self.engine) as conn:
                slot = conn.execute(_TAKE, params).scalar()
                if slot is not None:
                    return int(slot)
            with connection(self.engine) as conn:
                wait = conn.execute(_NEXT_FREE, params).scalar()
            # Never more than a step at a time: a slot in flight may be stamped early.
            pause = min(max(float(wait or 0.0), 0.0), self._max_wait_step) + random.uniform(0.005, 0.05)
            self.waited_seconds += pause
            self._sleep(pause)

    def done(self, handle: object) -> None:
        try:
            with transaction(self.engine) as conn:
                conn.execute(_DONE, {"network": self.network_id, "slot": handle})
        except Exception as exc:  # the call itself went through: its slot frees itself later
            logger.warning("could not stamp HasOffers call slot %s: %s", handle, exc)
