"""scripts/bench --api: the HTTP API's order call at a steady rate, on SQLite.

Issue 17's target: `POST /api/v1/orders` within 5 ms at p99 at 200 calls/s.
One `relay serve` (SQLite in a temporary folder, `[api] listen` on
loopback, the SMTP side on but idle) gets, after provisioning through the
API itself (sellers and buyers, not measured) and a warm-up, an open loop:
call i is sent at t0 + i/rate whatever the earlier calls are doing, each a
new order with its own `Idempotency-Key` for a seeded random pair of the
provisioned parties (so new relationships and orders of known ones mix,
as at a real marketplace). Latency is counted from the moment the call was
due, not from when the client got round to it, so a stalled server cannot
hide its stall by slowing the load down (no coordinated omission); the
client is aiohttp with keep-alive connections, as a marketplace's backend
would be. Every 20th call is also retried with its key, as after a
timeout: the replay must be the first answer again, and is timed apart.

Checked afterwards, or the run is a failure (exit 1): every call 201, every
replay `Idempotent-Replayed: true` with the first body, and the store (read
once the relay has stopped) holding exactly one order per call. Reported,
never asserted: the achieved rate, p50/p99/p99.9/max, the relay's CPU per
call.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import tempfile
import time
from pathlib import Path

import aiohttp

from bench import HOST, PYTHON, BenchError, Server, cpu_seconds, descendants, free_port, log, percentile

TARGET_P99_MS = 5.0
RATE = 200.0  # calls per second
SECONDS = {"full": 30.0, "quick": 5.0}
WARMUP_SECONDS = 2.0
SELLERS, BUYERS = 20, 400
REPLAY_EVERY = 20
DOMAIN = "marketplace.example"


class ApiRelay(Server):
    """`relay serve` with the API on `self.port`; the SMTP side idles."""

    name = "relay-api"

    def __init__(self, directory: Path):
        super().__init__(directory)
        self.config_path = directory / "relay.toml"

    def prepare(self) -> None:
        q = json.dumps
        self.config_path.write_text(f"""# written by scripts/bench --api
domain = {q(DOMAIN)}
database = {q(str(self.directory / "relay.sqlite3"))}

[inbound]
listen = {q(f"{HOST}:{free_port()}")}

[submission]
listen = ""
listen_tls = ""

[upstream]
url = {q("maildir:" + str(self.directory / "outbox"))}

[auth]
inbound = "off"

[api]
listen = {q(f"{HOST}:{self.port}")}

