"""The relay's store against SQLAlchemy 2.0 Core on the same SQLite file:
the per-message reads and writes of issue 15's choice, each timed through
both, alternating, on one database made by the relay's own migrations.

    pip install --target DIR sqlalchemy greenlet   # not a relay dependency
    PYTHONPATH=DIR .venv/bin/python scripts/bench_sqlalchemy.py [--calls N] [--rounds R]

What is timed (median of R rounds of N calls, per call):
- `relationship_by_alias`: the route lookup of every message (a select
  joining relationships to both parties);
- `seller_sends` reservation: a write transaction (BEGIN IMMEDIATE, a
  count, an insert returning the id) as `reserve_send()` takes it;
- `message_ids` lookup: a select with an `IN` list, as threading asks it.

SQLAlchemy runs with its async engine over aiosqlite (the same driver), its
tables reflected once from the file, statements built once (its compiled
cache is on), and a connection held for the whole run, as the relay holds
its own. docs/design-notes.md has the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.store import open_store  # noqa: E402

try:
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine
except ImportError:  # pragma: no cover - a measuring tool
    sys.exit("bench_sqlalchemy: needs sqlalchemy and greenlet on the path (see the docstring)")

PAIRS = 200


async def provision(path: str) -> None:
    store = await open_store(path)
    await store.upgrade()
    for i in range(PAIRS):
        await store.add_party("seller", f"seller{i}@example.com", "")
        await store.add_party("buyer", f"buyer{i}@example.net", "")
        await store.add_order(f"order-{i}", f"seller{i}@example.com", f"buyer{i}@example.net",
                              "2026-12-06T12:00:00.000000Z", "relay.example")
    await store.close()


async def timed(fn, calls: int) -> float:
    began = time.perf_counter()
    for n in range(calls):
        await fn(n)
    return (time.perf_counter() - began) / calls * 1000


async def measure(path: str, calls: int, rounds: int) -> dict[str, tuple[float, float]]:
    store = await open_store(path)
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    metadata = sa.MetaData()
    async with engine.connect() as conn:
        await conn.run_sync(metadata.reflect)
    parties, relationships = metadata.tables["parties"], metadata.tables["relationships"]
    sends, message_ids = metadata.tables["seller_sends"], metadata.tables["message_ids"]
    seller, buyer = parties.alias("s"), parties.alias("b")
    route = (sa.select(relationships.c.id, relationships.c.seller_alias, relationships.c.buyer_alias,
                       relationships.c.created_at, seller.c.id, seller.c.address, seller.c.display_name,
                       seller.c.opted_out, seller.c.daily_orders, buyer.c.id, buyer.c.address,
                       buyer.c.display_name, buyer.c.opted_out, buyer.c.daily_orders)
             .join_from(relationships, seller, seller.c.id == relationships.c.seller_id)
             .join_from(relationships, buyer, buyer.c.id == relationships.c.buyer_id))
    aliases = [r.buyer_alias for r in [await store.relationship_by_id(i + 1) for i in range(PAIRS)]]
    at, window = "2026-12-07T00:00:00.000000Z", "2026-12-06T00:00:00.000000Z"
    results: dict[str, list[tuple[float, float]]] = {"relationship_by_alias": [], "reservation": [],
                                                     "message_ids": []}
    # Autocommit, as the relay's own connection runs its reads: no BEGIN
    # and ROLLBACK around a select; the write takes BEGIN IMMEDIATE itself.
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")

        async def sa_route(n):
            alias = aliases[n % PAIRS]
            (await conn.execute(route.where(sa.or_(relationships.c.seller_alias == alias,
                                                   relationships.c.buyer_alias == alias)))).one()

        async def sa_reserve(n):
            await conn.exec_driver_sql("BEGIN IMMEDIATE")
            (await conn.execute(sa.select(sa.func.count(), sa.func.min(sends.c.sent_at))
                                .where(sends.c.seller_id == 1, sends.c.sent_at >= window))).one()
            new = (await conn.execute(sends.insert().values(seller_id=1, archive_id=None, sent_at=at)
                                      .returning(sends.c.id))).scalar_one()
            await conn.exec_driver_sql("COMMIT")
            return new

        async def sa_ids(n):
            ids = [f"<o{n}@example.net>", f"<r{n}@relay.example>"]
            (await conn.execute(sa.select(message_ids.c.sender_id, message_ids.c.original_id,
                                          message_ids.c.relay_id)
                                .where(message_ids.c.relationship_id == 1,
                                       sa.or_(message_ids.c.relay_id.in_(ids),
                                              message_ids.c.original_id.in_(ids))))).all()

        async def relay_route(n):
            await store.relationship_by_alias(aliases[n % PAIRS])

        async def relay_reserve(n):
            await store.reserve_send(1, at, window, 10**9)

        async def relay_ids(n):
            await store.message_id_rows(1, [f"<o{n}@example.net>", f"<r{n}@relay.example>"])

        pairs = {"relationship_by_alias": (relay_route, sa_route), "reservation": (relay_reserve, sa_reserve),
                 "message_ids": (relay_ids, sa_ids)}
        for ours, theirs in pairs.values():  # warm both paths (SQLAlchemy's compiled cache)
            await ours(0)
            await theirs(0)
        for _ in range(rounds):
            for name, (ours, theirs) in pairs.items():
                results[name].append((await timed(ours, calls), await timed(theirs, calls)))
    await engine.dispose()
    await store.close()
    return {name: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
            for name, runs in results.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "relay.db")
        asyncio.run(provision(path))
        results = asyncio.run(measure(path, args.calls, args.rounds))
    print(f"{'per call':24} {'relay store':>12} {'SQLAlchemy':>12} {'SQLAlchemy/relay':>17}")
    for name, (ours, theirs) in results.items():
        print(f"{name:24} {ours:9.3f} ms {theirs:9.3f} ms {theirs / ours:16.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
