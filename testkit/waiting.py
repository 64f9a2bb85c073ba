"""Waiting for a condition with a deadline, never a bare sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 15.0, interval: float = 0.05,
             what: str = "condition") -> T:
    """Poll until condition() is truthy and return it; TimeoutError naming `what` after
    the deadline. The condition is asked once more after the deadline, so a slow poll
    never fails a condition that holds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what} (last: {result!r})")
        time.sleep(interval)
