"""Fixtures: a recording upstream and the relay, both real servers on
loopback ports chosen by the OS."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

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
