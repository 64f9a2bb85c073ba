"""Helpers for tests that run the real services against the real broker and database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pika

from shared.rabbitmq import SERVICE_BINDINGS, queue_names

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 15.0, interval: float = 0.05, what: str = "condition") -> T:
    """Poll until condition() is truthy; fail with `what` after the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {result!r})")
        time.sleep(interval)


def delete_topology(exchange: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    for service in SERVICE_BINDINGS:
        names = queue_names(exchange, service)
        for queue in (names.work, names.retry, names.dead):
            channel.queue_delete(queue)
    channel.exchange_delete(exchange)
    connection.close()


def queue_depth(queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def drain(queue: str) -> list[tuple[Any, bytes]]:
    """Take every message off a queue: [(properties, body)]."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    taken = []
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        taken.append((properties, body))
    connection.close()
    return taken


class ServiceProcess:
    """`python -m services.<name>` as a real process, its log in a file."""

    def __init__(self, service: str, env: dict[str, str], log_dir: Path, module: str | None = None,
                 args: list[str] | None = None):
        self.service = service
        self.module = module or f"services.{service}"
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.args = args or []
        self.log_path = log_dir / f"{service}-{time.monotonic_ns()}.log"
        self.process: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True, ready_text: str = "consuming") -> ServiceProcess:
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args], cwd=ROOT, env=self.env,
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        if wait_ready:
            wait_for(lambda: ready_text in self.log() or self.process.poll() is not None, 20,
                     what=f"{self.service} to start")
            assert self.process.poll() is None, f"{self.service} exited at start:\n{self.log()}"
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 15) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()

    def wait(self, timeout: float = 60) -> int:
        assert self.process is not None
        return self.process.wait(timeout)
