"""Prometheus metrics and a health endpoint for one service process."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ServiceMetrics:
    def __init__(self, service: str):
        self.service = service
        self.registry = CollectorRegistry()
        self.handled = Counter("kpi_messages_handled_total", "Messages handled (acked)", ["service", "outcome"],
                               registry=self.registry)
        self.failed = Counter("kpi_messages_failed_total", "Messages whose handling raised", ["service"],
                              registry=self.registry)
        self.dead_lettered = Counter("kpi_messages_dead_lettered_total", "Messages or items sent to the dead queue",
                                     ["service"], registry=self.registry)
        self.retries = Counter("kpi_message_retries_total", "Messages sent to the retry queue", ["service"],
                               registry=self.registry)
        self.latency = Histogram(
            "kpi_handler_seconds", "Time from delivery to ack", ["service"], registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        # What says a service has stalled (for the metric_loader: a load is late) when
        # nothing fails: time() minus this grows past the expected interval.
        self.last_handled = Gauge("kpi_last_handled_timestamp_seconds",
                                  "Unix time of the last message handled (fully or partly)", ["service"],
                                  registry=self.registry)

    def record(self, service: str, outcome: str, seconds: float) -> None:
        self.handled.labels(service, outcome).inc()
        self.latency.labels(service).observe(seconds)
        if outcome in ("handled", "handled_partly"):
            self.last_handled.labels(service).set_to_current_time()
        if outcome in ("dead_lettered", "handled_partly"):
            self.dead_lettered.labels(service).inc()
        elif outcome == "retried":
            self.retries.labels(service).inc()
            self.failed.labels(service).inc()


def serve(metrics: ServiceMetrics, port: int, healthy: Callable[[], bool], host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve /metrics and /health on a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.startswith("/metrics"):
                body, status, ctype = generate_latest(metrics.registry), 200, CONTENT_TYPE_LATEST
            elif self.path.startswith("/health"):
                ok = healthy()
                body, status, ctype = (b"ok\n" if ok else b"not ready\n"), (200 if ok else 503), "text/plain"
            else:
                body, status, ctype = b"not found\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # scrapes are not worth a log line
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
