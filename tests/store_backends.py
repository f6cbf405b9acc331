"""The store tests' backends (no tests here): `database` is parametrized
over SQLite (a file in the test's tmp_path) and PostgreSQL (a fresh database
on the session's throwaway cluster, tests/postgres_support.py), so that one
suite runs against both. Import the fixtures into a test module:

    from store_backends import database, open_two  # noqa: F401
"""

from __future__ import annotations

import pytest

from relay.store import open_store
from relay.store.url import is_postgres

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def database(request, tmp_path) -> str:
    """What the config's `database` would say: a path or a postgresql:// URL."""
    if request.param == "sqlite":
        return str(tmp_path / "sub" / "relay.sqlite3")
    return request.getfixturevalue("postgres_url")


def engine(store) -> str:
    return "postgresql" if type(store).__name__ == "PostgresStore" else "sqlite"


def with_query(database: str, **parameters) -> str:
    """A PostgreSQL URL with extra query parameters (SQLite paths unchanged)."""
    if not is_postgres(database):
        return database
    query = "&".join(f"{name}={value}" for name, value in parameters.items())
    return f"{database}{'&' if '?' in database else '?'}{query}"


async def open_two(database: str):
    """Two stores on one database, as two relay nodes (or two processes on
    one SQLite file) would have: separate connections, separate locks."""
    first = await open_store(database)
    await first.upgrade()
    second = await open_store(database)
    await second.upgrade()
    return first, second
