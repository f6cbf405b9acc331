"""The lock file that tells whether a relay is serving a SQLite database.

`relay serve` holds a shared flock(2) on ``<database>.lock`` (beside the
SQLite file) for as long as it runs; `relay db migrate-to` takes it
exclusively for the whole copy. So migrate-to refuses while any relay
serves the source, and a relay started during a copy refuses to start. The
kernel drops the lock with the process however it ends (kill -9
included), so there is no stale pid file to clean up; the file itself stays
and is never deleted (deleting a lock file lets two processes each lock
their own copy). A PostgreSQL database has no such file: several nodes
serve it at once by design, and migrate-to only reads SQLite.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class Locked(Exception):
    """Another process holds the lock in a conflicting mode."""


def lock_path(database: str) -> Path:
    return Path(database + ".lock")


class DatabaseLock:
    def __init__(self, database: str):
        self.path = lock_path(database)
        self._fd: int | None = None

    def acquire(self, exclusive: bool) -> "DatabaseLock":
        """Take the lock at once or raise Locked; never waits."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Locked(str(self.path)) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "DatabaseLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
