"""Fixtures for the hostile-input suite: a relay built with the limits a
case needs (small timeouts, small connection limits), a provisioned pair,
and a seller who can log in to the submission listeners."""

from __future__ import annotations

from dataclasses import replace

import pytest

from attack_support import PASSWORD, Client
from relay import auth
from support import RunningRelay, make_config, upstream_url


@pytest.fixture(autouse=True)
def close_clients():
    yield
    while Client.opened:
        Client.opened.pop().close()


@pytest.fixture
def start(tmp_path, upstream):
    """start(limits={...}, workers={...}, inbound={...}, **make_config
    overrides) -> RunningRelay with `.main`, a provisioned pair."""
    running = []

    def start_relay(*, limits=None, workers=None, inbound=None, seller_password=False, **overrides) -> RunningRelay:
        config = make_config(tmp_path, upstream_url(upstream), **overrides)
        if limits:
            config = replace(config, limits=replace(config.limits, **limits))
        # One worker process is enough for one client at a time, and cheap
        # to start; a case that needs more says so.
        config = replace(config, workers=replace(config.workers, **{"count": 1, **(workers or {})}))
        if inbound:
            config = replace(config, inbound=replace(config.inbound, **inbound))
        relay = RunningRelay(config)
        running.append(relay)
        relay.main = relay.pair()
        if seller_password:
            relay.call(relay.store.set_password_hash(relay.main.seller, auth.hash_password(PASSWORD)))
        return relay

    yield start_relay
    for relay in running:
        relay.stop()
