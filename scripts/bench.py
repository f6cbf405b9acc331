"""Benchmark: the relay with every policy on against a bare aiosmtpd
passthrough, on one machine, over loopback. Run through scripts/bench;
docs/benchmark.md explains what is measured and how to read it.

Processes (everything listens on 127.0.0.1):

- this one: the orchestrator, a counting sink (aiosmtpd, in a thread), the
  tests' DNS server (tests/dnsserver.py) serving the buyer's domain (SPF,
  DKIM key, DMARC p=reject), and an RSS sampler (/proc, every 50 ms, the
  process plus all its descendants);
- (a) the passthrough, scripts/bench_passthrough.py: aiosmtpd whose DATA
  hook forwards the message unchanged to the sink with aiosmtplib;
- (b) the relay, `python -m relay serve`, with a throw-away SQLite database,
  the sink as upstream, inbound SPF/DKIM/DMARC checks against the DNS
  server, DKIM signing, HTML sanitizing, link stripping and the archive, one
  seller/buyer pair provisioned with the `relay` CLI;
- the load client, scripts/bench_load.py: C connections sending the mix of
  scripts/bench_messages.py (70 % 2 KB text, 25 % 20 KB HTML with links,
  5 % 500 KB PDF), the same seeded sequence to both servers.

Phases: (a) and (b) closed loop (each connection sends its next message as
soon as the last one is answered: the peak rate); both again paced, open
loop, at half of (b)'s peak rate; then a fresh relay (and a fresh
passthrough) handles one message with a 10,000,000-byte PDF while its RSS is
sampled every 10 ms. Each phase starts with an unmeasured warm-up.

A benchmark that loses mail is a failure: every message must get 250, the
sink must have received exactly what was accepted, the relay must have
archived each one as delivered, and no message the relay delivered may
name the buyer's real address, keep an off-site link or lack the relay's
DKIM signature. Otherwise exit status 1. Targets are reported, never
asserted.

One node vs two (--nodes N, --compare-nodes): the relay phase only, closed
loop, after the same passthrough phase as the reference. With PostgreSQL
(bench_postgres.py: a throwaway cluster on loopback, durable settings) the
bench creates a database, runs `relay db upgrade` and provisions the pair
once, then starts N `relay serve` processes on that one database, each with
its own inbound port and the same bounce secret and DKIM key files; the
load client spreads its C connections round-robin over the nodes' ports.
Reported: msg/s, p50/p99, the ratio to the passthrough, the RSS summed over
all nodes, the CPU the nodes, PostgreSQL and the load client spent per
message. Checked afterwards: every message 250, each delivered once at the
sink, the archive holds each as delivered, `relay archive verify` passes.
--compare-nodes runs 1 node on SQLite, 1 node on PostgreSQL and 2 nodes on
PostgreSQL in one run (a fresh store each, the same shared files).

    scripts/bench [--quick] [--json] [--messages N] [--concurrency C]
    scripts/bench --profile    # where the relay's CPU goes, per message kind
    scripts/bench --nodes 2 [--database postgresql] [--quick] [--json]
    scripts/bench --compare-nodes [--quick] [--json]
    scripts/bench --api [--quick] [--json]   # the HTTP API's order call (scripts/bench_api.py)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from aiosmtpd.smtp import SMTP

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' DNS server
from dnsserver import DNSServer  # noqa: E402

import bench_messages as mix  # noqa: E402

HOST = "127.0.0.1"
PYTHON = sys.executable
MB = 1024 * 1024
SAMPLE_INTERVAL = 0.05
BIG_SAMPLE_INTERVAL = 0.01
TREE_REFRESH = 4  # samples between two scans of /proc for new descendants
START_TIMEOUT = 30.0
# Issue 16's targets, reported, never asserted.
TARGETS = {"ratio_min": 0.6, "rss_growth_max_x_wire": 3.0, "half_peak_added_p99_max_ms": 50.0,
           "idle_rss_max_mb": 120.0}

# Sizes of a run: messages per closed-loop phase, warm-up messages, seconds
# of each paced phase, the time cap of one phase.
DEFAULTS = {"messages": 600, "warmup": 24, "paced_seconds": 20.0, "phase_seconds": 90.0}
PROFILE_MESSAGES = 200  # --profile: messages of the mix per pass (two passes)
QUICK = {"messages": 120, "warmup": 12, "paced_seconds": 4.0, "phase_seconds": 10.0}


class BenchError(Exception):
    """The run produced no valid number: mail lost, refused or mangled."""


_T0 = time.monotonic()


def log(text: str) -> None:
    print(f"bench: {time.monotonic() - _T0:5.1f}s {text}", file=sys.stderr, flush=True)


# --- processes and their memory -----------------------------------------------

PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, name: str, logfile: Path | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = logfile.read_text(errors="replace")[-2000:] if logfile and logfile.exists() else ""
            raise BenchError(f"{name} exited with status {process.returncode} at start-up\n{tail}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"{name} did not listen on port {port} within {START_TIMEOUT:g} s")


def descendants(*roots: int) -> list[int]:
    """The `roots` and every process below them, from the ppid field of /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split(None, 2)[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def memory(pids: list[int]) -> tuple[int, int]:
    """(RSS, PSS) in bytes, summed over `pids`. RSS counts a page shared by
    two processes (a forked worker's inherited pages) twice, PSS halves it."""
    each = memory_by_pid(pids).values()
    return sum(rss for rss, _ in each), sum(pss for _, pss in each)


def memory_by_pid(pids: list[int]) -> dict[int, tuple[int, int]]:
    """(RSS, PSS) in bytes of each of `pids` still running."""
    found = {}
    for pid in pids:
        rss = pss = 0
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Rss:"):
                        rss = int(line.split()[1]) * 1024
                    elif line.startswith(b"Pss:"):
                        pss = int(line.split()[1]) * 1024
                        break
        except FileNotFoundError:
            try:  # no smaps_rollup (old kernel): RSS only, PSS taken as RSS
                with open(f"/proc/{pid}/statm", "rb") as f:
                    rss = pss = int(f.read().split()[1]) * PAGE
            except (OSError, IndexError, ValueError):
                continue  # gone
        except (OSError, IndexError, ValueError):
            continue  # gone
        found[pid] = (rss, pss)
    return found


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) of `pids`, their reaped children included,
    in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rindex(b")") + 2:].split()
            total += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
        except (OSError, ValueError, IndexError):
            pass  # gone
    return total / ticks


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    try:
        with open("/proc/stat", "rb") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0, 0.0
    idle = values[3] + values[4]  # idle, iowait
    return float(sum(values) - idle), float(sum(values))


