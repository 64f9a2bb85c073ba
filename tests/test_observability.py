import time

from prometheus_client import generate_latest

from shared.observability import ServiceMetrics


def _last_handled(metrics: ServiceMetrics) -> float | None:
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith('kpi_last_handled_timestamp_seconds{service="metric_loader"}'):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_the_last_handled_time_moves_only_when_a_message_is_handled():
    metrics = ServiceMetrics("metric_loader")
    metrics.record("metric_loader", "retried", 0.1)
    metrics.record("metric_loader", "dead_lettered", 0.1)
    assert _last_handled(metrics) is None
    before = time.time()
    metrics.record("metric_loader", "handled", 0.1)
    first = _last_handled(metrics)
    assert first is not None and before - 1 <= first <= time.time() + 1
    metrics.record("metric_loader", "retried", 0.1)
    assert _last_handled(metrics) == first
