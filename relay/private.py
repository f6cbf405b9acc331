"""Files only the relay's own user may read: the database (it holds every
archived message), DKIM keys, the bounce secret and the submission TLS pair.

Each is created 0600 in folders created 0700, with that mode given to
open()/mkdir() themselves rather than set by a chmod afterwards, so there is
no moment at which another user could open it; the umask can only take bits
away from these modes. Files and folders that exist already are never
chmod'ed (an operator may have given a backup group read access on
purpose): `relay serve` warns at start-up, one line per file that group or
others may open (`warn_exposed`).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("relay.private")

FILE_MODE = 0o600
DIR_MODE = 0o700


def make_dirs(path: Path) -> None:
    """`path` and its missing parents, each one made here 0700."""
    missing = []
    while not path.exists() and path.parent != path:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, DIR_MODE)
        except FileExistsError:
            pass  # made meanwhile by another process: its mode is its maker's


def write(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """`data` in `path`, 0600, written atomically: a reader sees the old
    file or the whole new one. With `exclusive`, FileExistsError if `path`
    exists, also when another process made it meanwhile (two nodes starting
    on one state folder must end up with the same bounce secret)."""
    make_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # A left-over temporary file keeps its old mode under O_TRUNC: start anew.
    tmp.unlink(missing_ok=True)
    handle = open_new(tmp, exclusive=True)
    try:
        with handle as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # fails if path exists, unlike a rename
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def open_new(path: Path, *, exclusive: bool = False):
    """`path` opened for writing bytes, created 0600 when it is missing;
    an existing file is emptied and keeps its mode, or with `exclusive`
    FileExistsError."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    return os.fdopen(os.open(path, flags, FILE_MODE), "wb")


def create_empty(path: Path) -> None:
    """`path` made empty and 0600 if it does not exist. For SQLite: it gives
    the database's -wal and -shm files the database file's own mode."""
    make_dirs(path.parent)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except FileExistsError:
        pass


def exposed(paths) -> list[tuple[Path, int]]:
    """The paths among `paths` that exist and that group or others may
    read or write, with their permission bits."""
    found = []
    for path in paths:
        try:
            status = os.stat(path)
        except OSError:  # missing or unreadable: the file checks say so
            continue
        mode = stat.S_IMODE(status.st_mode)
        # Only files: a folder where a file belongs is a configuration
        # error (relay/preflight.py names it), not a secret to chmod.
        if stat.S_ISREG(status.st_mode) and mode & 0o077:
            found.append((Path(path), mode))
    return found


def warn_exposed(paths) -> list[Path]:
    """One warning line per file of `paths` that group or others may open."""
    found = exposed(paths)
    for path, mode in found:
        log.warning("%s can be opened by group or others (mode %04o) and holds secrets: chmod 600 %s",
                    path, mode, path)
    return [path for path, _ in found]
