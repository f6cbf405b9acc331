"""Upstream delivery: hand a finished message to the smarthost.

An upstream has one method, ``deliver(mail_from, rcpt_to, data)``, which
returns a short description of what the upstream said on success and raises
`DeliveryError` carrying the Reply for the client otherwise. That Reply is
decided in one place, `reply_for_upstream()`: any 4xx, a refused connection,
a timeout or a TLS failure is transient (451, the client keeps the message
and retries); a 5xx is permanent, and its text never repeats the upstream's
words, which may name the real recipient.

Backends: SMTP through aiosmtplib (``smtp://``, ``smtp+starttls://``,
``smtps://``) and ``maildir:DIR``, which writes one ``.eml`` per message
atomically (temporary file, fsync, rename) for single-machine trials.
The smarthost's connections are reused (`SmtpUpstream`: a few messages
per TLS handshake and login instead of one); ``mx:`` opens one connection
per message, as each may go to another host.

`queue_id()` picks the upstream's own id for the message out of its reply
(postfix "queued as 4Xyz", exim "OK id=1abc-000-XY"), for the log line that
lets an operator follow a message into the upstream's log.

`WatchedUpstream` wraps a backend and keeps a `DeliveryRecord` of how its
recent deliveries ended, so /healthz can say when the upstream has refused
or been unreachable for every delivery for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Protocol

import aiosmtplib
import aiosmtplib.protocol
import aiosmtplib.smtp

from relay import replies
from relay.config import UpstreamConfig
from relay.replies import Reply


class DeliveryError(Exception):
    """The upstream did not take the message. `detail` is for the log only."""

    def __init__(self, reply: Reply, detail: str):
        super().__init__(f"{reply.line()} ({detail})")
        self.reply = reply
        self.detail = detail


class Upstream(Protocol):
    async def deliver(self, mail_from: str, rcpt_to: str, data: bytes) -> str: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def reply_for_upstream(code: int, message: str = "") -> Reply:
    """The reply the client sees for an upstream's refusal `code`."""
    if 400 <= code < 500:
        return replies.UPSTREAM_DEFERRED
    if 500 <= code < 600:
        enhanced = message.split(" ", 1)[0] if message else ""
        if code in (550, 551, 553) or enhanced.startswith("5.1."):
            return replies.UPSTREAM_NO_MAILBOX
        # 552 is "exceeded storage allocation" (RFC 5321): the message is too
        # big (5.3.4, 5.2.3, or no enhanced code), unless the mailbox is full (5.2.2).
        if enhanced in ("5.3.4", "5.2.3") or (code == 552 and enhanced != "5.2.2"):
            return replies.UPSTREAM_TOO_BIG
        return replies.UPSTREAM_REJECTED
    # A reply outside 4xx/5xx where a refusal was expected: the upstream is
    # confused, so keep the message and let the client retry.
    return replies.UPSTREAM_DEFERRED


# The forms of "your message is queued as X" in the 250 after DATA that
# common servers use: postfix "2.0.0 Ok: queued as 4XyzAB12", exim
# "OK id=1tAbCd-000123-Xy", and a maildir upstream's "written NAME".
_QUEUE_ID = re.compile(r"\b(?:queued as|id=|written)\s*([A-Za-z0-9][\w.@:-]*)", re.IGNORECASE)


def queue_id(reply_text: str) -> str:
    """The upstream's id for the message from its accepting reply, or the
    whole reply (one line) when it names none in a form we know."""
    found = _QUEUE_ID.search(reply_text)
    return found.group(1).rstrip(".:") if found else " ".join(reply_text.split())


# aiosmtplib passes over every message it sends three times with regular
# expressions, on the event loop (about 1 ms per 100 KB each): lone CR or
# LF to CRLF before DATA and again in sendmail() to count the SIZE=
# parameter (smtp.py imports that function by name, so both names are set),
# and dot-stuffing. The relay's messages have CRLF line ends only (DATA
# refuses bare CR and LF, the pipeline writes CRLF) and seldom a line that
# starts with a dot, so these return such a message as it is and leave
# anything else to aiosmtplib's own code; the result is the same bytes
# (tests/unit/test_forward_fast_path.py).
_normalize_line_endings = aiosmtplib.protocol.normalize_message_line_endings


def normalize_message_line_endings(message: bytes) -> bytes:
    crlf = message.count(b"\r\n")
    if crlf == message.count(b"\n") == message.count(b"\r") and message.endswith(b"\r\n"):
        return message
    return _normalize_line_endings(message)