class RssSampler(threading.Thread):
    """Samples the memory of each watched process tree (one or several
    roots and all their descendants, summed) every `interval` seconds; keeps
    each tree's peak RSS and peak PSS since `reset()`."""

    def __init__(self):
        super().__init__(name="rss-sampler", daemon=True)
        self.interval = SAMPLE_INTERVAL
        self.roots: dict[str, tuple[int, ...]] = {}
        self.trees: dict[str, list[int]] = {}
        self.peak: dict[str, int] = {}  # RSS
        self.peak_pss: dict[str, int] = {}
        self.current: dict[str, tuple[int, int]] = {}
        self.processes: dict[str, int] = {}
        self.pid_peak: dict[str, dict[int, int]] = {}  # each process's own peak RSS
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def watch(self, name: str, *pids: int) -> None:
        with self._lock:
            self.roots[name] = pids
            self.trees[name] = descendants(*pids)
            self.current[name] = memory(self.trees[name])
            self.peak[name], self.peak_pss[name] = self.current[name]
            self.processes[name] = len(self.trees[name])

    def unwatch(self, name: str) -> None:
        with self._lock:
            for table in (self.roots, self.trees, self.peak, self.peak_pss, self.current, self.processes):
                table.pop(name, None)

    def reset(self, name: str) -> None:
        with self._lock:
            self.peak[name], self.peak_pss[name] = self.current.get(name, (0, 0))
            self.processes[name] = len(self.trees.get(name, ()))
            self.pid_peak[name] = {}

    def measure(self, name: str) -> tuple[int, int]:
        """The tree's (RSS, PSS) now, outside the sampling rhythm."""
        with self._lock:
            pids = descendants(*self.roots[name])
        return memory(pids)

    def measure_each(self, name: str) -> dict[int, int]:
        """Each process's RSS now, outside the sampling rhythm."""
        with self._lock:
            pids = descendants(*self.roots[name])
        return {pid: rss for pid, (rss, _) in memory_by_pid(pids).items()}

    def cpu(self, name: str) -> float:
        """CPU seconds of the tree so far (see cpu_seconds)."""
        with self._lock:
            pids = descendants(*self.roots[name])
        return cpu_seconds(pids)

    def run(self) -> None:
        count = 0
        while not self._halt.wait(self.interval):
            count += 1
            with self._lock:
                for name, roots in self.roots.items():
                    if count % TREE_REFRESH == 0:
                        self.trees[name] = descendants(*roots)
                        self.processes[name] = max(self.processes.get(name, 0), len(self.trees[name]))
                    each = memory_by_pid(self.trees[name])
                    peaks = self.pid_peak.setdefault(name, {})
                    for pid, (rss, _) in each.items():
                        peaks[pid] = max(peaks.get(pid, 0), rss)
                    value = (sum(rss for rss, _ in each.values()), sum(pss for _, pss in each.values()))
                    self.current[name] = value
                    self.peak[name] = max(self.peak.get(name, 0), value[0])
                    self.peak_pss[name] = max(self.peak_pss.get(name, 0), value[1])

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


# --- the sink ----------------------------------------------------------------------

class Sink:
    """Accepts every message; counts it and what it contains (only ever on
    the sink's loop; read between phases)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.count = self.bytes = self.naming_buyer = self.offsite_links = self.relay_signed = 0

    async def handle_DATA(self, server, session, envelope):
        data = envelope.original_content
        head = data[:data.find(b"\r\n\r\n") + 2]
        self.count += 1
        self.bytes += len(data)
        self.naming_buyer += mix.BUYER.encode() in data
        self.offsite_links += mix.OFFSITE_HOST.encode() in data
        self.relay_signed += b"DKIM-Signature:" in head and f"d={mix.MARKETPLACE};".encode() in head
        return "250 2.0.0 OK"

    def snapshot(self) -> dict:
        return {"count": self.count, "bytes": self.bytes, "naming_buyer": self.naming_buyer,
                "offsite_links": self.offsite_links, "relay_signed": self.relay_signed}


class SinkServer:
    """The sink on its own event loop in a thread, at a port the OS picks."""

    def __init__(self, handler: Sink):
        self.handler = handler
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sink", daemon=True)
        self._server = None

    def start(self) -> int:
        self._thread.start()

        async def listen():
            return await asyncio.get_running_loop().create_server(
                lambda: SMTP(self.handler, hostname="sink.bench", ident="sink",
                             data_size_limit=64 * MB, decode_data=False), HOST, 0)

        self._server = self.call(listen())
        return self._server.sockets[0].getsockname()[1]

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def snapshot(self) -> dict:
        async def read():
            return self.handler.snapshot()
        return self.call(read())

    def reset(self) -> None:
        async def clear():
            self.handler.reset()
        self.call(clear())

    def stop(self) -> None:
        async def close():
            self._server.close()
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.wait_closed()

        with contextlib.suppress(Exception):
            self.call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


# --- the servers under test ------------------------------------------------------

class Server:
    """A server process: started, waited for on its port, stopped with SIGTERM."""

    name = "server"

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.logfile = directory / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    env: dict | None = None
    # --cores N: the servers under test (passthrough and relay, with every
    # process they start) run on CPUs 0..N-1 only, by taskset; the load
    # client and the sink stay free to use the whole machine.
    cpus: str | None = None

    def start(self) -> None:
        self.port = free_port()
        self.prepare()
        pinned = ["taskset", "--cpu-list", self.cpus] if self.cpus else []
        with open(self.logfile, "ab") as out:
            self.process = subprocess.Popen(pinned + self.command(), stdout=out, stderr=subprocess.STDOUT,
                                            cwd=self.directory, env=self.env, start_new_session=True)
        wait_for_port(self.port, self.process, self.name, self.logfile)

    def prepare(self) -> None:
        """Anything to write before the process starts on `self.port`."""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log(f"{self.name} did not stop within 30 s of SIGTERM; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        # Anything of its process group left behind (a worker the server did
        # not take down with it).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


class Passthrough(Server):
    name = "passthrough"

    def __init__(self, directory: Path, sink_port: int):
        super().__init__(directory)
        self.sink_port = sink_port

    def command(self) -> list[str]:
        return [PYTHON, str(SCRIPTS / "bench_passthrough.py"), "--port", str(self.port),
                "--upstream-port", str(self.sink_port)]


class Relay(Server):
    """`python -m relay serve` with a config written for the bench. The
    process runs in the temporary directory, so `relay` is whatever the
    interpreter imports (PYTHONPATH first, then the installed package)."""

    name = "relay"

    def __init__(self, directory: Path, sink_port: int, nameserver: str, env: dict, *,
                 database: str = "", shared: dict | None = None, name: str = ""):
        if name:
            self.name = name
        super().__init__(directory)
        self.sink_port = sink_port
        self.nameserver = nameserver
        self.env = env
        self.config_path = directory / "relay.toml"
        # A SQLite file in the directory, or a postgresql:// URL (--nodes).
        self.database = database or str(directory / "relay.sqlite3")
        # Files every node shares (--nodes): "bounce_secret", "dkim_key".
        self.shared = shared or {}
        self.limits: dict = {}
        self.effective: dict = {}

    @property
    def postgres(self) -> bool:
        return self.database.startswith(("postgresql://", "postgres://"))

    def write_config(self) -> None:
        q = json.dumps  # a TOML basic string
        text = f"""# written by scripts/bench
domain = {q(mix.MARKETPLACE)}
database = {q(str(self.database))}

[inbound]
listen = {q(f"{HOST}:{self.port}")}
xforward_hosts = []

[submission]
listen = ""
listen_tls = ""

[upstream]
url = {q(f"smtp://{HOST}:{self.sink_port}")}

[policy]
allowed_link_domains = [{q(mix.MARKETPLACE)}]

[dns]
nameservers = [{q(self.nameserver)}]

[auth]
inbound = "dmarc"

[dkim]
key_file = {q(self.shared.get("dkim_key", str(self.directory / "dkim.pem")))}

