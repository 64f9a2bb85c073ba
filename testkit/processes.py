"""Services (and the fake HasOffers) as real processes of their own, each writing a log file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from testkit import ROOT
from testkit.waiting import wait_for


class ServiceStartError(RuntimeError):
    """The process exited before it said it was ready."""


class ServiceProcess:
    """`python -m services.<service>` (or `module`) run from the repository root.

    Its output goes to `log_dir/<log_name>`, opened for appending, so a process started
    again after a kill keeps one log.
    """

    def __init__(self, service: str, env: dict[str, str], log_dir: Path, *, module: str | None = None,
                 args: Sequence[str] = (), log_name: str | None = None):
        self.service = service
        self.name = service
        self.module = module or f"services.{service}"
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.args = list(args)
        self.log_path = log_dir / (log_name or f"{service}-{time.monotonic_ns()}.log")
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self, wait_ready: bool = True, ready_text: str = "consuming", timeout: float = 60.0) -> ServiceProcess:
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen([sys.executable, "-m", self.module, *self.args], cwd=ROOT,
                                            env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        if wait_ready:
            wait_for(lambda: self.ready(ready_text) or not self.alive(), timeout, what=f"{self.name} to start")
            if not self.alive():
                raise ServiceStartError(f"{self.name} exited at start:\n{self.log()}")
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ready(self, text: str = "consuming") -> bool:
        return text in self.log()

    def stop_soon(self) -> None:
        """SIGTERM: the service finishes the message in hand and exits."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)

    def terminate(self, timeout: float = 15) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`; its exit code."""
        if self.process is None:
            return None
        self.stop_soon()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)

    def kill(self) -> None:
        """SIGKILL, this child by its pid: a crash."""
        if self.alive():
            self.process.kill()
            self.process.wait(10)

    def wait(self, timeout: float = 60) -> int:
        assert self.process is not None, f"{self.name} was never started"
        return self.process.wait(timeout)


def terminate_all(processes: Iterable[ServiceProcess], timeout: float = 15) -> None:
    """Stop them together: every one is told first, then each is waited for."""
    processes = list(processes)
    for process in processes:
        process.stop_soon()
    for process in processes:
        process.terminate(timeout)
