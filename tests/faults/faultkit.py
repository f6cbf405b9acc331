"""Fault injection parts shared by tests/faults/ and scripts/chaos.py.

- `ScriptedUpstream`: a small SMTP server written on raw asyncio streams,
  on 127.0.0.1, that can misbehave at any stage of the conversation
  (refuse, hang up, stall, answer late, hold its reply until released). It
  tells apart what it *saw* (a whole message up to the final ".") from
  what it *accepted* (answered 250 to a client that was still connected),
  because a message the upstream saw but never acknowledged is exactly the
  case where at-least-once delivery makes duplicates.
- `RelayProcess`: `relay serve` as a child process in its own session,
  killable with SIGKILL, whose helper processes (the workers) can
  be listed and checked for leftovers.
- `DatabaseLocker`: another process holding `BEGIN EXCLUSIVE` on the
  relay's SQLite file until told to let go.
- `send()`: one SMTP attempt as a client MTA makes it, reporting the reply
  or the dropped connection, never raising for either.

Everything listens on or connects to 127.0.0.1 only, and every wait here is
bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
SELLER = "seller@shop.example"
BUYER = "buyer@mail.example"

# The longest any helper here waits for something to happen.
WAIT_SECONDS = 30.0


# --- messages ---------------------------------------------------------------------


def fault_message(sender: str, to: str, tag: str, body: str = "Hello from a fault test.\n",
                  size: int = 0) -> bytes:
    """A plain text message whose Subject and Message-ID carry `tag`: the relay
    keeps the Subject (it only scrubs real addresses out of it), so the sink
    can tell which message it got. `size` pads the body with hex lines."""
    if size:
        # 64 random hex digits a line: no dots, no @, nothing the content rules touch, and
        # incompressible enough that the archive row really takes that much room.
        body += "".join(os.urandom(32).hex() + "\n" for _ in range(size // 65 + 1))
    text = (f"From: {sender}\nTo: {to}\nSubject: fault {tag}\n"
            f"Date: Thu, 26 Nov 2026 10:00:00 +0000\nMessage-ID: <{tag}@client.example>\n"
            f"X-Fault-Id: {tag}\n\n{body}")
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


_SUBJECT_TAG = re.compile(rb"^Subject: fault (\S+)\r?$", re.MULTILINE | re.IGNORECASE)


def tag_of(data: bytes) -> str | None:
    """The tag of a message made by `fault_message` (raw or as delivered)."""
    head = data.split(b"\r\n\r\n", 1)[0]
    found = _SUBJECT_TAG.search(head)
    return found.group(1).decode("ascii") if found else None


# --- the client side --------------------------------------------------------------


@dataclass
class Attempt:
    """What one delivery attempt of a client MTA saw."""

    code: int | None  # the reply to the final "." (or the refusal before it); None: connection dropped
    text: str
    stage: str  # where it ended: connect, ehlo, mail, rcpt, data, sent

    @property
    def delivered(self) -> bool:
        return self.code == 250

    @property
    def transient(self) -> bool:
        """The client keeps the message and tries again."""
        return self.code is None or 400 <= self.code < 500

    def __str__(self) -> str:
        return f"{self.code} {self.text} at {self.stage}" if self.code else f"dropped at {self.stage}: {self.text}"


def send(port: int, mail_from: str, rcpt_to: str, data: bytes, timeout: float = WAIT_SECONDS,
         host: str = HOST) -> Attempt:
    """One SMTP transaction. A refused, reset or silently closed connection
    is reported as `code=None`, as a real MTA's queue would note it."""
    stage = "connect"
    try:
        with smtplib.SMTP(host, port, timeout=timeout) as client:
            stage = "ehlo"
            code, text = client.ehlo()
            if code != 250:
                return Attempt(code, text.decode(errors="replace"), stage)
            stage = "mail"
            code, text = client.mail(mail_from)
            if code != 250:
                return Attempt(code, text.decode(errors="replace"), stage)
            stage = "rcpt"
            code, text = client.rcpt(rcpt_to)
            if code not in (250, 251):
                return Attempt(code, text.decode(errors="replace"), stage)
            stage = "data"
            code, text = client.data(data)
            stage = "sent"
            attempt = Attempt(code, text.decode(errors="replace"), stage)
            with contextlib.suppress(smtplib.SMTPException, OSError):
                client.quit()
            return attempt
    except smtplib.SMTPDataError as exc:  # refused DATA itself (smtplib raises for it)
        return Attempt(exc.smtp_code, exc.smtp_error.decode(errors="replace"), stage)
    except (smtplib.SMTPServerDisconnected, smtplib.SMTPConnectError, OSError) as exc:
        return Attempt(None, f"{type(exc).__name__}: {exc}", stage)


