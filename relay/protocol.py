"""The SMTP session: aiosmtpd's protocol with the listener limits of a
server that faces the internet.

`RelaySMTP` is what every listener speaks. On top of aiosmtpd it adds:

- connection limits (overall and per client address) checked before the
  greeting, answered `421` and closed;
- an idle timeout that says `421 4.4.2` before closing (aiosmtpd closes
  silently), a time limit for one DATA transfer and one for the session,
  against clients that dribble a byte now and then (slowloris);
- its own DATA reader: one growing buffer instead of a list of lines,
  nothing kept once the message is over the size limit, lines of up to
  64 KiB (the pipeline re-encodes what is over 998 octets), enhanced
  status codes on every refusal. Line endings as postfix's
  `smtpd_forbid_bare_newline = normal`: the end of data is `CRLF.CRLF`
  only; a content line ending in a bare LF is read as ending in CRLF
  (scripts send `smtplib.sendmail(..., msg.as_bytes())`); a bare CR, and a
  dot line that a lenient server would take for the end (`LF.LF`,
  `LF.CRLF`, `CRLF.LF`: SMTP smuggling), are refused `550 5.6.11`. With
  `[inbound] bare_newline = "reject"` any bare LF is refused too;
- the PROXY protocol header, expected from `[limits] proxy_hosts` only;
- enhanced status codes (RFC 3463) added to aiosmtpd's own stock replies;
- postfix's XFORWARD on the inbound listener (`InboundSMTP`).

Together with handler.py, this is where a `Reply` becomes a line on the wire.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections import Counter

from aiosmtpd.smtp import SMTP, Session, syntax

from relay import replies
from relay.config import LimitsConfig
from relay.replies import Reply

log = logging.getLogger("relay.protocol")

PROXY_HEADER_SECONDS = 10.0
# RFC 5321 §4.5.3.1.6 says 1000 octets with the CRLF, but real Outlook
# replies and newsletters have longer lines; postfix takes them and so does
# the relay, up to this (the line ending and a dot added for transparency
# counted). What is delivered is cut to 998 by the pipeline (relay/pipeline/lines.py).
MAX_LINE_OCTETS = 64 * 1024
BARE_NEWLINE_MODES = ("normal", "reject")
# A line that is a single dot but not the end of data (CRLF.CRLF): one
# ending in a bare LF, or one after a line that ended in a bare LF. A more
# lenient server behind us could take it for the end (SMTP smuggling).
_FAKE_END = re.compile(rb"(?:^|\n)\.\n|(?:^|[^\r])\n\.\r\n")


class _LineMeter:
    """The lengths of the lines of data arriving in chunks:
    `first_too_long(chunk)` is where in the chunk the first line over
    MAX_LINE_OCTETS ends (the LF counted; a line that starts with a dot may
    be one longer, for the dot added for transparency), or -1."""

    def __init__(self):
        self.length = 0  # of the line in progress, so far
        self.first = None  # its first octet

    def first_too_long(self, chunk: bytes) -> int:
        """The offset just past the LF ending the first over-long line in
        `chunk`, or -1; a line still in progress is judged once it ends."""
        if self.length + len(chunk) <= MAX_LINE_OCTETS:
            # No line in it can be too long; only the one in progress is tracked.
            last_lf = chunk.rfind(b"\n")
            if last_lf < 0:
                self._grow(chunk)
            else:
                self.length, self.first = 0, None
                self._grow(chunk[last_lf + 1:])
            return -1
        pieces = chunk.split(b"\n")
        ended, rest = pieces[:-1], pieces[-1]
        if ended:
            first_piece, *whole = ended
            end = len(first_piece) + 1
            if self._over(self.length + end, self.first if self.length else (first_piece[:1] or None)):
                return end
            if whole and max(map(len, whole)) >= MAX_LINE_OCTETS:  # rarely: then look closer
                for piece in whole:
                    end += len(piece) + 1
                    if self._over(len(piece) + 1, piece[:1]):
                        return end
            self.length, self.first = 0, None
        self._grow(rest)
        return -1

    def _grow(self, piece: bytes) -> None:
        if piece and not self.length:
            self.first = piece[:1]
        self.length += len(piece)

    @staticmethod
    def _over(length: int, first) -> bool:
        return length > MAX_LINE_OCTETS and (length > MAX_LINE_OCTETS + 1 or first != b".")


def _last_two(before: bytes, data: bytes) -> bytes:
    """The last two octets of the stream once `data` follows `before` (the
    two before it), without copying `data`."""
    return data[-2:] if len(data) >= 2 else (before + data)[-2:]


def parse_ip(text: str):
    try:
        return ipaddress.ip_address(str(text).split("%", 1)[0])
    except ValueError:
        return None


class ConnectionLimiter:
    """Open connections of one relay process, overall and per client IP.
    Hosts in `exempt` (postfix in front, a PROXY load balancer) count
    towards the total only: all the internet's mail arrives from them."""

    def __init__(self, limits: LimitsConfig, exempt=()):
        self.limits = limits
        self.exempt = {ip for ip in map(parse_ip, exempt) if ip is not None}
        self.total = 0
        self.per_ip: Counter = Counter()

    def admit(self, peer_ip: str) -> Reply | None:
        """Take a place for a new connection, or say why there is none."""
        if self.total >= self.limits.max_connections:
            return replies.TOO_MANY_CONNECTIONS
        if parse_ip(peer_ip) not in self.exempt and self.per_ip[peer_ip] >= self.limits.max_connections_per_ip:
            return replies.TOO_MANY_CONNECTIONS_FROM_IP
        self.total += 1
        self.per_ip[peer_ip] += 1
        return None

    def release(self, peer_ip: str) -> None:
        self.total -= 1
        self.per_ip[peer_ip] -= 1
        if self.per_ip[peer_ip] <= 0:
            del self.per_ip[peer_ip]


