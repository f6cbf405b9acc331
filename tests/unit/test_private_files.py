"""relay/private.py: secret files are made 0600 in 0700 folders, whatever
the umask, and the start-up check names the ones others can open."""

from __future__ import annotations

import os

import pytest

from relay import private


@pytest.fixture
def open_umask():
    """umask 000: every mode bit the code asks for is what it gets."""
    old = os.umask(0)
    yield
    os.umask(old)


def mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_write_makes_0600_in_new_0700_folders(tmp_path, open_umask):
    (tmp_path / "existing").mkdir(mode=0o755)
    path = tmp_path / "existing" / "a" / "b" / "key.pem"
    private.write(path, b"secret")
    assert path.read_bytes() == b"secret"
    assert (mode(path), mode(path.parent), mode(path.parent.parent)) == (0o600, 0o700, 0o700)
    assert mode(tmp_path / "existing") == 0o755  # an existing folder is left alone
    assert sorted(p.name for p in path.parent.iterdir()) == ["key.pem"]  # no temporary file left


def test_write_replaces_and_does_not_inherit_a_stale_temporary_file(tmp_path, open_umask):
    path = tmp_path / "key.pem"
    stale = tmp_path / f".key.pem.{os.getpid()}.tmp"
    stale.write_bytes(b"old")
    stale.chmod(0o644)
    private.write(path, b"one")
    private.write(path, b"two")
    assert (path.read_bytes(), mode(path)) == (b"two", 0o600)
    assert not stale.exists()


def test_exclusive_write_keeps_the_first_file(tmp_path):
    path = tmp_path / "bounce.key"
    private.write(path, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        private.write(path, b"second", exclusive=True)
    assert path.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bounce.key"]


def test_create_empty_makes_0600_once(tmp_path, open_umask):
    path = tmp_path / "var" / "relay.sqlite3"
    private.create_empty(path)
    assert (path.read_bytes(), mode(path), mode(path.parent)) == (b"", 0o600, 0o700)
    path.write_bytes(b"data")
    path.chmod(0o640)
    private.create_empty(path)
    assert (path.read_bytes(), mode(path)) == (b"data", 0o640)


@pytest.mark.parametrize("bits, exposed", [(0o600, False), (0o400, False), (0o640, True), (0o604, True),
                                           (0o620, True), (0o602, True), (0o644, True)])
def test_exposed_means_any_group_or_other_bit(tmp_path, bits, exposed):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    path.chmod(bits)
    assert private.exposed([path, tmp_path / "missing"]) == ([(path, bits)] if exposed else [])


def test_warn_exposed_logs_one_line_naming_the_path(tmp_path, caplog):
    shown, hidden = tmp_path / "relay.sqlite3", tmp_path / "bounce.key"
    for path, bits in ((shown, 0o644), (hidden, 0o600)):
        path.write_bytes(b"x")
        path.chmod(bits)
    with caplog.at_level("WARNING", logger="relay.private"):
        assert private.warn_exposed([shown, hidden, tmp_path / "missing"]) == [shown]
    assert [r.getMessage() for r in caplog.records] == [
        f"{shown} can be opened by group or others (mode 0644) and holds secrets: chmod 600 {shown}"]
