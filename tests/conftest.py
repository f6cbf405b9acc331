"""Fixtures: a recording upstream and the relay, both real servers on
loopback ports chosen by the OS; a throwaway PostgreSQL cluster for the
tests that need one (started once, at the first such test)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from postgres_support import PostgresCluster, find_bindir  # noqa: E402
from support import RecordingUpstream, RunningRelay, make_config, upstream_url  # noqa: E402


@pytest.fixture
def upstream():
    recorder = RecordingUpstream().start()
    yield recorder
    recorder.stop()


@pytest.fixture
def start_relay(tmp_path):
    """start_relay(upstream_url, **config overrides) -> RunningRelay"""
    running = []

    def start(url: str, **overrides) -> RunningRelay:
        relay = RunningRelay(make_config(tmp_path, url, **overrides))
        running.append(relay)
        return relay

    yield start
    for relay in running:
        relay.stop()


@pytest.fixture
def relay(start_relay, upstream) -> RunningRelay:
    return start_relay(upstream_url(upstream))


@pytest.fixture(scope="session")
def postgres_cluster():
    """A PostgreSQL server of our own for the session (tests/postgres_support.py).
    Without the server binaries: skipped here, a failure under CI (set CI=1),
    where .ci/run has installed them."""
    bindir = find_bindir()
    if bindir is None:
        reason = ("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: "
                  "`apt-get install postgresql` (.ci/run does) or set RELAY_TEST_PG_BINDIR")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    cluster = PostgresCluster(bindir).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session", autouse=True)
def relays_on_postgresql(request):
    """RELAY_TEST_DATABASE=postgresql: every relay the tests start through
    make_config runs on a fresh PostgreSQL database instead of a SQLite file
    (.ci/run runs the suites that do not open SQLite files themselves a
    second time this way)."""
    import support

    if os.environ.get("RELAY_TEST_DATABASE", "sqlite") != "postgresql":
        yield
        return
    cluster = request.getfixturevalue("postgres_cluster")
    support.database_factory = cluster.create_database
    yield
    support.database_factory = None


@pytest.fixture
def postgres_url(postgres_cluster) -> str:
    """The URL of a new, empty database on the session's cluster."""
    url = postgres_cluster.create_database()
    yield url
    postgres_cluster.drop_database(url)
