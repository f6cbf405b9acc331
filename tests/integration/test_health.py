"""/healthz with real parts, and the workers of a relay started beside a
folder named `relay`.

`relay serve` runs as a child process where the test is about processes
(its workers, its working directory); the store and
upstream cases run the relay in a thread with an injectable clock. Each
case breaks a real part as it breaks in production: a worker that dies at
start-up, a database file replaced under the relay, a PostgreSQL server
stopped, an upstream that defers every message."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

import support
from postgres_support import PostgresCluster, find_bindir
from relay.config import BounceConfig, Endpoint, MetricsConfig
from support import Clock, RunningRelay, make_config, message, upstream_url

# The console script an operator runs (sys.path[0] is its own folder, not
# the working directory: `python -m relay` would import ./relay itself).
RELAY_SCRIPT = Path(sys.executable).parent / "relay"


def get(address, path="/healthz"):
    host, port = address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_until(condition, timeout: float, describe):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (found := condition()):
            return found
        time.sleep(0.1)
    raise AssertionError(describe())


def write_config(folder: Path, upstream: str) -> Path:
    path = folder / "relay.toml"
    path.write_text("\n".join([
        'domain = "marketplace.example"',
        f"database = {json.dumps(str(folder / 'relay.sqlite3'))}",
        "[inbound]", 'listen = "127.0.0.1:0"',
        "[submission]", 'listen = ""', 'listen_tls = ""',
        "[upstream]", f"url = {json.dumps(upstream)}", "timeout = 10",
        "[auth]", 'inbound = "off"',
        "[dkim]", f"key_file = {json.dumps(support.shared_dkim_key_file())}",
        "[metrics]", 'listen = "127.0.0.1:0"',
        "[workers]", "count = 1",
    ]) + "\n")
    return path


def provision(command: list[str], config: Path, cwd: Path) -> str:
    """A seller, a buyer and an order through the CLI; the seller's alias."""
    def run(*args):
        result = subprocess.run([*command, "--config", str(config), *args], cwd=cwd, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    run("seller", "add", "sam@shop.example", "--name", "Sam")
    run("buyer", "add", "bea@mail.example", "--name", "Bea")
    return json.loads(run("order", "add", "O-1", "--seller", "sam@shop.example", "--buyer", "bea@mail.example",
                          "--json"))["seller_alias"]


class Serve:
    """`relay serve` as a child process; its ports come from its log."""

    def __init__(self, command: list[str], config: Path, cwd: Path):
        self.proc = subprocess.Popen([*command, "--config", str(config), "serve"], cwd=cwd,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "RELAY_CONFIG": ""})
        self.lines: list[str] = []
        self.port = self.metrics = None
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line)
                if found := re.search(r"inbound listener on 127\.0\.0\.1:(\d+)", line):
                    self.port = int(found.group(1))
                if found := re.search(r"metrics on http://127\.0\.0\.1:(\d+)/", line):
                    self.metrics = ("127.0.0.1", int(found.group(1)))
                    ready.set()  # the last listener to start
            ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not ready.wait(60) or self.metrics is None:
            self.stop(signal.SIGKILL)
            raise AssertionError("relay serve did not start:\n" + self.log)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def send(self, alias: str, n: int) -> tuple[int, str]:
        """One message over SMTP; the reply to its DATA."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=60) as client:
            client.ehlo()
            assert client.mail("bea@mail.example")[0] == 250
            assert client.rcpt(alias)[0] == 250
            code, text = client.data(message("bea@mail.example", alias, message_id=f"<h{n}@client.example>"))
            return code, text.decode()

    def workers(self) -> list[int]:
        """The worker processes: children of the relay running
        `python -P -m relay.worker_process` (Linux: reads /proc)."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
                cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            fields = text.rsplit(")", 1)[-1].split()
            if fields[0] not in ("Z", "X") and int(fields[1]) == self.proc.pid and b"relay.worker_process" in cmdline:
                found.append(int(text.split(" ", 1)[0]))
        return found

    def stop(self, signum=signal.SIGTERM) -> int:
        self.proc.send_signal(signum)
        status = self.proc.wait(60)
        self._reader.join(10)
        self.proc.stderr.close()
        return status


def test_serve_beside_a_folder_named_relay_delivers(tmp_path, upstream):
    """A `relay/` folder in the working directory (a checkout, a config
    folder of that name) is not imported by the workers: the message is
    processed and delivered, and /healthz says ok."""
    workdir = tmp_path / "work"
    (workdir / "relay").mkdir(parents=True)
    (workdir / "relay" / "__init__.py").write_text('"""Not the relay: a folder that happens to share its name."""\n')
    config = write_config(tmp_path, upstream_url(upstream))
    alias = provision([str(RELAY_SCRIPT)], config, workdir)
    server = Serve([str(RELAY_SCRIPT)], config, workdir)
    try:
        assert server.send(alias, 1)[0] == 250
        [got] = upstream.wait_for(1)
        assert got.rcpt_tos == ["sam@shop.example"]
        assert b"Hi there." in got.data
        assert get(server.metrics) == (200, "ok\n")
    finally:
        assert server.stop() == 0
    assert "start-up" not in server.log and "Traceback" not in server.log


def interpreter_of_its_own(directory: Path) -> Path:
    """A virtualenv of its own (no pip) that sees this one's packages, the
    relay among them: a deployment whose interpreter can be taken away."""
    import site
    import venv

    venv.EnvBuilder(with_pip=False, symlinks=True).create(directory)
    [packages] = (directory / "lib").glob("python3*/site-packages")
    # A .pth line that starts with "import" runs: addsitedir also reads the
    # .pth files there (the relay's editable install is one).
    (packages / "outer.pth").write_text("".join(f"import site; site.addsitedir({path!r})\n"
                                                for path in site.getsitepackages()))
    return directory / "bin" / "python"


