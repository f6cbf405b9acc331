"""Send the marketplace its events: one task on the relay's event loop that
POSTs what the store's `webhook_events` table holds (relay/events.py says
what an event is and how it is signed).

Mail never waits for it. The handler's only part is to name the event in
the archive row's transaction (`ArchiveEntry.webhook_event`); this task is
woken afterwards (`wake`), and also looks every `POLL_SECONDS` for retries
that came due and for events another node wrote. An event is claimed before
its POST (`store.claim_webhook_events`), so several nodes on one database
send each attempt once, and a node that dies mid-POST leaves the event due
again once its claim runs out. A POST that fails (no connection, no answer
within `[webhooks] timeout`, any status but 2xx; redirects are not
followed) is tried again with exponential backoff until the event is
`max_age_hours` old; then it is given up, logged and counted. The table is
the queue, so events survive a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from datetime import timedelta
from pathlib import Path

import aiohttp

from relay import __version__, events
from relay.archive.times import iso, parse_iso
from relay import private
from relay.config import Config, WebhooksConfig
from relay.store import StoreUnavailable

log = logging.getLogger("relay.webhooks")

POLL_SECONDS = 5.0
BATCH = 8  # events claimed, and POSTed concurrently, at once
LEASE_MARGIN_SECONDS = 30.0  # a claim outlives the POST's timeout by this much
USER_AGENT = f"relay/{__version__} webhooks"


def secret_path(config: Config) -> Path:
    return Path(config.webhooks.secret_file) if config.webhooks.secret_file else config.state_dir / "webhook.key"


def load_secret(config: Config) -> bytes:
    """The HMAC key: `[webhooks] secret_file`, or var/webhook.key made now.
    The key is the file's text without its surrounding whitespace, so the
    marketplace can be given it as it reads (the relay writes 64 hex digits)."""
    path = secret_path(config)
    if not path.exists():
        try:
            private.write(path, secrets.token_hex(32).encode("ascii") + b"\n", exclusive=True)
            log.info("webhook secret made in %s: give its text to the marketplace", path)
        except FileExistsError:
            pass  # another node on this state folder made it first: use that one
    return path.read_bytes().strip()


class WebhookSender:
    def __init__(self, store, config: WebhooksConfig, secret: bytes, metrics, clock):
        self.store = store
        self.config = config
        self.secret = secret
        self.metrics = metrics
        self.clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None
        self._claimed: set[int] = set()  # taken from the table, outcome not yet written
        self._soonest = None  # the earliest retry this sender set since it last looked

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.timeout)
        self._session = aiohttp.ClientSession(timeout=timeout, headers={"User-Agent": USER_AGENT})
        self._task = asyncio.create_task(self._run(), name="relay-webhooks")

    def wake(self) -> None:
        """An event was written: look now rather than at the next poll."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop sending; events claimed but not finished are due again now."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._claimed:
            try:
                await self.store.release_webhook_events(sorted(self._claimed), iso(self.clock()))
            except Exception as exc:  # their claims run out by themselves
                log.warning("webhook events %s not released: %s", sorted(self._claimed), exc)
            self._claimed.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            try:
                await self._send_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The store is down, say: mail goes on, events wait in the table.
                log.warning("webhook events not sent now: %s", exc, exc_info=not isinstance(exc, StoreUnavailable))
            wait = POLL_SECONDS
            if self._soonest is not None:  # a retry of ours comes due before the next poll
                wait = min(wait, max((self._soonest - self.clock()).total_seconds(), 0.0))
                self._soonest = None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()

    async def _send_due(self) -> None:
        while True:
            now = self.clock()
            lease = now + timedelta(seconds=self.config.timeout + LEASE_MARGIN_SECONDS)
            batch = await self.store.claim_webhook_events(iso(now), iso(lease), BATCH)
            self._claimed.update(event["id"] for event in batch)
            outcomes = await asyncio.gather(*(self._attempt(event) for event in batch), return_exceptions=True)
            failures = [o for o in outcomes if isinstance(o, Exception)]
            if failures:  # an outcome not written (the store failed): due again when its claim runs out
                raise failures[0]
            if len(batch) < BATCH:
                return

    async def _attempt(self, event: dict) -> None:
        payload = events.body(event["id"], event["event"], event["created_at"], event["data"])
        timestamp = int(self.clock().timestamp())
        headers = {
            "Content-Type": "application/json",
            "Relay-Event": event["event"],
            "Relay-Event-Id": str(event["id"]),
            "Relay-Timestamp": str(timestamp),
            "Relay-Signature": events.signature(self.secret, timestamp, payload),
        }
        error = ""
        try:
            async with self._session.post(self.config.url, data=payload, headers=headers,
                                          allow_redirects=False) as response:
                if not 200 <= response.status < 300:
                    error = f"HTTP {response.status} {response.reason or ''}".strip()
        except asyncio.TimeoutError:
            error = f"no answer within {self.config.timeout:g} s"
        except aiohttp.ClientError as exc:
            error = f"{type(exc).__name__}: {exc}"
        now = self.clock()
        if not error:
            self.metrics.webhooks.labels(event["event"], "sent").inc()
            log.info("webhook event=%s type=%s archive=%s sent attempts=%d", event["id"], event["event"],
                     event["archive_id"], event["attempts"])
            await self.store.finish_webhook_attempt(event["id"], sent_at=iso(now))
            self._claimed.discard(event["id"])
            return
        config = self.config
        again = events.next_attempt(now, parse_iso(event["created_at"]), event["attempts"], config.retry_seconds,
                                    config.max_retry_seconds, timedelta(hours=config.max_age_hours))
        self._count_failure(event, error, again)
        if again is not None and (self._soonest is None or again < self._soonest):
            self._soonest = again
        await self.store.finish_webhook_attempt(event["id"], error=error,
                                                next_attempt_at=None if again is None else iso(again))
        self._claimed.discard(event["id"])

    def _count_failure(self, event: dict, error: str, again) -> None:
        if again is None:
            self.metrics.webhooks.labels(event["event"], "given_up").inc()
            log.error("webhook event=%s type=%s archive=%s given up after %d attempts: %s", event["id"],
                      event["event"], event["archive_id"], event["attempts"], error)
        else:
            self.metrics.webhooks.labels(event["event"], "failed").inc()
            log.warning("webhook event=%s type=%s attempt %d failed: %s; next at %s", event["id"], event["event"],
                        event["attempts"], error, iso(again))
