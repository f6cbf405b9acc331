"""A raw SMTP client for the hostile-input suite: bytes out exactly as the
test wrote them, replies in as (code, enhanced code, text). No smtplib: an
attacker does not normalise line endings, wait for replies or stop when told.

Every read has a socket timeout, so a server that goes silent fails the test
instead of hanging it."""

from __future__ import annotations

import base64
import re
import select
import socket
import ssl
import time
from dataclasses import dataclass

HOST = "127.0.0.1"
PASSWORD = "correct horse battery staple"  # the seller's, when a case asks for one
READ_TIMEOUT = 20.0

_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@dataclass
class Reply:
    code: int
    enhanced: str | None  # RFC 3463 code when the reply carries one
    text: str  # the last line's text after the code (and enhanced code)
    lines: list[str]  # every line as received, without CRLF

    @property
    def key(self) -> tuple[int, str | None]:
        return self.code, self.enhanced

    def __str__(self) -> str:
        return " | ".join(self.lines)


def parse_reply(lines: list[str]) -> Reply:
    last = lines[-1]
    code = int(last[:3])
    rest = last[4:]
    first, _, after = rest.partition(" ")
    if _ENHANCED.match(first):
        return Reply(code, first, after, lines)
    return Reply(code, None, rest, lines)


class ServerClosed(Exception):
    """The server closed the connection (EOF or reset)."""

    def __init__(self, pending: bytes = b""):
        super().__init__(f"connection closed by the server; unparsed bytes: {pending[:200]!r}")
        self.pending = pending


class Client:
    """One SMTP connection on 127.0.0.1, spoken byte by byte. Every client
    is closed at the end of its test (conftest.py), failed or not."""

    opened: list["Client"] = []

    def __init__(self, port: int, *, tls: ssl.SSLContext | None = None, timeout: float = READ_TIMEOUT,
                 connect: bool = True, sock: socket.socket | None = None):
        self.port = port
        self.timeout = timeout
        self.buffer = b""
        self.eof = False
        if sock is None and connect:
            sock = socket.create_connection((HOST, port), timeout=timeout)
            if tls is not None:
                sock = tls.wrap_socket(sock)
        self.sock = sock
        Client.opened.append(self)

    # --- bytes -----------------------------------------------------------------

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8", errors="surrogateescape")
        self.sock.sendall(data)

    def _fill(self, timeout: float | None = None) -> bool:
        """Read once more into the buffer; False at EOF."""
        if self.eof:
            return False
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        except ssl.SSLError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if not self._fill():
                raise ServerClosed(self.buffer)
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    # --- replies ---------------------------------------------------------------

    def reply(self) -> Reply:
        """The next complete (possibly multi-line) reply."""
        lines = []
        while True:
            line = self._line().decode("utf-8", errors="replace")
            lines.append(line)
            if not re.match(r"^\d{3}([ -]|$)", line):
                raise AssertionError(f"not an SMTP reply line: {line!r} (after {lines[:-1]})")
            if len(line) == 3 or line[3] == " ":
                return parse_reply(lines)

    def replies(self, count: int) -> list[Reply]:
        return [self.reply() for _ in range(count)]

    def command(self, line: bytes | str) -> Reply:
        """Send one command line (CRLF added) and read its reply."""
        if isinstance(line, str):
            line = line.encode("utf-8", errors="surrogateescape")
        self.send(line + b"\r\n")
        return self.reply()

    def remaining_replies(self) -> list[Reply]:
        """Every reply up to EOF (the server must close the connection)."""
        out = []
        while True:
            try:
                out.append(self.reply())
            except ServerClosed as closed:
                assert closed.pending == b"", f"an incomplete reply before the close: {closed.pending!r}"
                return out

    def closed_by_server(self, timeout: float = 10.0) -> bool:
        """True when the server closes the connection within `timeout`
        without sending anything more."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = len(self.buffer)
            try:
                more = self._fill(timeout=max(0.01, deadline - time.monotonic()))
            except socket.timeout:
                return False
            if not more:
                return len(self.buffer) == before
        return False

    def poll(self, timeout: float) -> bool:
        """Is there something to read (data or EOF) within `timeout`?"""
        if self.buffer or self.eof:
            return True
        readable, _, _ = select.select([self.sock], [], [], timeout)
        return bool(readable)

    # --- conveniences ----------------------------------------------------------

    def greeting(self) -> Reply:
        return self.reply()

    def ehlo(self, name: str = "client.example") -> Reply:
        reply = self.command(f"EHLO {name}")
        assert reply.code == 250, reply
        return reply

    def hello(self, name: str = "client.example") -> "Client":
        greeting = self.greeting()
        assert greeting.code == 220, greeting
        self.ehlo(name)
        return self

    def auth_plain(self, user: str, password: str) -> Reply:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return self.command(f"AUTH PLAIN {token}")

    def data(self, content: bytes) -> Reply:
        """DATA with `content` sent as is (dot-stuffed) and the end marker."""
        reply = self.command("DATA")
        assert reply.code == 354, reply
        self.send(dot_stuff(content) + b".\r\n")
        return self.reply()

    def transaction(self, mail_from: str, rcpt_to: str, content: bytes) -> Reply:
        """MAIL, RCPT, DATA: the reply to DATA (MAIL and RCPT must be 250)."""
        reply = self.command(f"MAIL FROM:<{mail_from}>")
        assert reply.key == (250, "2.1.0"), reply
        reply = self.command(f"RCPT TO:<{rcpt_to}>")
        assert reply.key == (250, "2.1.5"), reply
        return self.data(content)

    def quit(self) -> None:
        try:
            self.send(b"QUIT\r\n")
            self.reply()
        except (OSError, ServerClosed):
            pass
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def dot_stuff(content: bytes) -> bytes:
    """RFC 5321 §4.5.2 transparency; `content` must end with CRLF. Only
    CRLF-terminated lines are stuffed: bare CR/LF are left as the test wrote
    them."""
    assert content.endswith(b"\r\n"), "end the content with CRLF"
    lines = content.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def unverified_context() -> ssl.SSLContext:
    """The relay's self-signed certificate: encryption without trust."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def archive_id(reply: Reply) -> int:
    match = re.search(r"\(archive (\d+)\)", reply.text)
    assert match, f"no archive id in {reply}"
    return int(match.group(1))


def header_block(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0]


def header_lines(data: bytes) -> list[bytes]:
    """The top-level header fields, unfolded, one per entry."""
    fields: list[bytes] = []
    for line in header_block(data).split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b" " + line.strip()
        else:
            fields.append(line)
    return fields


def field_names(data: bytes) -> list[str]:
    return [line.split(b":", 1)[0].strip().lower().decode("ascii", "replace") for line in header_lines(data)]
