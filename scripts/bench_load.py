"""The benchmark's load client: a lean concurrent SMTP sender, in its own
process so that it shares no GIL with the server under test or the sink.

Postfix's smtp-source sends one synthetic message over and over; this sends
a prepared mix. Run by scripts/bench.py with a plan file (JSON):

    {"host": "127.0.0.1", "port": 2525, "helo": "...", "mail_from": "...",
     "rcpt": "...", "payloads": ["<file>", ...], "kinds": ["text", ...],
     "sequence": [0, 3, 1, ...], "warmup": [0, 1, ...], "concurrency": 8,
     "rate": 0, "max_seconds": 60, "tag": "relay"}

Several servers (relay nodes): "ports": [2525, 2526, ...] instead of (or
beside) "port"; connection i goes to ports[i % len(ports)], so the C
connections are spread round-robin over the servers and each keeps its
server for the whole run. The result counts the measured messages per
port ("by_port").

Each payload file holds a message as written after DATA (CRLF, dot-stuffed,
ending in CRLF.CRLF); a fresh Message-ID header goes in front of it per send.
C connections each say EHLO once, then MAIL/RCPT/DATA for message after
message (no pipelining: the servers do not offer it). First the `warmup`
messages, unmeasured, then `sequence`:

- closed loop (`rate` 0): each connection takes the next message as soon as
  its previous one is answered;
- paced (`rate` R > 0, open loop): message i is due at start + i/R whatever
  happened before, and the first idle connection sends it.

A message's latency is from writing MAIL FROM to reading the final reply
after the data. Any reply but 250 (or a broken connection) is a failure;
the message is not retried. Nothing new starts after `max_seconds`. Prints
one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

IO_TIMEOUT = 120.0  # one reply; the relay's own processing limit is 60 s
MAX_RECONNECTS = 20  # per connection and run: a server that keeps hanging up ends the run
# Messages per connection before QUIT and a new connection, as an MTA limits
# connection reuse (and under the relay's per-session command limit).
MESSAGES_PER_CONNECTION = 100
MAX_REPLY_LINES = 100


class ReplyError(Exception):
    def __init__(self, step: str, code: int, text: str):
        super().__init__(f"{step}: {code} {text}")
        self.step, self.code, self.text = step, code, text


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while len(lines) < MAX_REPLY_LINES:
        line = await asyncio.wait_for(reader.readline(), IO_TIMEOUT)
        if not line:
            raise ConnectionError("connection closed by the server")
        lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
        if len(line) < 4 or line[3:4] != b"-":
            break
    else:
        raise ConnectionError(f"a reply of more than {MAX_REPLY_LINES} lines")
    try:
        code = int(lines[-1][:3])
    except ValueError:
        raise ConnectionError(f"not an SMTP reply: {lines[-1]!r}") from None
    return code, " / ".join(line[4:] for line in lines)


class Connection:
    def __init__(self, plan: dict, number: int):
        self.plan = plan
        self.number = number
        ports = plan.get("ports") or [plan["port"]]
        self.port = ports[number % len(ports)]
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.messages = 0  # sent on the current connection

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.plan["host"], self.port), IO_TIMEOUT)
        self.messages = 0
        code, text = await read_reply(self.reader)
        if code != 220:
            raise ReplyError("greeting", code, text)
        await self.command(f"EHLO {self.plan['helo']}", 250, "EHLO")

    async def close(self) -> None:
        if self.writer is None:
            return
        try:
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.writer.drain(), 5)
            await asyncio.wait_for(read_reply(self.reader), 5)
        except (OSError, ConnectionError, asyncio.TimeoutError):
            pass
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        except (OSError, ConnectionError, asyncio.TimeoutError):
            pass
        self.writer = self.reader = None

    async def command(self, line: str, expect: int, step: str) -> None:
        self.writer.write(line.encode() + b"\r\n")
        code, text = await read_reply(self.reader)
        if code != expect:
            raise ReplyError(step, code, text)

    async def send(self, payload: bytes, message_id: str) -> None:
        size = len(payload)
        await self.command(f"MAIL FROM:<{self.plan['mail_from']}> SIZE={size}", 250, "MAIL")
        await self.command(f"RCPT TO:<{self.plan['rcpt']}>", 250, "RCPT")
        await self.command("DATA", 354, "DATA")
        self.writer.write(f"Message-ID: <{message_id}>\r\n".encode())
        self.writer.write(payload)
        await asyncio.wait_for(self.writer.drain(), IO_TIMEOUT)
        code, text = await read_reply(self.reader)
        if code != 250:
            raise ReplyError("end of data", code, text)


class Run:
    def __init__(self, plan: dict, payloads: list[bytes]):
        self.plan = plan
        self.payloads = payloads
        self.results: list[tuple[int, float, float]] = []  # (position, latency ms, lateness ms)
        self.failures: list[dict] = []
        self.sent = 0
        self.reconnects = 0
        self.by_port: dict[str, int] = {}  # measured messages answered 250, per server port
        self.nonce = f"{os.getpid():x}{int(time.time() * 1000) % 100000000:x}"

    async def deliver(self, conn: Connection, position: int, index: int, phase: str) -> float | None:
        """Send one message; its latency in ms, or None after a failure."""
        message_id = f"{self.plan['tag']}-{phase}-{position}-{self.nonce}@{self.plan['helo']}"
        self.sent += 1
        try:
            if conn.writer is not None and conn.messages >= MESSAGES_PER_CONNECTION:
                await conn.close()
            if conn.writer is None:
                await conn.open()
            conn.messages += 1
            started = time.perf_counter()
            await conn.send(self.payloads[index], message_id)
            return (time.perf_counter() - started) * 1000
        except ReplyError as exc:
            self.fail(phase, position, index, exc.step, f"{exc.code} {exc.text}")
            try:
                await conn.command("RSET", 250, "RSET")
            except (ReplyError, OSError, ConnectionError, asyncio.TimeoutError):
                await self.drop(conn)
        except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
            self.fail(phase, position, index, "connection", f"{type(exc).__name__}: {exc}")
            await self.drop(conn)
        return None

    def count_port(self, conn: Connection) -> None:
        key = str(conn.port)
        self.by_port[key] = self.by_port.get(key, 0) + 1

    async def drop(self, conn: Connection) -> None:
        if conn.writer is not None:
            conn.writer.close()
        conn.writer = conn.reader = None
        self.reconnects += 1
        await asyncio.sleep(0.05)

    def fail(self, phase: str, position: int, index: int, step: str, reply: str) -> None:
        self.failures.append({"phase": phase, "position": position,
                              "kind": self.plan["kinds"][index], "step": step, "reply": reply})

    async def closed_loop(self, conns: list[Connection], indexes: list[int], phase: str,
                          deadline: float, record: bool) -> None:
        queue = iter(enumerate(indexes))

        async def worker(conn: Connection) -> None:
            for position, index in queue:
                if time.monotonic() > deadline or self.reconnects > MAX_RECONNECTS * len(conns):
                    return
                latency = await self.deliver(conn, position, index, phase)
                if record and latency is not None:
                    self.results.append((position, latency, 0.0))
                    self.count_port(conn)

        await asyncio.gather(*(worker(conn) for conn in conns))

    async def paced(self, conns: list[Connection], indexes: list[int], rate: float,
                    deadline: float) -> None:
        due: asyncio.Queue = asyncio.Queue()
        start = time.perf_counter() + 0.05

        async def producer() -> None:
            for position, index in enumerate(indexes):
                at = start + position / rate
                delay = at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if time.monotonic() > deadline:
                    break
                due.put_nowait((position, index, at))
            for _ in conns:
                due.put_nowait(None)

        async def worker(conn: Connection) -> None:
            while (item := await due.get()) is not None:
                position, index, at = item
                if time.monotonic() > deadline:
                    continue
                lateness = max(0.0, (time.perf_counter() - at) * 1000)
                latency = await self.deliver(conn, position, index, "measured")
                if latency is not None:
                    self.results.append((position, latency, lateness))
                    self.count_port(conn)

        await asyncio.gather(producer(), *(worker(conn) for conn in conns))

    async def run(self) -> dict:
        plan = self.plan
        deadline = time.monotonic() + plan["max_seconds"]
        conns = [Connection(plan, i) for i in range(plan["concurrency"])]
        try:
            await asyncio.gather(*(conn.open() for conn in conns))
        except (ReplyError, OSError, ConnectionError, asyncio.TimeoutError) as exc:
            return {"error": f"cannot open {len(conns)} connection(s): {type(exc).__name__}: {exc}"}
        try:
            warm_started = time.perf_counter()
            await self.closed_loop(conns, plan["warmup"], "warmup", deadline, record=False)
            warm_sent = self.sent
            warm_seconds = time.perf_counter() - warm_started
            started = time.perf_counter()
            if plan["rate"] > 0:
                await self.paced(conns, plan["sequence"], plan["rate"], deadline)
            else:
                await self.closed_loop(conns, plan["sequence"], "measured", deadline, record=True)
            elapsed = time.perf_counter() - started
        finally:
            await asyncio.gather(*(conn.close() for conn in conns))
        self.results.sort()
        return {
            "warmup_sent": warm_sent,
            "warmup_seconds": round(warm_seconds, 3),
            "sent": self.sent - warm_sent,
            "planned": len(plan["sequence"]),
            "delivered": len(self.results),
            "elapsed_s": elapsed,
            "timed_out": time.monotonic() > deadline,
            "reconnects": self.reconnects,
            "by_port": self.by_port,
            "failures": self.failures,
            "latencies_ms": [round(r[1], 3) for r in self.results],
            "lateness_ms": [round(r[2], 3) for r in self.results],
            "kinds": [plan["kinds"][plan["sequence"][r[0]]] for r in self.results],
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="scripts/bench's load client (see its docstring)")
    parser.add_argument("plan", help="the plan file (JSON)")
    args = parser.parse_args(argv)
    with open(args.plan, encoding="utf-8") as f:
        plan = json.load(f)
    payloads = []
    for path in plan["payloads"]:
        with open(path, "rb") as f:
            payloads.append(f.read())
    result = asyncio.run(Run(plan, payloads).run())
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
