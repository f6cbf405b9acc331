"""A throwaway PostgreSQL cluster for the tests (no tests here).

`PostgresCluster.start()` runs ``initdb`` into a temporary folder and
``pg_ctl start`` on a free loopback port (its unix socket in that folder
too, trust authentication, fsync off: it only has to live as long as the
test run), `create_database()` gives each test a fresh database, `stop()`
throws it all away. The server binaries are found with ``pg_config
--bindir``, in /usr/lib/postgresql/<version>/bin (Debian's layout, newest
first) or on PATH; ``RELAY_TEST_PG_BINDIR`` overrides. ``initdb`` refuses to
run as root, so as root the cluster runs as the ``postgres`` user (which
Debian's package creates; else ``nobody``).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SUPERUSER = "postgres"


def find_bindir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres, or None."""
    needed = ("initdb", "pg_ctl", "postgres")

    def complete(folder) -> bool:
        return folder is not None and all((Path(folder) / name).is_file() for name in needed)

    candidates = [os.environ.get("RELAY_TEST_PG_BINDIR")]
    if shutil.which("pg_config"):
        try:
            candidates.append(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                             timeout=10).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass

    def version(path: str) -> tuple:
        name = Path(path).parent.name
        return tuple(int(part) for part in name.split(".") if part.isdigit())

    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).resolve().parent))
    for folder in candidates:
        if folder and complete(folder):
            return Path(folder)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.host = "127.0.0.1"
        self.port = 0
        self.folder: Path | None = None
        self._names = itertools.count(1)
        self._owner: pwd.struct_passwd | None = None

    # --- running the server binaries ------------------------------------------

    def _as_owner(self, argv: list[str]) -> list[str]:
        if self._owner is None:
            return argv
        runuser = shutil.which("runuser")
        if runuser:
            return [runuser, "-u", self._owner.pw_name, "--", *argv]
        return ["su", "-s", "/bin/sh", self._owner.pw_name, "-c", " ".join(f"'{a}'" for a in argv)]

    def _run(self, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run(self._as_owner(argv), capture_output=True, text=True, timeout=timeout,
                                cwd=self.folder)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return result

    # A throwaway server: nothing it writes has to survive a crash.
    settings = ("-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
                " -c max_connections=300 -c shared_buffers=32MB")
    folder_prefix = "relay-pg-"

    def start(self) -> "PostgresCluster":
        # Not pytest's tmp_path: its base folder is private to the user that
        # runs the tests, and the server may run as another one.
        self.folder = Path(tempfile.mkdtemp(prefix=self.folder_prefix))
        if os.geteuid() == 0:
            try:
                self._owner = pwd.getpwnam("postgres")
            except KeyError:
                self._owner = pwd.getpwnam("nobody")
            os.chown(self.folder, self._owner.pw_uid, self._owner.pw_gid)
        data = self.folder / "data"
        self._run([str(self.bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, "-A", "trust",
                   "-E", "UTF8", "--locale=C", "--no-sync"])
        for attempt in range(5):
            self.port = _free_port()
            options = (f"-c listen_addresses={self.host} -c port={self.port}"
                       f" -c unix_socket_directories={self.folder} {self.settings}")
            try:
                self._run([str(self.bindir / "pg_ctl"), "-D", str(data), "-l", str(self.folder / "server.log"),
                           "-o", options, "-w", "-t", "60", "start"])
                return self
            except RuntimeError:
                if attempt == 4:
                    raise RuntimeError("PostgreSQL did not start:\n" + self.log())
        return self

    def log(self) -> str:
        try:
            return (self.folder / "server.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.folder is None:
            return
        try:
            self._run([str(self.bindir / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "-w",
                       "stop"], timeout=60)
        except (RuntimeError, subprocess.SubprocessError):
            pass
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None

    # --- databases --------------------------------------------------------------

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run `sql` with psql (as the superuser, over TCP); its output."""
        psql = self.bindir / "psql"
        if not psql.is_file():
            psql = Path(shutil.which("psql") or "psql")
        result = subprocess.run([str(psql), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", self.host,
                                 "-p", str(self.port), "-U", SUPERUSER, "-d", database, "-c", sql],
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr}")
        return result.stdout

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        name = f"relay_test_{os.getpid()}_{next(self._names)}"
        self.psql(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        for attempt in range(3):
            try:
                self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                return
            except RuntimeError:
                time.sleep(0.2)
