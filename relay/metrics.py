"""Operational metrics in Prometheus text format, and a health check.

`Metrics` holds the counters the handler updates (prometheus_client's
types are thread-safe) in a registry of its own, so two relays in one
process (the tests) do not share numbers. `MetricsServer` serves
``/metrics`` and ``/healthz`` from the standard library's HTTP server on a
thread of its own: scrapes never wait on the event loop, and the health
check reaches into the loop only for the two things it must test (a store
query and an upstream connection), with a time limit.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger("relay.metrics")

HEALTH_TIMEOUT = 5.0


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.messages = Counter(
            "relay_messages", "Messages after DATA, by direction and verdict",
            ["direction", "verdict"], registry=self.registry)
        self.rejections = Counter(
            "relay_rejections", "Refusals by SMTP stage and reply code",
            ["stage", "code", "enhanced"], registry=self.registry)
        self.upstream_seconds = Histogram(
            "relay_upstream_seconds", "Time the upstream took to accept or refuse a message",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)
        self.open_connections = Gauge(
            "relay_open_connections", "SMTP connections open now", ["listener"], registry=self.registry)
        self.in_flight = Gauge(
            "relay_messages_in_flight", "Messages between DATA and the reply", registry=self.registry)
        self.archive_rows = Gauge(
            "relay_archive_rows", "Rows in the archive (highest archive id)", registry=self.registry)
        self.archive_bytes = Gauge(
            "relay_archive_bytes", "Size of the database files on disk", registry=self.registry)

    def refused(self, stage: str, reply) -> None:
        if reply.code >= 400:
            self.rejections.labels(stage, str(reply.code), reply.enhanced).inc()


class MetricsServer:
    """HTTP on `endpoint`: /metrics and /healthz. `server` is the RelayServer."""

    def __init__(self, endpoint, server, loop: asyncio.AbstractEventLoop):
        self.relay = server
        self.loop = loop
        handler = self._handler_class()
        self.httpd = ThreadingHTTPServer((endpoint.host, endpoint.port), handler)
        self.httpd.daemon_threads = True
        self.address = self.httpd.server_address[:2]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)

    def _refresh_archive_gauges(self) -> None:
        metrics = self.relay.metrics
        size = asyncio.run_coroutine_threadsafe(self.relay.store.database_bytes(), self.loop)
        metrics.archive_bytes.set(size.result(HEALTH_TIMEOUT))
        future = asyncio.run_coroutine_threadsafe(self.relay.store.archive_size(), self.loop)
        metrics.archive_rows.set(future.result(HEALTH_TIMEOUT))

    def _health(self) -> tuple[bool, list[str]]:
        problems = []
        for name, check in (("store", self.relay.store.ping), ("upstream", self.relay.upstream.ping)):
            try:
                asyncio.run_coroutine_threadsafe(check(), self.loop).result(HEALTH_TIMEOUT)
            except Exception as exc:  # any failure is what the check reports
                problems.append(f"{name}: {type(exc).__name__}: {exc}")
        return not problems, problems

    def _handler_class(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "relay-metrics"

            def do_GET(self):  # noqa: N802 — the stdlib's name
                if self.path == "/metrics":
                    try:
                        outer._refresh_archive_gauges()
                    except Exception as exc:
                        log.warning("archive gauges not refreshed: %s", exc)
                    self._reply(200, generate_latest(outer.relay.metrics.registry), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    ok, problems = outer._health()
                    body = ("ok\n" if ok else "\n".join(problems) + "\n").encode()
                    self._reply(200 if ok else 503, body, "text/plain; charset=utf-8")
                else:
                    self._reply(404, b"not found\n", "text/plain; charset=utf-8")

            def _reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args):  # scrapes are not news
                log.debug("metrics %s", format % args)

        return Handler
