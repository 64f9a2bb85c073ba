"""The `x-kpi-*` headers of retried and dead-lettered messages, bounded and validated.

Everything written into a header is bounded: RabbitMQ closes a connection whose header
frame is over its frame size (128 KiB by default), and the service would then meet the
same message again after reconnecting, forever. A reason longer than REASON_MAX is cut
in the header (the full reasons of a batch's items travel in the dead letter's body,
see shared.batch); the retry history keeps its last entries; headers of other
publishers are carried over only while they are small.

Incoming `x-kpi-*` headers are anyone's input: a retry count that is not a
non-negative integer counts as 0 and one above the limit as the limit, so a message
can neither crash the failure path nor buy itself extra retries.
"""

from __future__ import annotations

import time
from typing import Any

import pika.data

H_REASON = "x-kpi-dead-reason"
H_RETRIES = "x-kpi-retry-count"
H_HISTORY = "x-kpi-retry-history"
H_ROUTING_KEY = "x-kpi-original-routing-key"
H_SERVICE = "x-kpi-service"
H_DEAD_AT = "x-kpi-dead-at"
H_DROPPED = "x-kpi-dropped-headers"
# Set by quorum queues: how many times the message came back to the queue (a requeue, or
# a consumer gone while holding it) before this delivery.
H_DELIVERY_COUNT = "x-delivery-count"

REASON_MAX = 1000
HISTORY_ENTRIES = 10
HISTORY_ENTRY_MAX = 300
FOREIGN_HEADERS_MAX = 16 * 1024  # encoded bytes


def bounded(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    keep = max(limit - 40, 0)
    return f"{text[:keep]}... ({len(text) - keep} more characters)"


def count_header(headers: dict[str, Any], name: str, limit: int) -> int:
    """A non-negative count from a header: anything else is 0, and it is at most `limit`."""
    raw = headers.get(name)
    if isinstance(raw, bool):
        return 0
    if isinstance(raw, (bytes, str)):
        text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
        raw = int(text) if text.isascii() and text.isdigit() and len(text) < 10 else 0
    if not isinstance(raw, int) or raw < 0:
        return 0
    return min(raw, limit)


def retries_so_far(headers: dict[str, Any], limit: int, redelivered: bool = True) -> int:
    """Times this message went through the retry queue, or was delivered before (quorum
    queues count deliveries themselves), whichever is more.

    The broker sets `x-delivery-count` on a redelivery only: on a first delivery the
    header, if any, is the publisher's (RabbitMQ 3.10 leaves a client's value in place
    until the first requeue), so it counts only when the delivery is flagged redelivered.
    """
    retries = count_header(headers, H_RETRIES, limit)
    if redelivered:
        retries = max(retries, count_header(headers, H_DELIVERY_COUNT, limit))
    return retries


def history_of(headers: dict[str, Any]) -> list[str]:
    raw = headers.get(H_HISTORY)
    if not isinstance(raw, list):
        return []
    entries = [item.decode("utf-8", "replace") if isinstance(item, bytes) else item for item in raw]
    return [bounded(entry, HISTORY_ENTRY_MAX) for entry in entries if isinstance(entry, str)][-HISTORY_ENTRIES:]


def _encoded_size(table: dict[str, Any]) -> int:
    try:
        return pika.data.encode_table([], table)
    except Exception:  # a value pika cannot encode again: too odd to carry over
        return FOREIGN_HEADERS_MAX + 1


def carried_over(headers: dict[str, Any]) -> dict[str, Any]:
    """The headers of other publishers, if they are small; ours are rebuilt, not copied."""
    foreign = {k: v for k, v in headers.items() if not k.startswith("x-kpi-") and k != H_DELIVERY_COUNT}
    if not foreign or _encoded_size(foreign) <= FOREIGN_HEADERS_MAX:
        return foreign
    return {H_DROPPED: bounded(", ".join(sorted(foreign)), 200)}


def retry_headers(headers: dict[str, Any], routing_key: str, retries: int, reason: str) -> dict[str, Any]:
    """Headers of a message sent through the retry queue for its retry number `retries + 1`.
    `routing_key`: the key the message was first published with (consumer.py decides it)."""
    history = history_of(headers) + [bounded(f"attempt {retries + 1}: {reason}", HISTORY_ENTRY_MAX)]
    return {
        **carried_over(headers),
        H_RETRIES: retries + 1,
        H_HISTORY: history[-HISTORY_ENTRIES:],
        H_ROUTING_KEY: routing_key,
    }


def dead_headers(headers: dict[str, Any], routing_key: str, service: str, reason: str,
                 retries: int, history: list[str] | None = None) -> dict[str, Any]:
    """Headers of a dead letter: the bounded reason, where and when it died."""
    dead = {
        **carried_over(headers),
        H_REASON: bounded(reason, REASON_MAX),
        H_ROUTING_KEY: routing_key,
        H_SERVICE: service,
        H_DEAD_AT: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        H_RETRIES: retries,
    }
    if history:
        dead[H_HISTORY] = history[-HISTORY_ENTRIES:]
    return dead
