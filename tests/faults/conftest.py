"""Fixtures for the fault tests: a misbehaving upstream on loopback."""

from __future__ import annotations

import pytest

from faultkit import ScriptedUpstream


@pytest.fixture
def scripted():
    upstream = ScriptedUpstream().start()
    yield upstream
    upstream.stop()