[log]
level = "info"
"""
        if "bounce_secret" in self.shared:
            text += f"\n[bounce]\nsecret_file = {q(self.shared['bounce_secret'])}\n"
        if self.limits:
            text += "\n[limits]\n" + "".join(f"{key} = {value}\n" for key, value in self.limits.items())
        self.config_path.write_text(text)

    def cli(self, *args: str) -> str:
        done = subprocess.run([PYTHON, "-m", "relay", "--config", str(self.config_path), *args],
                              cwd=self.directory, env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise BenchError(f"relay {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def configure(self) -> None:
        """Write the config; when the relay has a [limits] section, raise its
        connection limits above the bench's load."""
        self.write_config()
        self.effective = json.loads(self.cli("check-config", "--json"))
        limits = self.effective.get("limits")
        if isinstance(limits, dict):
            for key, value in limits.items():
                if "connection" in key and isinstance(value, int) and not isinstance(value, bool):
                    self.limits[key] = max(value, 1000)
            if self.limits:
                self.write_config()
                self.effective = json.loads(self.cli("check-config", "--json"))

    def provision(self) -> str:
        """The seller, the buyer and one order; returns the seller's alias."""
        self.cli("seller", "add", mix.SELLER, "--name", mix.SELLER_NAME)
        self.cli("buyer", "add", mix.BUYER, "--name", mix.BUYER_NAME)
        order = json.loads(self.cli("order", "add", "111-000", "--seller", mix.SELLER,
                                    "--buyer", mix.BUYER, "--json"))
        return order["seller_alias"]

    def command(self) -> list[str]:
        return [PYTHON, "-m", "relay", "--config", str(self.config_path), "serve"]

    def prepare(self) -> None:
        self.write_config()

    def archive_verdicts(self) -> dict[str, int]:
        """Archived messages by verdict: straight from SQLite (read-only), or
        through `relay archive list` should the schema have moved on (and
        always for PostgreSQL)."""
        try:
            if self.postgres:
                raise sqlite3.Error("not SQLite")
            with contextlib.closing(sqlite3.connect(f"file:{self.database}?mode=ro", uri=True,
                                                    timeout=30)) as db:
                return dict(db.execute("SELECT verdict, COUNT(*) FROM archive GROUP BY verdict").fetchall())
        except sqlite3.Error:
            counts: dict[str, int] = {}
            for row in json.loads(self.cli("archive", "list", "--json", "--limit", "1000000")):
                counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
            return counts

    def archive_verify(self) -> dict:
        """`relay archive verify --json`: {"ok", "rows", "purged", "head", "breaks"}."""
        done = subprocess.run([PYTHON, "-m", "relay", "--config", str(self.config_path), "archive", "verify",
                               "--json"], cwd=self.directory, env=self.env, capture_output=True, text=True,
                              timeout=300)
        try:
            return json.loads(done.stdout)
        except json.JSONDecodeError:
            raise BenchError(f"relay archive verify: exit {done.returncode}: {done.stderr.strip()[-2000:]}") from None

    def log_problems(self) -> dict:
        """WARNING/ERROR lines of the relay's log, counted by their text
        (numbers blanked), the start-up DKIM key notice left out."""
        counts: dict[str, int] = {}
        if not self.logfile.exists():
            return counts
        for line in self.logfile.read_text(errors="replace").splitlines():
            if not any(level in line for level in ("WARNING", "ERROR", "CRITICAL", "Traceback")):
                continue
            if "made a DKIM key" in line:
                continue
            key = "".join("#" if c.isdigit() else c for c in line)[:160]
            counts[key] = counts.get(key, 0) + 1
        return counts


