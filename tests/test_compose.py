"""docker-compose.yml runs the whole loop with no manual step: the schedule is on, reference
first, and the services declare quorum queues."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from services.metric_loader.schedule import Schedule
from shared.vocabulary import METRIC_KEYS, REFERENCE
from tests.support import ROOT


def test_the_compose_file_turns_the_schedule_on():
    if shutil.which("docker-compose") is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is not installed (.ci/run installs it)")
        pytest.skip("docker-compose is not installed: apt-get install docker-compose")
    result = subprocess.run(["python3", "scripts/check_compose.py"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


class RecordingBus:
    def __init__(self, sent: list):
        self.sent, self.connection = sent, None

    def connect(self) -> "RecordingBus":
        return self

    def publish(self, event, mandatory: bool = True) -> None:
        self.sent.append(event.data["metric_key"])

    def close(self) -> None:
        pass


def test_the_schedule_requests_the_reference_before_the_metrics_on_start_up(db):
    """One metric_loader handles its queue in order, so on a new database the first metric
    loads find the offers the reference load just stored."""
    sent: list = []
    schedule = Schedule(db, lambda: RecordingBus(sent), metrics_seconds=900, reference_seconds=3600,
                        lookback_hours=24, clock=time.time)
    schedule.tick()
    assert sent == [REFERENCE, *METRIC_KEYS]