# --- the upstream side ------------------------------------------------------------


@dataclass
class Seen:
    """A whole message that reached the upstream."""

    data: bytes
    tag: str | None
    accepted: bool = False  # the upstream answered 250 to a connected client


@dataclass
class ScriptedUpstream:
    """An SMTP server on 127.0.0.1 whose every stage can be made to fail.

    Each stage (`greeting`, `ehlo`, `mail`, `rcpt`, `data`, `eom` = the reply
    to the final ".", `quit`, `starttls`) takes an action, read when the stage is
    reached, so it can be changed while the server runs:

    - ``None``: behave (``starttls`` unset: STARTTLS is not offered);
    - ``"4xx …"``/``"5xx …"``: answer that line instead;
    - ``"close"``: hang up without a reply;
    - ``"stall"``: never answer (until the client hangs up or the server stops);
    - ``("delay", seconds)``: answer normally, that much later;
    - ``"hold"``: answer normally once `release()` is called;
    - ``"hangup-on-input"``: wait for the client's first bytes, then hang up
      (a greeting stage that breaks an implicit-TLS handshake);
    - ``"garbage"``: write bytes that are not SMTP (or not TLS) and hang up.

    `starttls` set (to any of these, or ``"ready-then-garbage"``: "220
    Ready" and then no handshake) makes EHLO offer STARTTLS; this server
    never speaks TLS, so every STARTTLS fails one way or another.
    """

    greeting: object = None
    ehlo: object = None
    mail: object = None
    rcpt: object = None
    data: object = None
    eom: object = None
    quit: object = None
    starttls: object = None
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def heal(self) -> None:
        """Back to a well-behaved server (held replies are released too)."""
        self.greeting = self.ehlo = self.mail = self.rcpt = self.data = self.eom = self.quit = None
        self.starttls = None
        self.release()

    # -- what it got

    def accepted(self) -> Counter:
        """tag → how many times the upstream acknowledged it with 250."""
        with self.lock:
            return Counter(s.tag for s in self.seen if s.accepted)

    def seen_tags(self) -> Counter:
        with self.lock:
            return Counter(s.tag for s in self.seen)

    def wait_seen(self, count: int, timeout: float = WAIT_SECONDS) -> None:
        _wait(lambda: len(self.seen) >= count, timeout, lambda: f"upstream saw {len(self.seen)} message(s), "
                                                                 f"expected {count}")

    def wait_accepted(self, count: int, timeout: float = WAIT_SECONDS) -> None:
        _wait(lambda: sum(self.accepted().values()) >= count, timeout,
              lambda: f"upstream accepted {sum(self.accepted().values())} message(s), expected {count}")

    # -- lifecycle

    def start(self) -> "ScriptedUpstream":
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="scripted-upstream", daemon=True)
        self._thread.start()
        self._release = None
        self._stopping = None
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, scheme: str = "smtp") -> str:
        return f"{scheme}://{HOST}:{self.port}"

    def release(self) -> None:
        """Let every held reply go (and the ones held from now on wait again)."""
        def wake():
            self._release.set()
            self._release = asyncio.Event()
        if getattr(self, "_loop", None) is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(wake)

    def stop(self) -> None:
        if getattr(self, "_loop", None) is None:
            return

        async def close():
            self._server.close()
            self._stopping.set()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    async def _listen(self):
        self._release = asyncio.Event()
        self._stopping = asyncio.Event()
        return await asyncio.start_server(self._session, HOST, self.port, limit=1 << 20)

    # -- one connection

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.lock:
            self.connections += 1
        try:
            await self._converse(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _act(self, action, reader, writer) -> str:
        """Carry out `action`: "normal" (go on and answer as usual), "replied" or "closed"."""
        if action is None:
            return "normal"
        if isinstance(action, str) and action[:1].isdigit():
            writer.write(action.encode() + b"\r\n")
            await writer.drain()
            return "replied"
        if action == "close":
            return "closed"
        if action == "garbage":
            writer.write(b"\x15\x03\x01\x00\x02\x02\x28this is not what you expected\r\n")
            await writer.drain()
            return "closed"
        if action == "hangup-on-input":
            await asyncio.wait_for(reader.read(1), WAIT_SECONDS)
            return "closed"
        if action == "stall":
            await self._until(reader, self._stopping)
            return "closed"
        if action == "hold":
            return "normal" if await self._until(reader, self._release) else "closed"
        if isinstance(action, tuple) and action[0] == "delay":
            timer = asyncio.Event()
            handle = asyncio.get_running_loop().call_later(action[1], timer.set)
            try:
                return "normal" if await self._until(reader, timer) else "closed"
            finally:
                handle.cancel()
        raise ValueError(f"unknown action {action!r}")

    async def _until(self, reader, event: asyncio.Event) -> bool:
        """Wait for `event`, or the client hanging up (False), or the server stopping (False)."""
        eof = asyncio.ensure_future(self._drain_until_eof(reader))
        woken = asyncio.ensure_future(event.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({eof, woken, stopping}, return_when=asyncio.FIRST_COMPLETED,
                               timeout=4 * WAIT_SECONDS)
            return woken.done() and not eof.done() and not stopping.done()
        finally:
            for task in (eof, woken, stopping):
                task.cancel()
            await asyncio.gather(eof, woken, stopping, return_exceptions=True)

    @staticmethod
    async def _drain_until_eof(reader) -> None:
        while await reader.read(4096):
            pass

    async def _converse(self, reader, writer) -> None:
        outcome = await self._act(self.greeting, reader, writer)
        if outcome == "closed":
            return
        if outcome == "normal":
            writer.write(b"220 upstream.test ESMTP scripted\r\n")
            await writer.drain()
        for _ in range(1000):  # commands on one connection: plenty for any client here
            line = await reader.readline()
            if not line:
                return
            verb = line.split(b" ", 1)[0].split(b":", 1)[0].strip().upper()
            if verb in (b"EHLO", b"HELO"):
                outcome = await self._act(self.ehlo, reader, writer)
                if outcome == "normal":
                    if verb == b"EHLO":
                        offer = b"250-STARTTLS\r\n" if self.starttls is not None else b""
                        writer.write(b"250-upstream.test\r\n250-8BITMIME\r\n" + offer + b"250 SMTPUTF8\r\n")
                    else:
                        writer.write(b"250 upstream.test\r\n")
            elif verb == b"STARTTLS":
                action = self.starttls
                if action == "ready-then-garbage":
                    # "Ready", and then no TLS at all: the handshake fails on the client's side.
                    writer.write(b"220 2.0.0 Ready to start TLS\r\n")
                    action = "garbage"
                outcome = await self._act(action, reader, writer)
                if outcome == "normal":
                    writer.write(b"454 4.7.0 TLS not available\r\n")
            elif verb == b"MAIL":
                outcome = await self._act(self.mail, reader, writer)
                if outcome == "normal":
                    writer.write(b"250 2.1.0 OK\r\n")
            elif verb == b"RCPT":
                outcome = await self._act(self.rcpt, reader, writer)
                if outcome == "normal":
                    writer.write(b"250 2.1.5 OK\r\n")
            elif verb == b"DATA":
                outcome = await self._act(self.data, reader, writer)
                if outcome == "normal":
                    writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    await writer.drain()
                    outcome = await self._message(reader, writer)
            elif verb in (b"RSET", b"NOOP"):
                writer.write(b"250 2.0.0 OK\r\n")
            elif verb == b"QUIT":
                if await self._act(self.quit, reader, writer) == "normal":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    await writer.drain()
                return
            else:
                writer.write(b"502 5.5.2 Command not recognized\r\n")
            if outcome == "closed":
                return
            await writer.drain()

    async def _message(self, reader, writer) -> str:
        lines = []
        while True:
            line = await reader.readline()
            if not line:
                return "closed"
            if line in (b".\r\n", b".\n"):
                break
            lines.append(line[1:] if line.startswith(b".") else line)
        data = b"".join(lines)
        seen = Seen(data, tag_of(data))
        with self.lock:
            self.seen.append(seen)
        outcome = await self._act(self.eom, reader, writer)
        if outcome == "normal":
            writer.write(b"250 2.0.0 OK queued\r\n")
            await writer.drain()
            with self.lock:
                seen.accepted = True
        return outcome


def _wait(condition, timeout: float, describe) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(describe())


# --- relay serve as a process -------------------------------------------------------


def write_config(directory: Path, upstream_url: str, database: Path, *, upstream_timeout: float = 5.0,
                 dkim_key_file: str = "", ca_file: str = "", listen: str = f"{HOST}:0") -> Path:
    """A relay.toml for a throw-away relay: loopback only, no submission
    listeners, no DNS (inbound mail authentication off)."""
    lines = [
        'domain = "marketplace.example"',
        f"database = {json.dumps(str(database))}",
        "[inbound]",
        f"listen = {json.dumps(listen)}",
        "[submission]",
        'listen = ""',
        'listen_tls = ""',
        "[upstream]",
        f"url = {json.dumps(upstream_url)}",
        f"timeout = {upstream_timeout}",
        f"ca_file = {json.dumps(ca_file)}",
        "[auth]",
        'inbound = "off"',
    ]
    if dkim_key_file:
        lines += ["[dkim]", f"key_file = {json.dumps(dkim_key_file)}"]
    path = Path(directory) / "relay.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def relay_command(config: Path, *args: str, timeout: float = 60, stdin: str | None = None,
                  python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "relay", "--config", str(config), *args], capture_output=True,
                          text=True, input=stdin, timeout=timeout, env={**os.environ, "RELAY_CONFIG": ""})


