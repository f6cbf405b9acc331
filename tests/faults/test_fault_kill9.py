"""Fault: `kill -9` of a running `relay serve`, in the middle of a
transaction. No drain, no clean close: the client sees its connection drop
(never a 250), `relay serve` is started again on the same database, the
client retries, and the message is delivered at least once and archived
once for the one 250 the client finally got. The archive's hash chain
still verifies (`relay archive verify`)."""

from __future__ import annotations

import smtplib
import threading

import pytest

from faultkit import (BUYER, Attempt, DatabaseLocker, Ledger, RelayProcess, ScriptedUpstream, archive_by_tag,
                      archive_in, fault_message, provision, send, verify_archive, write_config)
from support import shared_dkim_key_file

CLIENT_TIMEOUT = 30.0


@pytest.fixture
def setup(tmp_path, scripted):
    database = tmp_path / "relay.sqlite3"
    aliases = provision(database)
    config = write_config(tmp_path, scripted.url(), database, upstream_timeout=20.0,
                          dkim_key_file=shared_dkim_key_file())
    processes = []

    def start() -> RelayProcess:
        process = RelayProcess(config)
        processes.append(process)
        return process

    yield config, aliases["seller_alias"], start
    for process in processes:
        process.kill()
    leaked = {process.proc.pid: process.leftovers() for process in processes}
    for process in processes:
        process.kill_session()
    # kill -9 leaves nothing behind: the worker processes end with their parent.
    assert not any(leaked.values()), leaked


def in_background(target, *args):
    result = []
    thread = threading.Thread(target=lambda: result.append(target(*args)), daemon=True)
    thread.start()
    return thread, result


def finish(config, ledger, scripted, tag, seller_alias, start):
    """Restart, retry until delivered (bounded), and check everything."""
    relay = start()
    raw = fault_message(BUYER, seller_alias, tag)
    for _ in range(5):
        if ledger.note(tag, send(relay.port, BUYER, seller_alias, raw, timeout=CLIENT_TIMEOUT)).delivered:
            break
    assert ledger.attempts[tag][-1].code == 250, ledger.attempts[tag]
    assert relay.stop() == 0
    archived = archive_in(config.parent / "relay.sqlite3")
    summary = ledger.check(scripted.accepted(), archived)
    report = verify_archive(config)
    assert (report["exit"], report["ok"], report["breaks"]) == (0, True, []), report
    return summary, archived


def test_kill_while_the_client_is_in_the_middle_of_data(setup, scripted):
    config, seller_alias, start = setup
    relay = start()
    ledger = Ledger()
    raw = fault_message(BUYER, seller_alias, "k2", size=64 * 1024)
    half = len(raw) // 2
    client = smtplib.SMTP("127.0.0.1", relay.port, timeout=CLIENT_TIMEOUT)
    try:
        client.ehlo()
        assert client.mail(BUYER)[0] == 250
        assert client.rcpt(seller_alias)[0] == 250
        assert client.docmd("DATA")[0] == 354
        client.send(raw[:half])
        relay.kill()
        try:
            client.send(raw[half:] + b".\r\n")
            code, text = client.getreply()
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            code, text = None, f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    first = ledger.note("k2", Attempt(code, str(text), "data"))
    assert first.code is None, first
    assert scripted.seen_tags() == {}  # half a message never goes anywhere
    summary, archived = finish(config, ledger, scripted, "k2", seller_alias, start)
    assert archived == {"k2": ["delivered"]}
    assert summary == {"sent": 1, "duplicates": 0, "archived_without_250": 0}


def test_kill_after_the_upstream_took_it_but_before_the_archive_row(setup, scripted):
    """The worst moment: the upstream has said 250, the archive row is not
    committed yet (another process holds the database, so the relay waits
    in its busy timeout), and the relay dies. The client got no 250, so it
    retries: the upstream gets a second copy (a counted duplicate) and the
    archive one row, for the one 250."""
    config, seller_alias, start = setup
    relay = start()
    ledger = Ledger()
    raw = fault_message(BUYER, seller_alias, "k3")
    database = config.parent / "relay.sqlite3"
    with DatabaseLocker(database):
        thread, result = in_background(send, relay.port, BUYER, seller_alias, raw, CLIENT_TIMEOUT)
        scripted.wait_accepted(1)
        relay.kill()
        thread.join(CLIENT_TIMEOUT + 5)
    [first] = result
    ledger.note("k3", first)
    assert first.code is None, first
    summary, archived = finish(config, ledger, scripted, "k3", seller_alias, start)
    assert archived == {"k3": ["delivered"]}
    assert summary == {"sent": 1, "duplicates": 1, "archived_without_250": 0}


