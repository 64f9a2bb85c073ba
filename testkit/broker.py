"""Exchanges and queues of their own on the local RabbitMQ: a consumer to run in a test,
inspection and teardown."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

from shared.rabbitmq import SERVICE_BINDINGS, Consumer, queue_names


def amqp_url(variable: str = "AMQP_URL") -> str:
    return os.environ.get(variable, "amqp://guest:guest@127.0.0.1:5672/%2F")


@contextmanager
def consuming(consumer: Consumer, stop_within: float = 30) -> Iterator[Consumer]:
    """The consumer's loop on a thread of its own for the block, stopped afterwards, and
    seen to stop within `stop_within` seconds."""
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    assert consumer.ready.wait(10), "consumer did not connect"
    try:
        yield consumer
    finally:
        consumer.stop()
        thread.join(stop_within)
        assert not thread.is_alive(), f"the consumer did not stop within {stop_within:g}s"


@contextmanager
def channel(url: str) -> Iterator[BlockingChannel]:
    """A channel on a connection of its own, closed afterwards."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        yield connection.channel()
    finally:
        if connection.is_open:
            connection.close()


def delete_topology(channel: BlockingChannel, exchange: str, also: Sequence[str] = ()) -> None:
    """Every queue the services declare on `exchange` (work, retry, dead), the queues
    named in `also`, and the exchange."""
    for service in SERVICE_BINDINGS:
        names = queue_names(exchange, service)
        for queue in (names.work, names.retry, names.dead):
            channel.queue_delete(queue)
    for queue in also:
        channel.queue_delete(queue)
    channel.exchange_delete(exchange)


def delete_topology_at(url: str, exchange: str, also: Sequence[str] = ()) -> None:
    """delete_topology on a connection of its own."""
    with channel(url) as ch:
        delete_topology(ch, exchange, also)


@contextmanager
def temporary_exchange(url: str, prefix: str) -> Iterator[str]:
    """A name `<prefix>.<random>` for an exchange of the block's own; whatever topology
    was declared on it is deleted afterwards."""
    exchange = f"{prefix}.{uuid.uuid4().hex[:10]}"
    try:
        yield exchange
    finally:
        delete_topology_at(url, exchange)


def queue_depth(channel: BlockingChannel, queue: str) -> int:
    return channel.queue_declare(queue, passive=True).method.message_count


def take_all(channel: BlockingChannel, queue: str) -> list[tuple[Any, bytes]]:
    """Every message off a queue: [(properties, body)]."""
    taken = []
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return taken
        taken.append((properties, body))
