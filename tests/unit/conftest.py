"""Fixtures shared by the DNS and mail-authentication tables: the test DNS
server (tests/dnsserver.py) serving tests/zones/, and a resolver on it."""

from __future__ import annotations

import pytest

from dnsserver import ZONES, DNSServer
from relay.dns import make_resolver


@pytest.fixture(scope="module")
def dns_server():
    with DNSServer.from_files(ZONES.glob("*.zone")) as server:
        yield server


@pytest.fixture
def server(dns_server):
    yield dns_server
    dns_server.clear_failures()


@pytest.fixture
def resolver(server):
    # A fresh resolver (and cache) per test, so an injected fault is seen; a
    # short lifetime, so a name the server never answers fails in half a
    # second (the other faults are SERVFAILs, which fail at once).
    return make_resolver([server.address], lifetime=0.5)