def test_kill_while_the_relay_waits_for_the_upstream(setup, scripted):
    """kill -9 while the upstream has the whole message and has not
    answered yet, twice in a row, with messages archived in between. Each
    cut message: the client's connection drops, the upstream never
    acknowledged that copy, the retry after the restart is delivered once
    and archived once, and the chain verifies."""
    config, seller_alias, start = setup
    ledger = Ledger()
    for round_ in range(2):
        relay = start()
        done = ledger.note(f"ok{round_}", send(relay.port, BUYER, seller_alias,
                                               fault_message(BUYER, seller_alias, f"ok{round_}"),
                                               timeout=CLIENT_TIMEOUT))
        assert done.code == 250, done
        scripted.eom = "hold"
        tag = f"cut{round_}"
        thread, result = in_background(send, relay.port, BUYER, seller_alias,
                                       fault_message(BUYER, seller_alias, tag), CLIENT_TIMEOUT)
        scripted.wait_seen(2 * round_ + 2)
        relay.kill()
        thread.join(CLIENT_TIMEOUT + 5)
        ledger.note(tag, result[0])
        assert result[0].code is None, result
        scripted.heal()
    relay = start()
    for round_ in range(2):
        tag = f"cut{round_}"
        retry = ledger.note(tag, send(relay.port, BUYER, seller_alias, fault_message(BUYER, seller_alias, tag),
                                      timeout=CLIENT_TIMEOUT))
        assert retry.code == 250, retry
    assert relay.stop() == 0
    archived = archive_by_tag(config)  # as an operator reads it: relay archive export
    assert ledger.check(scripted.accepted(), archived) == {"sent": 4, "duplicates": 0, "archived_without_250": 0}
    report = verify_archive(config)
    assert (report["exit"], report["ok"], report["rows"]) == (0, True, 4), report


def test_upstream_restart_does_not_confuse_a_restarted_relay(tmp_path):
    """Both sides die: the upstream goes away while the relay is killed;
    the relay comes back first (451 while the upstream is down), then the
    upstream, and the message is delivered once."""
    database = tmp_path / "relay.sqlite3"
    aliases = provision(database)
    upstream = ScriptedUpstream(eom="hold").start()
    port = upstream.port
    config = write_config(tmp_path, upstream.url(), database, upstream_timeout=5.0,
                          dkim_key_file=shared_dkim_key_file())
    ledger = Ledger()
    seller_alias = aliases["seller_alias"]
    raw = fault_message(BUYER, seller_alias, "both")
    relay = first = RelayProcess(config)
    try:
        thread, result = in_background(send, relay.port, BUYER, seller_alias, raw, CLIENT_TIMEOUT)
        upstream.wait_seen(1)
        relay.kill()
        assert relay.leftovers() == []
        upstream.stop()
        thread.join(CLIENT_TIMEOUT + 5)
        ledger.note("both", result[0])
        relay = RelayProcess(config)
        down = ledger.note("both", send(relay.port, BUYER, seller_alias, raw, timeout=CLIENT_TIMEOUT))
        assert (down.code, down.text[:5]) == (451, "4.4.1"), down
        upstream = ScriptedUpstream(port=port).start()
        assert ledger.note("both", send(relay.port, BUYER, seller_alias, raw, timeout=CLIENT_TIMEOUT)).code == 250
        assert relay.stop() == 0
        assert ledger.check(upstream.accepted(), archive_in(database))["sent"] == 1
        assert archive_in(database) == {"both": ["deferred", "delivered"]}
    finally:
        for process in (first, relay):
            process.kill()
            process.kill_session()
        upstream.stop()