def relay_source(env: dict) -> str:
    """Which relay code runs: the git commit of the tree it is imported from
    (with "+changes" when relay/ differs from that commit)."""
    probe = subprocess.run([PYTHON, "-c", "import relay, os; print(os.path.dirname(relay.__file__))"],
                           cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True, timeout=30)
    package = Path(probe.stdout.strip())
    try:
        commit = subprocess.run(["git", "-C", str(package), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(package), "status", "--porcelain", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "unknown"
    return (commit or "unknown") + ("+changes" if dirty else "")


# --- load ------------------------------------------------------------------------------

class Load:
    """Runs scripts/bench_load.py with a plan; collects its JSON."""

    def __init__(self, directory: Path, variants: list[mix.Message], rcpt: str, concurrency: int):
        self.directory = directory
        self.rcpt = rcpt
        self.concurrency = concurrency
        self.kinds = [v.kind for v in variants]
        self.payloads = []
        payload_dir = directory / "messages"
        payload_dir.mkdir(parents=True, exist_ok=True)
        for variant in variants:
            path = payload_dir / f"{variant.name}.eml"
            path.write_bytes(variant.payload())
            self.payloads.append(str(path))
        self.runs = 0

    def run(self, tag: str, port: int | list[int], sequence: list[int], warmup: list[int], *,
            rate: float = 0.0, max_seconds: float, concurrency: int | None = None) -> dict:
        """`port`: one server, or a list of them (relay nodes), over which
        the connections are spread round-robin."""
        self.runs += 1
        ports = list(port) if isinstance(port, (list, tuple)) else [port]
        plan = {"host": HOST, "port": ports[0], "ports": ports, "helo": "client.mail.example", "mail_from": mix.BUYER,
                "rcpt": self.rcpt, "payloads": self.payloads, "kinds": self.kinds, "sequence": sequence,
                "warmup": warmup, "concurrency": concurrency or self.concurrency, "rate": rate,
                "max_seconds": max_seconds, "tag": f"{tag}{self.runs}"}
        plan_path = self.directory / f"plan-{self.runs}.json"
        plan_path.write_text(json.dumps(plan))
        try:
            done = subprocess.run([PYTHON, str(SCRIPTS / "bench_load.py"), str(plan_path)],
                                  capture_output=True, text=True, timeout=max_seconds + 150)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{tag}: the load client did not finish within {max_seconds + 150:g} s") from None
        try:
            result = json.loads(done.stdout)
        except json.JSONDecodeError:
            raise BenchError(f"{tag}: the load client failed: {done.stderr.strip()[-2000:]}") from None
        if "error" in result:
            raise BenchError(f"{tag}: {result['error']}")
        return result


def percentile(values: list[float], q: float) -> float:
    """Nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def stats(result: dict) -> dict:
    latencies = result["latencies_ms"]
    out = {
        "messages": result["delivered"],
        "msgs_per_s": result["delivered"] / result["elapsed_s"] if result["elapsed_s"] > 0 else 0.0,
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies) if latencies else float("nan"),
        "elapsed_s": result["elapsed_s"],
        "timed_out": result["timed_out"],
        "by_kind": {},
    }
    for kind in mix.KINDS:
        values = [v for v, k in zip(latencies, result["kinds"]) if k == kind]
        if values:
            out["by_kind"][kind] = {"messages": len(values), "p50_ms": percentile(values, 0.5),
                                    "p99_ms": percentile(values, 0.99)}
    if any(result.get("lateness_ms", ())):
        out["max_lateness_ms"] = max(result["lateness_ms"])
    return out


def check_delivery(name: str, result: dict, sink: dict) -> None:
    """Every message accepted with 250, and the sink got exactly those."""
    if result["failures"]:
        first = result["failures"][0]
        raise BenchError(f"{name}: {len(result['failures'])} message(s) not accepted; first: "
                         f"{first['kind']} message at {first['step']}: {first['reply']}")
    accepted = result["warmup_sent"] + result["delivered"]
    if sink["count"] != accepted:
        raise BenchError(f"{name}: the sink received {sink['count']} message(s), the client had "
                         f"{accepted} accepted")


def check_policies(name: str, sink: dict) -> None:
    """The relay really applied its policies to what it delivered."""
    problems = []
    if sink["naming_buyer"]:
        problems.append(f"{sink['naming_buyer']} naming the buyer's real address")
    if sink["offsite_links"]:
        problems.append(f"{sink['offsite_links']} with an off-site link")
    if sink["relay_signed"] != sink["count"]:
        problems.append(f"{sink['count'] - sink['relay_signed']} without the relay's DKIM signature")
    if problems:
        raise BenchError(f"{name}: of {sink['count']} delivered message(s), " + ", ".join(problems))


# --- the run ---------------------------------------------------------------------------

def load_average() -> float:
    """The one-minute load average, with a warning when it will skew the run."""
    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"the load average is {load:.2f}: other work on this machine skews the numbers")
    return load


class Bench:
    def __init__(self, args: argparse.Namespace, sizes: dict):
        self.args = args
        self.sizes = sizes
        self.stack = contextlib.ExitStack()
        self.sampler = RssSampler()
        self.results: dict = {}
        self.relay_sent = 0  # messages the relay accepted, warm-ups included (for the archive check)

    def phase(self, name: str, server: Server, sampler_name: str, sequence: list[int], warmup: list[int],
              *, rate: float = 0.0, policies: bool = False) -> dict:
        self.sink.reset()
        self.sampler.reset(sampler_name)
        seconds = self.sizes["phase_seconds"] if rate == 0 else self.sizes["paced_seconds"] * 1.5 + 10
        cpu_before = self.sampler.cpu(sampler_name)
        result = self.load.run(name.split()[0], server.port, sequence, warmup, rate=rate, max_seconds=seconds)
        cpu_spent = self.sampler.cpu(sampler_name) - cpu_before
        sink = self.sink.snapshot()
        check_delivery(name, result, sink)
        if policies:
            check_policies(name, sink)
        if server is self.relay:
            self.relay_sent += sink["count"]
        out = stats(result)
        out["peak_rss_mb"] = self.sampler.peak[sampler_name] / MB
        out["peak_pss_mb"] = self.sampler.peak_pss[sampler_name] / MB
        out["processes"] = self.sampler.processes[sampler_name]
        out["warmup"] = result["warmup_sent"]
        # CPU of the server's processes over the phase (warm-up included),
        # per message: steadier between runs than msg/s on a shared machine.
        out["cpu_ms_per_msg"] = cpu_spent * 1000 / max(out["messages"] + out["warmup"], 1)
        if out["timed_out"]:
            log(f"{name}: stopped at the {seconds:g} s cap after {out['messages']} of {len(sequence)} messages")
        log(f"{name}: {out['messages']} messages, {out['msgs_per_s']:.1f} msg/s, "
            f"p50 {out['p50_ms']:.1f} ms, p99 {out['p99_ms']:.1f} ms")
        return out

    def big_message(self, server: Server, sampler_name: str, message: mix.Message, warmup: list[int]) -> dict:
        """RSS growth of a freshly started, warmed-up server while it handles
        one message with a 10 MB attachment."""
        self.sink.reset()
        warm = self.load.run("warm", server.port, [], warmup, max_seconds=60, concurrency=1)
        check_delivery(f"{sampler_name} warm-up", warm, self.sink.snapshot())
        time.sleep(0.5)
        baseline, baseline_pss = min(self.sampler.measure(sampler_name) for _ in range(3))
        baseline_each = self.sampler.measure_each(sampler_name)
        processes_before = len(descendants(*self.sampler.roots[sampler_name]))
        self.sampler.interval = BIG_SAMPLE_INTERVAL
        self.sampler.reset(sampler_name)
        big = Load(self.directory / f"big-{sampler_name}", [message], self.load.rcpt, 1)
        try:
            result = big.run("big", server.port, [0], [], max_seconds=120)
            time.sleep(0.2)
        finally:
            self.sampler.interval = SAMPLE_INTERVAL
        sink = self.sink.snapshot()
        check_delivery(f"{sampler_name} 10 MB attachment", {**result, "warmup_sent": len(warmup)}, sink)
        if server is self.relay:
            self.relay_sent += sink["count"]
        peak, peak_pss = self.sampler.peak[sampler_name], self.sampler.peak_pss[sampler_name]
        # Each process's own peak growth (the tree's peak above is of the
        # sum, which is less when the processes peak at different moments);
        # the server's own process first, then its workers, new ones from 0.
        root = server.process.pid
        growth_each = sorted(((pid != root, (rss - baseline_each.get(pid, 0)) / MB)
                              for pid, rss in self.sampler.pid_peak.get(sampler_name, {}).items()),
                             key=lambda item: (item[0], -item[1]))
        return {"growth_by_process_mb": [round(mb, 1) for _, mb in growth_each],
                "baseline_mb": baseline / MB, "peak_mb": peak / MB, "growth_mb": (peak - baseline) / MB,
                "pss_growth_mb": (peak_pss - baseline_pss) / MB,
                "baseline_processes": processes_before,
                "processes": self.sampler.processes[sampler_name],
                "latency_ms": result["latencies_ms"][0] if result["latencies_ms"] else float("nan")}

    def run_facts(self, source: str, load_at_start: float, sequence, variants) -> dict:
        """The report's first keys: when, on what, with which load."""
        args = self.args
        return {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "relay_code": source,
            "cores": os.cpu_count(),
            "server_cores": args.cores or os.cpu_count(),
            "loadavg_at_start": round(load_at_start, 2),
            "python": platform.python_version(),
            "quick": bool(args.quick),
            "concurrency": args.concurrency,
            "seed": args.seed,
            "mix": {kind: sum(1 for i in sequence if variants[i].kind == kind) for kind in mix.KINDS},
        }

    def start_common(self):
        """What every mode needs, on `self.stack`: the work folder, the sink
        and the DNS server with the buyer's zone."""
        self.directory = Path(self.stack.enter_context(tempfile.TemporaryDirectory(prefix="relay-bench-")))
        private_pem = mix.TEST_KEY.read_bytes()
        env = dict(os.environ)
        self.sink = Sink()
        sink_server = SinkServer(self.sink)
        sink_port = sink_server.start()
        self.stack.callback(sink_server.stop)
        dns_server = self.stack.enter_context(DNSServer([mix.buyer_zone(private_pem)]))
        return private_pem, env, sink_port, dns_server

    def restart_and_send_big(self, server, name: str, big, warmup) -> dict:
        """Restart `server` (so its memory starts from idle) and measure one
        message with a 10 MB attachment through it."""
        server.stop()
        self.sampler.unwatch(name)
        server.start()
        self.sampler.watch(name, server.process.pid)
        result = self.big_message(server, name, big, warmup)
        log(f"{name}, one 10 MB attachment: RSS +{result['growth_mb']:.1f} MB, {result['latency_ms']:.0f} ms")
        return result

    def run(self) -> dict:
        args, sizes = self.args, self.sizes
        started, load_at_start = time.monotonic(), load_average()
        with self.stack:
            private_pem, env, sink_port, dns_server = self.start_common()

            passthrough = Passthrough(self.directory, sink_port)
            passthrough.start()
            self.stack.callback(passthrough.stop)

            self.relay = relay = Relay(self.directory, sink_port, dns_server.address, env)
            relay.port = free_port()
            relay.configure()
            alias = relay.provision()
            relay.start()
            self.stack.callback(relay.stop)

            self.sampler.start()
            self.stack.callback(self.sampler.stop)
            self.sampler.watch("passthrough", passthrough.process.pid)
            self.sampler.watch("relay", relay.process.pid)
            relay_idle, relay_idle_pss = self.sampler.measure("relay")

            variants = mix.build_variants(alias, args.seed, private_pem)
            self.load = Load(self.directory, variants, alias, args.concurrency)
            sequence = mix.sequence(variants, args.messages, args.seed)
            warmup = mix.sequence(variants, sizes["warmup"], args.seed + 1)
            source = relay_source(env)
            log(f"set up in {time.monotonic() - started:.1f} s; relay {source}")

            a = self.phase("passthrough (a)", passthrough, "passthrough", sequence, warmup)
            b = self.phase("relay (b)", relay, "relay", sequence, warmup, policies=True)
            relay_peak_rss = b["peak_rss_mb"]

            rate = b["msgs_per_s"] / 2
            paced_count = max(1, min(len(sequence), round(rate * sizes["paced_seconds"])))
            paced_sequence = mix.sequence(variants, paced_count, args.seed + 2)
            short_warmup = warmup[:args.concurrency]
            half_b = self.phase("relay at half peak", relay, "relay", paced_sequence, short_warmup,
                                rate=rate, policies=True)
            relay_peak_rss = max(relay_peak_rss, half_b["peak_rss_mb"])
            relay_peak_pss = max(b["peak_pss_mb"], half_b["peak_pss_mb"])
            half_a = self.phase("passthrough at half peak", passthrough, "passthrough", paced_sequence,
                                short_warmup, rate=rate)

            archived = relay.archive_verdicts()
            if archived.get("delivered", 0) != self.relay_sent or sum(archived.values()) != self.relay_sent:
                raise BenchError(f"relay: the archive holds {archived}, expected {self.relay_sent} delivered")

            # One 10 MB attachment, each server freshly started and warmed up.
            big = mix.big_message(alias, args.seed + 3, private_pem)
            wire = len(big.payload())
            big_warmup = [next(j for j, v in enumerate(variants) if v.kind == kind) for kind in mix.KINDS]
            relay_big = self.restart_and_send_big(relay, "relay", big, big_warmup)
            archived = relay.archive_verdicts()
            if archived.get("delivered", 0) != self.relay_sent:
                raise BenchError(f"relay: the archive holds {archived}, expected {self.relay_sent} delivered")
            passthrough_big = self.restart_and_send_big(passthrough, "passthrough", big, big_warmup)
            problems = relay.log_problems()

        ratio = b["msgs_per_s"] / a["msgs_per_s"] if a["msgs_per_s"] else float("nan")
        added = half_b["p99_ms"] - half_a["p99_ms"]
        growth_x = relay_big["growth_mb"] * MB / wire
        report = {
            **self.run_facts(source, load_at_start, sequence, variants),
            "passthrough_messages": a["messages"],
            "passthrough_msgs_per_s": round(a["msgs_per_s"], 1),
            "passthrough_p50_ms": round(a["p50_ms"], 1),
            "passthrough_p99_ms": round(a["p99_ms"], 1),
            "passthrough_peak_rss_mb": round(a["peak_rss_mb"], 1),
            "relay_messages": b["messages"],
            "relay_msgs_per_s": round(b["msgs_per_s"], 1),
            "relay_cpu_ms_per_msg": round(b["cpu_ms_per_msg"], 2),
            "passthrough_cpu_ms_per_msg": round(a["cpu_ms_per_msg"], 2),
            "relay_p50_ms": round(b["p50_ms"], 1),
            "relay_p99_ms": round(b["p99_ms"], 1),
            "relay_max_ms": round(b["max_ms"], 1),
            "relay_by_kind": _rounded(b["by_kind"]),
            "passthrough_by_kind": _rounded(a["by_kind"]),
            "ratio": round(ratio, 3),
            "relay_idle_rss_mb": round(relay_idle / MB, 1),
            "relay_peak_rss_mb": round(relay_peak_rss, 1),
            "relay_peak_pss_mb": round(relay_peak_pss, 1),
            "relay_idle_pss_mb": round(relay_idle_pss / MB, 1),
            "relay_processes": max(b["processes"], half_b["processes"]),
            "half_peak_rate_msgs_per_s": round(rate, 2),
            "half_peak_messages": half_b["messages"],
            "half_peak_relay_p50_ms": round(half_b["p50_ms"], 1),
            "half_peak_relay_p99_ms": round(half_b["p99_ms"], 1),
            "half_peak_passthrough_p50_ms": round(half_a["p50_ms"], 1),
            "half_peak_passthrough_p99_ms": round(half_a["p99_ms"], 1),
            "half_peak_added_p99_ms": round(added, 1),
            "half_peak_relay_max_lateness_ms": round(half_b.get("max_lateness_ms", 0.0), 1),
            "half_peak_relay_by_kind": _rounded(half_b["by_kind"]),
            "half_peak_passthrough_by_kind": _rounded(half_a["by_kind"]),
            "big_message_wire_mb": round(wire / MB, 2),
            "big_attachment_decoded_bytes": mix.BIG_PDF_BYTES,
            "rss_10mb_attachment_mb": round(relay_big["growth_mb"], 1),
            "rss_10mb_attachment_x_wire": round(growth_x, 2),
            "rss_10mb_attachment_baseline_mb": round(relay_big["baseline_mb"], 1),
            # Processes of the relay before the message, and the most while it ran.
            "big_message_relay_processes": [relay_big["baseline_processes"], relay_big["processes"]],
            "pss_10mb_attachment_mb": round(relay_big["pss_growth_mb"], 1),
            # Each process's own peak growth: the event loop's, then its workers'.
            "rss_10mb_attachment_by_process_mb": relay_big["growth_by_process_mb"],
            "big_message_relay_ms": round(relay_big["latency_ms"], 1),
            "passthrough_rss_10mb_attachment_mb": round(passthrough_big["growth_mb"], 1),
            "big_message_passthrough_ms": round(passthrough_big["latency_ms"], 1),
            "relay_limits_set": relay.limits,
            "relay_workers": relay.effective.get("workers"),
            "relay_log_problems": problems,
            "targets": TARGETS,
            "targets_met": {
                "ratio": ratio >= TARGETS["ratio_min"],
                "rss_10mb_attachment": growth_x <= TARGETS["rss_growth_max_x_wire"],
                "half_peak_added_p99": added <= TARGETS["half_peak_added_p99_max_ms"],
                "idle_rss": relay_idle / MB <= TARGETS["idle_rss_max_mb"],
            },
            "wall_s": round(time.monotonic() - started, 1),
        }
        return report


# --- one node vs two ---------------------------------------------------------------

COMPARE = (("sqlite", 1), ("postgresql", 1), ("postgresql", 2))  # --compare-nodes, in this order
ENGINE_NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


class Setup:
    """One relay configuration of --nodes/--compare-nodes: its store (a
    fresh SQLite file, or a fresh database on the bench's cluster), its
    nodes, the seller's alias it provisioned, and the messages to it."""

    def __init__(self, kind: str, count: int):
        self.kind = kind
        self.count = count
        self.key = f"{kind}-{count}"
        self.label = f"{ENGINE_NAMES[kind]}, {count} node{'s' if count > 1 else ''}"
        self.relays: list[Relay] = []
        self.alias = ""
        self.variants: list[mix.Message] = []
        self.load: Load | None = None


class NodesBench(Bench):
    """--nodes N and --compare-nodes: one passthrough phase, then for each
    configuration its relay nodes on one store, closed loop, checked."""

    def __init__(self, args: argparse.Namespace, sizes: dict, configurations: list[tuple[str, int]]):
        super().__init__(args, sizes)
        self.configurations = configurations
        self.relay = None  # phase() counts nothing for the relay: each configuration checks its own
        self.cluster = None
        self.postgres_version = ""

    def start_cluster(self) -> None:
        import bench_postgres

        bindir = bench_postgres.find_bindir()
        if bindir is None:
            raise BenchError("PostgreSQL's server binaries (initdb, pg_ctl, postgres) were not found "
                             "(pg_config --bindir, /usr/lib/postgresql/*/bin, PATH, RELAY_TEST_PG_BINDIR)")
        cluster = bench_postgres.BenchCluster(bindir)
        self.stack.callback(cluster.stop)  # before start(): a half-started cluster is stopped too
        try:
            cluster.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            raise BenchError(f"PostgreSQL: {exc}") from None
        self.cluster = cluster
        self.postgres_version = cluster.version()
        self.postgres_settings = bench_postgres.DURABLE
        pid = cluster.postmaster_pid()
        if pid is None:
            raise BenchError("PostgreSQL: no postmaster.pid after start")
        self.sampler.watch("postgresql", pid)
        log(f"PostgreSQL {self.postgres_version} on {cluster.host}:{cluster.port}")

    def shared_files(self) -> dict:
        """The bounce secret (made here) and the DKIM key (made by `relay
        dkim keygen` with the first configuration): one set for every node
        of every configuration, as on real nodes."""
        folder = self.directory / "shared"
        folder.mkdir()
        secret = folder / "bounce.key"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
        return {"bounce_secret": str(secret), "dkim_key": str(folder / "dkim.pem")}

    def prepare_setup(self, setup: Setup, sink_port: int, nameserver: str, env: dict, shared: dict,
                      private_pem: bytes) -> None:
        """The store made and migrated once (`relay db upgrade`), the pair
        provisioned once (CLI), the nodes' configs written; nothing started."""
        database = ""
        if setup.kind == "postgresql":
            try:
                database = self.cluster.create_named_database(f"relay_bench_{setup.count}_nodes")
            except RuntimeError as exc:
                raise BenchError(f"PostgreSQL: {exc}") from None
        for number in range(1, setup.count + 1):
            folder = self.directory / setup.key / f"node-{number}"
            folder.mkdir(parents=True)
            setup.relays.append(Relay(folder, sink_port, nameserver, env, database=database, shared=shared,
                                      name=f"relay-{number}"))
        first = setup.relays[0]
        first.port = free_port()
        first.configure()
        for relay in setup.relays[1:]:
            relay.limits, relay.effective = dict(first.limits), first.effective
        if not Path(shared["dkim_key"]).exists():
            first.cli("dkim", "keygen", "--out", shared["dkim_key"])
        first.cli("db", "upgrade")
        setup.alias = first.provision()
        setup.variants = mix.build_variants(setup.alias, self.args.seed, private_pem)
        setup.load = Load(self.directory / setup.key / "load", setup.variants, setup.alias, self.args.concurrency)

    def relay_phase(self, setup: Setup, sequence: list[int], warmup: list[int], reference: dict) -> dict:
        """Start the configuration's nodes, send the closed-loop phase spread
        over them, stop them, check sink, archive and chain."""
        name = f"relay (b), {setup.label}"
        relays = setup.relays
        for relay in relays:
            self.stack.callback(relay.stop)  # stop() does nothing to a stopped server
            relay.start()
        group = f"relay {setup.key}"
        self.sampler.watch(group, *(relay.process.pid for relay in relays))
        time.sleep(0.5)
        idle_rss, idle_pss = min(self.sampler.measure(group) for _ in range(3))
        postgres = setup.kind == "postgresql"

        self.sink.reset()
        self.sampler.reset(group)
        if postgres:
            self.sampler.reset("postgresql")
        relay_cpu, pg_cpu = self.sampler.cpu(group), self.sampler.cpu("postgresql") if postgres else 0.0
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        own_cpu, machine = time.process_time(), machine_cpu()
        result = setup.load.run("relay", [relay.port for relay in relays], sequence, warmup,
                                max_seconds=self.sizes["phase_seconds"])
        machine_after = machine_cpu()
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = {
            "relay": self.sampler.cpu(group) - relay_cpu,
            "postgresql": (self.sampler.cpu("postgresql") - pg_cpu) if postgres else 0.0,
            "load_client": (children_after.ru_utime + children_after.ru_stime
                            - children.ru_utime - children.ru_stime),
            "sink_and_bench": time.process_time() - own_cpu,
        }
        sink = self.sink.snapshot()
        check_delivery(name, result, sink)
        check_policies(name, sink)
        out = stats(result)
        peak_rss, peak_pss = self.sampler.peak[group], self.sampler.peak_pss[group]
        processes = self.sampler.processes[group]
        pg_rss = self.sampler.peak["postgresql"] if postgres else None
        pg_pss = self.sampler.peak_pss["postgresql"] if postgres else None
        handled = sink["count"]  # warm-up and measured messages, each accepted and delivered once
        if out["timed_out"]:
            log(f"{name}: stopped at the {self.sizes['phase_seconds']:g} s cap after {out['messages']} of "
                f"{len(sequence)} messages")
        per_node = [result.get("by_port", {}).get(str(relay.port), 0) for relay in relays]
        log(f"{name}: {out['messages']} messages ({' + '.join(map(str, per_node))}), {out['msgs_per_s']:.1f} msg/s, "
            f"p50 {out['p50_ms']:.1f} ms, p99 {out['p99_ms']:.1f} ms")
        for relay in relays:
            relay.stop()
        self.sampler.unwatch(group)

        archived = relays[0].archive_verdicts()
        if archived.get("delivered", 0) != handled or sum(archived.values()) != handled:
            raise BenchError(f"{name}: the archive holds {archived}, expected {handled} delivered")
        verify = relays[0].archive_verify()
        if not verify.get("ok") or verify.get("rows") != handled:
            breaks = verify.get("breaks") or []
            raise BenchError(f"{name}: relay archive verify: ok={verify.get('ok')}, {verify.get('rows')} rows "
                             f"(expected {handled}); first breaks: {breaks[:3]}")
        problems: dict[str, int] = {}
        for relay in relays:
            for text, count in relay.log_problems().items():
                problems[text] = problems.get(text, 0) + count
        log(f"{name}: archive {archived}, chain verified ({verify['rows']} rows)")

        total_jiffies = machine_after[1] - machine[1]
        per_msg = {key: round(value * 1000 / handled, 2) if handled else None for key, value in cpu.items()}
        return {
            "label": setup.label,
            "database": setup.kind,
            "nodes": setup.count,
            "messages": out["messages"],
            "warmup": result["warmup_sent"],
            "msgs_per_s": round(out["msgs_per_s"], 1),
            "p50_ms": round(out["p50_ms"], 1),
            "p99_ms": round(out["p99_ms"], 1),
            "max_ms": round(out["max_ms"], 1),
            "ratio": round(out["msgs_per_s"] / reference["msgs_per_s"], 3) if reference["msgs_per_s"] else None,
            "by_kind": _rounded(out["by_kind"]),
            "messages_per_node": per_node,
            "timed_out": out["timed_out"],
            "idle_rss_mb": round(idle_rss / MB, 1),
            "idle_pss_mb": round(idle_pss / MB, 1),
            "peak_rss_mb": round(peak_rss / MB, 1),
            "peak_pss_mb": round(peak_pss / MB, 1),
            "processes": processes,
            "postgresql_peak_rss_mb": round(pg_rss / MB, 1) if pg_rss is not None else None,
            "postgresql_peak_pss_mb": round(pg_pss / MB, 1) if pg_pss is not None else None,
            "cpu_ms_per_msg": per_msg,
            "machine_cpu_busy_pct": round(100 * (machine_after[0] - machine[0]) / total_jiffies, 1)
            if total_jiffies else None,
            "archive": archived,
            "archive_verify": {"ok": verify["ok"], "rows": verify["rows"], "head": verify.get("head")},
            "workers_per_node": relays[0].effective.get("workers"),
            "log_problems": problems,
        }

    def run(self) -> dict:
        args, sizes = self.args, self.sizes
        started, load_at_start = time.monotonic(), load_average()
        with self.stack:
            private_pem, env, sink_port, dns_server = self.start_common()

            self.sampler.start()
            self.stack.callback(self.sampler.stop)
            if any(kind == "postgresql" for kind, _ in self.configurations):
                self.start_cluster()
            shared = self.shared_files()
            setups = [Setup(kind, count) for kind, count in self.configurations]
            for setup in setups:
                self.prepare_setup(setup, sink_port, dns_server.address, env, shared, private_pem)

            passthrough = Passthrough(self.directory, sink_port)
            self.stack.callback(passthrough.stop)
            passthrough.start()
            self.sampler.watch("passthrough", passthrough.process.pid)

            # The same sequence of the mix for every configuration (each sends
            # it to its own alias: the stores are separate).
            self.load = setups[0].load
            sequence = mix.sequence(setups[0].variants, args.messages, args.seed)
            warmup = mix.sequence(setups[0].variants, sizes["warmup"], args.seed + 1)
            source = relay_source(env)
            log(f"set up in {time.monotonic() - started:.1f} s; relay {source}")

            a = self.phase("passthrough (a)", passthrough, "passthrough", sequence, warmup)
            passthrough.stop()
            self.sampler.unwatch("passthrough")
            entries = [self.relay_phase(setup, sequence, warmup, a) for setup in setups]

        variants = setups[0].variants
        report = {
            "mode": "compare-nodes" if self.args.compare_nodes else "nodes",
            **self.run_facts(source, load_at_start, sequence, variants),
            "postgresql": ({"version": self.postgres_version, "settings": self.postgres_settings,
                            "pool_size_per_node": "relay default (10)", "host": "127.0.0.1"}
                           if self.cluster else None),
            "passthrough_messages": a["messages"],
            "passthrough_msgs_per_s": round(a["msgs_per_s"], 1),
            "passthrough_p50_ms": round(a["p50_ms"], 1),
            "passthrough_p99_ms": round(a["p99_ms"], 1),
            "passthrough_peak_rss_mb": round(a["peak_rss_mb"], 1),
        }
        if self.args.compare_nodes:
            report["nodes_comparison"] = entries
        else:
            entry = entries[0]
            report.update({"nodes": entry["nodes"], "database": entry["database"]})
            report.update({f"relay_{key}": value for key, value in entry.items()
                           if key not in ("label", "database", "nodes", "ratio")})
            report["ratio"] = entry["ratio"]
            report["nodes_run"] = entry
        report["wall_s"] = round(time.monotonic() - started, 1)
        return report


def nodes_table(r: dict) -> str:
    entries = r.get("nodes_comparison") or [r["nodes_run"]]
    kinds = r["mix"]
    total = sum(kinds.values())

    def row(*cells, widths=(28, 6, 7, 8, 8, 8, 7)):
        return "".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [
        f"relay bench {r['date']}, {r['cores']} cores{pinned_note(r)}, Python {r['python']}, "
        f"relay {r['relay_code']}, {r['concurrency']} connections{', quick' if r['quick'] else ''}",
        f"mix of {total}: {kinds['text']} text 2 KB, {kinds['html']} HTML 20 KB with links, "
        f"{kinds['pdf']} PDF 500 KB",
    ]
    if r["postgresql"]:
        lines.append(f"PostgreSQL {r['postgresql']['version']} on 127.0.0.1 (fsync, synchronous_commit, "
                     f"full_page_writes on), a fresh database per configuration")
    lines += [
        "",
        row("closed loop (peak)", "nodes", "msgs", "msg/s", "p50 ms", "p99 ms", "ratio") + "  per node",
        row("(a) aiosmtpd passthrough", "-", r["passthrough_messages"], f"{r['passthrough_msgs_per_s']:.1f}",
            f"{r['passthrough_p50_ms']:.1f}", f"{r['passthrough_p99_ms']:.1f}", "-"),
    ]
    for e in entries:
        lines.append(row(f"(b) relay, {ENGINE_NAMES[e['database']]}", e["nodes"], e["messages"],
                         f"{e['msgs_per_s']:.1f}", f"{e['p50_ms']:.1f}", f"{e['p99_ms']:.1f}",
                         f"{e['ratio']:.3f}") + "  " + " + ".join(map(str, e["messages_per_node"])))
    lines += ["", row("memory, peak under load", "", "", "RSS MB", "PSS MB", "procs", "")
              + "  PostgreSQL RSS / PSS MB"]
    for e in entries:
        pg = (f"{e['postgresql_peak_rss_mb']:.1f} / {e['postgresql_peak_pss_mb']:.1f}"
              if e["postgresql_peak_rss_mb"] is not None else "-")
        lines.append(row(f"(b) relay, {ENGINE_NAMES[e['database']]}", e["nodes"], "", f"{e['peak_rss_mb']:.1f}",
                         f"{e['peak_pss_mb']:.1f}", e["processes"], "") + f"  {pg}")
    cpu_widths = (28, 6, 7, 12, 8, 8, 14)
    lines += ["", row("CPU ms per message", "", "relay", "PostgreSQL", "load", "sink", "machine busy",
                      widths=cpu_widths),
              "  (warm-up included; relay: all nodes and their workers; sink: the bench's own process)"]
    for e in entries:
        c = e["cpu_ms_per_msg"]
        lines.append(row(f"(b) relay, {ENGINE_NAMES[e['database']]}", e["nodes"], f"{c['relay']:.1f}",
                         f"{c['postgresql']:.1f}", f"{c['load_client']:.1f}", f"{c['sink_and_bench']:.1f}",
                         f"{e['machine_cpu_busy_pct']:.0f} %", widths=cpu_widths))
    lines += ["", "checks: every message answered 250 and delivered once; archive and chain:"]
    for e in entries:
        lines.append(f"  {e['label']}: {e['archive'].get('delivered', 0)} delivered, relay archive verify ok "
                     f"({e['archive_verify']['rows']} rows)")
    problems = [(e["label"], text, count) for e in entries for text, count in e["log_problems"].items()]
    if problems:
        lines += ["", "relay log warnings/errors:"]
        lines += [f"  {label}: {count} x {text}" for label, text, count in problems]
    lines += ["", f"{r['wall_s']:.0f} s"]
    return "\n".join(lines)


def _finite(value):
    """NaN (a phase without a number) as null: the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _rounded(by_kind: dict) -> dict:
    return {kind: {k: round(v, 1) if isinstance(v, float) else v for k, v in values.items()}
            for kind, values in by_kind.items()}


def table(r: dict) -> str:
    def row(label, msgs, rate, p50, p99, extra=""):
        return f"{label:<30}{msgs:>7}{rate:>9}{p50:>9}{p99:>9}  {extra}".rstrip()

    def yes(ok):
        return "met" if ok else "NOT met"

    kinds = r["mix"]
    total = sum(kinds.values())
    lines = [
        f"relay bench {r['date']}, {r['cores']} cores{pinned_note(r)}, Python {r['python']}, "
        f"relay {r['relay_code']}, {r['concurrency']} connections{', quick' if r['quick'] else ''}",
        f"mix of {total}: {kinds['text']} text 2 KB, {kinds['html']} HTML 20 KB with links, "
        f"{kinds['pdf']} PDF 500 KB",
        "",
        row("closed loop (peak)", "msgs", "msg/s", "p50 ms", "p99 ms", "peak RSS"),
        row("(a) aiosmtpd passthrough", r["passthrough_messages"], f"{r['passthrough_msgs_per_s']:.1f}",
            f"{r['passthrough_p50_ms']:.1f}", f"{r['passthrough_p99_ms']:.1f}",
            f"{r['passthrough_peak_rss_mb']:.1f} MB"),
        row("(b) relay, all policies", r["relay_messages"], f"{r['relay_msgs_per_s']:.1f}",
            f"{r['relay_p50_ms']:.1f}", f"{r['relay_p99_ms']:.1f}",
            f"{r['relay_peak_rss_mb']:.1f} MB (PSS {r['relay_peak_pss_mb']:.1f} MB; "
            f"{r['relay_processes']} process(es); idle {r['relay_idle_rss_mb']:.1f} MB, target <= "
            f"{TARGETS['idle_rss_max_mb']:g} MB: {yes(r['targets_met']['idle_rss'])})"),
    ]
    for kind in mix.KINDS:
        k = r["relay_by_kind"].get(kind)
        if k:
            lines.append(row(f"    relay, {kind}", k["messages"], "", f"{k['p50_ms']:.1f}", f"{k['p99_ms']:.1f}"))
    lines += [
        f"ratio b/a: {r['ratio']:.3f}  (target >= {TARGETS['ratio_min']}: {yes(r['targets_met']['ratio'])})"
        f"; CPU per message: relay {r['relay_cpu_ms_per_msg']:.1f} ms, passthrough "
        f"{r['passthrough_cpu_ms_per_msg']:.1f} ms",
        "",
        row(f"paced at {r['half_peak_rate_msgs_per_s']:.1f} msg/s (half b)", "msgs", "", "p50 ms", "p99 ms"),
        row("(a) aiosmtpd passthrough", r["half_peak_messages"], "", f"{r['half_peak_passthrough_p50_ms']:.1f}",
            f"{r['half_peak_passthrough_p99_ms']:.1f}"),
        row("(b) relay, all policies", r["half_peak_messages"], "", f"{r['half_peak_relay_p50_ms']:.1f}",
            f"{r['half_peak_relay_p99_ms']:.1f}"),
        f"added p99 at half peak: {r['half_peak_added_p99_ms']:.1f} ms  (target <= "
        f"{TARGETS['half_peak_added_p99_max_ms']:g} ms: {yes(r['targets_met']['half_peak_added_p99'])})",
        "",
        f"one 10 MB attachment ({r['big_attachment_decoded_bytes']:,} bytes decoded, "
        f"{r['big_message_wire_mb']:.1f} MB on the wire):",
        f"  relay RSS grows {r['rss_10mb_attachment_mb']:.1f} MB = {r['rss_10mb_attachment_x_wire']:.2f}x the wire "
        f"size (target <= {TARGETS['rss_growth_max_x_wire']:g}x: {yes(r['targets_met']['rss_10mb_attachment'])}; "
        f"PSS grows {r['pss_10mb_attachment_mb']:.1f} MB), answered in {r['big_message_relay_ms']:.0f} ms",
        "  each process's own peak growth, event loop first: "
        + ", ".join(f"{mb:.1f}" for mb in r["rss_10mb_attachment_by_process_mb"]) + " MB",
        f"  passthrough RSS grows {r['passthrough_rss_10mb_attachment_mb']:.1f} MB, answered in "
        f"{r['big_message_passthrough_ms']:.0f} ms",
    ]
    if r["relay_log_problems"]:
        lines += ["", "relay log warnings/errors:"]
        lines += [f"  {count} x {text}" for text, count in r["relay_log_problems"].items()]
    lines += ["", f"{r['wall_s']:.0f} s"]
    return "\n".join(lines)


# --- command line ------------------------------------------------------------------

def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Throughput, latency and memory of the relay with every policy on, against a bare "
                    "aiosmtpd passthrough, on loopback. See docs/benchmark.md.")
    parser.add_argument("--messages", type=positive, metavar="N",
                        help=f"messages per closed-loop phase (default {DEFAULTS['messages']}, "
                             f"--quick {QUICK['messages']}; --profile {PROFILE_MESSAGES})")
    parser.add_argument("--concurrency", type=positive, default=8, metavar="C",
                        help="concurrent client connections (default 8)")
    parser.add_argument("--quick", action="store_true", help="a smaller run, under 45 s")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the load: profile the relay's per-message work in-process "
                             "(cProfile) and print the top functions and CPU ms per message kind")
    parser.add_argument("--nodes", type=int, choices=(1, 2), metavar="N",
                        help="one node vs two: N relay nodes (1 or 2) on one database, the relay phase only "
                             "(closed loop) after the passthrough phase; the load's connections spread "
                             "round-robin over the nodes")
    parser.add_argument("--database", choices=("sqlite", "postgresql"),
                        help="with --nodes: the nodes' store (default postgresql: a throwaway cluster on "
                             "loopback; sqlite for one node only)")
    parser.add_argument("--compare-nodes", action="store_true",
                        help="relay phases for 1 node on SQLite, 1 node on PostgreSQL and 2 nodes on "
                             "PostgreSQL after one passthrough phase, and a table")
    parser.add_argument("--cores", type=positive, metavar="N",
                        help="run the servers under test on CPUs 0..N-1 only (taskset; the relay then "
                             "starts one worker per core it may use); the load client and the sink are "
                             "not pinned")
    parser.add_argument("--api", action="store_true",
                        help="instead of the mail load: the HTTP API's order call, open loop at 200 calls/s on "
                             "SQLite, p50/p99 from when each call was due (scripts/bench_api.py)")
    parser.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cores and args.cores > (os.cpu_count() or 1):
        parser.error(f"--cores {args.cores}: this machine has {os.cpu_count()}")
    if args.api and (args.profile or args.nodes or args.database or args.compare_nodes or args.cores):
        parser.error("--api measures the HTTP API alone: no --profile, --nodes, --database, --compare-nodes "
                     "or --cores")
    if args.cores and args.profile:
        parser.error("--profile runs in-process: no --cores")
    if args.cores and not shutil.which("taskset"):
        parser.error("--cores needs taskset (util-linux)")
    if args.compare_nodes and (args.nodes or args.database):
        parser.error("--compare-nodes runs its own configurations: leave out --nodes and --database")
    if args.profile and (args.nodes or args.database or args.compare_nodes):
        parser.error("--profile measures one relay in-process: no --nodes, --database or --compare-nodes")
    if args.database and not args.nodes:
        args.nodes = 1
    if args.nodes and not args.database:
        args.database = "postgresql"
    if args.nodes == 2 and args.database == "sqlite":
        parser.error("two nodes share one database: --database postgresql")
    if max(args.nodes or 0, 2 if args.compare_nodes else 0) > args.concurrency:
        parser.error("--concurrency must be at least the number of nodes: each node gets its share of the "
                     "connections")
    if args.messages is None:
        if args.profile:
            args.messages = PROFILE_MESSAGES // 2 if args.quick else PROFILE_MESSAGES
        else:
            args.messages = (QUICK if args.quick else DEFAULTS)["messages"]
    if args.concurrency > args.messages:
        parser.error("--concurrency must not exceed --messages")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.profile:
        import bench_profile

        return bench_profile.main(args)
    if args.api:
        import bench_api

        try:
            return bench_api.main(args)
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
    sizes = dict(QUICK if args.quick else DEFAULTS)
    if args.cores:
        Server.cpus = f"0-{args.cores - 1}"
    # SIGTERM unwinds like Ctrl-C: every server, the cluster and the
    # temporary folders are stopped and removed on the way out.
    signal.signal(signal.SIGTERM, _terminated)
    nodes_mode = bool(args.nodes or args.compare_nodes)
    try:
        if nodes_mode:
            configurations = list(COMPARE) if args.compare_nodes else [(args.database, args.nodes)]
            report = NodesBench(args, sizes, configurations).run()
        else:
            report = Bench(args, sizes).run()
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(_finite(report), allow_nan=False))
    else:
        print(nodes_table(report) if nodes_mode else table(report))
    return 0


def pinned_note(r: dict) -> str:
    """', servers on 1 of them' when --cores pinned the servers under test."""
    server_cores = r.get("server_cores")
    return f", servers on {server_cores} of them" if server_cores and server_cores != r["cores"] else ""


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
