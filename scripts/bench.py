"""Throughput benchmark: the relay against a bare aiosmtpd passthrough.

Run through scripts/bench. Everything listens on 127.0.0.1, in this process:

- a sink upstream, an aiosmtpd server that accepts and counts every message;
- the baseline, a bare passthrough: an aiosmtpd server whose DATA hook
  forwards the message unchanged to the sink with aiosmtplib, so it makes
  the same network hops as the relay but neither rewrites nor archives;
- the relay (`ThreadedRelay`) with a throw-away SQLite database, the sink as
  its upstream and one provisioned seller/buyer pair.

Each phase sends N messages (about 4 KB: text and HTML alternatives naming
the buyer's address, plus a small base64 attachment) from the buyer to the
seller's alias over C concurrent smtplib connections, and gets at most
PHASE_SECONDS. Afterwards the sink must have received exactly N messages
(and the relay archived N), otherwise the run fails with exit status 1: a
benchmark that loses mail is a failure. Prints messages/second for both and
their ratio, or one JSON object with --json.

Clients, servers and the relay share one process and so one GIL; the numbers
compare the two setups on one machine and are no capacity figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import smtplib
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from email import policy
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
from aiosmtpd.smtp import SMTP

from relay.config import Config, Endpoint, parse_upstream_url
from relay.server import ThreadedRelay
from relay.store import utc_now

# The tests' DNS server: the relay checks SPF/DKIM/DMARC as in production.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from dnsserver import DNSServer  # noqa: E402

HOST = "127.0.0.1"
PHASE_SECONDS = 120.0
SELLER = "seller@shop.example"
BUYER = "buyer@mail.example"


class BenchError(Exception):
    """The run produced no valid number: mail lost or refused, or too slow."""


# --- the sink and the passthrough ----------------------------------------------

class Sink:
    """Accepts every message and counts it (only ever on the sink's loop)."""

    def __init__(self):
        self.count = 0

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        return "250 2.0.0 OK"


class Passthrough:
    """Forwards each message unchanged to the sink and answers 250 only after
    the sink did, one upstream connection per message, as the relay does."""

    def __init__(self, sink_port: int):
        self.sink_port = sink_port

    async def handle_DATA(self, server, session, envelope):
        try:
            await aiosmtplib.send(
                envelope.original_content,
                sender=envelope.mail_from,
                recipients=envelope.rcpt_tos,
                hostname=HOST,
                port=self.sink_port,
                local_hostname="passthrough.bench",
                timeout=30,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            return f"451 4.4.1 sink unavailable: {exc}"
        return "250 2.0.0 OK forwarded"


class LoopServer:
    """An aiosmtpd server for `handler` on 127.0.0.1 at a port the OS picks,
    on its own event loop in a thread."""

    def __init__(self, handler, name: str):
        self.handler = handler
        self.name = name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._server: asyncio.base_events.Server | None = None

    def start(self) -> int:
        self._thread.start()
        self._server = self._call(self._listen())
        return self._server.sockets[0].getsockname()[1]

    async def _listen(self) -> asyncio.base_events.Server:
        def factory() -> SMTP:
            return SMTP(self.handler, hostname=f"{self.name}.bench", ident=self.name)

        return await asyncio.get_running_loop().create_server(factory, HOST, 0)

    def stop(self) -> None:
        async def close():
            self._server.close()
            # Sessions still open (only after an aborted phase) end here, not
            # as "Task was destroyed" noise when the loop closes.
            sessions = asyncio.all_tasks() - {asyncio.current_task()}
            for task in sessions:
                task.cancel()
            await asyncio.gather(*sessions, return_exceptions=True)
            await self._server.wait_closed()

        self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)


# --- the relay -------------------------------------------------------------------

# The buyer's domain as the relay's SPF/DKIM/DMARC checks see it: mail from
# 127.0.0.1 passes SPF (no DKIM, no DMARC record), as from a small provider.
BUYER_ZONE = """$ORIGIN mail.example.
@ 300 IN SOA ns.mail.example. hostmaster.mail.example. 1 3600 600 86400 300
@ 300 IN NS ns.mail.example.
@ 300 IN TXT "v=spf1 ip4:127.0.0.1 -all"
"""


def relay_config(directory: Path, sink_port: int, nameserver: str) -> Config:
    base = Config()
    return replace(
        base,
        database=str(directory / "relay.sqlite3"),
        inbound=replace(base.inbound, listen=Endpoint(HOST, 0)),
        submission=replace(base.submission, listen=None, listen_tls=None),
        dns=replace(base.dns, nameservers=(nameserver,)),
        upstream=replace(base.upstream,
                         url=parse_upstream_url("upstream.url", f"smtp://{HOST}:{sink_port}")),
    )


def provision(relay: ThreadedRelay) -> str:
    """Add the seller, the buyer and an order; return the seller's alias."""
    store = relay.server.store
    relay.call(store.add_party("seller", SELLER, "Sam Seller"))
    relay.call(store.add_party("buyer", BUYER, "Bea Buyer"))
    relationship, _ = relay.call(store.add_order(
        "ORDER-1", SELLER, BUYER, utc_now(), relay.server.config.domain))
    return relationship.seller_alias


# --- the load --------------------------------------------------------------------

def bench_message(to: str) -> bytes:
    """The message body sent in both phases, without a Message-ID (each send
    adds a fresh one, as real clients do)."""
    msg = EmailMessage()
    msg["From"] = f"Bea Buyer <{BUYER}>"
    msg["To"] = to
    msg["Subject"] = "Question about order ORDER-1"
    msg["Date"] = "Thu, 26 Nov 2026 10:00:00 +0000"
    paragraphs = [
        "Hello, thank you for the quick dispatch. The parcel arrived today, but the "
        "blue mug in the set has a chip on its rim, and the saucer is missing.",
        "Could you send a replacement, or refund that part of the order? I attached "
        "the receipt. Photos of the damage can follow if you need them.",
        f"If it is easier, write to me directly at {BUYER} or call me in the "
        "afternoon; I am at home most days this week.",
        "I would also like to order two more of the small bowls if they are back "
        "in stock, to be shipped together with the replacement.",
        f"Best regards,\nBea Buyer <{BUYER}>",
    ]
    msg.set_content("\n\n".join(paragraphs) + "\n")
    html = "".join(f"<p>{p.replace(chr(10), '<br>')}</p>\n" for p in paragraphs)
    msg.add_alternative(
        "<html><body>\n" + html.replace(BUYER, f'<a href="mailto:{BUYER}">{BUYER}</a>', 1)
        + "</body></html>\n",
        subtype="html",
    )
    # A real PDF header: the relay checks attachment content, not just names.
    msg.add_attachment(b"%PDF-1.4\n" + bytes(range(256)) * 5 + b"\n%%EOF\n", maintype="application", subtype="pdf",
                       filename="receipt.pdf")
    return msg.as_bytes(policy=policy.SMTP)


def with_message_id(body: bytes) -> bytes:
    return b"Message-ID: <%s@mail.example>\r\n" % uuid.uuid4().hex.encode() + body


def run_phase(name: str, port: int, rcpt: str, body: bytes, messages: int,
              concurrency: int, sink: Sink) -> float:
    """Send `messages` over `concurrency` connections; return messages/second."""
    before = sink.count
    shares = [messages // concurrency + (i < messages % concurrency) for i in range(concurrency)]
    deadline = time.monotonic() + PHASE_SECONDS
    errors: list[Exception] = []

    def client(count: int) -> None:
        try:
            with smtplib.SMTP(HOST, port, timeout=PHASE_SECONDS) as smtp:
                for _ in range(count):
                    if time.monotonic() > deadline:
                        return
                    smtp.sendmail(BUYER, [rcpt], with_message_id(body))
        except (smtplib.SMTPException, OSError) as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(count,), name=f"{name}-client-{i}", daemon=True)
               for i, count in enumerate(shares)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    elapsed = time.monotonic() - started
    received = sink.count - before
    if any(thread.is_alive() for thread in threads) or time.monotonic() > deadline:
        raise BenchError(f"{name}: aborted after {PHASE_SECONDS:g} s, "
                         f"{received} of {messages} message(s) delivered")
    if errors:
        raise BenchError(f"{name}: {len(errors)} of {concurrency} client(s) failed, first with "
                         f"{type(errors[0]).__name__}: {errors[0]}")
    if received != messages:
        raise BenchError(f"{name}: the sink received {received} message(s), expected {messages}")
    return messages / elapsed


def run(messages: int, concurrency: int) -> tuple[float, float]:
    """Both phases; returns (passthrough, relay) in messages/second."""
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp, contextlib.ExitStack() as stack:
        sink = Sink()
        sink_server = LoopServer(sink, "sink")
        sink_port = sink_server.start()
        stack.callback(sink_server.stop)

        dns_server = stack.enter_context(DNSServer([BUYER_ZONE]))
        relay = ThreadedRelay(relay_config(Path(tmp), sink_port, dns_server.address))
        _, relay_port = relay.start()
        stack.callback(relay.stop, drain_seconds=10)
        seller_alias = provision(relay)
        body = bench_message(seller_alias)

        passthrough_server = LoopServer(Passthrough(sink_port), "passthrough")
        passthrough_port = passthrough_server.start()
        stack.callback(passthrough_server.stop)

        passthrough_mps = run_phase("passthrough", passthrough_port, seller_alias, body,
                                    messages, concurrency, sink)
        relay_mps = run_phase("relay", relay_port, seller_alias, body, messages, concurrency, sink)
        archived = len(relay.call(relay.server.store.archive_ids()))
        if archived != messages:
            raise BenchError(f"relay: {archived} message(s) archived, expected {messages}")
        return passthrough_mps, relay_mps


# --- command line ------------------------------------------------------------------

def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Messages/second through the relay and through a bare aiosmtpd passthrough.")
    parser.add_argument("--messages", type=positive, default=400, metavar="N",
                        help="messages per phase (default 400)")
    parser.add_argument("--concurrency", type=positive, default=8, metavar="C",
                        help="concurrent client connections (default 8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.concurrency > args.messages:
        parser.error("--concurrency must not exceed --messages")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        passthrough_mps, relay_mps = run(args.messages, args.concurrency)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    ratio = relay_mps / passthrough_mps
    if args.json:
        print(json.dumps({
            "messages": args.messages,
            "concurrency": args.concurrency,
            "passthrough_mps": round(passthrough_mps, 1),
            "relay_mps": round(relay_mps, 1),
            "ratio": round(ratio, 3),
        }))
    else:
        print(f"passthrough {passthrough_mps:.1f} msg/s  relay {relay_mps:.1f} msg/s  ratio {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
