"""Databases made by the store before issue 15 (one query layer, migrations
rendered from relay/store/schema.py) upgrade in place with `relay db upgrade`
on both engines: every row survives as it was, the archive chain verifies,
and the schema ends up the same as a fresh database's.

The databases are frozen in tests/cases/store_main/: main's own migration
SQL of the time (up to version 3, and up to the then latest, 6), then the
rows its store wrote: parties with a password, a cap and an opt-out, two
relationships, a chain of archive rows with two tombstones of a purge run, a
hold, a reservation, a delivery report and the Message-ID map."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import asyncpg
import pytest

from archive_support import relay_cli, write_config
from relay.store.postgresql import TABLES
from relay.store.schema import MIGRATIONS
from test_postgres_cli import write_postgres_config

CASES = Path(__file__).resolve().parent.parent / "cases" / "store_main"
LATEST = MIGRATIONS[-1][0]
# The newest database frozen from main (version 6); later migrations upgrade it too.
MAIN_FROZEN = 6


def run(config: Path, *args) -> str:
    result = relay_cli(config, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


# --- reading a database as it is, with the drivers themselves ---------------------


def sqlite_rows(path: Path) -> dict:
    db = sqlite3.connect(path)
    try:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {table: [tuple(row) for row in db.execute(f"SELECT * FROM {table} ORDER BY rowid")]
                for table in TABLES if table in tables}
    finally:
        db.close()


def sqlite_schema(path: Path) -> dict:
    """Every table's columns, indexes and foreign keys, as SQLite reports them."""
    db = sqlite3.connect(path)
    try:
        shape = {}
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"):
            indexes = {}
            for index in db.execute(f"PRAGMA index_list({table})").fetchall():
                indexes[index[1]] = (index[2], index[3], index[4],
                                     [tuple(c) for c in db.execute(f"PRAGMA index_xinfo({index[1]})")])
            shape[table] = ([tuple(c) for c in db.execute(f"PRAGMA table_info({table})")], indexes,
                            sorted(tuple(k)[2:] for k in db.execute(f"PRAGMA foreign_key_list({table})")))
        return shape
    finally:
        db.close()


async def postgres_rows(url: str) -> dict:
    conn = await asyncpg.connect(url)
    try:
        found = {}
        for table in TABLES:
            if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
                order = {"archive_bodies": "archive_id", "archive_holds": "relationship_id",
                         "api_idempotency": "token_id, idem_key"}.get(table, "id")
                found[table] = [tuple(row) for row in await conn.fetch(f"SELECT * FROM {table} ORDER BY {order}")]
        return found
    finally:
        await conn.close()


async def postgres_schema(url: str) -> dict:
    conn = await asyncpg.connect(url)
    try:
        columns = await conn.fetch(
            "SELECT table_name, column_name, ordinal_position, data_type, is_nullable, column_default,"
            " collation_name, is_identity, identity_generation FROM information_schema.columns"
            " WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position")
        indexes = await conn.fetch("SELECT tablename, indexname, indexdef FROM pg_indexes"
                                   " WHERE schemaname = current_schema() ORDER BY indexname")
        constraints = await conn.fetch(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE connamespace = current_schema()::regnamespace ORDER BY 1, 2")
        storage = await conn.fetch(
            "SELECT attrelid::regclass::text, attname, attstorage FROM pg_attribute"
            " WHERE attrelid = 'archive_bodies'::regclass AND attnum > 0 ORDER BY attnum")
        return {"columns": [tuple(r) for r in columns], "indexes": [tuple(r) for r in indexes],
                "constraints": [tuple(r) for r in constraints], "storage": [tuple(r) for r in storage]}
    finally:
        await conn.close()


# --- the databases main made ------------------------------------------------------


def main_sqlite(folder: Path, version: int) -> Path:
    path = folder / f"main-v{version}.sqlite3"
    db = sqlite3.connect(path)
    db.executescript((CASES / f"sqlite-v{version}.sql").read_text(encoding="utf-8"))
    db.close()
    return path


async def load_postgres(url: str, version: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute((CASES / f"postgresql-v{version}.sql").read_text(encoding="utf-8"))
    finally:
        await conn.close()


def upgraded_survivors(before: dict, after: dict) -> None:
    """Every row of every table is still there with the same values (the
    columns a later migration added come after the old ones)."""
    assert set(before) <= set(after)
    for table, rows in before.items():
        assert len(after[table]) == len(rows), table
        for old, new in zip(rows, after[table]):
            assert new[:len(old)] == old, table
    assert sum(len(rows) for rows in before.values()) > 20
    assert len(before["archive"]) >= 5


def check_chain(config: Path, rows: int) -> None:
    verified = json.loads(run(config, "archive", "verify", "--json"))
    assert (verified["ok"], verified["rows"], verified["purged"]) == (True, rows, 2), verified


@pytest.mark.parametrize("version", [3, MAIN_FROZEN])
def test_a_sqlite_database_of_main_upgrades_in_place(tmp_path, version):
    path = main_sqlite(tmp_path, version)
    before = sqlite_rows(path)
    config = write_config(tmp_path, path)
    out = run(config, "db", "upgrade")
    if version < LATEST:
        assert f"applied migration(s) {', '.join(str(n) for n in range(version + 1, LATEST + 1))};" in out
    after = sqlite_rows(path)
    upgraded_survivors(before, after)
    check_chain(config, len(after["archive"]))
    # The same schema as a database made now, and as main's newest frozen one upgraded.
    folder = tmp_path / "fresh"
    folder.mkdir()
    fresh = folder / "fresh.sqlite3"
    run(write_config(folder, fresh), "db", "upgrade")
    frozen = main_sqlite(folder, MAIN_FROZEN)
    run(write_config(folder, frozen), "db", "upgrade")
    assert sqlite_schema(path) == sqlite_schema(frozen) == sqlite_schema(fresh)


@pytest.mark.parametrize("version", [3, MAIN_FROZEN])
def test_a_postgresql_database_of_main_upgrades_in_place(tmp_path, postgres_url, postgres_cluster, version):
    asyncio.run(load_postgres(postgres_url, version))
    before = asyncio.run(postgres_rows(postgres_url))
    config = write_postgres_config(tmp_path / "node", postgres_url)
    out = run(config, "db", "upgrade")
    if version < LATEST:
        assert f"applied migration(s) {', '.join(str(n) for n in range(version + 1, LATEST + 1))};" in out
    after = asyncio.run(postgres_rows(postgres_url))
    upgraded_survivors(before, after)
    check_chain(config, len(after["archive"]))
    main_latest, fresh = postgres_cluster.create_database(), postgres_cluster.create_database()
    try:
        asyncio.run(load_postgres(main_latest, MAIN_FROZEN))
        run(write_postgres_config(tmp_path / "frozen", main_latest), "db", "upgrade")
        run(write_postgres_config(tmp_path / "fresh", fresh), "db", "upgrade")
        upgraded = asyncio.run(postgres_schema(postgres_url))
        assert upgraded == asyncio.run(postgres_schema(main_latest)) == asyncio.run(postgres_schema(fresh))
    finally:
        postgres_cluster.drop_database(main_latest)
        postgres_cluster.drop_database(fresh)
