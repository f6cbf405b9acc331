"""Chaos run: load through a real `relay serve` while faults are injected.

Run through scripts/chaos. Everything listens on 127.0.0.1, in a temporary
folder:

- a sink upstream (tests/faults/faultkit.py's ScriptedUpstream) that records
  every message it acknowledged, and can be told to refuse, stall or hang up;
- `relay serve` as a child process on a fixed free port, with a fresh SQLite
  database, provisioned with one seller/buyer pair through the CLI
  (`relay seller add`, `relay buyer add`, `relay order add --json`);
- a few client threads sending N messages buyer → seller alias. Each
  message carries its id in the Subject (the relay keeps the Subject; it
  drops X- headers). A client behaves like an MTA's queue: on a 4xx or a
  dropped or refused connection it waits (short growing backoff) and tries
  again, up to --retries times; a 5xx is final.

Faults are injected one after another, each when the load has reached a
given share of the messages, so every run sees all of them however fast
the machine is: the upstream refusing (451 at the final dot, 450 at RCPT),
stalling past the relay's upstream timeout, hanging up after the final "."
before replying, another process holding the database with BEGIN EXCLUSIVE
longer than the relay's busy timeout, kill -9 of `relay serve`
(once while it waits for the upstream's reply, once at a random moment,
each followed by a restart on the same database and port), and kill -9 of
the relay's worker processes (the relay replaces them).

At the end `relay serve` is stopped, the archive read back with
`relay archive export` and checked with `relay archive verify`, and the
counts printed: sent (messages whose client got 250), delivered (messages
the sink acknowledged), duplicates (extra copies the sink acknowledged),
archived (messages with a `delivered` archive row), lost (got 250 but not
delivered or not archived), gave_up (retries exhausted), refused (5xx).
Exit status 1 when anything was lost or the relay broke another promise
(a reply that is neither 250, 4xx nor 5xx; the chain not verifying; worker
processes left behind by kill -9), else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "faults"))
from faultkit import (Attempt, DatabaseLocker, Ledger, RelayProcess, ScriptedUpstream,  # noqa: E402
                      archive_by_tag, fault_message, free_port, relay_command, send, verify_archive,
                      write_config)

SELLER = "seller@shop.example"
BUYER = "buyer@mail.example"
UPSTREAM_TIMEOUT = 2.0  # the relay's [upstream] timeout in this run
CLIENT_TIMEOUT = 60.0  # a client's socket timeout (RFC 5321 allows 10 minutes for the final reply)
BUSY_TIMEOUT = 5.0  # relay/store/sqlite.py BUSY_TIMEOUT_MS: the lock is held longer than this


class ChaosError(Exception):
    """The run could not be carried out (not a finding about the relay)."""


class Run:
    def __init__(self, args, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.rng = random.Random(args.seed)
        self.started = time.monotonic()
        self.deadline = self.started + args.seconds
        self.ledger = Ledger()
        self.events: list[dict] = []
        self.lock = threading.Lock()
        self.finished: set[str] = set()  # tags whose client is done with them (250, 5xx or gave up)
        self.gave_up: set[str] = set()
        self.refused: set[str] = set()
        self.relay: RelayProcess | None = None
        self.relay_lock = threading.Lock()
        self.processes: list[RelayProcess] = []
        self.restarts = 0
        self.leftovers: list[str] = []  # processes a killed relay left behind (there should be none)
        self.stop_load = threading.Event()

    # -- output

    def say(self, text: str) -> None:
        if not self.args.quiet:
            print(f"[{time.monotonic() - self.started:6.1f}s] {text}", file=sys.stderr, flush=True)

    def event(self, kind: str, **details) -> None:
        self.events.append({"at": round(time.monotonic() - self.started, 1), "fault": kind, **details})
        self.say(f"fault {kind} " + " ".join(f"{k}={v}" for k, v in details.items()))

    # -- set-up

    def setup(self) -> None:
        self.sink = ScriptedUpstream().start()
        self.port = free_port()
        self.database = self.workdir / "var" / "relay.sqlite3"
        self.config = write_config(self.workdir, self.sink.url(), self.database, upstream_timeout=UPSTREAM_TIMEOUT,
                                   dkim_key_file=str(self.workdir / "var" / "dkim.pem"),
                                   listen=f"127.0.0.1:{self.port}")
        for args in (("seller", "add", SELLER, "--name", "Chaos Shop"), ("buyer", "add", BUYER, "--name", "Chaos Buyer")):
            result = relay_command(self.config, *args)
            if result.returncode != 0:
                raise ChaosError(f"relay {' '.join(args)}: {result.stderr.strip()}")
        result = relay_command(self.config, "order", "add", "CHAOS-1", "--seller", SELLER, "--buyer", BUYER, "--json")
        if result.returncode != 0:
            raise ChaosError(f"relay order add: {result.stderr.strip()}")
        order = json.loads(result.stdout)
        self.alias = order["seller_alias"]
        self.relationship = order["relationship"]
        self.start_relay()

    def start_relay(self) -> None:
        last = None
        for _ in range(5):  # the port is ours, but be patient with a slow exit of the killed one
            try:
                process = RelayProcess(self.config)
            except RuntimeError as exc:
                last = exc
                time.sleep(0.5)
                continue
            with self.relay_lock:
                self.relay = process
            self.processes.append(process)
            return
        raise ChaosError(f"relay serve would not start again: {last}")

    def kill_relay(self) -> None:
        with self.relay_lock:
            process = self.relay
        process.kill()
        leftovers = process.leftovers()
        if leftovers:
            self.leftovers.extend(leftovers)
            process.kill_session()
        self.restarts += 1

    # -- the clients

    def client(self, queue: list[str]) -> None:
        while not self.stop_load.is_set() and time.monotonic() < self.deadline:
            with self.lock:
                if not queue:
                    return
                tag = queue.pop(0)
            self.deliver(tag)

    def deliver(self, tag: str) -> None:
        raw = fault_message(BUYER, self.alias, tag, body=f"Chaos message {tag}.\n")
        for attempt_number in range(self.args.retries):
            attempt = self.ledger.note(tag, send(self.port, BUYER, self.alias, raw, timeout=CLIENT_TIMEOUT))
            if attempt.delivered:
                break
            if attempt.code is not None and attempt.code >= 500:
                with self.lock:
                    self.refused.add(tag)
                break
            if time.monotonic() > self.deadline:
                with self.lock:
                    self.gave_up.add(tag)
                return
            time.sleep(min(0.1 * 2 ** attempt_number, 2.0) * (0.5 + self.rng.random()))
        else:
            with self.lock:
                self.gave_up.add(tag)
        with self.lock:
            self.finished.add(tag)

    # -- the faults

    def progress(self) -> float:
        with self.lock:
            return len(self.finished) / self.args.messages

    def wait_progress(self, share: float) -> bool:
        while self.progress() < share:
            if time.monotonic() > self.deadline or self.stop_load.is_set():
                return False
            time.sleep(0.02)
        return True

    def hold_for(self, seconds: float) -> None:
        time.sleep(max(0.0, min(seconds, self.deadline - time.monotonic())))

    def faults(self) -> None:
        sink = self.sink
        schedule = [
            (0.08, "upstream-refusing-451", lambda: self.sink_fault("eom", "451 4.3.0 chaos: try again later", 2.0)),
            (0.20, "upstream-stalling", lambda: self.sink_fault("eom", "stall", UPSTREAM_TIMEOUT + 1.5)),
            (0.32, "kill-9-while-forwarding", self.kill_while_forwarding),
            (0.44, "upstream-drop-after-dot", lambda: self.sink_fault("eom", "close", 2.0)),
            (0.56, "database-locked", self.lock_database),
            (0.68, "upstream-refusing-rcpt-450", lambda: self.sink_fault("rcpt", "450 4.2.1 chaos: mailbox busy", 1.5)),
            (0.80, "kill-9-anytime", self.kill_anytime),
            (0.90, "kill-9-workers", self.kill_workers),
        ]
        for share, name, inject in schedule[:self.args.faults]:
            if not self.wait_progress(share):
                self.say(f"fault {name} not injected: the load did not get to {share:.0%} in time")
                continue
            try:
                inject()
            finally:
                sink.heal()
        self.say("faults done")

    def sink_fault(self, stage: str, action, seconds: float) -> None:
        self.event(f"upstream {stage}={action}", seconds=seconds)
        setattr(self.sink, stage, action)
        self.hold_for(seconds)
        self.sink.heal()

    def kill_while_forwarding(self) -> None:
        seen = len(self.sink.seen)
        self.sink.eom = "hold"  # the next message sits with the upstream, unanswered
        deadline = min(time.monotonic() + 10, self.deadline)
        while len(self.sink.seen) <= seen and time.monotonic() < deadline:
            time.sleep(0.01)
        self.event("kill -9 relay serve", moment="waiting for the upstream's reply to the final dot")
        self.kill_relay()
        self.sink.heal()
        self.start_relay()

    def kill_anytime(self) -> None:
        time.sleep(self.rng.uniform(0.0, 0.3))
        self.event("kill -9 relay serve", moment="random")
        self.kill_relay()
        self.start_relay()

    def kill_workers(self) -> None:
        with self.relay_lock:
            process = self.relay
        workers = process.workers()
        self.event("kill -9 worker processes", count=len(workers))
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def lock_database(self) -> None:
        seconds = BUSY_TIMEOUT + 2.0
        self.event("BEGIN EXCLUSIVE by another process", seconds=seconds)
        with DatabaseLocker(self.database, max_seconds=int(seconds) + 30):
            self.hold_for(seconds)

    # -- the whole run

    def run(self) -> dict:
        self.setup()
        tags = [f"c{i:06d}" for i in range(self.args.messages)]
        queue = list(tags)
        clients = [threading.Thread(target=self.client, args=(queue,), name=f"client-{i}", daemon=True)
                   for i in range(self.args.clients)]
        injector = threading.Thread(target=self.faults, name="faults", daemon=True)
        self.say(f"relay serve on 127.0.0.1:{self.port}, sink on 127.0.0.1:{self.sink.port}; "
                 f"{self.args.messages} messages from {self.args.clients} clients")
        for thread in clients + [injector]:
            thread.start()
        for thread in clients:
            thread.join(max(0.0, self.deadline - time.monotonic()) + CLIENT_TIMEOUT + 5)
        self.stop_load.set()
        injector.join(30)
        self.say("load done; stopping relay serve")
        with self.relay_lock:
            status = self.relay.stop()
        if status != 0:
            self.say(f"relay serve exited with status {status} on SIGTERM")
        return self.account(tags, status)

    def account(self, tags: list[str], stop_status: int) -> dict:
        archived = archive_by_tag(self.config, self.relationship, workdir=self.workdir)
        report = verify_archive(self.config)
        accepted = self.sink.accepted()
        summary, problems = self.ledger.audit(accepted, archived)
        got_250 = {t for t, attempts in self.ledger.attempts.items() if any(a.delivered for a in attempts)}
        lost = sorted(t for t in got_250
                      if accepted[t] == 0 or archived.get(t, []).count("delivered") == 0)
        replies = Counter()
        for attempts in self.ledger.attempts.values():
            for attempt in attempts:
                replies[_reply_key(attempt)] += 1
        attempted = set(self.ledger.attempts)
        result = {
            "messages": len(tags),
            "sent": len(got_250),
            "delivered": sum(1 for t in tags if accepted[t]),
            "duplicates": summary["duplicates"],
            "archived": sum(1 for t in tags if "delivered" in archived.get(t, [])),
            "lost": len(lost),
            "gave_up": len(self.gave_up - got_250),
            "refused": len(self.refused),
            "unsent": len(set(tags) - attempted),
            "attempts": sum(replies.values()),
            "replies": dict(sorted(replies.items())),
            "archived_without_250": summary["archived_without_250"],
            "archive_rows": sum(len(v) for v in archived.values()),
            "archive_verify": {"ok": report.get("ok", False), "rows": report.get("rows"),
                               "exit": report.get("exit")},
            "relay_restarts": self.restarts,
            "leftover_processes": list(self.leftovers),
            "relay_stop_status": stop_status,
            "faults": self.events,
            "problems": problems[:20],
            "lost_ids": lost[:20],
            "seconds": round(time.monotonic() - self.started, 1),
        }
        return result


def _reply_key(attempt: Attempt) -> str:
    if attempt.code is None:
        return "dropped" if attempt.stage != "connect" else "refused-connection"
    if attempt.code == 250:
        return "250"
    return f"{attempt.code} {attempt.text[:5]}"


def print_text(result: dict) -> None:
    print(f"messages {result['messages']}: sent {result['sent']}, delivered {result['delivered']}, "
          f"duplicates {result['duplicates']}, archived {result['archived']}, lost {result['lost']}, "
          f"gave_up {result['gave_up']}, refused {result['refused']}, unsent {result['unsent']}")
    print(f"attempts {result['attempts']}: " + ", ".join(f"{k} x{v}" for k, v in result["replies"].items()))
    verify = result["archive_verify"]
    print(f"archive: {result['archive_rows']} rows, chain {'verified' if verify['ok'] else 'BROKEN'}; "
          f"delivered rows without a 250 (client gone): {result['archived_without_250']}")
    print(f"faults: {len(result['faults'])}; relay serve restarts: {result['relay_restarts']}; "
          f"{result['seconds']} s")
    for event in result["faults"]:
        details = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("at", "fault"))
        print(f"  {event['at']:6.1f}s  {event['fault']} {details}".rstrip())
    if result["leftover_processes"]:
        print(f"LEFT BEHIND by kill -9: {result['leftover_processes']}")
    for line in result["problems"]:
        print(f"PROBLEM: {line}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Load through relay serve while faults are injected.")
    parser.add_argument("--messages", type=int, default=300, help="distinct messages to send (default 300)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client connections (default 4)")
    parser.add_argument("--seconds", type=float, default=75.0,
                        help="stop starting messages and injecting faults after this long (default 75)")
    parser.add_argument("--retries", type=int, default=12, help="attempts per message (default 12)")
    parser.add_argument("--faults", type=int, default=8, help="how many of the scheduled faults to inject (0-8)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (backoff jitter, kill moment)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (database, logs)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if not 1 <= args.messages <= 100_000 or not 1 <= args.clients <= 64 or not 1 <= args.retries <= 100:
        parser.error("--messages 1..100000, --clients 1..64, --retries 1..100")
    if not 1 <= args.seconds <= 3600:
        parser.error("--seconds 1..3600")

    workdir = Path(tempfile.mkdtemp(prefix="relay-chaos-"))
    run = Run(args, workdir)
    status = 1
    try:
        result = run.run()
        (workdir / "relay.log").write_text("".join(line for p in run.processes for line in p.lines))
        if args.json:
            print(json.dumps(result, sort_keys=True))
        else:
            print_text(result)
        broken = (result["lost"] or result["problems"] or not result["archive_verify"]["ok"]
                  or result["leftover_processes"])
        status = 1 if broken else 0
    except ChaosError as exc:
        print(f"chaos: {exc}", file=sys.stderr)
        status = 2
    finally:
        for process in run.processes:
            process.kill()
            process.kill_session()
        with contextlib.suppress(Exception):
            run.sink.stop()
        if args.keep or status == 1:
            print(f"chaos: files kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