class DotStuffing:
    """aiosmtplib's PERIOD_REGEX (`(?m)^\\.`), whose `sub` leaves a message
    in which no line starts with a dot as it is, without a pass of the
    regular expression."""

    def __init__(self, pattern: re.Pattern):
        self.pattern = pattern

    def sub(self, replacement: bytes, message: bytes, count: int = 0) -> bytes:
        if message[:1] != b"." and b"\n." not in message:
            return message
        return self.pattern.sub(replacement, message, count)


# The message is written in pieces of DATA_CHUNK octets, each once the
# transport has sent most of the one before (its flow control), and the
# final dot on its own: aiosmtplib's own DATA appends ".\r\n" to the
# message (a whole copy) and hands all of it to the transport at once,
# which copies what the socket does not take at once into its buffer (most
# of a big message). For a 10 MB attachment those were two copies held in
# the event loop's process while it waited for the upstream's reply.
DATA_CHUNK = 1 << 20


async def execute_data_command(self, message: bytes, timeout: float | None = None):
    """aiosmtplib's SMTPProtocol.execute_data_command, the same dialogue and
    bytes on the wire, without copying the message (above)."""
    if self._command_lock is None:
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    message = aiosmtplib.protocol.normalize_message_line_endings(message)
    message = aiosmtplib.protocol.PERIOD_REGEX.sub(b"..", message)
    async with self._command_lock:
        self._response_pending = True
        self.write(b"DATA\r\n")
        start_response = await self.read_response(timeout=timeout)
        if start_response.code != aiosmtplib.SMTPStatus.start_input:
            raise aiosmtplib.SMTPDataError(start_response.code, start_response.message)
        self._response_pending = True
        view = memoryview(message)
        for offset in range(0, len(view), DATA_CHUNK):
            self.write(view[offset:offset + DATA_CHUNK])
            # Bounded by the delivery's own timeout (SmtpUpstream._send).
            await self._drain_helper()
        self.write(b".\r\n")
        response = await self.read_response(timeout=timeout)
        if response.code != aiosmtplib.SMTPStatus.completed:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


aiosmtplib.protocol.normalize_message_line_endings = normalize_message_line_endings
aiosmtplib.smtp.normalize_message_line_endings = normalize_message_line_endings
if not isinstance(aiosmtplib.protocol.PERIOD_REGEX, DotStuffing):
    aiosmtplib.protocol.PERIOD_REGEX = DotStuffing(aiosmtplib.protocol.PERIOD_REGEX)
aiosmtplib.protocol.SMTPProtocol.execute_data_command = execute_data_command


