"""One rate limit per network, shared by every process through PostgreSQL.

Three real processes call the fake network at full speed; the fake counts every
client of the network together and refuses what goes over, as HasOffers does. A
smaller limit than the real 50 / 10 s keeps the test short; scripts/bench_rate_limit
measures the real one.
"""

from __future__ import annotations

import time

import pytest

from scripts.bench_rate_limit import measure, report
from shared.hasoffers_rate import SharedCallWindow

CALLS, WINDOW, SECONDS = 10, 2.0, 8.0


def test_three_processes_share_the_limit_and_none_starves():
    result = measure(3, SECONDS, CALLS, WINDOW)
    print(report(result, CALLS, WINDOW))
    assert result.refused == 0 and result.peak <= CALLS
    allowed = CALLS * SECONDS / WINDOW + CALLS  # the first window's burst, then CALLS per WINDOW
    assert result.total <= allowed
    # Not over-cautious: most of what the limit allows is used (calls cost milliseconds).
    assert result.total >= 0.5 * CALLS * SECONDS / WINDOW
    # Every process gets a fair share and is never kept waiting for long.
    assert min(result.per_process) >= 0.15 * result.total, result.per_process
    assert max(result.longest_gaps) < 3 * WINDOW, result.longest_gaps


def test_a_limit_counted_per_process_is_exceeded_together():
    """What the shared limit prevents: each process alone keeps to it, the network refuses."""
    result = measure(3, 4.0, CALLS, WINDOW, shared=False)
    assert result.refused > 0 and result.peak > CALLS


def test_slots_are_taken_once_and_freed_when_the_window_has_passed(db):
    sleeps: list[float] = []
    window = SharedCallWindow(db, "unit", calls=3, seconds=0.5, sleep=sleeps.append)
    taken = [window.acquire() for _ in range(3)]
    assert sorted(taken) == [0, 1, 2] and sleeps == []
    for slot in taken:
        window.done(slot)
    other = SharedCallWindow(db, "other-network", calls=3, seconds=0.5, sleep=sleeps.append)
    assert other.acquire() in (0, 1, 2) and sleeps == [], "a network of its own has slots of its own"

    real = SharedCallWindow(db, "unit", calls=3, seconds=0.5)
    started = time.monotonic()
    slot = real.acquire()  # waits for the oldest use to leave the window
    assert slot in taken and time.monotonic() - started == pytest.approx(0.5, abs=0.45)
    assert real.waited_seconds > 0
