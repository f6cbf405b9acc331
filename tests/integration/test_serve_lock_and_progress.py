"""A running relay and `relay db migrate-to` keep out of each other's way
(the flock on <database>.lock: relay/lock.py), and the long commands show
progress on a terminal — a real pseudo-terminal as stderr — and nothing
with --json or when stderr is not a terminal. Real `relay serve` and CLI
processes on a SQLite file written over SMTP."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from archive_support import clock_at, relay_cli, send
from relay.lock import DatabaseLock
from support import RecordingUpstream, RunningRelay, make_config, message, shared_dkim_key_file, upstream_url

UNREACHABLE = "postgresql://relay@127.0.0.1:1/relay"  # refused before it is ever connected to


def write_config(folder: Path, database: Path) -> Path:
    """The CLI's and serve's config: SQLite at `database`, the inbound
    listener on a free port, no submission listener, no DNS."""
    path = folder / "relay.toml"
    path.write_text(f'database = "{database}"\n\n[inbound]\nlisten = "127.0.0.1:0"\n\n'
                    '[submission]\nlisten = ""\nlisten_tls = ""\n\n'
                    f'[dkim]\nkey_file = "{shared_dkim_key_file()}"\n\n[auth]\ninbound = "off"\n')
    return path


class Serve:
    """`relay serve --config CONFIG` in a child process, up once it logged
    its inbound listener."""

    def __init__(self, config: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "relay", "--config", str(config), "serve"],
                                     cwd=config.parent, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "RELAY_CONFIG": ""})
        self.lines: list[str] = []
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line)
                if re.search(r"inbound listener on 127\.0\.0\.1:\d+", line):
                    ready.set()
            ready.set()  # it ended

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        ready.wait(60)
        assert self.proc.poll() is None, "relay serve did not start:\n" + "".join(self.lines)

    def stop(self, signum=signal.SIGTERM) -> int:
        self.proc.send_signal(signum)
        status = self.proc.wait(30)
        self._reader.join(10)
        self.proc.stderr.close()
        return status


@pytest.fixture
def archived(tmp_path) -> tuple[Path, Path]:
    """(config, database): five messages archived by a relay, three of them
    800 days old (past the default retention of 730)."""
    upstream = RecordingUpstream().start()
    database = tmp_path / "relay.sqlite3"
    now = datetime.now(timezone.utc)
    clock = clock_at(now - timedelta(days=800))
    relay = RunningRelay(dataclasses.replace(make_config(tmp_path, upstream_url(upstream)), database=str(database)),
                         clock=clock)
    try:
        pair = relay.pair()
        for number, days in enumerate([800, 800, 800, 2, 1], start=1):
            clock.now = now - timedelta(days=days)
            raw = message(pair.buyer, pair.seller_alias, body=f"Message {number}\n")
            assert send(relay, pair.buyer, pair.seller_alias, raw)[0] == 250
        upstream.wait_for(5)
    finally:
        relay.stop()
        upstream.stop()
    return write_config(tmp_path, database), database


def on_terminal(config: Path, *args: str) -> tuple[int, bytes, str]:
    """Run the CLI with a pseudo-terminal as stderr: (status, stdout, what
    the terminal showed)."""
    controller, terminal = os.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "relay", "--config", str(config), *args],
                                cwd=config.parent, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=terminal, env={**os.environ, "RELAY_CONFIG": ""})
    finally:
        os.close(terminal)
    shown = b""
    try:
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the child closed the terminal (Linux)
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
    out = proc.stdout.read()
    proc.stdout.close()
    return proc.wait(60), out, shown.decode()


def test_migrate_to_refuses_while_a_relay_serves_the_database(archived):
    config, database = archived
    server = Serve(config)
    try:
        refused = relay_cli(config, "db", "migrate-to", UNREACHABLE)
        assert refused.returncode == 1
        assert refused.stderr == (
            f"relay: a relay is running on {database} (it holds {database}.lock); stop every `relay serve` on it"
            " first, so that nothing it accepts is left out of the copy\n")
        # A second relay on the same file is fine: the lock is shared among them.
        assert relay_cli(config, "archive", "verify").returncode == 0
    finally:
        assert server.stop() == 0
    # Stopped: migrate-to goes past the lock (and on to the unreachable server).
    after = relay_cli(config, "db", "migrate-to", UNREACHABLE)
    assert after.returncode == 1 and "a relay is running" not in after.stderr


def test_a_killed_relay_leaves_no_lock_behind(archived):
    config, _ = archived
    server = Serve(config)
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    after = relay_cli(config, "db", "migrate-to", UNREACHABLE)
    assert after.returncode == 1 and "a relay is running" not in after.stderr


def test_serve_refuses_while_migrate_to_copies(archived):
    config, database = archived
    with DatabaseLock(str(database)).acquire(exclusive=True):  # what migrate-to holds during the copy
        result = subprocess.run([sys.executable, "-m", "relay", "--config", str(config), "serve"],
                                cwd=config.parent, capture_output=True, text=True, timeout=60,
                                env={**os.environ, "RELAY_CONFIG": ""})
    assert result.returncode == 1
    assert result.stderr.endswith(
        f"relay: database {database} is being copied by `relay db migrate-to` (it holds {database}.lock);"
        " start the relay once the copy is done\n")
    assert "inbound listener" not in result.stderr


def test_verify_shows_progress_on_a_terminal_only(archived):
    config, _ = archived
    status, out, shown = on_terminal(config, "archive", "verify")
    assert status == 0 and out.decode().startswith("archive chain verified: 5 row(s)")
    assert shown.endswith("verifying: 5 row(s)\r\n")  # the terminal turns \n into \r\n
    status, out, shown = on_terminal(config, "archive", "verify", "--json")
    assert (status, shown) == (0, "")
    piped = relay_cli(config, "archive", "verify")
    assert (piped.returncode, piped.stderr) == (0, "")


def test_purge_shows_progress_on_a_terminal_only(archived):
    config, _ = archived
    status, _, shown = on_terminal(config, "purge", "--dry-run")
    assert status == 0 and shown.endswith("counting: 3 row(s) past retention\r\n")
    status, _, shown = on_terminal(config, "purge", "--json")
    assert (status, shown) == (0, "")
    status, out, shown = on_terminal(config, "purge")
    assert status == 0 and shown == "\rpurging: 0 row(s) past retention\r\n"  # the --json run purged the three
    assert relay_cli(config, "archive", "verify").returncode == 0


def test_migrate_to_shows_progress_on_a_terminal(archived, postgres_url):
    config, _ = archived
    status, out, shown = on_terminal(config, "db", "migrate-to", postgres_url)
    assert status == 0, shown
    lines = out.decode().splitlines()
    assert lines[-1].startswith("copy: archive chain verified: 5 row(s)")
    copied = sum(int(line.split()[1]) for line in lines[1:-1])  # "  archive  5 row(s)" per table
    # The last state of each line, then its end (a shorter line is padded over a longer one).
    assert re.search(rf"\rcopying: {copied} row\(s\) *\r\n\rverifying the copy: .*\rverifying the copy: 5 row\(s\)\r\n$",
                     shown), shown


def test_migrate_to_json_shows_no_progress(archived, postgres_url):
    config, _ = archived
    status, out, shown = on_terminal(config, "db", "migrate-to", postgres_url, "--json")
    assert (status, shown) == (0, "")
    assert b'"ok": true' in out
