"""The test session's broker and database, and the queue helpers bound to that broker.

Everything else the tests run the product with is in testkit.
"""

from __future__ import annotations

from typing import Any

from testkit import ROOT, broker
from testkit.database import admin_url

__all__ = ["AMQP_URL", "PG_ADMIN_URL", "ROOT", "drain", "queue_depth"]

AMQP_URL = broker.amqp_url("TEST_AMQP_URL")
PG_ADMIN_URL = admin_url("TEST_PG_ADMIN_URL")


def queue_depth(queue: str) -> int:
    with broker.channel(AMQP_URL) as channel:
        return broker.queue_depth(channel, queue)


def drain(queue: str) -> list[tuple[Any, bytes]]:
    """Take every message off a queue: [(properties, body)]."""
    with broker.channel(AMQP_URL) as channel:
        return broker.take_all(channel, queue)
