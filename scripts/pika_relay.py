"""Baseline: a bare 4-hop pika relay, no database at all.

publisher -> q0 -> relay -> q1 -> relay -> q2 -> relay -> q3 -> sink, persistent
messages, publisher confirms, acks batched by `multiple=True`. Each relay is its own
process, like the services. Used by the benchmarks to express their figures as a ratio
against what the broker alone does on the same machine at the same moment.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import uuid

import pika

HOPS = 4


def _relay(amqp_url: str, source: str, target: str | None, count: int, batch: int, done: mp.Queue) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_qos(prefetch_count=batch * 2)
    seen = 0
    pending = 0
    for method, properties, body in channel.consume(source, inactivity_timeout=30):
        if method is None:
            break
        if target is not None:
            channel.basic_publish("", target, body, properties=properties)
        seen += 1
        pending += 1
        if pending >= batch or seen == count:
            channel.basic_ack(method.delivery_tag, multiple=True)
            pending = 0
        if seen == count:
            break
    done.put((source, time.monotonic(), seen))
    channel.cancel()
    connection.close()


def run_relay(amqp_url: str, messages: int, body_size: int = 200, batch: int = 100) -> dict[str, float]:
    """Push `messages` through 4 hops; return messages/s end to end."""
    prefix = f"bench.relay.{uuid.uuid4().hex[:8]}"
    queues = [f"{prefix}.q{i}" for i in range(HOPS)]
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    for queue in queues:
        channel.queue_declare(queue, durable=True)
    channel.confirm_delivery()
    context = mp.get_context("spawn")
    done = context.Queue()
    workers = [
        context.Process(target=_relay, args=(amqp_url, queues[i], queues[i + 1] if i + 1 < HOPS else None,
                                             messages, batch, done))
        for i in range(HOPS)
    ]
    for worker in workers:
        worker.start()
    time.sleep(1.0)  # let the consumers attach
    body = b"x" * body_size
    properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
    started = time.monotonic()
    for _ in range(messages):
        channel.basic_publish("", queues[0], body, properties=properties)
    finished = max(done.get(timeout=300)[1] for _ in range(HOPS))
    for worker in workers:
        worker.join(30)
    for queue in queues:
        channel.queue_delete(queue)
    connection.close()
    elapsed = finished - started
    return {"messages": messages, "seconds": elapsed, "messages_per_second": messages / elapsed}


if __name__ == "__main__":
    import sys

    url = "amqp://guest:guest@127.0.0.1:5672/%2F"
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    result = run_relay(url, n)
    print(f"bare 4-hop pika relay: {result['messages']} messages in {result['seconds']:.2f}s "
          f"= {result['messages_per_second']:.0f} msg/s")
