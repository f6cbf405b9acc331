"""Listeners and lifecycle: open the store, listen, stop cleanly.

`RelayServer` owns the event-loop side of a running relay: it migrates and
opens the store, builds the upstream, starts the inbound listener (aiosmtpd
on our own loop, `ident` set, no AUTH), and on `stop()` closes the listening
sockets, lets every message already in DATA finish (forwarded and archived),
then closes the remaining connections and the store. `relay serve` runs it
until SIGTERM/SIGINT; tests run it in a thread on port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
import signal
import threading
import warnings
import weakref
from pathlib import Path

from aiosmtpd.smtp import SMTP

from relay import __version__, archive, bounces, dkim, mailauth, preflight, tls
from relay import dns as relay_dns
from relay.auth import Throttle
from relay.config import Config, Endpoint
from relay.forward import MaildirUpstream, WatchedUpstream, make_upstream
from relay.handler import RelayHandler, utc_clock
from relay.lock import DatabaseLock
from relay.protocol import ConnectionLimiter, InboundSMTP, RelaySMTP
from relay.metrics import Metrics, MetricsServer
from relay.store import iso, open_store
from relay.store.url import is_postgres, redact
from relay.workers import WorkerPool

log = logging.getLogger("relay.server")

IDENT = f"relay {__version__}"
DRAIN_SECONDS = 60.0
PURGE_INTERVAL = 24 * 3600.0
WEBHOOK_EVENTS_KEPT = timedelta(days=30)  # finished (sent or given up) events, then deleted


class RelayServer:
    def __init__(self, config: Config, clock=utc_clock):
        self.config = config
        self.clock = clock
        self.store = None
        self.handlers: list[RelayHandler] = []
        self._servers: list[asyncio.base_events.Server] = []
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()
        self.inbound_address: tuple[str, int] | None = None
        self.submission_address: tuple[str, int] | None = None
        self.submission_tls_address: tuple[str, int] | None = None
        self.metrics = Metrics()
        self.metrics_server: MetricsServer | None = None
        self.metrics_address: tuple[str, int] | None = None
        self.api_server = None
        self.api_address: tuple[str, int] | None = None
        self.upstream = None
        self._purger: asyncio.Task | None = None
        self.webhooks = None  # relay.webhooks.WebhookSender, with [webhooks] url set
        self.workers: WorkerPool | None = None
        self._lock: DatabaseLock | None = None
        self._tls_context = None
        # One count of open connections for all listeners; postfix in front
        # and PROXY load balancers carry everyone's mail, so no per-IP limit.
        self.limiter = ConnectionLimiter(config.limits,
                                         exempt=config.inbound.xforward_hosts + config.limits.proxy_hosts)

    @property
    def handler(self) -> RelayHandler | None:
        """The inbound listener's handler."""
        return self.handlers[0] if self.handlers else None

    async def start(self) -> None:
        """Check every configured file (preflight.FileProblems), take the
        database's serve lock (lock.Locked), then open the store and the
        workers, load the keys and the TLS context, and only then listen."""
        config = self.config
        for warning in await asyncio.to_thread(preflight.require, config):
            log.warning("%s", warning)
        if not is_postgres(config.database):
            self._lock = DatabaseLock(config.database).acquire(exclusive=False)
        try:
            self.store = await open_store(config.database)
            applied = await self.store.upgrade()
            if applied:
                log.info("database %s migrated to version %s", redact(config.database), applied[-1])
            self.resolver = None
            if config.upstream.url.scheme == "mx" or config.auth.inbound != "off":
                # Every DNS lookup of the relay (libraries' too) goes through it.
                self.resolver = relay_dns.make_resolver(config.dns.nameservers)
                relay_dns.install(self.resolver)
            if config.auth.inbound != "off":
                await asyncio.to_thread(mailauth.warm_up)
            else:  # whatever the upstream: an MX upstream needs the resolver, not the checks
                log.warning("INBOUND MAIL AUTHENTICATION IS OFF: forged senders are not refused. "
                            "Set [auth] inbound = \"dmarc\" for real mail.")
            backend = make_upstream(config.upstream, config.greeting_hostname, self.resolver)
            if isinstance(backend, MaildirUpstream):
                log.warning(
                    "UPSTREAM IS %s: delivered mail is written to files there, not sent to anyone. "
                    "Set [upstream] url to your smarthost for real delivery.", backend)
            # Every delivery's outcome is recorded there, for /healthz.
            upstream = self.upstream = WatchedUpstream(backend, self.clock)
            self.workers = WorkerPool(config.workers.processes, config.workers.time_limit,
                                      config.workers.memory_limit_mb, config.inbound.processing_timeout,
                                      max_idle=config.workers.max_idle)
            await self.workers.start()
            self.dkim_key = await asyncio.to_thread(dkim.load_key, config)
            self.bounce_secret = await asyncio.to_thread(bounces.load_secret, config)
            # Made (a self-signed pair) and loaded before any listener opens.
            self._tls_context = await asyncio.to_thread(self._submission_context)
            if config.webhooks.url:
                # Imported only when on, like the API: aiohttp's client.
                from relay import webhooks

                secret = await asyncio.to_thread(webhooks.load_secret, config)
                self.webhooks = webhooks.WebhookSender(self.store, config.webhooks, secret, self.metrics, self.clock)
                await self.webhooks.start()
                log.info("webhooks: %s to %s", ", ".join(config.webhooks.events), redact(config.webhooks.url))
            inbound = RelayHandler(config, self.store, upstream, clock=self.clock, metrics=self.metrics,
                                   dkim_key=self.dkim_key, bounce_secret=self.bounce_secret,
                                   resolver=self.resolver, workers=self.workers, webhook_wake=self._webhook_wake())
            self.handlers.append(inbound)
            server = await self._listen(config.inbound.listen, inbound, self._inbound_session, "inbound")
            self.inbound_address = server.sockets[0].getsockname()[:2]
            log.info("inbound listener on %s:%s, upstream %s, domain %s",
                     *self.inbound_address, upstream, config.domain)
            await self._start_submission(upstream)
            self._purger = asyncio.create_task(self._purge_daily(), name="relay-purge")
            if config.metrics.listen is not None:
                self.metrics_server = MetricsServer(config.metrics.listen, self, asyncio.get_running_loop())
                self.metrics_server.start()
                self.metrics_address = self.metrics_server.address
                log.info("metrics on http://%s:%s/metrics", *self.metrics_address)
            if config.api.listen is not None:
                # Imported only when on: aiohttp is memory the relay does not
                # spend unless the API is asked for.
                from relay.api import Api, ApiServer, token_sha256
                from relay.console import Console

                sub = config.submission
                console = Console(self.store, Throttle(sub.failure_delay, sub.max_failure_delay, sub.max_failures,
                                                       sub.failure_window), token_sha256)
                self.api_server = ApiServer(Api(self.store, config.domain, self.metrics, console), config.api.listen)
                await self.api_server.start()
                self.api_address = self.api_server.address
                log.info("HTTP API on http://%s:%s/api/v1/ (docs: /api/openapi.json), dispute console on /console/",
                         *self.api_address)
        except BaseException:
            await self.stop(drain_seconds=0)
            raise

    def _webhook_wake(self):
        """What a handler calls once it wrote an event: the sender's wake, if it runs."""
        return self.webhooks.wake if self.webhooks is not None else None

    async def _purge_daily(self) -> None:
        """Archive retention: purge once at start-up, then once a day. A
        failure is logged and tried again the next day; it never stops the
        relay."""
        while True:
            try:
                counts = await self.store.purge(
                    archive.retention_cutoff(self.clock(), self.config.archive.retention_days))
                if counts.rows:
                    log.info("retention: %s", archive.purge_summary(counts))
                # The daily cap looks back one window; keep two, drop the rest.
                window = timedelta(hours=2 * self.config.policy.daily_window_hours)
                await self.store.prune_seller_sends(iso(self.clock() - window))
                # Finished events are the marketplace's now; kept a while for an operator's look.
                await self.store.prune_webhook_events(iso(self.clock() - WEBHOOK_EVENTS_KEPT))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("retention purge failed; trying again in a day")
            await asyncio.sleep(PURGE_INTERVAL)

    def _submission_context(self):
        sub = self.config.submission
        if sub.listen is None and sub.listen_tls is None:
            return None
        cert, key = sub.tls_cert, sub.tls_key
        if not cert:
            cert, key = tls.self_signed_pair(Path(self.config.database).parent / "tls",
                                             self.config.greeting_hostname)
        return tls.server_context(cert, key)

    async def _start_submission(self, upstream) -> None:
        sub = self.config.submission
        context = self._tls_context
        if context is None:
            return
        throttle = Throttle(sub.failure_delay, sub.max_failure_delay, sub.max_failures, sub.failure_window)
        handler = RelayHandler(self.config, self.store, upstream, protocol="ESMTPSA", submission=True,
                               throttle=throttle, clock=self.clock, metrics=self.metrics,
                               dkim_key=self.dkim_key, bounce_secret=self.bounce_secret,
                               workers=self.workers, webhook_wake=self._webhook_wake())
        self.handlers.append(handler)
        if sub.listen is not None:
            server = await self._listen(sub.listen, handler, lambda h: self._submission_session(h, context),
                                        "submission")
            self.submission_address = server.sockets[0].getsockname()[:2]
            log.info("submission listener (STARTTLS) on %s:%s", *self.submission_address)
        if sub.listen_tls is not None:
            server = await self._listen(sub.listen_tls, handler, self._submission_tls_session, "submission_tls",
                                        ssl=context)
            self.submission_tls_address = server.sockets[0].getsockname()[:2]
            log.info("submission listener (implicit TLS) on %s:%s", *self.submission_tls_address)

    def _common(self) -> dict:
        return dict(hostname=self.config.greeting_hostname, ident=IDENT,
                    data_size_limit=self.config.size_limit, enable_SMTPUTF8=True, decode_data=False,
                    limits=self.config.limits, limiter=self.limiter, proxy_hosts=self.config.limits.proxy_hosts,
                    bare_newline=self.config.inbound.bare_newline)

    def _inbound_session(self, handler: RelayHandler) -> SMTP:
        # The inbound side takes mail for aliases only; no AUTH here.
        return InboundSMTP(handler, xforward_hosts=self.config.inbound.xforward_hosts,
                           auth_exclude_mechanism=["LOGIN", "PLAIN"], **self._common())

    def _submission_session(self, handler: RelayHandler, context) -> SMTP:
        # RFC 8314 / 6409: STARTTLS before anything else, AUTH before MAIL.
        return RelaySMTP(handler, tls_context=context, require_starttls=True, auth_required=True,
                         auth_require_tls=True, **self._common())

    def _submission_tls_session(self, handler: RelayHandler) -> SMTP:
        # The socket is TLS from the first byte; aiosmtpd only knows of
        # STARTTLS, so it must be told AUTH is safe here (and warns so).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return RelaySMTP(handler, auth_required=True, auth_require_tls=False, **self._common())

    async def _listen(self, endpoint: Endpoint, handler: RelayHandler, make_session, listener: str, ssl=None):
        loop = asyncio.get_running_loop()
        gauge = self.metrics.open_connections.labels(listener)

        def session_factory() -> SMTP:
            session = make_session(handler)
            self._sessions.add(session)
            # Counted from the protocol's own start and end; aiosmtpd has no
            # hook for either, so wrap the two methods of this instance.
            # STARTTLS calls connection_made a second time: count once.
            made, lost = session.connection_made, session.connection_lost
            counted = []

            def connection_made(transport):
                if not counted:
                    counted.append(True)
                    gauge.inc()
                made(transport)

            def connection_lost(exc):
                if counted:
                    counted.clear()
                    gauge.dec()
                lost(exc)

            session.connection_made, session.connection_lost = connection_made, connection_lost
            return session

        server = await loop.create_server(session_factory, host=endpoint.host, port=endpoint.port, ssl=ssl)
        self._servers.append(server)
        return server

    async def stop(self, drain_seconds: float = DRAIN_SECONDS) -> None:
        """Stop accepting, finish the messages in flight, close everything."""
        for server in self._servers:
            server.close()
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
            self._purger = None
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.stop)
            self.metrics_server = None
        if self.api_server is not None:
            await self.api_server.stop()
            self.api_server = None
        in_flight = sum(handler.in_flight for handler in self.handlers)
        if in_flight:
            log.info("draining %d message(s) in flight", in_flight)
        drained = await asyncio.gather(*(handler.drain(drain_seconds) for handler in self.handlers))
        if not all(drained):
            log.error("gave up waiting for messages in flight after %.0f s", drain_seconds)
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()
        if self.webhooks is not None:
            await self.webhooks.stop()
            self.webhooks = None
        if self.upstream is not None:
            await self.upstream.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self.workers is not None:
            await self.workers.close()
            self.workers = None
        if self.store is not None:
            await self.store.close()
            self.store = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then drain and return."""
    server = RelayServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await server.stop()
    log.info("stopped")


class ThreadedRelay:
    """A RelayServer on its own event loop in a thread, for blocking clients
    such as smtplib in tests and benchmarks (like aiosmtpd's Controller)."""

    def __init__(self, config: Config, clock=utc_clock):
        self.server = RelayServer(config, clock=clock)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="relay", daemon=True)

    def start(self) -> tuple[str, int]:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout=30)
        return self.server.inbound_address

    def call(self, coro, timeout: float = 30):
        """Run `coro` on the relay's loop (e.g. a store query) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=timeout)

    def stop(self, drain_seconds: float = DRAIN_SECONDS) -> None:
        try:
            self.call(self.server.stop(drain_seconds), timeout=drain_seconds + 30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()
