"""Operational metrics in Prometheus text format, and a health check.

`Metrics` holds the counters the handler updates (messages, refusals,
delivery reports, failed logins, store errors; prometheus_client's types
are thread-safe) in a registry of its own, so two relays in one
process (the tests) do not share numbers. `MetricsServer` serves
``/metrics`` and ``/healthz`` from the standard library's HTTP server on a
thread of its own: scrapes never wait on the event loop.

``/healthz`` answers ``200 ok``, or ``503`` with one line per problem
("name: reason"): the worker pool cannot start workers (`WorkerPool.problem`),
the store does not answer a query within `PROBE_TIMEOUT` (`store.ping`), the
upstream does not answer a connection (`upstream.ping`), or the upstream has
failed every delivery for a while (`DeliveryRecord.problem`). The two probes
reach into the event loop; each result is kept for `PROBE_CACHE_SECONDS`, so
a load balancer polling every second costs a query and a connection every
few seconds, not one each.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from relay.config import WEBHOOK_EVENTS

log = logging.getLogger("relay.metrics")

HEALTH_TIMEOUT = 5.0  # the archive gauges' queries
PROBE_TIMEOUT = 2.0  # a store or upstream probe of /healthz
PROBE_CACHE_SECONDS = 5.0
BOUNCE_OUTCOMES = ("notified", "recorded", "unknown")
LOGIN_FAILURES = ("credentials", "malformed", "blocked")
STORE_ERROR_KINDS = ("state", "value")
WEBHOOK_OUTCOMES = ("sent", "failed", "given_up")


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.messages = Counter(
            "relay_messages", "Messages after DATA, by direction and verdict",
            ["direction", "verdict"], registry=self.registry)
        self.api_calls = Counter(
            "relay_api_calls", "HTTP API calls, by route name and status",
            ["route", "status"], registry=self.registry)
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
        self.bounces = Counter(
            "relay_bounces", "Delivery reports received at a VERP address, by outcome: notified (the sender "
            "was sent a notice), recorded (recorded only), unknown (refused: not an address of ours, "
            "expired, or for no archived message)", ["outcome"], registry=self.registry)
        self.failed_logins = Counter(
            "relay_failed_logins", "Failed AUTH attempts on the submission listeners, by reason: credentials "
            "(wrong account or password), malformed (bad AUTH data), blocked (the client address is "
            "throttled: 421)", ["reason"], registry=self.registry)
        self.webhooks = Counter(
            "relay_webhook_attempts", "Webhook POSTs, by event type and outcome: sent (2xx), failed (tried "
            "again later), given_up (the event's last attempt failed)", ["event", "outcome"], registry=self.registry)
        self.store_errors = Counter(
            "relay_store_errors", "Store failures the handler answered for, by kind: state (the database is "
            "locked, full or unreachable: 451) or value (it refused a value of a message: 554)",
            ["kind"], registry=self.registry)
        # Every label value from the start: a rate over a series that
        # appears only with its first failure misses that failure.
        for outcome in BOUNCE_OUTCOMES:
            self.bounces.labels(outcome)
        for reason in LOGIN_FAILURES:
            self.failed_logins.labels(reason)
        for kind in STORE_ERROR_KINDS:
            self.store_errors.labels(kind)
        for event in WEBHOOK_EVENTS:
            for outcome in WEBHOOK_OUTCOMES:
                self.webhooks.labels(event, outcome)

    def api_call(self, route: str, status: int) -> None:
        self.api_calls.labels(route, str(status)).inc()

    def refused(self, stage: str, reply) -> None:
        if reply.code >= 400:
            self.rejections.labels(stage, str(reply.code), reply.enhanced).inc()

    def store_error(self, error: BaseException) -> None:
        """Count `error` if it is one of the store's two failure classes."""
        from relay.store import StoreDataError, StoreUnavailable

        if isinstance(error, StoreDataError):
            self.store_errors.labels("value").inc()
        elif isinstance(error, StoreUnavailable):
            self.store_errors.labels("state").inc()


class MetricsServer:
    """HTTP on `endpoint`: /metrics and /healthz. `server` is the RelayServer."""

    def __init__(self, endpoint, server, loop: asyncio.AbstractEventLoop):
        self.relay = server
        self.loop = loop
        self._probes: dict[str, tuple[float, str | None]] = {}
        self._probe_lock = threading.Lock()
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

    def _probe(self, name: str, check) -> str | None:
        """`check()` on the loop within PROBE_TIMEOUT, its result cached for
        PROBE_CACHE_SECONDS: None, or what went wrong."""
        with self._probe_lock:
            cached = self._probes.get(name)
        now = time.monotonic()
        if cached is not None and now - cached[0] < PROBE_CACHE_SECONDS:
            return cached[1]
        try:
            asyncio.run_coroutine_threadsafe(asyncio.wait_for(check(), PROBE_TIMEOUT),
                                             self.loop).result(PROBE_TIMEOUT + 1)
            problem = None
        except (asyncio.TimeoutError, TimeoutError):
            problem = f"no answer within {PROBE_TIMEOUT:g} s"
        except Exception as exc:  # any failure is what the check reports
            problem = f"{type(exc).__name__}: {exc}"
        with self._probe_lock:
            self._probes[name] = (time.monotonic(), problem)
        return problem

    def _health(self) -> tuple[bool, list[str]]:
        relay = self.relay
        problems = []
        if relay.workers is not None and (problem := relay.workers.problem):
            problems.append(f"workers: {problem}")
        if problem := self._probe("store", relay.store.ping):
            problems.append(f"store: {problem}")
        if problem := self._probe("upstream", relay.upstream.ping):
            problems.append(f"upstream: {problem}")
        elif problem := relay.upstream.record.problem():
            problems.append(f"upstream: {problem}")
        # One line per problem: no reason may carry a line break of its own.
        return not problems, [" ".join(line.split()) for line in problems]

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
