"""`relay db migrate-to`: a SQLite store copied into an empty PostgreSQL one,
for a marketplace that outgrows one machine.

Every table, every row, every id, as stored: the archive's hashes cover the
rows' text and bytes, not where they live, so the copied chain verifies as
the original did (the command runs the verify on the copy). The source is
read inside one read transaction (a consistent snapshot even beside a
running relay, though the relay should be stopped: what it writes after the
snapshot is not copied); the target is written in one transaction holding
all of the relay's advisory locks, and refused unless empty, so a failed
copy leaves it empty and can simply be run again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.store import StoreError
from relay.store.postgresql import TABLES, PostgresStore
from relay.store.sqlite import SqliteStore


@dataclass
class CopyResult:
    schema_version: int
    counts: dict[str, int] = field(default_factory=dict)  # table -> rows copied
    source_head: str | None = None  # the source's last archive row_sha256


async def copy_store(source: SqliteStore, target: PostgresStore, progress=None) -> CopyResult:
    """Copy every row of `source` into `target` (both migrated to the latest
    schema first); StoreError if the target holds anything. `progress`, if
    given, is called with (table, rows of it copied so far) after each batch."""
    await source.upgrade()
    await target.upgrade()
    version, target_version = await source.schema_version(), await target.schema_version()
    if version != target_version:  # a relay of another version migrated one of them
        raise StoreError(f"schema versions differ: source {version}, target {target_version}")
    tables = set(await source.tables()) - {"schema_migrations"}
    if tables != set(TABLES):
        raise StoreError(f"unexpected tables in the source: {sorted(tables ^ set(TABLES))}")
    result = CopyResult(schema_version=version)
    async with source.snapshot(), target.bulk_load() as loader:
        for table in TABLES:
            columns = await source.table_columns(table)
            target_columns = await loader.columns(table)
            if set(columns) != set(target_columns):
                raise StoreError(f"{table}: the columns differ between the engines: "
                                 f"{sorted(set(columns) ^ set(target_columns))}")
            result.counts[table] = 0
            async for rows in source.table_rows(table, columns):
                await loader.copy(table, columns, rows)
                result.counts[table] += len(rows)
                if progress is not None:
                    progress(table, result.counts[table])
        result.source_head = await source.archive_head()
    return result