# RFC 3463 class and subject for aiosmtpd's stock replies, which carry none.
_STOCK_ENHANCED = {500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4",
                   530: "5.7.0", 535: "5.7.8", 538: "5.7.11", 554: "5.7.0", 555: "5.5.4",
                   454: "4.7.0", 421: "4.3.0", 452: "4.3.1"}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -]\d\.\d{1,3}\.\d{1,3}( |$)")
_STOCK_SIZE_REFUSAL = "552 Error: message size exceeds fixed maximum message size"


class RelaySession(Session):
    """aiosmtpd's Session without the warning on every login.

    aiosmtpd 1.4 deprecates `Session.login_data` (a property that logs
    "Session.login_data is deprecated" to `mail.log` when read or set) and
    then sets it itself on every successful AUTH, whatever API the server
    uses (aio-libs/aiosmtpd#347). The relay reads `auth_data` only, so here
    it is a plain attribute again."""

    login_data = None


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP with the relay's limits; see the module docstring."""

    def __init__(self, handler, *, limits: LimitsConfig = LimitsConfig(), limiter: ConnectionLimiter | None = None,
                 proxy_hosts=(), bare_newline: str = "normal", **kwargs):
        kwargs.setdefault("timeout", limits.idle_timeout)
        kwargs.setdefault("command_call_limit", limits.command_call_limit)
        super().__init__(handler, **kwargs)
        self.limits = limits
        self.limiter = limiter
        if bare_newline not in BARE_NEWLINE_MODES:
            raise ValueError(f"bare_newline: expected one of {BARE_NEWLINE_MODES}, got {bare_newline!r}")
        self.bare_newline = bare_newline
        self.proxy_hosts = {ip for ip in map(parse_ip, proxy_hosts) if ip is not None}
        self._admitted: str | None = None  # the peer IP holding a place in the limiter
        self._refusal: Reply | None = None  # answered instead of the greeting
        self._session_timer: asyncio.TimerHandle | None = None
        self._data_timer: asyncio.TimerHandle | None = None

    # --- connection ---------------------------------------------------------

    def _create_session(self) -> Session:
        return RelaySession(self.loop)

    def connection_made(self, transport) -> None:
        if self._original_transport is None and self._session_timer is None:
            # The TCP connection itself (STARTTLS calls this again).
            peer = transport.get_extra_info("peername")
            peer_ip = str(peer[0]) if peer else ""
            if self.limiter is not None:
                self._refusal = self.limiter.admit(peer_ip)
                if self._refusal is None:
                    self._admitted = peer_ip
            # aiosmtpd reads a PROXY header before the greeting when this is
            # set; only the configured proxies may (or must) send one.
            self._proxy_timeout = PROXY_HEADER_SECONDS if parse_ip(peer_ip) in self.proxy_hosts else None
            self._session_timer = asyncio.get_running_loop().call_later(
                self.limits.session_timeout, self._say_and_close, replies.SESSION_TIMEOUT)
        super().connection_made(transport)

    def connection_lost(self, error) -> None:
        if self._admitted is not None and self.limiter is not None:
            self.limiter.release(self._admitted)
            self._admitted = None
        for timer in (self._session_timer, self._data_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        # aiosmtpd's session loop (a private method: the only place to answer
        # a connection instead of greeting it).
        if self._refusal is not None:
            log.warning("%s refused: %s", self.session.peer, self._refusal.text)
            await self.push(self._refusal.line())
            self.transport.close()
            return
        await super()._handle_client()

    def _timeout_cb(self) -> None:
        # aiosmtpd's idle timer: say why before closing.
        self._say_and_close(replies.IDLE_TIMEOUT)

    def _say_and_close(self, reply: Reply) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        log.info("%s: %s", self.session.peer if self.session else "?", reply.text)
        transport.write(reply.line().encode("ascii") + b"\r\n")
        transport.close()

    async def push(self, status) -> None:
        if isinstance(status, str) and status[:1] in ("4", "5") and not _HAS_ENHANCED.match(status):
            if status == _STOCK_SIZE_REFUSAL:
                status = replies.MESSAGE_TOO_BIG.line()
            else:
                enhanced = _STOCK_ENHANCED.get(int(status[:3]), f"{status[0]}.0.0")
                status = f"{status[:3]} {enhanced} {status[4:]}"
        await super().push(status)

    # --- MAIL and RCPT ------------------------------------------------------
    # aiosmtpd's address parser is lenient: it reads "<a@b" as a@b and
    # "<a@b\r>" as a@b. An envelope address is where relay tricks and
    # injected commands hide, so the argument is checked as sent first.

    async def smtp_MAIL(self, arg: str) -> None:
        if arg and not _well_formed_path(arg):
            await self.push(replies.BAD_SENDER_SYNTAX.line())
            return
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str) -> None:
        if arg and not _well_formed_path(arg):
            await self.push(replies.BAD_RECIPIENT_SYNTAX.line())
            return
        await super().smtp_RCPT(arg)

    # --- DATA ---------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        if not self.envelope.rcpt_tos:
            await self.push(replies.NEED_RCPT.line())
            return
        if arg:
            await self.push(replies.DATA_SYNTAX.line())
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        loop = asyncio.get_running_loop()
        self._data_timer = loop.call_later(self.limits.data_timeout, self._say_and_close, replies.DATA_TIMEOUT)
        try:
            content, refusal = await self._read_data(loop)
        finally:
            self._data_timer.cancel()
            self._data_timer = None
        if refusal is not None:
            log.info("%s DATA refused: %s", self.session.peer, refusal.text)
            self._set_post_data_state()
            await self.push(refusal.line())
            return
        self._reset_timeout()
        self.envelope.content = self.envelope.original_content = content
        del content  # the handler may let go of the message while it works (relay/spool.py)
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)

    async def _read_data(self, loop) -> tuple[bytes, Reply | None]:
        """Read to the end of data (a dot line after a CRLF, ending in CRLF);
        return the message (dots unstuffed, every line ending in CRLF) or
        the refusal to give once it is all read (RFC 5321 §4.2.5: the reply
        comes after the data). Past a refusal nothing more is kept.

        The data is read in the stream's chunks, not line by line (a 500 KB
        attachment is 9,000 lines: an await and a pass of this loop each),
        up to each ".<CRLF>": where the two octets before it are a CRLF (or
        it opens the data, after the DATA command's own CRLF), that is the
        dot line that ends the data, exactly what reading the lines up to
        each LF would find. Lines are still what the limits count: a line
        is everything up to an LF, and one over MAX_LINE_OCTETS (a dot added
        for transparency not counted) is refused.

        The checks and rewrites that can be done on the whole (bare CR or
        LF, the fake ends of smuggling, CRLF for bare LF, dot-unstuffing)
        are done once at the end, by bytes methods in C."""
        reader = self._reader
        limit = self.data_size_limit or 0
        buffer = bytearray()
        size, refusal = 0, None
        before = b"\r\n"  # the last two octets read: at first, the DATA command's CRLF
        line = _LineMeter()
        while True:
            try:
                chunk = await reader.readuntil(b".\r\n")
            except asyncio.LimitOverrunError as error:
                # No dot line within the stream's limit (or one beyond it):
                # take what is certainly data; a ".<CRLF>" being received
                # stays in the stream.
                chunk, end = await reader.read(error.consumed), False
            else:
                data = chunk[:-3]
                end = _last_two(before, data) == b"\r\n"
                if end:
                    chunk = data
            before = _last_two(before, chunk)
            self._reset_timeout()  # the idle timer measures silence, not the transfer
            if refusal is None and chunk:
                too_long_end = line.first_too_long(chunk)
                if limit and size + len(chunk) > limit:
                    # Line reading counts the size as each line ends: the
                    # refusal is the one whose line ends first (the size's
                    # if both are the same line's).
                    size_end = chunk.find(b"\n", limit - size)
                    if too_long_end != -1 and (size_end == -1 or too_long_end <= size_end):
                        refusal = replies.LINE_TOO_LONG
                    else:
                        refusal = replies.MESSAGE_TOO_BIG.with_text(
                            f"Message size exceeds fixed maximum message size of {limit} bytes")
                    buffer = bytearray()
                elif too_long_end != -1:
                    refusal, buffer = replies.LINE_TOO_LONG, bytearray()
                else:
                    buffer += chunk
                size += len(chunk)
            if end:
                break
        if refusal is not None:
            return b"", refusal
        # The data ends in CRLF (before the dot line): a CR that is not
        # before an LF is bare, and so is an LF that is not after a CR.
        crlfs = buffer.count(b"\r\n")
        if buffer.count(b"\r") != crlfs:
            return b"", replies.BARE_LINE_ENDING
        if buffer.count(b"\n") != crlfs:
            if self.bare_newline == "reject" or _FAKE_END.search(buffer):
                return b"", replies.BARE_LINE_ENDING
            # postfix's "normal": the line is read as if it ended in CRLF.
            # No bare CR is left, so every LF not after a CR gains one.
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        # Dot-unstuffing: the first dot of every line that starts with one.
        if buffer[:1] == b".":
            del buffer[0]
        if b"\r\n." in buffer:
            buffer = buffer.replace(b"\r\n.", b"\r\n")
        return bytes(buffer), None


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _well_formed_path(arg: str) -> bool:
    """No control character anywhere, and a "<" closed by a ">" after it."""
    if _CONTROL.search(arg):
        return False
    opened = arg.find("<")
    return opened < 0 or arg.find(">", opened) > opened