[log]
level = "warning"
""")

    def command(self) -> list[str]:
        return [PYTHON, "-m", "relay", "--config", str(self.config_path), "serve"]

    def cli(self, *args: str) -> str:
        import subprocess

        done = subprocess.run([PYTHON, "-m", "relay", "--config", str(self.config_path), *args],
                              cwd=self.directory, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise BenchError(f"relay {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
        return done.stdout


async def _call(session, url: str, token: str, body: dict, key: str | None = None):
    headers = {"Authorization": f"Bearer {token}"}
    if key:
        headers["Idempotency-Key"] = key
    async with session.post(url, json=body, headers=headers) as response:
        return response.status, await response.read(), response.headers.get("Idempotent-Replayed")


async def _provision(session, base: str, token: str) -> tuple[list[str], list[str]]:
    sellers = [f"seller{n}@shop{n}.example" for n in range(SELLERS)]
    buyers = [f"buyer{n}@mail.example" for n in range(BUYERS)]
    for role, addresses in (("seller", sellers), ("buyer", buyers)):
        for address in addresses:
            status, text, _ = await _call(session, f"{base}/api/v1/{role}s", token,
                                          {role: address, f"{role}_name": address.split("@")[0]})
            if status != 201:
                raise BenchError(f"provisioning {address}: HTTP {status} {text[:200]!r}")
    return sellers, buyers


async def _open_loop(session, base: str, token: str, pairs: list[tuple[str, str]], tag: str, rate: float,
                     seconds: float) -> dict:
    """`rate` calls a second for `seconds`; each a new order. Returns the
    latencies (ms, from when each call was due) and what each answered."""
    url = f"{base}/api/v1/orders"
    count = int(rate * seconds)
    latencies: list[float] = [0.0] * count
    service: list[float] = [0.0] * count
    answers: list[tuple[int, bytes] | None] = [None] * count
    replays: list[tuple[int, bytes, str | None, float]] = []
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05

    async def one(i: int) -> None:
        due = start + i / rate
        await asyncio.sleep(max(due - loop.time(), 0))
        sent = loop.time()
        seller, buyer = pairs[i]
        body = {"order": f"{tag}-{i}", "seller": seller, "buyer": buyer}
        status, text, _ = await _call(session, url, token, body, key=f"{tag}-key-{i}")
        done = loop.time()
        latencies[i], service[i], answers[i] = (done - due) * 1000, (done - sent) * 1000, (status, text)
        if i % REPLAY_EVERY == 0:  # the marketplace timed out and retries
            again = loop.time()
            status2, text2, replayed = await _call(session, url, token, body, key=f"{tag}-key-{i}")
            replays.append((status2, b"<different>" if text2 != text else text2, replayed,
                            (loop.time() - again) * 1000))

    await asyncio.gather(*(one(i) for i in range(count)))
    elapsed = loop.time() - start
    return {"count": count, "elapsed": elapsed, "latencies": latencies, "service": service, "answers": answers,
            "replays": replays}


async def _run(base: str, token: str, seconds: float, seed: int, pids: list[int]) -> tuple[dict, int]:
    """Provision, warm up, then the measured open loop, with the relay's
    CPU seconds (its process and workers) over that loop alone."""
    connector = aiohttp.TCPConnector(limit=32)
    async with aiohttp.ClientSession(connector=connector) as session:
        sellers, buyers = await _provision(session, base, token)
        rng = random.Random(seed)
        total = int(RATE * (seconds + WARMUP_SECONDS))
        # A marketplace's mix: most orders are of a buyer and seller who met
        # before (a few hundred pairs), some make a new relationship.
        known = [(rng.choice(sellers), rng.choice(buyers)) for _ in range(300)]
        pairs = [rng.choice(known) if rng.random() < 0.7 else (rng.choice(sellers), rng.choice(buyers))
                 for _ in range(total)]
        warm = int(RATE * WARMUP_SECONDS)
        log(f"warm-up: {warm} calls at {RATE:g}/s")
        await _open_loop(session, base, token, pairs[:warm], "warm", RATE, WARMUP_SECONDS)
        log(f"measured: {total - warm} calls at {RATE:g}/s")
        cpu_before = cpu_seconds(descendants(*pids))
        result = await _open_loop(session, base, token, pairs[warm:], "order", RATE, seconds)
        result["cpu_seconds"] = cpu_seconds(descendants(*pids)) - cpu_before
    return result, warm


def _check(result: dict) -> list[str]:
    problems = []
    bad = [a for a in result["answers"] if a is None or a[0] != 201]
    if bad:
        problems.append(f"{len(bad)} order call(s) not answered 201, e.g. {bad[0]!r}")
    for status, text, replayed, _ in result["replays"]:
        if status != 201 or replayed != "true" or text == b"<different>":
            problems.append(f"a replay answered {status}, Idempotent-Replayed={replayed}, "
                            f"{'another body' if text == b'<different>' else 'the first body'}")
            break
    return problems


def main(args) -> int:
    seconds = SECONDS["quick" if args.quick else "full"]
    with tempfile.TemporaryDirectory(prefix="relay-bench-api-") as folder:
        directory = Path(folder)
        relay = ApiRelay(directory)
        relay.port = free_port()
        relay.prepare()
        token = json.loads(relay.cli("api-token", "add", "bench", "--role", "provisioning", "--json"))["token"]
        try:
            relay.start()
            base = f"http://{HOST}:{relay.port}"
            result, warm = asyncio.run(_run(base, token, seconds, args.seed, [relay.process.pid]))
        finally:
            relay.stop()
        problems = _check(result)
        with sqlite3.connect(f"file:{directory / 'relay.sqlite3'}?mode=ro", uri=True) as db:
            orders = db.execute("SELECT COUNT(*) FROM orders").fetchone()[0]
            relationships = db.execute("SELECT COUNT(*) FROM relationships").fetchone()[0]
        expected = warm + result["count"]
        if orders != expected:
            problems.append(f"the store holds {orders} orders, expected {expected} (one per call)")
    latencies, service = result["latencies"], result["service"]
    replays = [ms for *_, ms in result["replays"]]
    report = {
        "api": {
            "calls": result["count"], "rate_target": RATE,
            "rate_achieved": round(result["count"] / result["elapsed"], 1),
            "p50_ms": round(percentile(latencies, 0.50), 2), "p99_ms": round(percentile(latencies, 0.99), 2),
            "p999_ms": round(percentile(latencies, 0.999), 2), "max_ms": round(max(latencies), 2),
            "service_p99_ms": round(percentile(service, 0.99), 2),
            "replay_p99_ms": round(percentile(replays, 0.99), 2), "replays": len(replays),
            "relay_cpu_ms_per_call": round(result["cpu_seconds"] * 1000 / (result["count"] + len(replays)), 3),
            "orders_in_store": orders, "relationships_in_store": relationships,
            "target_p99_ms": TARGET_P99_MS,
            "p99_target_met": percentile(latencies, 0.99) <= TARGET_P99_MS,
            "database": "sqlite", "problems": problems,
        },
    }
    if args.json:
        print(json.dumps(report))
    else:
        r = report["api"]
        print(f"POST /api/v1/orders, open loop at {r['rate_target']:g}/s for {seconds:g} s on SQLite "
              f"({r['calls']} calls, {r['rate_achieved']:g}/s achieved, {r['relationships_in_store']} "
              f"relationships):")
        print(f"  latency from when each call was due: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
              f"p99.9 {r['p999_ms']} ms, max {r['max_ms']} ms   (target p99 <= {TARGET_P99_MS:g} ms: "
              f"{'met' if r['p99_target_met'] else 'NOT met'})")
        print(f"  replays with the same Idempotency-Key: {r['replays']}, p99 {r['replay_p99_ms']} ms")
        print(f"  relay CPU per call: {r['relay_cpu_ms_per_call']} ms")
        for problem in problems:
            print(f"  FAILED: {problem}")
    return 1 if problems else 0
