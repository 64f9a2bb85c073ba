"""Reading and replaying a service's dead-letter queue (`kpi dead list|replay`)."""

from __future__ import annotations

from typing import Any

import json

from shared.handling import REASONS_KEY
from shared.rabbitmq import headers as h
from shared.rabbitmq.publisher import Bus
from shared.rabbitmq.topology import queue_names


def dead_letter_count(bus: Bus, service: str) -> int:
    return bus.queue_depth(queue_names(bus.exchange, service).dead)


def read_dead_letters(bus: Bus, service: str, limit: int | None = 100) -> list[dict[str, Any]]:
    """Peek at a dead queue without consuming it (messages are requeued). A quorum queue
    puts the requeued letters at its end, so repeated peeks show the queue rotated: the
    order of dead letters means nothing, replay does not depend on it."""
    assert bus.channel is not None
    names = queue_names(bus.exchange, service)
    found: list[dict[str, Any]] = []
    tags = []
    # Only what is there now: what we hand back goes to the end of the queue again.
    for _ in range(dead_letter_count(bus, service) if limit is None else min(limit, dead_letter_count(bus, service))):
        method, properties, body = bus.channel.basic_get(names.dead, auto_ack=False)
        if method is None:
            break
        tags.append(method.delivery_tag)
        headers = properties.headers if isinstance(properties.headers, dict) else {}
        found.append({
            "message_id": properties.message_id,
            "type": properties.type,
            "reason": headers.get(h.H_REASON),
            "routing_key": headers.get(h.H_ROUTING_KEY),
            "retries": headers.get(h.H_RETRIES, 0),
            "history": headers.get(h.H_HISTORY, []),
            "dead_at": headers.get(h.H_DEAD_AT),
            "body": body.decode("utf-8", errors="replace"),
        })
    for tag in tags:
        bus.channel.basic_nack(tag, requeue=True)
    return found


def replay_dead_letters(bus: Bus, service: str, limit: int | None = None) -> int:
    """Move dead letters back onto the service's work queue; returns how many moved.

    Only the letters in the queue when the replay starts: a replayed message that dies
    again lands behind them and is not replayed a second time by the same command.
    Each message is published (confirmed) before it is acked off the dead queue, so a
    crash in between duplicates it at worst (harmless: handlers are idempotent). It goes
    straight to the work queue rather than through the exchange: no header of its own
    decides where it lands.
    """
    assert bus.channel is not None
    names = queue_names(bus.exchange, service)
    todo = dead_letter_count(bus, service)
    if limit is not None:
        todo = min(todo, limit)
    moved = 0
    while moved < todo:
        method, properties, body = bus.channel.basic_get(names.dead, auto_ack=False)
        if method is None:
            break
        bus.send_to_queue(names.work, without_reasons(body), message_id=properties.message_id,
                          type=properties.type, headers={})
        bus.channel.basic_ack(method.delivery_tag)
        moved += 1
    return moved


def without_reasons(body: bytes) -> bytes:
    """The body as the service first received it: a batch dead letter's reasons removed."""
    if REASONS_KEY.encode() not in body:
        return body
    try:
        message = json.loads(body)  # json, not orjson: the items may hold NaN, kept as they came
        if not isinstance(message, dict) or REASONS_KEY not in message:
            return body
        del message[REASONS_KEY]
        return json.dumps(message).encode()
    except (ValueError, RecursionError):
        return body