class InboundSMTP(RelaySMTP):
    """The inbound listener's session, plus postfix's XFORWARD command
    (XFORWARD_README): postfix in front tells us the real client's address
    and HELO, which SPF needs. Accepted only from `[inbound] xforward_hosts`;
    anyone else could claim any address."""

    def __init__(self, handler, *, xforward_hosts=(), **kwargs):
        super().__init__(handler, **kwargs)
        self.xforward_hosts = {ip for ip in map(parse_ip, xforward_hosts) if ip is not None}

    def xforward_allowed(self) -> bool:
        peer = self.session.peer[0] if self.session and self.session.peer else ""
        return parse_ip(peer) in self.xforward_hosts

    @syntax("XFORWARD attribute=value ...")
    async def smtp_XFORWARD(self, arg: str) -> None:
        if not self.xforward_allowed():
            await self.push(replies.XFORWARD_DENIED.line())
            return
        if self.envelope is not None and self.envelope.mail_from:
            await self.push(replies.XFORWARD_IN_TRANSACTION.line())
            return
        values = {}
        for item in (arg or "").split():
            name, eq, value = item.partition("=")
            if not eq or name.upper() not in XFORWARD_ATTRIBUTES:
                await self.push(replies.XFORWARD_BAD_ATTRIBUTE.line())
                return
            value = xtext_decode(value)
            values[name.upper()] = None if value in ("[UNAVAILABLE]", "[TEMPUNAVAIL]") else value
        if not values:
            await self.push(replies.XFORWARD_BAD_ATTRIBUTE.line())
            return
        xforward = getattr(self.session, "xforward", None) or {}
        xforward.update(values)
        self.session.xforward = xforward
        await self.push(replies.XFORWARD_OK.line())


XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")


def xtext_decode(value: str) -> str:
    """RFC 3461 xtext: "+" and two hex digits stand for one byte."""
    out, i = bytearray(), 0
    raw = value.encode("ascii", errors="replace")
    while i < len(raw):
        if raw[i:i + 1] == b"+" and len(raw) >= i + 3:
            try:
                out.append(int(raw[i + 1:i + 3], 16))
                i += 3
                continue
            except ValueError:
                pass
        out.append(raw[i])
        i += 1
    return out.decode("utf-8", errors="replace")
