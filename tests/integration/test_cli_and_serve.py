"""The `relay` command as an operator uses it, and `relay serve` as a real
process: start, provision, deliver to var/outbox, SIGTERM with a message in
flight."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from support import RecordingUpstream, message

ROOT = Path(__file__).resolve().parents[2]


def relay_cmd(cwd, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", "relay", *args], cwd=cwd, capture_output=True,
                          text=True, input=stdin, timeout=60, env={**os.environ, "RELAY_CONFIG": ""})


@pytest.fixture
def workdir(tmp_path):
    """A working directory holding the shipped config, listening on a free port."""
    (tmp_path / "config").mkdir()
    text = (ROOT / "config" / "relay.toml").read_text()
    for port in ("2525", "5870", "4650"):
        text = text.replace(f'"127.0.0.1:{port}"', '"127.0.0.1:0"')
    (tmp_path / "config" / "relay.toml").write_text(text)
    return tmp_path


def provision(cwd):
    assert relay_cmd(cwd, "seller", "add", "Sam@Shop.example", "--name", "Sam's Shop").returncode == 0
    assert relay_cmd(cwd, "buyer", "add", "bea@mail.example", "--name", "Bea").returncode == 0
    result = relay_cmd(cwd, "order", "add", "111-222", "--seller", "sam@shop.example",
                       "--buyer", "bea@mail.example", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_provisioning_commands(workdir):
    order = provision(workdir)
    assert order["relationship"] == 1 and order["created"] is True
    for key in ("seller_alias", "buyer_alias"):
        local, domain = order[key].split("@")
        assert domain == "marketplace.example"
        assert re.fullmatch(r"[a-z2-7]{16}", local)  # 80 random bits, lower-case
        assert "sam" not in local and "bea" not in local
    assert order["seller_alias"] != order["buyer_alias"]

    # A second order for the pair reuses the relationship and its aliases.
    again = json.loads(relay_cmd(workdir, "order", "add", "111-333", "--seller", "sam@shop.example",
                                 "--buyer", "bea@mail.example", "--json").stdout)
    assert (again["relationship"], again["created"]) == (1, False)
    assert (again["seller_alias"], again["buyer_alias"]) == (order["seller_alias"], order["buyer_alias"])

    # The same order twice is an error that changes nothing.
    db = workdir / "var" / "relay.sqlite3"
    before = sqlite3.connect(db).execute("SELECT COUNT(*) FROM orders").fetchone()
    dup = relay_cmd(workdir, "order", "add", "111-222", "--seller", "sam@shop.example",
                    "--buyer", "bea@mail.example")
    assert dup.returncode == 1
    assert dup.stderr == "relay: order 111-222 is already recorded\n"
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM orders").fetchone() == before

    shown = json.loads(relay_cmd(workdir, "relationship", "show", "--alias", order["buyer_alias"].upper(),
                                 "--json").stdout)
    assert shown["seller"] == "sam@shop.example" and shown["buyer"] == "bea@mail.example"
    assert shown["orders"] == 2 and shown["seller_name"] == "Sam's Shop"
    by_pair = relay_cmd(workdir, "relationship", "show", "--seller", "sam@shop.example",
                        "--buyer", "bea@mail.example")
    assert by_pair.returncode == 0 and order["seller_alias"] in by_pair.stdout


@pytest.mark.parametrize("args, status, text", [
    (["seller", "add", "not-an-address"], 2, "relay: not an email address: 'not-an-address'\n"),
    (["seller", "add", "x@marketplace.example"], 2,
     "relay: x@marketplace.example is in the relay's own domain; give the seller's real address\n"),
    (["order", "add", "9", "--seller", "nobody@shop.example", "--buyer", "bea@mail.example"], 1,
     "relay: no seller nobody@shop.example; add it with `relay seller add`\n"),
    (["order", "add", "9", "--seller", "sam@shop.example", "--buyer", "bea@mail.example",
      "--placed-at", "yesterday"], 2, "relay: --placed-at: not an ISO 8601 date or time: 'yesterday'\n"),
    (["relationship", "show", "--alias", "zzzzzzzzzzzzzzzz@marketplace.example"], 1,
     "relay: no such relationship\n"),
    (["relationship", "show", "--seller", "sam@shop.example"], 2,
     "relay: give --alias, or both --seller and --buyer\n"),
    (["frobnicate"], 2, None),
])
def test_cli_errors_are_one_line(workdir, args, status, text):
    provision(workdir)
    result = relay_cmd(workdir, *args)
    assert result.returncode == status
    assert result.stderr.count("\n") == 1
    if text is not None:
        assert result.stderr == text


def test_party_registered_twice_is_an_error(workdir):
    provision(workdir)
    result = relay_cmd(workdir, "buyer", "add", "BEA@mail.example")
    assert (result.returncode, result.stderr) == (1, "relay: buyer bea@mail.example is already registered\n")


def test_db_upgrade_and_check_config(workdir):
    first = relay_cmd(workdir, "db", "upgrade")
    from relay.store.sqlite import migrations

    latest = migrations()[-1][0]
    assert first.returncode == 0 and f"applied migration(s) {', '.join(str(n) for n, _ in migrations())};" in first.stdout
    again = relay_cmd(workdir, "db", "upgrade")
    assert f"up to date at version {latest}" in again.stdout
    settings = json.loads(relay_cmd(workdir, "check-config", "--json").stdout)
    assert settings["inbound"]["listen"] == "127.0.0.1:0"
    assert settings["submission"]["listen_tls"] == "127.0.0.1:0"
    assert settings["upstream"]["url"] == "maildir:var/outbox"
    text = relay_cmd(workdir, "check-config").stdout
    assert 'domain = "marketplace.example"' in text and "[upstream]" in text


def test_config_from_environment(workdir, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere") / "relay.toml"
    other.write_text('domain = "other.example"\n')
    result = subprocess.run([sys.executable, "-m", "relay", "check-config", "--json"], cwd=workdir,
                            capture_output=True, text=True, env={**os.environ, "RELAY_CONFIG": str(other)})
    assert json.loads(result.stdout)["domain"] == "other.example"


class Serve:
    """`relay serve` as a child process; the port comes from its log."""

    def __init__(self, cwd):
        self.proc = subprocess.Popen([sys.executable, "-m", "relay", "serve"], cwd=cwd,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "RELAY_CONFIG": ""})
        self.lines: list[str] = []
        self.port = None
        ready = threading.Event()

        self._new_line = threading.Condition()

        def read():
            for line in self.proc.stderr:
                with self._new_line:
                    self.lines.append(line)
                    self._new_line.notify_all()
                found = re.search(r"inbound listener on 127\.0\.0\.1:(\d+)", line)
                if found:
                    self.port = int(found.group(1))
                    ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not ready.wait(30):
            self.stop(signal.SIGKILL)
            raise AssertionError("relay serve did not start:\n" + "".join(self.lines))

    def wait_until_serving(self) -> None:
        """Until start-up is over: the last listener is logged, and an SMTP
        round trip shows the event loop has moved past start-up (and set its
        SIGTERM handler, which start-up's last step does)."""
        with self._new_line:
            assert self._new_line.wait_for(
                lambda: any("submission listener (implicit TLS)" in line for line in self.lines), 30), self.lines
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
            assert client.noop()[0] == 250

    def stop(self, signum=signal.SIGTERM) -> int:
        self.proc.send_signal(signum)
        status = self.proc.wait(30)
        self._reader.join(10)  # every log line is in self.lines from here on
        self.proc.stderr.close()
        return status


def test_serve_delivers_to_the_outbox_with_only_aliases(workdir):
    order = provision(workdir)
    server = Serve(workdir)
    try:
        assert any("UPSTREAM IS maildir:var/outbox" in line for line in server.lines)
        raw = message('"Bea" <bea@mail.example>', order["seller_alias"],
                      body="Hi Sam (sam@shop.example), this is bea@mail.example.\n")
        with smtplib.SMTP("127.0.0.1", server.port) as client:
            assert client.sendmail("bea@mail.example", [order["seller_alias"]], raw) == {}
    finally:
        assert server.stop() == 0
    [eml] = list((workdir / "var" / "outbox").glob("*.eml"))
    data = eml.read_bytes()
    assert b"bea@mail.example" not in data.lower()
    # The recipient's own address only in To:.
    assert [line for line in data.split(b"\r\n") if b"sam@shop.example" in line.lower()] == [
        b"To: Sam's Shop <sam@shop.example>"]
    assert order["buyer_alias"].encode() in data
    log = "".join(server.lines)
    assert "verdict=delivered" in log and "direction=buyer_to_seller" in log
    assert "bea@mail.example" not in log.split("verdict=delivered")[0].rsplit("\n", 1)[-1]


def test_sigterm_finishes_the_message_in_flight(workdir):
    order = provision(workdir)
    slow = RecordingUpstream(delay=1.5).start()
    try:
        config = workdir / "config" / "relay.toml"
        config.write_text(config.read_text().replace('url = "maildir:var/outbox"',
                                                     f'url = "smtp://127.0.0.1:{slow.port}"'))
        server = Serve(workdir)
        replies = []

        def send():
            with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
                client.ehlo()
                client.mail("bea@mail.example")
                client.rcpt(order["seller_alias"])
                replies.append(client.data(message("bea@mail.example", order["seller_alias"])))

        sender = threading.Thread(target=send)
        sender.start()
        assert slow.data_started.wait(10)  # the message is now with the slow upstream
        assert server.stop() == 0
        sender.join(30)
        assert replies and replies[0][0] == 250
        assert len(slow.messages) == 1
        assert any("draining 1 message" in line for line in server.lines)
    finally:
        slow.stop()


def mode(path: Path) -> str:
    return oct(path.stat().st_mode & 0o777)


def test_serve_makes_its_state_readable_by_its_user_only(workdir):
    """The database (every archived message) with its -wal and -shm, the DKIM
    key, the bounce secret and the self-signed TLS pair: 0600, in 0700
    folders, whatever the umask of the shell that started the relay (tests
    run as root: the mode bits are still what other users meet)."""
    provision(workdir)  # the CLI makes the database
    var = workdir / "var"
    assert mode(var) == "0o700" and mode(var / "relay.sqlite3") == "0o600"
    server = Serve(workdir)
    try:
        server.wait_until_serving()
        # While the relay is running its WAL and shared-memory files exist.
        state = [var / "relay.sqlite3", var / "relay.sqlite3-wal", var / "relay.sqlite3-shm",
                 var / "dkim" / "relay.pem", var / "bounce.key",
                 var / "tls" / "submission-key.pem", var / "tls" / "submission-cert.pem"]
        assert {str(path.relative_to(workdir)): mode(path) for path in state} == {
            str(path.relative_to(workdir)): "0o600" for path in state}
        assert {mode(var / "dkim"), mode(var / "tls")} == {"0o700"}
        assert not any("can be opened by group or others" in line for line in server.lines)
    finally:
        assert server.stop() == 0


def test_serve_warns_about_state_others_can_read(workdir):
    """An existing file is left as the operator made it, with one warning
    line naming it; files no one else can read get none."""
    provision(workdir)
    server = Serve(workdir)  # makes the keys
    server.wait_until_serving()
    assert server.stop() == 0
    var = workdir / "var"
    (var / "relay.sqlite3").chmod(0o644)
    (var / "bounce.key").chmod(0o640)
    server = Serve(workdir)
    try:
        server.wait_until_serving()
        warnings = [line for line in server.lines if "can be opened by group or others" in line]
    finally:
        assert server.stop() == 0
    assert len(warnings) == 2, server.lines
    assert "var/relay.sqlite3 can be opened by group or others (mode 0644)" in warnings[0]
    assert "var/bounce.key can be opened by group or others (mode 0640)" in warnings[1]
    assert all(line.split()[2] == "WARNING" for line in warnings)
    assert mode(var / "relay.sqlite3") == "0o644"  # not changed behind the operator's back
