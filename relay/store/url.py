"""The config's `database` value: a SQLite path or a PostgreSQL URL.

Pure string work, no driver imported, so that `relay.config` can validate
the value at start-up. A URL is ``postgresql://user@host:port/dbname`` (or
``postgres://``), as libpq and asyncpg read it; these query parameters are
the relay's own and are taken out before the URL reaches asyncpg:

  pool_size          connections this node keeps open at most (default 10)
  statement_timeout  milliseconds one statement (lock waits included) may
                     take before the store reports itself unavailable
                     (default 5000, like SQLite's busy timeout)
  connect_timeout    seconds to open a connection (default 10)

Every other parameter (``sslmode``, ``application_name``, …) goes to
asyncpg unchanged. Keep the password out of the URL: asyncpg reads
``PGPASSWORD`` and ``~/.pgpass`` like psql does.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

SCHEMES = ("postgresql", "postgres")

DEFAULT_POOL_SIZE = 10
DEFAULT_STATEMENT_TIMEOUT_MS = 5000
DEFAULT_CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class PostgresOptions:
    dsn: str  # what asyncpg gets: the URL without the relay's own parameters
    pool_size: int = DEFAULT_POOL_SIZE
    statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT


def scheme_of(database: str) -> str | None:
    """The URL scheme of `database` (lower-case), or None for a file path."""
    if "://" not in database:
        return None
    return database.split("://", 1)[0].lower()


def is_postgres(database: str) -> bool:
    return scheme_of(database) in SCHEMES


def _positive_int(name: str, value: str) -> int:
    if not value.isdigit() or int(value) <= 0:
        raise ValueError(f"{name} must be a positive whole number, got {value!r}")
    return int(value)


def postgres_options(url: str) -> PostgresOptions:
    """Split a PostgreSQL URL into asyncpg's DSN and the relay's options;
    ValueError (naming the problem, never the password) if it is unusable."""
    if not is_postgres(url):
        raise ValueError(f"not a postgresql:// URL: {redact(url)!r}")
    parts = urllib.parse.urlsplit(url)
    if parts.fragment:
        raise ValueError(f"unexpected #fragment in {redact(url)!r}")
    if "," not in parts.netloc:  # several hosts (failover): the driver reads them
        try:
            parts.port  # noqa: B018 - validates the port
        except ValueError:
            raise ValueError(f"bad port in {redact(url)!r}") from None
    kept, options = [], {}
    for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if name == "pool_size":
            options["pool_size"] = _positive_int(name, value)
        elif name == "statement_timeout":
            options["statement_timeout_ms"] = _positive_int(name, value)
        elif name == "connect_timeout":
            options["connect_timeout"] = float(_positive_int(name, value))
        else:
            kept.append((name, value))
    dsn = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(kept)))
    return PostgresOptions(dsn=dsn, **options)


def redact(database: str) -> str:
    """`database` fit for a log line or an error: a URL's password masked."""
    if "://" not in database:
        return database
    parts = urllib.parse.urlsplit(database)
    if parts.password is None:
        return database
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))