class Goodbyes:
    """QUIT in the background: once the upstream has answered the data, the
    message is delivered (or refused), and neither the client's reply nor
    the outcome waits for an upstream that is slow to say goodbye. `close()`
    lets the last of them finish when the relay stops."""

    def __init__(self):
        self._tasks: set[asyncio.Task] = set()

    @contextlib.asynccontextmanager
    async def after(self, client: aiosmtplib.SMTP):
        """Around one transaction on `client`: QUIT in the background when it
        ended with a reply (accepted or refused); hang up at once when it
        did not (a timeout, a dropped or broken connection: the dialogue is
        in no state for another command)."""
        try:
            yield
        except aiosmtplib.SMTPResponseException:
            self.say(client)
            raise
        except BaseException:
            client.close()
            raise
        self.say(client)

    def say(self, client: aiosmtplib.SMTP) -> None:
        if not client.is_connected:
            client.close()
            return
        task = asyncio.ensure_future(self._goodbye(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _goodbye(client: aiosmtplib.SMTP) -> None:
        try:
            async with asyncio.timeout(5):
                await client.quit()
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError, ssl.SSLError):
            pass
        finally:
            client.close()

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class _Client(aiosmtplib.SMTP):
    """An aiosmtplib client that knows whether its transaction got as far
    as DATA: until then the upstream cannot have taken the message, so a
    reused connection that turns out to be gone may be replaced and the
    message sent again without any risk of a second copy."""

    data_started = False

    async def data(self, message, /, **kwargs):
        self.data_started = True
        return await super().data(message, **kwargs)


@dataclass(eq=False)
class _Connection:
    client: _Client
    used: int = 0  # messages it carried
    expiry: asyncio.TimerHandle | None = None


class _Stale(Exception):
    """A reused connection was gone before DATA: use a fresh one."""


def _is_hangup(exc: BaseException) -> bool:
    if isinstance(exc, (aiosmtplib.SMTPServerDisconnected, ConnectionError)):
        return True
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return any(refusal.code == 421 for refusal in exc.recipients)
    return isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code == 421


class SmtpUpstream:
    """A smarthost over SMTP, its connections reused: after a message the
    connection waits `reuse_idle_seconds` for the next one and carries up
    to `reuse_count` messages (0: one connection per message), then says
    QUIT. A reused connection that the upstream closed meanwhile is noticed
    before DATA and replaced (`_Stale`); `close()` says QUIT on every idle
    one."""

    def __init__(self, config: UpstreamConfig, local_hostname: str):
        self.goodbyes = Goodbyes()
        target = config.url
        self.target = target
        self.timeout = config.timeout
        self.local_hostname = local_hostname
        self.reuse_count = config.reuse_count
        self.reuse_idle_seconds = config.reuse_idle_seconds
        self.tls_context: ssl.SSLContext | None = None
        if target.scheme in ("smtps", "smtp+starttls"):
            self.tls_context = ssl.create_default_context(cafile=config.ca_file or None)
        self._idle: list[_Connection] = []
        self._closed = False
        self.connections_made = 0  # for the tests and the bench: how often reuse paid

    def __str__(self) -> str:
        return str(self.target)

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def deliver(self, mail_from: str, rcpt_to: str, data: bytes) -> str:
        try:
            connection = self._take_idle()
            if connection is not None:
                try:
                    return await self._send(connection, mail_from, rcpt_to, data, reused=True)
                except _Stale:
                    pass
            return await self._send(_Connection(self._client()), mail_from, rcpt_to, data, reused=False)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refusal = exc.recipients[0]
            raise DeliveryError(reply_for_upstream(refusal.code, refusal.message),
                                f"upstream refused recipient: {refusal.code} {refusal.message}") from None
        except aiosmtplib.SMTPAuthenticationError as exc:
            # Our credentials are wrong: an operator problem, never the sender's.
            raise DeliveryError(replies.UPSTREAM_UNAVAILABLE,
                                f"upstream authentication failed: {exc.code} {exc.message}") from None
        except aiosmtplib.SMTPResponseException as exc:
            raise DeliveryError(reply_for_upstream(exc.code, exc.message),
                                f"upstream said {exc.code} {exc.message}") from None
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            raise DeliveryError(replies.UPSTREAM_UNAVAILABLE,
                                f"upstream unreachable: {type(exc).__name__}: {exc}") from None

    async def _send(self, connection: _Connection, mail_from: str, rcpt_to: str, data: bytes,
                    reused: bool) -> str:
        client = connection.client
        client.data_started = False
        try:
            # aiosmtplib's timeout bounds each reply; this bounds the delivery.
            async with asyncio.timeout(self.timeout):
                if not reused:
                    self.connections_made += 1
                    await client.connect()
                # The client object rather than aiosmtplib.send(): send() refuses
                # the empty (null) reverse-path that bounce notices must use.
                errors, response = await client.sendmail(mail_from, [rcpt_to], data)
        except aiosmtplib.SMTPResponseException as exc:
            if reused and not client.data_started and _is_hangup(exc):
                client.close()
                raise _Stale from exc
            # A refusal: sendmail has said RSET, but a connection that just
            # refused is not worth keeping.
            self.goodbyes.say(client)
            raise
        except BaseException as exc:
            client.close()  # a timeout, a dropped or broken connection: in no state for more
            if reused and not client.data_started and _is_hangup(exc):
                raise _Stale from exc
            raise
        if errors:  # one recipient only, so this means it was refused
            self.goodbyes.say(client)
            code, message = next(iter(errors.values()))
            raise DeliveryError(reply_for_upstream(code, message), f"upstream said {code} {message}")
        self._put_back(connection)
        return response

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()  # the most recent: the least likely to have timed out
            if connection.expiry is not None:
                connection.expiry.cancel()
            if connection.client.is_connected:
                return connection
            connection.client.close()
        return None

    def _put_back(self, connection: _Connection) -> None:
        connection.used += 1
        client = connection.client
        if self._closed or not client.is_connected or connection.used >= max(self.reuse_count, 1):
            self.goodbyes.say(client)
            return
        loop = asyncio.get_running_loop()
        connection.expiry = loop.call_later(self.reuse_idle_seconds, self._expire, connection)
        self._idle.append(connection)

    def _expire(self, connection: _Connection) -> None:
        if connection in self._idle:
            self._idle.remove(connection)
            self.goodbyes.say(connection.client)

    def _client(self) -> _Client:
        target = self.target
        return _Client(
            hostname=target.host,
            port=target.port,
            username=target.username or None,
            password=target.password or None,
            local_hostname=self.local_hostname,
            use_tls=target.scheme == "smtps",
            start_tls=target.scheme == "smtp+starttls",
            tls_context=self.tls_context,
            timeout=self.timeout,
        )

    async def ping(self) -> None:
        """Connect, greet (and log in) and quit: raises if the upstream is not answering."""
        async with self._client():
            pass

    async def close(self) -> None:
        """QUIT on every idle connection, and wait for every goodbye."""
        self._closed = True
        while self._idle:
            connection = self._idle.pop()
            if connection.expiry is not None:
                connection.expiry.cancel()
            self.goodbyes.say(connection.client)
        await self.goodbyes.close()


class MaildirUpstream:
    """Writes each message to DIR/<time>.<random>.eml; never a half-written file."""

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def __str__(self) -> str:
        return f"maildir:{self.directory}"

    async def deliver(self, mail_from: str, rcpt_to: str, data: bytes) -> str:
        try:
            return await asyncio.to_thread(self._write, data)
        except OSError as exc:
            raise DeliveryError(replies.UPSTREAM_UNAVAILABLE,
                                f"cannot write to {self.directory}: {exc.strerror}") from None

    async def ping(self) -> None:
        def check():
            self.directory.mkdir(parents=True, exist_ok=True)
            if not os.access(self.directory, os.W_OK):
                raise PermissionError(f"{self.directory} is not writable")
        await asyncio.to_thread(check)

    def _write(self, data: bytes) -> str:
        tmp_dir = self.directory / ".tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns()}.{uuid.uuid4().hex}.eml"
        tmp_path = tmp_dir / name
        with open(tmp_path, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, self.directory / name)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return f"written {name}"


    async def close(self) -> None:
        pass


class MxUpstream:
    """Direct delivery: the recipient domain's MX hosts in preference order
    (RFC 5321 §5.1: no MX → the domain's own address; a null MX "0 ." →
    the domain takes no mail), each address of each host in turn, with
    opportunistic STARTTLS (unverified, as MTAs do without DANE/MTA-STS).

    A refused connection, a timeout or a 4xx moves on to the next host; the
    first 5xx is final; when every host failed temporarily the client gets
    a 451. DNS goes through the relay's resolver (`[dns] nameservers`)."""

    def __init__(self, config: UpstreamConfig, local_hostname: str, resolver, port: int = 25):
        self.goodbyes = Goodbyes()
        self.timeout = config.timeout
        self.local_hostname = local_hostname
        self.resolver = resolver
        self.port = port
        self.tls_context = ssl.create_default_context()
        self.tls_context.check_hostname = False
        self.tls_context.verify_mode = ssl.CERT_NONE

    def __str__(self) -> str:
        return "mx:"

    def _lookup(self, domain: str) -> list[str]:
        """The addresses to try, best first. Raises DeliveryError."""
        from relay import dns as relay_dns

        try:
            answer = relay_dns.resolve(self.resolver, domain, "MX")
        except relay_dns.TemporaryDNSError as exc:
            raise DeliveryError(replies.MX_DNS_TEMPORARY, f"MX lookup for {domain}: {exc}") from None
        if answer is None:  # NXDOMAIN or no MX: the domain itself is the host
            hosts = [domain]
        else:
            records = sorted(answer, key=lambda r: r.preference)
            if len(records) == 1 and records[0].exchange.to_text() == ".":
                raise DeliveryError(replies.MX_NO_MAIL, f"{domain} publishes a null MX")
            hosts = [r.exchange.to_text().rstrip(".") for r in records]
        addresses, temporary = [], False
        for host in hosts:
            for rdtype in ("A", "AAAA"):
                try:
                    found = relay_dns.resolve(self.resolver, host, rdtype)
                except relay_dns.TemporaryDNSError:
                    temporary = True
                    continue
                addresses.extend(r.to_text() for r in found or ())
        if not addresses:
            if temporary:
                raise DeliveryError(replies.MX_DNS_TEMPORARY, f"no address for the MX hosts of {domain} yet")
            raise DeliveryError(replies.MX_NO_MAIL, f"{domain} has no mail host")
        return list(dict.fromkeys(addresses))

    async def deliver(self, mail_from: str, rcpt_to: str, data: bytes) -> str:
        domain = rcpt_to.rpartition("@")[2]
        hosts = await asyncio.to_thread(self._lookup, domain)
        last_error: DeliveryError | None = None
        for host in hosts:
            client = aiosmtplib.SMTP(hostname=host, port=self.port, local_hostname=self.local_hostname,
                                     start_tls=None, tls_context=self.tls_context, timeout=self.timeout)
            try:
                async with self.goodbyes.after(client), asyncio.timeout(self.timeout):  # per host
                    await client.connect()
                    errors, response = await client.sendmail(mail_from, [rcpt_to], data)
                if not errors:
                    return f"{host}: {response}"
                code, message = next(iter(errors.values()))
                error = DeliveryError(reply_for_upstream(code, message), f"{host} said {code} {message}")
            except aiosmtplib.SMTPRecipientsRefused as exc:
                refusal = exc.recipients[0]
                error = DeliveryError(reply_for_upstream(refusal.code, refusal.message),
                                      f"{host} refused the recipient: {refusal.code} {refusal.message}")
            except aiosmtplib.SMTPResponseException as exc:
                error = DeliveryError(reply_for_upstream(exc.code, exc.message), f"{host} said {exc.code} {exc.message}")
            except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
                error = DeliveryError(replies.UPSTREAM_UNAVAILABLE, f"{host} unreachable: {type(exc).__name__}")
            if error.reply.permanent:
                raise error
            last_error = error
        raise last_error or DeliveryError(replies.UPSTREAM_UNAVAILABLE, f"no host for {domain}")

    async def ping(self) -> None:
        """Direct delivery has no single upstream to check; the resolver must answer."""
        from relay import dns as relay_dns

        await asyncio.to_thread(relay_dns.resolve, self.resolver, self.local_hostname, "A")

    async def close(self) -> None:
        await self.goodbyes.close()


# The upstream counts as failing once this many deliveries in a row, spread
# over at least this many seconds, all failed: one refused message, or a
# burst in the second the smarthost restarts, is not an outage.
FAILING_AFTER_DELIVERIES = 3
FAILING_AFTER_SECONDS = 30.0

# Refusals about one recipient or one recipient's domain say nothing about
# the upstream: the next message may well go through.
_RECIPIENT_PROBLEMS = {replies.UPSTREAM_NO_MAILBOX, replies.MX_NO_MAIL, replies.MX_DNS_TEMPORARY}


class DeliveryRecord:
    """The deliveries that failed since the last one that succeeded.

    `problem()` is a line for /healthz once `FAILING_AFTER_DELIVERIES`
    deliveries in a row failed over `FAILING_AFTER_SECONDS` or more (the
    relay's clock), None otherwise; the next delivery the upstream accepts
    clears it. It names our reply, never the upstream's words (they may
    name the recipient)."""

    def __init__(self, clock: Callable[[], datetime]):
        self.clock = clock
        self.failures = 0
        self.first_failure: datetime | None = None
        self.last_reply: Reply | None = None

    def succeeded(self) -> None:
        self.failures, self.first_failure, self.last_reply = 0, None, None

    def failed(self, error: DeliveryError) -> None:
        if error.reply in _RECIPIENT_PROBLEMS:
            return
        if not self.failures:
            self.first_failure = self.clock()
        self.failures += 1
        self.last_reply = error.reply

    def problem(self) -> str | None:
        if self.failures < FAILING_AFTER_DELIVERIES or self.first_failure is None:
            return None
        seconds = (self.clock() - self.first_failure).total_seconds()
        if seconds < FAILING_AFTER_SECONDS:
            return None
        return (f"the last {self.failures} deliveries over {seconds:.0f} s all failed, none accepted since "
                f"(last: {self.last_reply.line()})")


class WatchedUpstream:
    """An upstream whose deliveries are recorded in `record` (see DeliveryRecord)."""

    def __init__(self, upstream: Upstream, clock: Callable[[], datetime]):
        self.upstream = upstream
        self.record = DeliveryRecord(clock)

    def __str__(self) -> str:
        return str(self.upstream)

    async def deliver(self, mail_from: str, rcpt_to: str, data: bytes) -> str:
        try:
            response = await self.upstream.deliver(mail_from, rcpt_to, data)
        except DeliveryError as error:
            self.record.failed(error)
            raise
        self.record.succeeded()
        return response

    async def ping(self) -> None:
        await self.upstream.ping()

    async def close(self) -> None:
        await self.upstream.close()


def make_upstream(config: UpstreamConfig, local_hostname: str, resolver=None) -> Upstream:
    if config.url.scheme == "maildir":
        return MaildirUpstream(config.url.path)
    if config.url.scheme == "mx":
        return MxUpstream(config, local_hostname, resolver)
    return SmtpUpstream(config, local_hostname)
