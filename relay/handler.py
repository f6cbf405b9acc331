"""The aiosmtpd handler: the protocol edge of the relay.

This is the only module that turns a `Reply` into a reply line, and the only
one that knows aiosmtpd's hook names. RCPT decides who may write to which
alias; DATA runs the pipeline in a worker thread with a time limit, forwards
to the upstream, archives, and only then answers. The client hears `250`
only after the upstream said `250` and the archive row is committed;
anything transient (store, upstream, timeout, an unexpected exception) is a
`451`, so the client keeps the message and retries.

A message being delivered is shielded from cancellation: aiosmtpd cancels
the hook when the client hangs up, and a message the upstream has taken
must still be archived. `drain()` waits for those on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from relay import addresses, pipeline, replies
from relay.config import Config
from relay.forward import DeliveryError, Upstream
from relay.pipeline.changes import ChangeLog
from relay.replies import Reply, SmtpError
from relay.store import ArchiveEntry, Party, Relationship, StoreUnavailable, utc_now

log = logging.getLogger("relay.handler")

BUYER_TO_SELLER = "buyer_to_seller"
SELLER_TO_BUYER = "seller_to_buyer"


@dataclass(frozen=True)
class Route:
    """Where one transaction's mail goes, decided at the first RCPT."""

    relationship: Relationship
    direction: str
    sender: Party
    recipient: Party
    sender_alias: str
    recipient_alias: str


def route_for(relationship: Relationship, alias: str) -> Route:
    """The route for mail written to `alias` of `relationship`."""
    if alias == relationship.seller_alias:
        return Route(relationship, BUYER_TO_SELLER, relationship.buyer, relationship.seller,
                     relationship.buyer_alias, relationship.seller_alias)
    return Route(relationship, SELLER_TO_BUYER, relationship.seller, relationship.buyer,
                 relationship.seller_alias, relationship.buyer_alias)


