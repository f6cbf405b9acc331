"""The store's archive queries at scale, on SQLite: `record()`, `relay archive
list`, `relay archive verify` and `relay purge --dry-run`, each timed as the
store method the command calls (no process start-up counted).

    .venv/bin/python scripts/bench_archive.py build DB --rows N
    .venv/bin/python scripts/bench_archive.py run DB [--repeat R] [--json]

`build` makes a migrated database and fills it fast by direct inserts
(a valid chain, real zstd bodies, a Message-ID map entry per delivered
row, 200 sellers and 4000 relationships), so that one file can be measured
by two versions of the store: `run` never changes what `build` wrote
except by appending the rows it records (run it on a copy to repeat it
exactly). docs/design-notes.md has the numbers of issue 15.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.store import ArchiveEntry, chain_hash, encode_bodies, open_store, sha256_hex  # noqa: E402

SELLERS, BUYERS = 200, 4000
START = 1_700_000_000  # seconds: rows are one per 10 s from here
RAW = (b"From: buyer@example.net\r\nTo: alias@relay.example\r\nSubject: about my order\r\n"
       b"Message-ID: <m@example.net>\r\n\r\n" + b"Hello, where is my parcel? " * 20 + b"\r\n")
DELIVERED = RAW.replace(b"buyer@example.net", b"b-alias@relay.example")


def stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds * 1e6) % 10**6:06d}Z"


def build(path: str, rows: int) -> None:
    async def migrate():
        store = await open_store(path)
        await store.upgrade()
        await store.close()

    asyncio.run(migrate())
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")
    db.execute("BEGIN")
    now = stamp(START)
    db.executemany("INSERT INTO parties (id, role, address, display_name, created_at) VALUES (?, ?, ?, '', ?)",
                   [(i, "seller", f"seller{i}@example.com", now) for i in range(1, SELLERS + 1)]
                   + [(SELLERS + i, "buyer", f"buyer{i}@example.net", now) for i in range(1, BUYERS + 1)])
    db.executemany("INSERT INTO relationships (id, seller_id, buyer_id, seller_alias, buyer_alias, created_at)"
                   " VALUES (?, ?, ?, ?, ?, ?)",
                   [(i, 1 + i % SELLERS, SELLERS + i, f"s{i}@relay.example", f"b{i}@relay.example", now)
                    for i in range(1, BUYERS + 1)])
    raw_blob, delivered_blob = encode_bodies(RAW, DELIVERED)
    raw_sha, delivered_sha = sha256_hex(RAW), sha256_hex(DELIVERED)
    prev = "0" * 64
    batch, bodies, ids = [], [], []
    for n in range(1, rows + 1):
        rel = 1 + (n * 7919) % BUYERS
        direction = "buyer_to_seller" if n % 2 else "seller_to_buyer"
        verdict = "delivered" if n % 10 else "rejected"
        received = stamp(START + 10 * n)
        reply = "250 2.0.0 OK" if verdict == "delivered" else "550 5.7.1 no"
        meta = {"received_at": received, "relationship_id": rel, "direction": direction,
                "client_address": "192.0.2.1", "mail_from": "buyer@example.net",
                "rcpt_to": [f"s{rel}@relay.example"], "verdict": verdict, "reply": reply, "changes": []}
        row = chain_hash(meta, raw_sha, delivered_sha, prev)
        batch.append((n, received, rel, direction, "192.0.2.1", "buyer@example.net",
                      json.dumps(meta["rcpt_to"]), verdict, reply, "[]", b"", None, raw_sha, delivered_sha,
                      prev, row, "zstd", len(RAW), len(DELIVERED), 0))
        bodies.append((n, raw_blob, delivered_blob))
        if verdict == "delivered":
            ids.append((rel, 1 + rel % SELLERS, f"<o{n}@example.net>", f"<r{n}@relay.example>", n, received))
        prev = row
        if len(batch) == 10_000 or n == rows:
            db.executemany(
                "INSERT INTO archive (id, received_at, relationship_id, direction, client_address, mail_from,"
                " rcpt_to, verdict, reply, changes, raw, delivered, raw_sha256, delivered_sha256, prev_sha256,"
                " row_sha256, body_encoding, raw_size, delivered_size, auto_reply)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", batch)
            db.executemany("INSERT INTO archive_bodies (archive_id, raw, delivered) VALUES (?, ?, ?)", bodies)
            db.executemany("INSERT INTO message_ids (relationship_id, sender_id, original_id, relay_id,"
                           " archive_id, created_at) VALUES (?, ?, ?, ?, ?, ?)", ids)
            batch, bodies, ids = [], [], []
    db.execute("COMMIT")
    db.execute("ANALYZE")
    db.close()


async def timed(fn, repeat: int) -> float:
    """The median seconds of `repeat` calls of the coroutine function `fn`."""
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


async def measure(path: str, repeat: int) -> dict:
    from relay import archive

    store = await open_store(path)
    try:
        rows = await store.archive_size()
        middle = stamp(START + 10 * rows // 2)
        results = {"rows": rows}

        async def record_many():
            for n in range(50):
                await store.record(ArchiveEntry(
                    received_at=stamp(START + 10 * rows + n), relationship_id=1, direction="buyer_to_seller",
                    client_address="192.0.2.1", mail_from="buyer@example.net", rcpt_to=("s1@relay.example",),
                    verdict="delivered", reply="250 2.0.0 OK", changes=(), raw=RAW, delivered=DELIVERED,
                    sender_id=SELLERS + 1, original_message_id=f"<bench{time.time_ns()}@example.net>",
                    relay_message_id=f"<bench{time.time_ns()}@relay.example>"))

        results["record_ms"] = await timed(record_many, repeat) / 50 * 1000

        async def one_message_lookups():
            # What the handler asks the store for one seller message besides
            # record(): the route, the cap (orders, then a reservation, given
            # back here so the window stays the same), the threading ids.
            for n in range(50):
                relationship = await store.relationship_by_alias(f"b{1 + n % BUYERS}@relay.example")
                seller_id = relationship.seller.id
                await store.seller_orders_since(seller_id, middle)
                reservation, _, _ = await store.reserve_send(seller_id, stamp(START + 10 * rows + n), middle, 10**6)
                await store.message_id_rows(relationship.id, [f"<o{n}@example.net>", f"<r{n}@relay.example>"])
                await store.latest_order_at(relationship.id)
                await store.release_send(reservation)

        results["lookups_per_message_ms"] = await timed(one_message_lookups, repeat) / 50 * 1000
        lists = {
            "list_newest": dict(),
            "list_deep_page": dict(offset=100_000 if rows > 200_000 else rows // 2),
            "list_seller": dict(seller="seller7@example.com"),
            "list_buyer": dict(buyer="buyer42@example.net"),
            "list_verdict": dict(verdict="rejected"),
            "list_since_until": dict(since=middle, until=stamp(START + 10 * rows // 2 + 86400)),
        }
        for name, kwargs in lists.items():
            results[name + "_ms"] = await timed(lambda kw=kwargs: store.archive_list(**kw), repeat) * 1000

        async def verify():
            verifier = archive.ChainVerifier(purge_runs=await store.purge_runs())
            async for row in store.archive_chain():
                verifier.feed(row)
            assert verifier.ok, verifier.breaks[:3]

        results["verify_s"] = await timed(verify, 1)
        cutoff = stamp(START + 10 * rows // 10)  # the oldest tenth is past retention

        async def purge():
            counts = await store.purge(cutoff, dry_run=True)
            assert counts.rows > 0

        results["purge_dry_run_s"] = await timed(purge, 1)
        return results
    finally:
        await store.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("db")
    b.add_argument("--rows", type=int, default=200_000)
    r = sub.add_parser("run")
    r.add_argument("db")
    r.add_argument("--repeat", type=int, default=5)
    r.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "build":
        if Path(args.db).exists():
            parser.error(f"{args.db} exists")
        began = time.perf_counter()
        build(args.db, args.rows)
        print(f"built {args.rows} rows in {time.perf_counter() - began:.0f} s")
        return 0
    results = asyncio.run(measure(args.db, args.repeat))
    if args.json:
        print(json.dumps(results))
    else:
        for key, value in results.items():
            print(f"{key:24} {value:.3f}" if isinstance(value, float) else f"{key:24} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
