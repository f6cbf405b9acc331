"""The benchmark's baseline: a bare aiosmtpd passthrough proxy.

An aiosmtpd server whose DATA hook forwards the message unchanged to the
sink with aiosmtplib and answers 250 only after the sink did, one upstream
connection per message, as the relay does. It neither parses, rewrites,
checks, signs nor archives: the floor of any Python SMTP proxy on this
machine. Runs in its own process (started by scripts/bench.py) so that its
RSS and CPU are measured the same way as the relay's:

    python scripts/bench_passthrough.py --port 2526 --upstream-port 2527

Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiosmtplib
from aiosmtpd.smtp import SMTP

HOST = "127.0.0.1"


class Passthrough:
    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port

    async def handle_DATA(self, server, session, envelope):
        try:
            await aiosmtplib.send(
                envelope.original_content,
                sender=envelope.mail_from,
                recipients=envelope.rcpt_tos,
                hostname=HOST,
                port=self.upstream_port,
                local_hostname="passthrough.bench",
                timeout=60,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            return f"451 4.4.1 upstream unavailable: {exc}"
        return "250 2.0.0 OK forwarded"


async def serve(port: int, upstream_port: int) -> None:
    handler = Passthrough(upstream_port)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="passthrough.bench", ident="passthrough",
                     data_size_limit=64 * 1024 * 1024, decode_data=False),
        HOST, port)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.upstream_port))


if __name__ == "__main__":
    main()