def test_healthz_names_workers_that_cannot_start(tmp_path, upstream):
    """Workers are started from the relay's interpreter; a deploy that
    replaces the virtualenv under a running relay makes every new worker
    fail to start. /healthz says so until a worker starts again; meanwhile
    messages get 451 at once, and the first one after is delivered."""
    python = interpreter_of_its_own(tmp_path / "venv")
    command = [str(python), "-m", "relay"]
    config = write_config(tmp_path, upstream_url(upstream))
    alias = provision(command, config, tmp_path)
    server = Serve(command, config, tmp_path)
    try:
        assert server.send(alias, 1)[0] == 250, server.log
        assert get(server.metrics) == (200, "ok\n")

        python.rename(python.with_name("python.away"))
        workers = server.workers()
        assert len(workers) == 1
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not server.workers(), 30, lambda: f"workers still alive: {server.workers()}")
        code, text = server.send(alias, 2)
        assert (code, text.split(" ", 1)[0]) == (451, "4.3.2")
        status, body = get(server.metrics)
        assert status == 503
        [line] = body.splitlines()
        assert line.startswith("workers: a worker could not be started ([Errno 2] No such file"), body
        assert line.endswith("0 of 1 running")

        python.with_name("python.away").rename(python)
        wait_until(lambda: get(server.metrics) == (200, "ok\n"), 60, lambda: get(server.metrics)[1])
        assert server.send(alias, 3)[0] == 250
        assert len(upstream.wait_for(2)) == 2
    finally:
        assert server.stop() == 0
    assert "a worker could not be started" in server.log
    assert "a worker started again" in server.log


def test_healthz_names_a_sqlite_file_replaced_under_the_relay(tmp_path, start_relay, upstream):
    if support.database_factory is not None:  # set by a session fixture, so asked here, not at import
        pytest.skip("about a SQLite file; this run puts the relays on PostgreSQL")
    relay = start_relay(upstream_url(upstream), metrics=MetricsConfig(Endpoint("127.0.0.1", 0)))
    database = Path(relay.config.database)
    # Replaced by a directory: what a botched restore or a volume mounted
    # over var/ looks like. The relay's open file still answers (and takes
    # writes, to a file no longer at the configured path: a restart would
    # not find them), so only the probe's look at the path tells.
    database.rename(database.with_name("moved.sqlite3"))
    database.mkdir()
    status, body = get(relay.threaded.server.metrics_address)
    assert status == 503
    [line] = body.splitlines()
    assert line == (f"store: StoreUnavailable: {database} is no longer the database file the relay has open "
                    "(removed, moved or replaced)")


def test_healthz_names_a_stopped_postgresql(tmp_path, upstream):
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found")
    cluster = PostgresCluster(bindir).start()  # its own: stopping it must not touch other tests
    relay = None
    try:
        # Nothing made beside the database, which is a URL here: no
        # submission listener (its self-signed pair), the bounce key in tmp.
        config = make_config(tmp_path, upstream_url(upstream), metrics=MetricsConfig(Endpoint("127.0.0.1", 0)),
                             bounce=BounceConfig(secret_file=str(tmp_path / "bounce.key")))
        relay = RunningRelay(replace(config, database=cluster.create_database(),
                                     submission=replace(config.submission, listen=None, listen_tls=None)))
        pair = relay.pair()
        # (Not scraped before: a scrape's "ok" would be kept for a few seconds.)
        cluster.stop()
        with smtplib.SMTP(relay.host, relay.port) as client:
            client.ehlo()
            client.mail(pair.buyer)
            assert client.rcpt(pair.seller_alias)[0] == 451
        status, body = get(relay.threaded.server.metrics_address)
        assert status == 503
        [line] = body.splitlines()
        assert line.startswith("store: ")
    finally:
        if relay is not None:
            relay.stop()
        cluster.stop()


def test_healthz_names_an_upstream_that_defers_everything(tmp_path, upstream):
    clock = Clock()
    relay = RunningRelay(make_config(tmp_path, upstream_url(upstream),
                                     metrics=MetricsConfig(Endpoint("127.0.0.1", 0))), clock=clock)
    try:
        pair = relay.pair()
        address = relay.threaded.server.metrics_address
        upstream.fail_with("451 4.3.0 Queue full, try again later")

        def send(n: int) -> int:
            with smtplib.SMTP(relay.host, relay.port) as client:
                client.ehlo()
                client.mail(pair.buyer)
                client.rcpt(pair.seller_alias)
                return client.data(message(pair.buyer, pair.seller_alias, message_id=f"<u{n}@x>"))[0]

        start = clock.now
        for n, seconds in enumerate((0, 20)):
            clock.now = start + timedelta(seconds=seconds)
            assert send(n) == 451
        assert get(address) == (200, "ok\n")  # two failures: not yet an outage
        clock.now = start + timedelta(seconds=29)
        assert send(2) == 451
        assert get(address) == (200, "ok\n")  # three, but within 30 s
        clock.now = start + timedelta(seconds=45)
        status, body = get(address)
        assert status == 503
        assert body == ("upstream: the last 3 deliveries over 45 s all failed, none accepted since "
                        "(last: 451 4.3.0 Upstream mail server deferred the message, try again later)\n")

        upstream.reply_code = 250
        assert send(3) == 250
        assert get(address) == (200, "ok\n")
        assert len(upstream.messages) == 1
    finally:
        relay.stop()
