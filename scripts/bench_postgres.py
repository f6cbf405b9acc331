"""A throwaway PostgreSQL cluster for scripts/bench --nodes and
--compare-nodes: the tests' cluster (tests/postgres_support.py: initdb into
a temporary folder, a free loopback port, run as the ``postgres`` user when
the bench runs as root, the binaries from ``pg_config --bindir``,
/usr/lib/postgresql/*/bin or PATH), started with durable settings.

The tests' cluster turns fsync, synchronous_commit and full_page_writes
off: it only has to live as long as a test run. The bench compares the
relay on PostgreSQL with the relay on SQLite, which commits with
``synchronous=FULL`` (an fsync per commit), so here PostgreSQL keeps its
defaults: a commit returns once its WAL is flushed to disk.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import postgres_support  # tests/ is on sys.path (scripts/bench.py puts it there)

# Server settings on the command line. Everything else is PostgreSQL's
# default (shared_buffers 128MB, max_connections 100: two nodes keep at
# most 2 x pool_size = 20 connections, plus one CLI at a time).
DURABLE = ("-c fsync=on -c synchronous_commit=on -c full_page_writes=on"
           " -c max_connections=100 -c shared_buffers=128MB")


def find_bindir() -> Path | None:
    return postgres_support.find_bindir()


class BenchCluster(postgres_support.PostgresCluster):
    """The tests' cluster with DURABLE settings; `stop()` (the tests' own)
    stops it with ``-m immediate`` and deletes its folder."""

    settings = DURABLE
    folder_prefix = "relay-bench-pg-"

    def postmaster_pid(self) -> int | None:
        """The server's main process (the root of its process tree)."""
        try:
            return int((self.folder / "data" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError, TypeError):
            return None

    def version(self) -> str:
        try:
            out = subprocess.run([str(self.bindir / "postgres"), "--version"], capture_output=True, text=True,
                                 timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "unknown"
        found = re.search(r"\d+(?:\.\d+)+", out)  # "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
        return found.group(0) if found else "unknown"

    def create_named_database(self, name: str) -> str:
        """A new, empty database `name` (letters, digits, _); its URL."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"not a plain database name: {name!r}")
        self.psql(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)
