"""A consumer whose handler never finishes: the process is killed holding an unacked message."""

import sys
import time

from shared.rabbitmq import Consumer
from tests.support import AMQP_URL


def handle(envelope, delivery):
    print(f"holding {envelope.event_id}", flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    consumer = Consumer(amqp_url=AMQP_URL, exchange=sys.argv[1], service="trigger_checker", handler=handle)
    print("consuming", flush=True)
    consumer.run()
