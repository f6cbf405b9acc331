"""The aiosmtpd handler: the protocol edge of the relay.

This is the only module that turns a `Reply` into a reply line, and the only
one that knows aiosmtpd's hook names. RCPT decides who may write to which
alias; DATA runs the pipeline in a worker process (relay/workers.py) with a
time and memory limit, forwards
to the upstream, archives, and only then answers. The client hears `250`
only after the upstream said `250` and the archive row is committed;
anything transient (store, upstream, timeout, an unexpected exception) is a
`451`, so the client keeps the message and retries. A value of the message
that the database refuses (`StoreDataError`) would be refused on every
retry: `554 5.6.0`, logged as the relay's bug it is, never as an outage.

A message being delivered is shielded from cancellation: aiosmtpd cancels
the hook when the client hangs up, and a message the upstream has taken
must still be archived. `drain()` waits for those on shutdown.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from aiosmtpd.smtp import MISSING, AuthResult

from relay import addresses, auth, bounces, dkim, events, mailauth, pipeline, replies
from relay.auth import Throttle
from relay.config import Config
from relay.forward import DeliveryError, Upstream, queue_id
from relay.metrics import Metrics
from relay.pipeline.changes import ChangeLog
from relay.protocol import XFORWARD_ATTRIBUTES, InboundSMTP
from relay.replies import Reply, SmtpError
from relay.spool import HeldMessage
from relay.workers import LimitExceeded, PoolBusy, WorkerError, WorkerLost, WorkerPool
from relay.store import ArchiveEntry, Party, Relationship, StoreDataError, StoreUnavailable, iso

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


def client_address(session) -> str:
    """The client's IP: XFORWARD's ADDR when postfix told us, else the
    source address of a PROXY header from a configured proxy, else the peer."""
    forwarded = (getattr(session, "xforward", None) or {}).get("ADDR")
    if forwarded:
        return forwarded[5:] if forwarded.upper().startswith("IPV6:") else forwarded
    proxied = getattr(session, "proxy_data", None)
    if proxied is not None and proxied.src_addr is not None:
        return str(proxied.src_addr)
    return str(session.peer[0]) if session.peer else ""


def log_value(text: str) -> str:
    """`text` as one key=value field of a log line: as it is when it is one
    word, quoted (repr) when it has spaces or quotes of its own."""
    return text if text and text.isprintable() and not any(c in text for c in " '\"=") else repr(text)


def client_helo(session) -> str:
    forwarded = (getattr(session, "xforward", None) or {}).get("HELO")
    return forwarded or session.host_name or ""


def utc_clock() -> datetime:
    return datetime.now(timezone.utc)


def daily_cap(policy, orders_in_window: int, override: int | None) -> int:
    """DESIGN §4: base + per_order × daily order volume, where the volume is
    the orders of the last order_window_days divided by that many days,
    rounded up (or the seller's `--daily-orders` override)."""
    volume = override if override is not None else math.ceil(orders_in_window / policy.order_window_days)
    return policy.daily_message_base + policy.daily_message_per_order * volume


class RelayHandler:
    """One per listener kind: `submission=False` for the inbound (MX/postfix)
    side, where the envelope sender must be the counterpart; `True` for the
    sellers' authenticated submission listeners, where the logged-in seller
    is the sender whatever the envelope says."""

    def __init__(self, config: Config, store, upstream: Upstream, protocol: str = "ESMTP",
                 submission: bool = False, throttle: Throttle | None = None, clock=utc_clock,
                 metrics: Metrics | None = None, dkim_key=None, bounce_secret: bytes = b"",
                 resolver=None, workers: WorkerPool | None = None, webhook_wake=None):
        self.config = config
        self.store = store
        self.upstream = upstream
        self.protocol = protocol
        self.submission = submission
        self.throttle = throttle
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.dkim_key = dkim_key
        self.resolver = resolver
        self.workers = workers  # parsing, rewriting, sanitizing and signing happen there
        self.bounce_secret = bounce_secret or secrets.token_bytes(32)
        self._in_flight: set[asyncio.Task] = set()
        self.closing = False
        # Called once an event for the marketplace is written (relay/webhooks.py).
        self.webhook_wake = webhook_wake or (lambda: None)

    # --- aiosmtpd hooks -------------------------------------------------------

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname  # aiosmtpd leaves that to a handler with this hook
        if isinstance(server, InboundSMTP) and server.xforward_allowed():
            responses.insert(-1, "250-XFORWARD " + " ".join(XFORWARD_ATTRIBUTES))
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.closing:
            return replies.SHUTTING_DOWN.line()
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return replies.SENDER_OK.line()

    async def handle_PROXY(self, server, session, envelope, proxy_data):
        # Only [limits] proxy_hosts are asked for a header (protocol.py); a
        # valid one is taken, its source address standing for the client's.
        return bool(proxy_data.valid)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        # Counted before anything else: every RCPT costs a lookup.
        envelope.relay_rcpt_count = getattr(envelope, "relay_rcpt_count", 0) + 1
        if envelope.relay_rcpt_count > self.config.limits.max_recipients:
            self._refused_recipient(session, address, replies.TOO_MANY_RECIPIENTS)
            return replies.TOO_MANY_RECIPIENTS.line()
        try:
            reply = await self._recipient(session, envelope, address)
        except StoreUnavailable as exc:
            log.warning("rcpt lookup failed: %s", exc)
            self.metrics.store_error(exc)
            reply = replies.LOOKUP_FAILED
        except Exception:
            log.exception("unexpected error in RCPT")
            reply = replies.INTERNAL_ERROR
        self._refused_recipient(session, address, reply)
        return reply.line()

    def _refused_recipient(self, session, address: str, reply: Reply) -> None:
        """Count a refused RCPT and log it: the address as the client wrote
        it, our reply code, and who the client was."""
        self.metrics.refused("rcpt", reply)
        if reply.code >= 400:
            log.info("rcpt refused client=%s to=%s code=%d enhanced=%s listener=%s",
                     client_address(session) or "-", log_value(address), reply.code, reply.enhanced,
                     "submission" if self.submission else "inbound")

    async def handle_DATA(self, server, session, envelope):
        if getattr(envelope, "relay_bounce", None) is not None:
            work = self._bounce(session, envelope)
        else:
            work = self._message(session, envelope)
        task = asyncio.ensure_future(work)
        self._in_flight.add(task)
        self.metrics.in_flight.inc()
        task.add_done_callback(self._in_flight.discard)
        task.add_done_callback(lambda _: self.metrics.in_flight.dec())
        reply = await asyncio.shield(task)
        return reply.line()

    # --- AUTH (submission only) -------------------------------------------------
    # aiosmtpd's own PLAIN/LOGIN call a synchronous authenticator; ours must
    # look up the store and run scrypt off the loop, so the mechanisms are
    # implemented here (aiosmtpd prefers a handler's auth_* methods).

    async def auth_PLAIN(self, server, args):
        credentials = await self._initial_response(server, args, "")
        if credentials is None:
            return AuthResult(success=False, handled=True)
        try:
            # RFC 4616: authzid NUL authcid NUL password; authzid ignored.
            _, login, password = credentials.split(b"\x00")
        except ValueError:
            self.metrics.failed_logins.labels("malformed").inc()
            await server.push(replies.AUTH_MALFORMED.line())
            return AuthResult(success=False, handled=True)
        return await self._login(server, login, password)

    async def auth_LOGIN(self, server, args):
        login = await self._initial_response(server, args, "Username:")
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await server.challenge_auth("Password:")
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._login(server, login, password)

    async def _initial_response(self, server, args, challenge: str) -> bytes | None:
        """The client's first AUTH data, decoded: given on the AUTH line
        (RFC 4954 initial response) or asked for with `challenge`. None when
        it was bad or aborted (the client has been answered already)."""
        if len(args) > 1:
            return await self._decode(server, args[1].encode())
        response = await server.challenge_auth(challenge)
        return None if response is MISSING else response

    async def _decode(self, server, data: bytes) -> bytes | None:
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            self.metrics.failed_logins.labels("malformed").inc()
            await server.push(replies.AUTH_BAD_BASE64.line())
            return None

    async def _login(self, server, login: bytes, password: bytes):
        # The client's own address, also behind a PROXY load balancer:
        # throttling the balancer's would lock every seller out at once.
        peer = client_address(server.session)
        if self.throttle.blocked(peer):
            self.metrics.failed_logins.labels("blocked").inc()
            await server.push(replies.AUTH_TOO_MANY_FAILURES.line())
            server.transport.close()
            return AuthResult(success=False, handled=True)
        account = login.decode("utf-8", errors="replace").strip().lower()[:320]
        try:
            found = await self.store.password_hash(account) if addresses.is_valid(account) else None
        except StoreUnavailable as exc:
            self.metrics.store_error(exc)
            await server.push(replies.AUTH_TEMPORARY_FAILURE.line())
            return AuthResult(success=False, handled=True)
        stored = found[1] if found else None
        ok = await asyncio.to_thread(auth.verify_password, password, stored)
        if ok and found:
            self.throttle.success(account, peer)
            log.info("seller %s logged in from %s", found[0].id, peer)
            return AuthResult(success=True, auth_data=found[0])
        self.metrics.failed_logins.labels("credentials").inc()
        delay = self.throttle.failure(account, peer)
        log.warning("failed login from %s (waiting %.1f s)", peer, delay)
        await asyncio.sleep(delay)
        # handled=False: aiosmtpd answers "535 5.7.8 Authentication credentials invalid".
        return AuthResult(success=False, handled=False)

    async def handle_exception(self, error):
        # aiosmtpd's default would answer "500 Error: (ExcName) text", which
        # is both wrong (not our client's fault) and a leak of internals.
        log.error("unexpected error in the SMTP session", exc_info=error)
        return replies.INTERNAL_ERROR.line()

    # --- RCPT -----------------------------------------------------------------

    async def _recipient(self, session, envelope, address: str) -> Reply:
        alias = addresses.normalize(address)
        local, domain = addresses.split(alias)
        if domain != self.config.domain:
            # Submission must never relay to arbitrary addresses.
            return replies.RELAY_DENIED if self.submission else replies.NOT_OUR_DOMAIN
        if bounces.is_bounce_local(local) and not self.submission:
            return await self._bounce_recipient(envelope, address, local)
        if not addresses.is_alias_token(local):
            return replies.UNKNOWN_ALIAS
        if getattr(envelope, "relay_bounce", None) is not None:
            return replies.OTHER_RELATIONSHIP
        relationship = await self.store.relationship_by_alias(alias)
        if relationship is None:
            return replies.UNKNOWN_ALIAS
        route = route_for(relationship, alias)
        if self.submission:
            seller: Party = session.auth_data
            if route.direction != SELLER_TO_BUYER or route.sender.id != seller.id:
                return replies.NOT_YOUR_BUYER
        elif addresses.normalize(envelope.mail_from or "") != route.sender.address:
            # Say nothing about who the counterpart is.
            return replies.NOT_COUNTERPART
        current: Route | None = getattr(envelope, "relay_route", None)
        if current is not None:
            if current.relationship.id != relationship.id or current.direction != route.direction:
                return replies.OTHER_RELATIONSHIP
            return replies.RECIPIENT_DUPLICATE
        if route.direction == SELLER_TO_BUYER:
            over = await self._over_daily_cap(route.sender)
            if over is not None:
                return over
        envelope.relay_route = route
        envelope.rcpt_tos.append(address)
        return replies.RECIPIENT_OK

    async def _bounce_recipient(self, envelope, address: str, local: str) -> Reply:
        """A delivery report coming back to a VERP address of ours."""
        try:
            relay_id = bounces.parse_address(local, self.config.domain, self.bounce_secret, self.clock())
        except bounces.InvalidBounceAddress as why:
            log.info("refused bounce address (%s)", why)
            self.metrics.bounces.labels("unknown").inc()
            return replies.BOUNCE_ADDRESS_INVALID
        original = await self.store.message_by_relay_id(relay_id)
        if original is None:
            self.metrics.bounces.labels("unknown").inc()
            return replies.BOUNCE_ADDRESS_INVALID
        if getattr(envelope, "relay_route", None) is not None or getattr(envelope, "relay_bounce", None):
            return replies.OTHER_RELATIONSHIP
        envelope.relay_bounce = (relay_id, original)
        envelope.rcpt_tos.append(address)
        return replies.RECIPIENT_OK

    async def _bounce(self, session, envelope) -> Reply:
        """Record the report against the bounced message and tell its sender,
        in general terms, through a notice from mailer-daemon."""
        relay_id, original = envelope.relay_bounce
        raw: bytes = envelope.original_content
        try:
            reports = await self.workers.run(bounces.read_report, raw)
        except LimitExceeded:
            return replies.TOO_COMPLEX
        except (PoolBusy, WorkerLost):
            return replies.WORKERS_BUSY
        failed = [r for r in reports if r.action == "failed"]
        chosen = failed[0] if failed else (reports[0] if reports else None)
        action, status = (chosen.action, chosen.status) if chosen else ("none", "")
        detector = chosen.detector if chosen else ""
        notified = False
        try:
            # The report's own Auto-Submitted/Precedence say nothing here:
            # every bounce is automatic. _notify() declines for an automatic
            # original message, the only case that must go unanswered.
            if failed:
                try:
                    notified = await self._notify(original, status)
                except DeliveryError as exc:
                    if exc.reply.transient:
                        # The report comes again and the notice is tried again.
                        log.warning("bounce notice for %s deferred: %s", relay_id, exc.detail)
                        return replies.UPSTREAM_UNAVAILABLE
                    # Refused for good: record the report anyway, unnotified.
                    log.warning("bounce notice for %s refused: %s", relay_id, exc.detail)
            event = self._webhook_event(events.BOUNCED)
            await self.store.record_bounce(iso(self.clock()), relay_id, original["archive_id"],
                                           original["relationship_id"], action, status, notified, raw,
                                           detector=detector, webhook_event=event)
            if event:
                self.webhook_wake()
        except StoreUnavailable as exc:
            log.warning("bounce for %s not recorded: %s", relay_id, exc)
            self.metrics.store_error(exc)
            return replies.LOOKUP_FAILED
        except StoreDataError as exc:
            # Refused again on every retry, and each retry would send the notice again.
            log.exception("bounce for %s not recorded: the store refused a value of it", relay_id)
            self.metrics.store_error(exc)
            return replies.UNSTORABLE
        except Exception:
            log.exception("unexpected error handling a bounce for %s", relay_id)
            return replies.INTERNAL_ERROR
        self.metrics.bounces.labels("notified" if notified else "recorded").inc()
        log.info("bounce relationship=%s archive=%s action=%s status=%s detector=%s notified=%s",
                 original["relationship_id"], original["archive_id"], action, status or "-", detector or "-",
                 notified)
        return replies.BOUNCE_ACCEPTED

    def _webhook_event(self, event: str | None) -> str | None:
        """`event`, if [webhooks] is on and sends it; else None."""
        webhooks = self.config.webhooks
        return event if event and webhooks.url and event in webhooks.events else None

    async def _notify(self, original: dict, status: str) -> bool:
        """Send the notice; False when there is nobody to tell (an automatic
        original message, which must never be answered)."""
        relationship = await self.store.relationship_by_id(original["relationship_id"])
        if relationship is None:
            return False
        if original.get("archive_id"):
            row = await self.store.archive_row(original["archive_id"])
            automatic = row.get("auto_reply") if row else None
            if automatic is None and row and row.get("raw"):  # rows archived before the flag existed
                parsed = await asyncio.to_thread(pipeline.parse, row["raw"])
                automatic = bounces.auto_submitted(parsed)
            if automatic:
                return False
        if relationship.seller.id == original["sender_id"]:
            sender, alias = relationship.seller, relationship.buyer_alias
        else:
            sender, alias = relationship.buyer, relationship.seller_alias
        sent_at = original["created_at"][:16].replace("T", " ") + " UTC"
        data = bounces.notice(self.config.domain, sender.display_name, sender.address, alias, sent_at,
                              status, addresses.new_message_id(self.config.domain), self.clock())
        if self.dkim_key is not None:
            data = dkim.sign(data, self.dkim_key)
        # A null envelope sender: a notice must never cause another notice.
        await self.upstream.deliver("", sender.address, data)
        return True

    async def _over_daily_cap(self, seller: Party, reservations: list[int] | None = None) -> Reply | None:
        """The daily-cap refusal, or None. Without `reservations` (at RCPT) a
        read-only check. With it (a message about to be forwarded), the
        message takes its place in the store: `store.reserve_send()` counts
        and inserts in one transaction serialized per seller, across
        processes and relay nodes, so transactions open side by side cannot
        all slip under the cap; the reservation id is appended to
        `reservations`, and record() turns it into the message's row or
        gives it back."""
        policy = self.config.policy
        now = self.clock()
        window_start = now - timedelta(hours=policy.daily_window_hours)
        orders = await self.store.seller_orders_since(
            seller.id, iso(now - timedelta(days=policy.order_window_days)))
        cap = daily_cap(policy, orders, seller.daily_orders)
        if reservations is None:
            sent, oldest = await self.store.seller_sends_since(seller.id, iso(window_start))
            if sent < cap:
                return None
        else:
            reservation, sent, oldest = await self.store.reserve_send(seller.id, iso(now), iso(window_start), cap)
            if reservation is not None:
                reservations.append(reservation)
                return None
        frees_at = (datetime.fromisoformat(oldest.replace("Z", "+00:00")) if oldest else now) \
            + timedelta(hours=policy.daily_window_hours)
        return replies.DAILY_CAP.with_text(
            f"Daily sending limit of {cap} messages reached; "
            f"the next message can be sent after {frees_at.strftime('%Y-%m-%d %H:%M:%S')} UTC")

    # --- DATA -----------------------------------------------------------------

    async def _message(self, session, envelope) -> Reply:
        held = HeldMessage(envelope.original_content)
        # From here the message is `held`'s alone, so that it can leave
        # memory while a worker has it (relay/spool.py).
        envelope.content = envelope.original_content = None
        try:
            return await self._held_message(session, envelope, held)
        finally:
            held.close()

    async def _held_message(self, session, envelope, held: HeldMessage) -> Reply:
        started = time.monotonic()
        route: Route = envelope.relay_route
        transaction_id = secrets.token_hex(6)
        changes = ChangeLog()
        delivered: bytes | None = None
        original_id = None
        relay_id = addresses.new_message_id(self.config.domain)
        reserved: list[int] = []  # the daily-cap place this message took in the store (reservation id)
        accepted: list[str] = []  # what the upstream said when it took the message
        bodies = None  # the archive's form of raw and delivered, made by the worker
        try:
            reply, verdict, processed, original_id = await self._process_and_forward(
                route, held, relay_id, transaction_id, changes, session, envelope, reserved, accepted)
            if processed is not None:
                delivered, bodies = processed.result.delivered, processed.bodies
        except Exception:
            log.exception("unexpected error handling message %s", transaction_id)
            reply, verdict = replies.INTERNAL_ERROR, "deferred"
            delivered = None
        delivered_bodies = bodies if verdict == "delivered" else None
        raw = None
        if delivered_bodies is None:
            # The worker's archive form of a delivered message covers raw:
            # only otherwise are the bytes as received needed again.
            try:
                raw = await held.read()
            except OSError as exc:  # record() below fails for want of it, and says so as any archive failure
                log.error("message %s: its temporary file cannot be read back: %s", transaction_id, exc)

        entry = ArchiveEntry(
            received_at=iso(self.clock()),
            relationship_id=route.relationship.id,
            direction=route.direction,
            client_address=client_address(session),
            mail_from=envelope.mail_from or "",
            rcpt_to=tuple(envelope.rcpt_tos),
            verdict=verdict,
            reply=reply.line(),
            changes=tuple(changes),
            raw=raw,
            raw_size=held.size,
            delivered=delivered if verdict == "delivered" else None,
            sender_id=route.sender.id,
            original_message_id=original_id,
            relay_message_id=relay_id,
            send_reservation=reserved[0] if reserved else None,
            bodies=delivered_bodies,
            webhook_event=self._webhook_event(events.for_verdict(verdict)),
        )
        archive_id = None
        try:
            archive_id = await self.store.record(entry)
            if entry.webhook_event:
                self.webhook_wake()
        except StoreDataError as exc:
            self.metrics.store_error(exc)
            log.exception("archive refused a value of message %s", transaction_id)
            if verdict == "delivered":
                # A retry would be delivered again and refused again, for
                # days: say no for good (the upstream has this one copy).
                log.error("message %s was delivered but cannot be archived; refused for good",
                          transaction_id)
                reply = replies.UNSTORABLE
        except Exception as exc:
            self.metrics.store_error(exc)
            log.error("archive failed for message %s: %s", transaction_id, exc,
                      exc_info=not isinstance(exc, StoreUnavailable))
            if verdict == "delivered":
                # The upstream has it but the archive does not: ask the client
                # to retry, accepting a duplicate over an unarchived message.
                log.error("message %s was delivered but not archived; the client will retry",
                          transaction_id)
                reply = replies.ARCHIVE_FAILED
        if reserved and archive_id is None:  # not archived: the client retries, counted then
            try:
                await self.store.release_send(reserved[0])
            except Exception as exc:  # counted until it leaves the window: the cap errs on the safe side
                self.metrics.store_error(exc)
                log.warning("daily-cap place of message %s not given back: %s", transaction_id, exc)
        self.metrics.messages.labels(route.direction, verdict).inc()
        self.metrics.refused("data", reply)
        if reply is replies.DELIVERED and archive_id is not None:
            reply = reply.with_text(f"{reply.text} (archive {archive_id})")
        # The client's IP and the upstream's queue id: the two ends an
        # operator follows a message by, into postfix's log on either side.
        log.info(
            "message archive=%s relationship=%s direction=%s verdict=%s client=%s queue_id=%s bytes=%d ms=%.1f "
            "policy=%s reply=%r",
            archive_id, route.relationship.id, route.direction, verdict, client_address(session) or "-",
            log_value(queue_id(accepted[0])) if accepted else "-", held.size,
            (time.monotonic() - started) * 1000, changes.policy_summary().replace(" ", ""), reply.line(),
        )
        return reply

    async def _authenticate(self, session, envelope, raw: bytes, changes) -> str | None:
        """SPF/DKIM/DMARC for mail on the inbound listener (DESIGN §4, issue 5):
        raises SmtpError when `[auth] inbound` says to refuse; returns the
        Authentication-Results value for the delivered message, or None."""
        mode = self.config.auth.inbound
        if self.submission or mode == "off":
            return None
        verdict = await asyncio.wait_for(asyncio.to_thread(
            mailauth.authenticate, raw, client_address(session), client_helo(session),
            addresses.normalize(envelope.mail_from or ""), resolver=self.resolver,
            authserv_id=self.config.greeting_hostname), self.config.inbound.processing_timeout)
        # The full result (with the sender's domains) is for the archive;
        # the recipient gets the results only, since a domain can name the
        # sender (a company's own mail domain).
        changes.append(f"authentication: {verdict.header}")
        refusal = mailauth.decide(verdict, mode)
        if refusal is not None:
            changes.append(f"refused by [auth] inbound = {mode}")
            raise SmtpError(refusal)
        return (f"{self.config.greeting_hostname}; spf={verdict.spf}; dkim={verdict.dkim}; "
                f"dmarc={verdict.dmarc}")

    async def _process_and_forward(self, route: Route, held: HeldMessage, relay_id: str, transaction_id: str,
                                   changes: list[str], session, envelope, reserved: list[int],
                                   accepted: list[str]):
        """Returns (reply, verdict, the worker's Processed once it made the
        bytes to deliver, original Message-ID); appends the upstream's
        accepting reply to `accepted`."""
        timeout = self.config.inbound.processing_timeout
        try:
            auth_results = await self._authenticate(session, envelope, held.raw, changes) if session else None
            async with self.workers.lease() as worker:
                begun = await worker.call(pipeline.BEGIN, held.raw)
                await held.spill()  # the worker has it now
                if begun.refusal is not None:
                    raise SmtpError(begun.refusal)
                rows = await self.store.message_id_rows(route.relationship.id, begun.referenced_ids)
                latest_order = None
                if route.direction == SELLER_TO_BUYER:
                    latest_order = await self.store.latest_order_at(route.relationship.id)
                context = pipeline.Context(
                    domain=self.config.domain,
                    hostname=self.config.greeting_hostname,
                    direction=route.direction,
                    sender=route.sender,
                    recipient=route.recipient,
                    sender_alias=route.sender_alias,
                    recipient_alias=route.recipient_alias,
                    relay_message_id=relay_id,
                    received_at=self.clock(),
                    transaction_id=transaction_id,
                    thread_rows=tuple(rows),
                    protocol=self.protocol,
                    max_hops=self.config.inbound.max_received,
                    max_relay_hops=self.config.inbound.max_relay_hops,
                    dkim_key=self.dkim_key,
                    auth_results=auth_results,
                    policy=self.config.policy,
                    authenticated=self.submission,
                    latest_order_at=datetime.fromisoformat(latest_order.replace("Z", "+00:00")) if latest_order else None,
                )
                processed = await worker.call(pipeline.FINISH, context)
            changes.merge(processed.changes)
            if processed.refusal is not None:
                raise SmtpError(processed.refusal)
            result = processed.result
        except SmtpError as exc:
            return exc.reply, "rejected" if exc.reply.permanent else "deferred", None, None
        except StoreUnavailable as exc:
            log.warning("lookup failed for message %s: %s", transaction_id, exc)
            self.metrics.store_error(exc)
            return replies.LOOKUP_FAILED, "deferred", None, None
        except StoreDataError as exc:
            self.metrics.store_error(exc)
            log.exception("lookup for message %s: the store refused a value of it", transaction_id)
            changes.append(f"refused: the store cannot hold a value of this message ({exc})")
            return replies.UNSTORABLE, "rejected", None, None
        except asyncio.TimeoutError:
            changes.append(f"processing exceeded {timeout:g} s")
            return replies.PROCESSING_TIMEOUT, "deferred", None, None
        except LimitExceeded as exc:
            # The message itself is the problem: the same again would fail again.
            changes.append(f"refused: processing went {exc}")
            return replies.TOO_COMPLEX, "rejected", None, None
        except PoolBusy as exc:
            log.warning("message %s not processed: %s", transaction_id, exc)
            return replies.WORKERS_BUSY, "deferred", None, None
        except WorkerLost as exc:
            log.error("message %s: the worker processing it was lost (%s)", transaction_id, exc)
            changes.append(f"processing interrupted: {exc}")
            return replies.WORKER_LOST, "deferred", None, None
        except WorkerError as exc:
            log.error("unexpected error processing message %s in a worker:\n%s", transaction_id, exc.detail)
            return replies.INTERNAL_ERROR, "deferred", None, None

        if route.direction == SELLER_TO_BUYER:
            # Checked at RCPT already; again here, taking a place in the
            # store, since transactions running side by side (on any node)
            # all passed RCPT.
            try:
                over = await self._over_daily_cap(route.sender, reservations=reserved)
            except StoreUnavailable as exc:
                self.metrics.store_error(exc)
                log.warning("daily cap of message %s not checked: %s", transaction_id, exc)
                return replies.LOOKUP_FAILED, "deferred", None, result.original_message_id
            if over is not None:
                changes.append("refused: the daily cap was reached while this transaction was open")
                return over, "deferred", None, result.original_message_id
        started = time.monotonic()
        try:
            return_path = bounces.make_address(relay_id, self.config.domain, self.bounce_secret, self.clock(),
                                               self.config.bounce.lifetime_days)
            detail = await self.upstream.deliver(return_path, route.recipient.address, result.delivered)
        except DeliveryError as exc:
            self.metrics.upstream_seconds.observe(time.monotonic() - started)
            log.warning("delivery of message %s failed: %s", transaction_id, exc.detail)
            changes.append(f"upstream: {exc.detail}")
            verdict = "deferred" if exc.reply.transient else "failed"
            return exc.reply, verdict, processed, result.original_message_id
        self.metrics.upstream_seconds.observe(time.monotonic() - started)
        accepted.append(detail)
        return replies.DELIVERED, "delivered", processed, result.original_message_id

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