class RelayHandler:
    def __init__(self, config: Config, store, upstream: Upstream, protocol: str = "ESMTP"):
        self.config = config
        self.store = store
        self.upstream = upstream
        self.protocol = protocol
        self._in_flight: set[asyncio.Task] = set()
        self.closing = False

    # --- aiosmtpd hooks -------------------------------------------------------

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.closing:
            return replies.SHUTTING_DOWN.line()
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return replies.SENDER_OK.line()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        try:
            reply = await self._recipient(envelope, address)
        except StoreUnavailable as exc:
            log.warning("rcpt lookup failed: %s", exc)
            reply = replies.LOOKUP_FAILED
        except Exception:
            log.exception("unexpected error in RCPT")
            reply = replies.INTERNAL_ERROR
        return reply.line()

    async def handle_DATA(self, server, session, envelope):
        task = asyncio.ensure_future(self._message(session, envelope))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        reply = await asyncio.shield(task)
        return reply.line()

    async def handle_exception(self, error):
        # aiosmtpd's default would answer "500 Error: (ExcName) text", which
        # is both wrong (not our client's fault) and a leak of internals.
        log.error("unexpected error in the SMTP session", exc_info=error)
        return replies.INTERNAL_ERROR.line()

    # --- RCPT -----------------------------------------------------------------

    async def _recipient(self, envelope, address: str) -> Reply:
        alias = addresses.normalize(address)
        local, domain = addresses.split(alias)
        if domain != self.config.domain:
            return replies.NOT_OUR_DOMAIN
        if not addresses.is_alias_token(local):
            return replies.UNKNOWN_ALIAS
        relationship = await self.store.relationship_by_alias(alias)
        if relationship is None:
            return replies.UNKNOWN_ALIAS
        route = route_for(relationship, alias)
        if addresses.normalize(envelope.mail_from or "") != route.sender.address:
            # Say nothing about who the counterpart is.
            return replies.NOT_COUNTERPART
        current: Route | None = getattr(envelope, "relay_route", None)
        if current is not None:
            if current.relationship.id != relationship.id or current.direction != route.direction:
                return replies.OTHER_RELATIONSHIP
            return replies.RECIPIENT_DUPLICATE
        envelope.relay_route = route
        envelope.rcpt_tos.append(address)
        return replies.RECIPIENT_OK

    # --- DATA -----------------------------------------------------------------

    async def _message(self, session, envelope) -> Reply:
        started = time.monotonic()
        route: Route = envelope.relay_route
        raw: bytes = envelope.original_content
        transaction_id = secrets.token_hex(6)
        changes = ChangeLog()
        delivered: bytes | None = None
        original_id = None
        relay_id = addresses.new_message_id(self.config.domain)
        try:
            reply, verdict, delivered, original_id = await self._process_and_forward(
                route, raw, relay_id, transaction_id, changes)
        except Exception:
            log.exception("unexpected error handling message %s", transaction_id)
            reply, verdict = replies.INTERNAL_ERROR, "deferred"
            delivered = None

        entry = ArchiveEntry(
            received_at=utc_now(),
            relationship_id=route.relationship.id,
            direction=route.direction,
            client_address=str(session.peer[0]) if session.peer else "",
            mail_from=envelope.mail_from or "",
            rcpt_to=tuple(envelope.rcpt_tos),
            verdict=verdict,
            reply=reply.line(),
            changes=tuple(changes),
            raw=raw,
            delivered=delivered if verdict == "delivered" else None,
            sender_id=route.sender.id,
            original_message_id=original_id,
            relay_message_id=relay_id,
        )
        archive_id = None
        try:
            archive_id = await self.store.record(entry)
        except Exception as exc:
            log.error("archive failed for message %s: %s", transaction_id, exc,
                      exc_info=not isinstance(exc, StoreUnavailable))
            if verdict == "delivered":
                # The upstream has it but the archive does not: ask the client
                # to retry, accepting a duplicate over an unarchived message.
                log.error("message %s was delivered but not archived; the client will retry",
                          transaction_id)
                reply = replies.ARCHIVE_FAILED
        if reply is replies.DELIVERED and archive_id is not None:
            reply = reply.with_text(f"{reply.text} (archive {archive_id})")
        log.info(
            "message archive=%s relationship=%s direction=%s verdict=%s bytes=%d ms=%.1f policy=%s reply=%r",
            archive_id, route.relationship.id, route.direction, verdict, len(raw),
            (time.monotonic() - started) * 1000, changes.policy_summary().replace(" ", ""), reply.line(),
        )
        return reply

    async def _process_and_forward(self, route: Route, raw: bytes, relay_id: str,
                                   transaction_id: str, changes: list[str]):
        """Returns (reply, verdict, delivered bytes, original Message-ID)."""
        timeout = self.config.inbound.processing_timeout
        try:
            message = await asyncio.wait_for(asyncio.to_thread(pipeline.parse, raw), timeout)
            rows = await self.store.message_id_rows(route.relationship.id, pipeline.referenced_ids(message))
            context = pipeline.Context(
                domain=self.config.domain,
                hostname=self.config.greeting_hostname,
                direction=route.direction,
                sender=route.sender,
                recipient=route.recipient,
                sender_alias=route.sender_alias,
                recipient_alias=route.recipient_alias,
                relay_message_id=relay_id,
                received_at=datetime.now(timezone.utc),
                transaction_id=transaction_id,
                thread_rows=tuple(rows),
                protocol=self.protocol,
                policy=self.config.policy,
            )
            result = await asyncio.wait_for(
                asyncio.to_thread(pipeline.process, message, context, changes), timeout)
        except SmtpError as exc:
            return exc.reply, "rejected" if exc.reply.permanent else "deferred", None, None
        except StoreUnavailable as exc:
            log.warning("lookup failed for message %s: %s", transaction_id, exc)
            return replies.LOOKUP_FAILED, "deferred", None, None
        except asyncio.TimeoutError:
            changes.append(f"processing exceeded {timeout:g} s")
            return replies.PROCESSING_TIMEOUT, "deferred", None, None

        try:
            detail = await self.upstream.deliver(route.sender_alias, route.recipient.address, result.delivered)
        except DeliveryError as exc:
            log.warning("delivery of message %s failed: %s", transaction_id, exc.detail)
            changes.append(f"upstream: {exc.detail}")
            verdict = "deferred" if exc.reply.transient else "failed"
            return exc.reply, verdict, result.delivered, result.original_message_id
        log.debug("message %s delivered: %s", transaction_id, detail)
        return replies.DELIVERED, "delivered", result.delivered, result.original_message_id

    # --- shutdown -------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def drain(self, timeout: float) -> bool:
        """Wait until every message being handled is finished; False on timeout."""
        self.closing = True
        deadline = asyncio.get_running_loop().time() + timeout
        while self._in_flight:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            await asyncio.wait(set(self._in_flight), timeout=remaining)
        return True