class RelayProcess:
    """`relay serve` in a child process; its port comes from its log."""

    def __init__(self, config: Path, cwd: Path | None = None, python: str = sys.executable,
                 start_timeout: float = WAIT_SECONDS):
        self.config = config
        self.lines: list[str] = []
        self.port: int | None = None
        self.proc = subprocess.Popen([python, "-m", "relay", "--config", str(config), "serve"],
                                     cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True,
                                     env={**os.environ, "RELAY_CONFIG": ""})
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line)
                found = re.search(r"inbound listener on 127\.0\.0\.1:(\d+)", line)
                if found:
                    self.port = int(found.group(1))
                    ready.set()
            ready.set()  # the process ended (start-up failed): stop waiting

        self._reader = threading.Thread(target=read, name="relay-serve-log", daemon=True)
        self._reader.start()
        ready.wait(start_timeout)
        if self.port is None:
            self.kill()
            raise RuntimeError("relay serve did not start:\n" + "".join(self.lines[-30:]))

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def kill(self) -> int:
        """SIGKILL: no drain, no clean close of the database."""
        return self._end(signal.SIGKILL)

    def stop(self) -> int:
        """SIGTERM: finish what is in flight, exit 0."""
        return self._end(signal.SIGTERM)

    def leftovers(self, timeout: float = 10.0) -> list[str]:
        """Processes of this relay's session (its worker processes…) still
        alive `timeout` seconds after it ended: none, or something leaked.
        Linux only (reads /proc); elsewhere always []."""
        def alive() -> list[str]:
            found = []
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    text = stat.read_text()
                except OSError:
                    continue
                fields = text.rsplit(")", 1)[-1].split()
                # fields[0] is the state, fields[3] the session id
                if len(fields) > 3 and fields[3] == str(self.proc.pid) and fields[0] not in ("Z", "X"):
                    found.append(text.split(" ", 2)[0] + " " + text.split("(", 1)[1].split(")", 1)[0])
            return found

        deadline = time.monotonic() + timeout
        while (found := alive()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return found

    def session(self) -> list[tuple[int, int, str]]:
        """(pid, parent pid, command line) of every live process of this
        relay's session but the relay itself: its worker processes and
        whatever they started. Linux only (reads /proc); elsewhere []."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
                cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            fields = text.rsplit(")", 1)[-1].split()
            pid = int(text.split(" ", 1)[0])
            if len(fields) > 3 and fields[3] == str(self.proc.pid) and fields[0] not in ("Z", "X") \
                    and pid != self.proc.pid:
                found.append((pid, int(fields[1]), cmdline.strip()))
        return found

    def workers(self) -> list[int]:
        """The worker processes: children of the relay running
        `python -P -m relay.worker_process`."""
        return sorted(pid for pid, ppid, cmdline in self.session()
                      if ppid == self.proc.pid and " -m relay.worker_process " in cmdline)

    def kill_session(self) -> None:
        """SIGKILL whatever is left of this relay's session (cleanup only)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def _end(self, signum) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            status = self.proc.wait(WAIT_SECONDS + 60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = self.proc.wait(10)
        self._reader.join(10)
        with contextlib.suppress(Exception):
            self.proc.stderr.close()
        return status


# --- another process holding the database -------------------------------------------

_LOCKER = r"""
import signal, sqlite3, sys
signal.alarm(int(sys.argv[2]))  # never held past this, whatever happens to the parent
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("ROLLBACK")
db.close()
print("released", flush=True)
"""


class DatabaseLocker:
    """A separate Python process holding `BEGIN EXCLUSIVE` on `database`
    (as an operator's sqlite3 shell or a backup job would) from `lock()`
    until `release()`; at most `max_seconds` in any case."""

    def __init__(self, database, python: str = sys.executable, max_seconds: int = 60):
        self.database = str(database)
        self.python = python
        self.max_seconds = max_seconds
        self.proc: subprocess.Popen | None = None

    def lock(self) -> "DatabaseLocker":
        self.proc = subprocess.Popen([self.python, "-c", _LOCKER, self.database, str(self.max_seconds)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # bounded: the child alarms itself
        if line.strip() != "locked":
            self.proc.kill()
            self.proc.wait(10)
            raise RuntimeError(f"could not lock {self.database}: {line!r}")
        return self

    def release(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
        try:
            self.proc.wait(WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        self.proc = None

    def __enter__(self) -> "DatabaseLocker":
        return self.lock()

    def __exit__(self, *exc) -> None:
        self.release()


# --- the archive, as the dispute tools see it ---------------------------------------


def archive_by_tag(config: Path, relationship: int = 1, python: str = sys.executable,
                   workdir: Path | None = None) -> dict[str, list[str]]:
    """tag → the verdicts of its archive rows, oldest first, read through
    `relay archive export` (raw bytes, so the client's Subject as sent)."""
    workdir = Path(workdir or Path(config).parent)
    out = workdir / f"export-{time.monotonic_ns()}"
    result = relay_command(config, "archive", "export", "--relationship", str(relationship),
                           "--format", "eml-dir", "--as", "raw", str(out), "--json", python=python)
    if result.returncode != 0:
        raise RuntimeError(f"relay archive export failed: {result.stderr.strip()}")
    manifest = json.loads(result.stdout)
    verdicts: dict[str, list[str]] = {}
    for entry in manifest["messages"]:
        tag = tag_of((out / entry["file"]).read_bytes())
        verdicts.setdefault(tag, []).append(entry["verdict"])
    return verdicts


def archive_in(database) -> dict[str, list[str]]:
    """tag → verdicts of the archive rows in `database`, oldest first, read
    in this process through the store (quicker than `archive_by_tag`; the
    relay may be running: WAL readers do not block it)."""
    from relay.store import open_store

    async def work():
        store = await open_store(str(database))
        try:
            verdicts: dict[str, list[str]] = {}
            for archive_id in await store.archive_ids():
                row = await store.archive_row(archive_id)
                verdicts.setdefault(tag_of(row["raw"]), []).append(row["verdict"])
            return verdicts
        finally:
            await store.close()

    return asyncio.run(work())


def verify_archive(config: Path, python: str = sys.executable) -> dict:
    """`relay archive verify --json` (its exit status is in "exit")."""
    result = relay_command(config, "archive", "verify", "--json", python=python)
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        report = {"ok": False, "stderr": result.stderr.strip()}
    report["exit"] = result.returncode
    return report


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def provision(database) -> dict:
    """Migrate `database` and give it one seller/buyer pair (in this process,
    through the store, before any relay runs on it): the aliases."""
    from relay.store import open_store, utc_now

    async def work():
        store = await open_store(str(database))
        try:
            await store.upgrade()
            await store.add_party("seller", SELLER, "Sam Seller")
            await store.add_party("buyer", BUYER, "Bea Buyer")
            relationship, _ = await store.add_order("ORDER-1", SELLER, BUYER, utc_now(), "marketplace.example")
            return {"relationship": relationship.id, "seller_alias": relationship.seller_alias,
                    "buyer_alias": relationship.buyer_alias}
        finally:
            await store.close()

    return asyncio.run(work())


# --- the invariant -----------------------------------------------------------------


@dataclass
class Ledger:
    """What the clients saw, per message tag, set against what the upstream
    accepted and what the archive holds.

    The relay's promise, checked by `check()`: a message whose client got a
    `250` was accepted by the upstream and has a `delivered` archive row for
    each `250`; a `delivered` row stands for a copy the upstream really
    accepted; every other reply the client saw is a 4xx or a 5xx (or the
    connection dropped, from a relay that died). The upstream may hold more
    copies than the client got `250`s for, and the archive may hold a
    `delivered` row for a copy whose client had hung up: those are the
    duplicates of at-least-once delivery, counted, never an error."""

    attempts: dict[str, list[Attempt]] = field(default_factory=dict)

    def note(self, tag: str, attempt: Attempt) -> Attempt:
        self.attempts.setdefault(tag, []).append(attempt)
        return attempt

    def check(self, accepted: Counter, archived: dict[str, list[str]]) -> dict:
        """Assert the promise; return {"sent", "duplicates", "archived_without_250"}."""
        summary, problems = self.audit(accepted, archived)
        assert not problems, "\n".join(problems)
        return summary

    def audit(self, accepted: Counter, archived: dict[str, list[str]]) -> tuple[dict, list[str]]:
        """The counts, and every broken promise as a line of text."""
        problems = []
        sent = duplicates = extra_rows = 0
        for tag, attempts in self.attempts.items():
            for attempt in attempts:
                if attempt.code is not None and not (attempt.code == 250 or 400 <= attempt.code < 600):
                    problems.append(f"{tag}: reply outside 2xx/4xx/5xx: {attempt}")
            oks = sum(1 for a in attempts if a.delivered)
            rows = archived.get(tag, [])
            delivered_rows = rows.count("delivered")
            if oks:
                sent += 1
                if accepted[tag] == 0:
                    problems.append(f"{tag}: the client got 250 but the upstream never accepted it (LOST)")
            if delivered_rows < oks:
                problems.append(f"{tag}: the client got {oks} x 250 but the archive has only {delivered_rows} "
                                f"delivered row(s) {rows} (UNARCHIVED)")
            if delivered_rows > accepted[tag]:
                problems.append(f"{tag}: {delivered_rows} delivered archive row(s) {rows} but the upstream "
                                f"accepted {accepted[tag]} copy(ies)")
            duplicates += max(0, accepted[tag] - 1)
            extra_rows += max(0, delivered_rows - oks)
        for tag in sorted(set(accepted) - set(self.attempts), key=str):
            problems.append(f"upstream accepted a message nobody sent: {tag}")
        return {"sent": sent, "duplicates": duplicates, "archived_without_250": extra_rows}, problems


def archive_of(running) -> dict[str, list[str]]:
    """tag → verdicts of the archive rows of an in-thread relay (tests/support.RunningRelay)."""
    verdicts: dict[str, list[str]] = {}
    for row in running.archive_rows():
        verdicts.setdefault(tag_of(row["raw"]), []).append(row["verdict"])
    return verdicts
