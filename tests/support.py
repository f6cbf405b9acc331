"""Real parts for the tests: a recording aiosmtpd upstream, the relay in a
thread, and message builders. No mocks: every test speaks SMTP over
loopback sockets."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
import tempfile
from pathlib import Path
import secrets
import socket
import ssl
import threading
import time
import warnings
from dataclasses import dataclass, field, replace

from aiosmtpd.smtp import SMTP, AuthResult

from relay import config as config_module
from relay import dkim
from relay.config import Endpoint, UpstreamTarget
from relay.server import ThreadedRelay
from relay.store import utc_now


def broken_finish(context):
    """A pipeline step with a bug, for tests: run in a worker process."""
    raise ValueError("secret internal detail")


class Clock:
    """An injectable clock for the relay: tests move `now` instead of sleeping."""

    def __init__(self):
        self.now = datetime.now(timezone.utc)

    def __call__(self):
        return self.now


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    queue_id: str = ""  # what the recorder said it queued the message as


class _RecorderHandler:
    def __init__(self, upstream: "RecordingUpstream"):
        self.upstream = upstream

    async def handle_DATA(self, server, session, envelope):
        up = self.upstream
        up.data_started.set()
        if up.delay:
            await asyncio.sleep(up.delay)
        if up.reply_code != 250:
            return up.reply_line
        # Answered as postfix does, so the relay's log can name the queue id.
        queue_id = secrets.token_hex(5).upper()
        with up.lock:
            up.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                        envelope.original_content, queue_id))
        return f"250 2.0.0 Ok: queued as {queue_id}"

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        up = self.upstream
        with up.lock:
            reply, up.mail_reply = up.mail_reply, ""
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_QUIT(self, server, session, envelope):
        with self.upstream.lock:
            self.upstream.quits += 1
        return "221 Bye"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        up = self.upstream
        if up.rcpt_reply:
            return up.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"


@dataclass
class RecordingUpstream:
    """An aiosmtpd server on 127.0.0.1 that records what it accepted.

    Set `reply_code`/`reply_line` to make DATA fail, `rcpt_reply` to refuse
    the recipient, `delay` to answer slowly. `tls` = "implicit" or
    "starttls" with a trustme-made context; `credentials` requires AUTH.
    """

    tls: str = ""
    tls_context: ssl.SSLContext | None = None
    credentials: tuple[str, str] | None = None
    messages: list[Received] = field(default_factory=list)
    reply_code: int = 250
    reply_line: str = ""
    rcpt_reply: str = ""
    mail_reply: str = ""  # answered once to the next MAIL FROM, then cleared
    delay: float = 0.0
    port: int = 0
    host: str = "127.0.0.1"  # another loopback address (127.0.0.52) for MX tests
    lock: threading.Lock = field(default_factory=threading.Lock)
    data_started: threading.Event = field(default_factory=threading.Event)
    # The SMTP sessions it served (one per connection) and the QUITs it got:
    # the relay reuses connections, and says QUIT on each when it stops.
    sessions: list = field(default_factory=list)
    quits: int = 0

    @property
    def connections(self) -> int:
        return len(self.sessions)

    def open_connections(self) -> int:
        return sum(1 for session in self.sessions
                   if session.transport is not None and not session.transport.is_closing())

    def hang_up(self) -> None:
        """Close every open connection, as a server does whose idle timeout
        passed (without a 421: many just close)."""
        def close_all():
            for session in self.sessions:
                if session.transport is not None:
                    session.transport.close()

        self._loop.call_soon_threadsafe(close_all)

    def fail_with(self, line: str) -> None:
        self.reply_code = int(line[:3])
        self.reply_line = line

    def start(self) -> "RecordingUpstream":
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _listen(self):
        handler = _RecorderHandler(self)
        kwargs = {}
        if self.credentials:
            user, password = self.credentials

            def authenticator(server, session, envelope, mechanism, auth_data):
                ok = auth_data.login == user.encode() and auth_data.password == password.encode()
                return AuthResult(success=ok)

            kwargs.update(authenticator=authenticator, auth_required=True)
        if self.tls == "starttls":
            kwargs.update(tls_context=self.tls_context, require_starttls=True)

        if self.tls == "implicit" and self.credentials:
            # aiosmtpd only knows about STARTTLS; on an implicit-TLS socket
            # the transport is already encrypted, so AUTH may go ahead.
            kwargs["auth_require_tls"] = False

        def factory():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # aiosmtpd warns about auth_require_tls=False
                session = SMTP(handler, hostname="upstream.test", ident="recorder", **kwargs)
            self.sessions.append(session)
            return session

        ssl_context = self.tls_context if self.tls == "implicit" else None
        return await asyncio.get_running_loop().create_server(factory, self.host, self.port, ssl=ssl_context)

    def stop(self) -> None:
        async def close():
            self._server.close()
            await self._server.wait_closed()
            # As a server that shuts down does: hang up on the connections
            # still open (a relay's idle, reusable ones), and let each
            # session's task end before the loop stops.
            tasks = []
            for session in self.sessions:
                if session.transport is not None and not session.transport.is_closing():
                    session.transport.close()
                if session._handler_coroutine is not None:
                    tasks.append(session._handler_coroutine)
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.02)
        raise AssertionError(f"upstream got {len(self.messages)} message(s), expected {count}")


def wait_until(predicate, what: str, timeout: float = 10.0):
    """Poll `predicate` until it gives something true, and return that; a
    failure names `what`. A wait for an outcome, never a timing check."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def closed_port() -> int:
    """A loopback port with nothing listening (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DKIM_KEY_DIR = tempfile.mkdtemp(prefix="relay-test-dkim-")


def shared_dkim_key_file() -> str:
    """One DKIM key for the whole test run: making a 2048-bit RSA key per
    relay would cost seconds over the suite."""
    path = Path(_DKIM_KEY_DIR) / "relay.pem"
    if not path.exists():
        dkim.write_key(path, dkim.generate_private_pem())
    return str(path)


# Set by tests/conftest.py when RELAY_TEST_DATABASE=postgresql: makes a new,
# empty database on the session's PostgreSQL cluster and returns its URL.
# The relays the tests start then run on PostgreSQL instead of SQLite.
database_factory = None


def _database(tmp_path) -> tuple[str, dict]:
    """The `database` for a test's relay and what PostgreSQL needs besides
    (the files every node must share, so none is made next to a URL)."""
    if database_factory is None:
        return str(tmp_path / "relay.sqlite3"), {}
    from relay import tls

    cert, key = tls.self_signed_pair(Path(tmp_path) / "tls", "marketplace.example")
    return database_factory(), {
        "bounce": replace(config_module.BounceConfig(), secret_file=str(Path(tmp_path) / "bounce.key")),
        "submission_files": {"tls_cert": cert, "tls_key": key},
    }


def make_config(tmp_path, upstream_url: str, **overrides) -> config_module.Config:
    base = config_module.Config()
    database, shared = _database(tmp_path)
    for name, value in shared.items():
        if name != "submission_files":
            overrides.setdefault(name, value)
    upstream = replace(
        base.upstream,
        url=config_module.parse_upstream_url("upstream.url", upstream_url),
        timeout=overrides.pop("upstream_timeout", 5.0),
        ca_file=overrides.pop("ca_file", ""),
        reuse_count=overrides.pop("upstream_reuse_count", base.upstream.reuse_count),
        reuse_idle_seconds=overrides.pop("upstream_reuse_idle_seconds", base.upstream.reuse_idle_seconds),
    )
    inbound = replace(base.inbound, listen=Endpoint("127.0.0.1", 0),
                      processing_timeout=overrides.pop("processing_timeout", 30.0),
                      max_message_bytes=overrides.pop("max_message_bytes", base.inbound.max_message_bytes))
    submission = replace(base.submission, listen=Endpoint("127.0.0.1", 0), listen_tls=Endpoint("127.0.0.1", 0),
                         **{**shared.get("submission_files", {}), **overrides.pop("submission", {})})
    dkim_config = overrides.pop("dkim", replace(base.dkim, key_file=shared_dkim_key_file()))
    # No DNS here unless a test brings its own server (tests/dnsserver.py).
    overrides.setdefault("auth", replace(base.auth, inbound="off"))
    return replace(base, database=database, upstream=upstream,
                   inbound=inbound, submission=submission, dkim=dkim_config, **overrides)


@dataclass
class Pair:
    """A provisioned relationship, with the addresses tests need."""

    seller: str
    buyer: str
    seller_alias: str  # the buyer writes here
    buyer_alias: str  # the seller writes here
    relationship_id: int


class RunningRelay:
    def __init__(self, config, clock=None):
        self.config = config
        self.threaded = ThreadedRelay(config, **({"clock": clock} if clock else {}))
        self.host, self.port = self.threaded.start()
        server = self.threaded.server
        self.submission_port = server.submission_address[1] if server.submission_address else None
        self.submission_tls_port = server.submission_tls_address[1] if server.submission_tls_address else None

    @property
    def store(self):
        return self.threaded.server.store

    def call(self, coro):
        return self.threaded.call(coro)

    def pair(self, seller="seller@shop.example", buyer="buyer@mail.example",
             seller_name="Sam Seller", buyer_name="Bea Buyer", order="ORDER-1") -> Pair:
        store = self.store
        if self.call(store.get_party("seller", seller)) is None:
            self.call(store.add_party("seller", seller, seller_name))
        if self.call(store.get_party("buyer", buyer)) is None:
            self.call(store.add_party("buyer", buyer, buyer_name))
        # Placed now: seller messages are inside the contact window.
        relationship, _ = self.call(store.add_order(order, seller, buyer, utc_now(), self.config.domain))
        return Pair(seller, buyer, relationship.seller_alias, relationship.buyer_alias, relationship.id)

    def archive(self, archive_id: int) -> dict:
        return self.call(self.store.archive_row(archive_id))

    def archive_rows(self) -> list[dict]:
        return [self.archive(i) for i in self.call(self.store.archive_ids())]

    def stop(self):
        if self.threaded is not None:
            self.threaded.stop(drain_seconds=10)
            self.threaded = None


def message(sender: str, to: str, subject: str = "Hello", body: str = "Hi there.\n",
            headers: dict | None = None, message_id: str | None = "<m1@client.example>") -> bytes:
    """A plain text message with CRLF line ends."""
    lines = [f"From: {sender}", f"To: {to}", f"Subject: {subject}",
             "Date: Thu, 26 Nov 2026 10:00:00 +0000"]
    if message_id:
        lines.append(f"Message-ID: {message_id}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    text = "\n".join(lines) + "\n\n" + body
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


def upstream_url(upstream: RecordingUpstream, scheme: str = "smtp", userinfo: str = "") -> str:
    at = f"{userinfo}@" if userinfo else ""
    return f"{scheme}://{at}127.0.0.1:{upstream.port}"


def target(url: str) -> UpstreamTarget:
    return config_module.parse_upstream_url("upstream.url", url)
