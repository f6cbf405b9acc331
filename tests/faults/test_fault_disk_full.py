"""Fault: the disk under the database is full. The archive row cannot be
written after the upstream took the message: the client must get `451`
(it retries: a counted duplicate), never a 250 for an unarchived message;
once there is room again the retry is delivered and archived.

Two ways to fill the disk, both real errors from SQLite (SQLITE_FULL):

- "filesystem": the database on a 2 MB tmpfs, filled up with a file. Needs
  `mount` (root, or CAP_SYS_ADMIN); where that is not permitted the test
  says so in its output and falls back to the next one;
- "page-limit": `PRAGMA max_page_count` on the relay's own connection, the
  database's size limit, which SQLite enforces exactly as a full disk.
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from faultkit import Ledger, archive_of, fault_message, send, verify_archive, write_config
from support import RunningRelay, make_config

BODY_BYTES = 128 * 1024  # far more than any free page the database has


def _mount_tmpfs(directory) -> bool:
    directory.mkdir()
    if os.geteuid() != 0:
        return False
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(directory)],
                                capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


class FullDisk:
    """fill() makes the next archive write fail with SQLITE_FULL; free() undoes it."""

    def __init__(self, kind: str, directory):
        self.kind, self.directory = kind, directory
        self.filler = directory / "filler"
        self.relay = None

    def fill(self) -> None:
        if self.kind == "filesystem":
            with open(self.filler, "wb", buffering=0) as f:
                chunk = b"\0" * 4096
                for _ in range(4096):  # 16 MB at most: bounded, and far more than 2 MB
                    try:
                        f.write(chunk)
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC, exc
                        break
                else:
                    raise AssertionError("the small filesystem never filled up")
        else:
            db = self.relay.store._db
            self.relay.call(db.execute("PRAGMA max_page_count = 1"))  # clamps to the current size

    def free(self) -> None:
        if self.kind == "filesystem":
            self.filler.unlink()
        else:
            self.relay.call(self.relay.store._db.execute("PRAGMA max_page_count = 1073741823"))


@pytest.fixture(params=["filesystem", "page-limit"])
def full_disk(request, tmp_path):
    kind = request.param
    directory = tmp_path / "small"
    mounted = False
    if kind == "filesystem":
        mounted = _mount_tmpfs(directory)
        if not mounted:
            print("mount -t tmpfs not permitted here; testing the page limit instead")
            kind = "page-limit"
    else:
        directory.mkdir()
    disk = FullDisk(kind, directory)
    try:
        yield disk
    finally:
        if disk.relay is not None:
            disk.relay.stop()
        if mounted:
            subprocess.run(["umount", str(directory)], capture_output=True, timeout=30)


def test_disk_full_is_451_then_the_retry_is_archived(full_disk, scripted):
    relay = full_disk.relay = RunningRelay(make_config(full_disk.directory, scripted.url()))
    pair = relay.pair()
    ledger = Ledger()
    raw = fault_message(pair.buyer, pair.seller_alias, "full", size=BODY_BYTES)

    full_disk.fill()
    first = ledger.note("full", send(relay.port, pair.buyer, pair.seller_alias, raw))
    assert (first.code, first.text[:5]) == (451, "4.3.0"), first
    assert archive_of(relay) == {}
    # The upstream has it and the client will retry: at-least-once.
    assert scripted.accepted() in ({}, {"full": 1})
    # Still full: a second try is deferred the same way, the relay keeps serving.
    again = ledger.note("full", send(relay.port, pair.buyer, pair.seller_alias, raw))
    assert again.code == 451, again

    full_disk.free()
    last = ledger.note("full", send(relay.port, pair.buyer, pair.seller_alias, raw))
    assert last.code == 250, last
    assert archive_of(relay) == {"full": ["delivered"]}
    summary = ledger.check(scripted.accepted(), archive_of(relay))
    assert summary["sent"] == 1 and summary["archived_without_250"] == 0
    # The database came through its full disk whole: the chain verifies.
    config = write_config(full_disk.directory.parent, scripted.url(), full_disk.directory / "relay.sqlite3")
    report = verify_archive(config)
    assert (report["exit"], report["ok"], report["rows"]) == (0, True, 1), report
