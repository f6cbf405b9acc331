"""Fault: `kill -9` of the relay's worker processes (the pool that parses
and rewrites messages), not of `relay serve` itself: while idle, in the
middle of a message, and every helper process of the relay at once.
The relay keeps serving; the client sees 451 at worst, and its retry is
delivered once and archived once.

The workers are found from outside, as an operator (or the OOM killer)
would: the relay's children running `python -P -m relay.worker_process` (Linux:
reads /proc)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from faultkit import BUYER, Ledger, RelayProcess, ScriptedUpstream, archive_in, fault_message, provision, \
    send, write_config
from support import shared_dkim_key_file

CLIENT_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One `relay serve` for the module (each test uses its own message tags)."""
    directory = tmp_path_factory.mktemp("workers")
    database = directory / "relay.sqlite3"
    aliases = provision(database)
    upstream = ScriptedUpstream().start()
    config = write_config(directory, upstream.url(), database, upstream_timeout=10.0,
                          dkim_key_file=shared_dkim_key_file())
    relay = RelayProcess(config)
    try:
        yield relay, upstream, config, aliases["seller_alias"]
    finally:
        relay.stop()
        relay.kill_session()
        upstream.stop()


def html_message(alias: str, tag: str, paragraphs: int) -> bytes:
    """An HTML message that takes the content rules a while (links, styles,
    bare URLs in every paragraph)."""
    para = ('<p>Hello <b>there</b>, see <a href="https://elsewhere.example/x">this</a> and '
            '<span style="color:red">that</span> at www.elsewhere.example</p>\r\n')
    return (f"From: {BUYER}\r\nTo: {alias}\r\nSubject: fault {tag}\r\n"
            f"Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{tag}@client.example>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
            f"<html><body>{para * paragraphs}</body></html>\r\n").encode()


def cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return -1
    return int(fields[11]) + int(fields[12])  # utime + stime


def retry_until_delivered(ledger, relay, alias, tag, raw, attempts: int):
    for _ in range(attempts):
        attempt = ledger.note(tag, send(relay.port, BUYER, alias, raw, timeout=CLIENT_TIMEOUT))
        if attempt.code != 451:
            return attempt
    return attempt


def check(ledger, upstream, config, tags):
    archived = {tag: rows for tag, rows in archive_in(config.parent / "relay.sqlite3").items() if tag in tags}
    accepted = Counter({tag: n for tag, n in upstream.accepted().items() if tag in tags})
    return ledger.check(accepted, archived)


def test_idle_workers_killed(served):
    relay, upstream, config, alias = served
    ledger = Ledger()
    assert send(relay.port, BUYER, alias, fault_message(BUYER, alias, "warm")).code == 250
    workers = relay.workers()
    assert workers, f"no worker processes found in the relay's session: {relay.session()}"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    tags = [f"idle{i}" for i in range(3)]
    for tag in tags:
        raw = fault_message(BUYER, alias, tag)
        # The pool checks a worker is alive before handing it a message, but
        # a death is seen a moment late: a dead worker may
        # still cost a message a 451, never more than one per dead worker.
        last = retry_until_delivered(ledger, relay, alias, tag, raw, attempts=len(workers) + 1)
        assert last.code == 250, ledger.attempts
    failures = sum(1 for tag in tags for a in ledger.attempts[tag] if not a.delivered)
    assert failures <= len(workers), ledger.attempts
    assert all(a.code in (250, 451) for tag in tags for a in ledger.attempts[tag]), ledger.attempts
    assert relay.proc.poll() is None  # the relay itself lives on
    assert check(ledger, upstream, config, set(tags))["sent"] == 3
    assert len(relay.workers()) == len(workers)  # replaced


def test_worker_killed_in_the_middle_of_a_message(served):
    relay, upstream, config, alias = served
    ledger = Ledger()
    assert send(relay.port, BUYER, alias, fault_message(BUYER, alias, "warm2")).code == 250
    before = {pid: cpu_ticks(pid) for pid in relay.workers()}
    assert before, relay.session()
    raw = html_message(alias, "busy", 1000)
    outcome = []
    client = threading.Thread(target=lambda: outcome.append(
        send(relay.port, BUYER, alias, raw, timeout=CLIENT_TIMEOUT)), daemon=True)
    client.start()
    victim = None
    deadline = time.monotonic() + CLIENT_TIMEOUT
    while victim is None and time.monotonic() < deadline and client.is_alive():
        for pid, ticks in before.items():
            if cpu_ticks(pid) - ticks >= 10:  # 0.1 s of CPU on this message: it is the busy one
                victim = pid
                break
        time.sleep(0.01)
    assert victim is not None, f"no worker got busy with the message: {outcome}"
    os.kill(victim, signal.SIGKILL)
    client.join(CLIENT_TIMEOUT + 5)
    [first] = outcome
    ledger.note("busy", first)
    assert (first.code, first.text[:5]) == (451, "4.3.0"), first
    assert upstream.seen_tags()["busy"] == 0
    # The retry (the same message) goes through a fresh worker.
    last = retry_until_delivered(ledger, relay, alias, "busy", raw, attempts=3)
    assert last.code == 250, ledger.attempts
    assert check(ledger, upstream, config, {"busy"}) == {"sent": 1, "duplicates": 0, "archived_without_250": 0}
    assert archive_in(config.parent / "relay.sqlite3")["busy"] == ["deferred", "delivered"]


def test_every_helper_process_killed(served):
    relay, upstream, config, alias = served
    ledger = Ledger()
    assert send(relay.port, BUYER, alias, fault_message(BUYER, alias, "warm3")).code == 250
    helpers = relay.session()
    assert helpers
    for pid, _, _ in helpers:
        os.kill(pid, signal.SIGKILL)
    tags = [f"fs{i}" for i in range(3)]
    for tag in tags:
        last = retry_until_delivered(ledger, relay, alias, tag, fault_message(BUYER, alias, tag), attempts=6)
        assert last.code == 250, ledger.attempts
    assert relay.proc.poll() is None
    assert check(ledger, upstream, config, set(tags))["sent"] == 3


def test_frozen_worker_is_not_a_permanent_refusal(tmp_path):
    """A worker that stops getting CPU (SIGSTOP here; a swap storm, a frozen
    cgroup or a starved host in production) runs its message over
    `[workers] time_limit` through no fault of the message. That is a
    transient failure of the relay: the client must get a 4xx and retry,
    not a 5xx that bounces a perfectly ordinary message to its sender."""
    database = tmp_path / "relay.sqlite3"
    aliases = provision(database)
    upstream = ScriptedUpstream().start()
    config = write_config(tmp_path, upstream.url(), database, dkim_key_file=shared_dkim_key_file())
    config.write_text(config.read_text() + "[workers]\ncount = 1\ntime_limit = 1\n")
    relay = RelayProcess(config)
    alias = aliases["seller_alias"]
    frozen = []
    try:
        assert send(relay.port, BUYER, alias, fault_message(BUYER, alias, "warm")).code == 250
        frozen = relay.workers()
        assert len(frozen) == 1, relay.session()
        os.kill(frozen[0], signal.SIGSTOP)
        ledger = Ledger()
        first = ledger.note("small", send(relay.port, BUYER, alias, fault_message(BUYER, alias, "small"),
                                          timeout=CLIENT_TIMEOUT))
        assert first.code is not None and 400 <= first.code < 500, first
        last = retry_until_delivered(ledger, relay, alias, "small", fault_message(BUYER, alias, "small"), 3)
        assert last.code == 250, ledger.attempts
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        relay.stop()
        relay.kill_session()
        upstream.stop()
