"""The README's "Integrating your marketplace" curl block, run as it
stands (bash, the real curl) against a real relay with its API on: the
commands a marketplace copies must work, and do what the README says."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from relay import api
from relay.config import ApiConfig, Endpoint
from support import RunningRelay, make_config, upstream_url

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block() -> str:
    section = README.read_text().split("## Integrating your marketplace", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section has one ```sh block, the one this test runs"
    return blocks[0]


def json_values(text: str) -> list:
    """The JSON values curl printed one after another (no separators)."""
    decoder, values, position = json.JSONDecoder(), [], 0
    while position < len(text):
        if text[position].isspace():
            position += 1
            continue
        value, position = decoder.raw_decode(text, position)
        values.append(value)
    return values


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (.ci/run installs it)")
def test_the_readme_curl_examples_run_as_written(tmp_path, upstream):
    config = make_config(tmp_path, upstream_url(upstream))
    relay = RunningRelay(replace(config, api=ApiConfig(listen=Endpoint("127.0.0.1", 0))))
    try:
        tokens = {}
        for name, role in (("shop-backend", "provisioning"), ("dispute-desk", "disputes")):
            tokens[name] = api.new_token()
            relay.call(relay.store.add_api_token(name, role, api.token_sha256(tokens[name])))
        host, port = relay.threaded.server.api_address
        env = {"PATH": "/usr/bin:/bin", "RELAY_API": f"http://{host}:{port}", "TOKEN": tokens["shop-backend"],
               "DISPUTES_TOKEN": tokens["dispute-desk"]}
        script = "set -euo pipefail\n" + readme_block()
        result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        answers = json_values(result.stdout)
        seller, buyer, order, retried, looked_up, opted_out, raised, hold, archived = answers
        assert seller["seller"] == "sam@shop.example" and seller["seller_name"] == "Sam's Shop"
        assert buyer["buyer"] == "bea@mail.example"
        assert retried == order and order["relationship"] == looked_up["relationship"] == 1
        assert (order["seller_alias"], order["buyer_alias"]) == (looked_up["seller_alias"], looked_up["buyer_alias"])
        assert opted_out["opted_out"] is True and raised["daily_orders_override"] == 500
        assert hold["placed"] is True and hold["hold"]["reason"] == "case 4711"
        assert archived == {"messages": [], "next_page": None}  # no mail has passed yet
        # What the README promised happened in the store: one order, a
        # seller with a submission password, the hold.
        store = relay.store
        assert relay.call(store.relationship_by_order("112-4567890")).id == hold["hold"]["relationship"] == 1
        assert relay.call(store.password_hash("sam@shop.example")) is not None
        assert relay.call(store.get_party("buyer", "bea@mail.example")).opted_out is True
        assert [row["relationship"] for row in relay.call(store.holds())] == [1]
    finally:
        relay.stop()
