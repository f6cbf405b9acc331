"""Config: defaults, the shipped file, and golden bad configs.

Each tests/configs/bad-*/ holds a relay.toml and error.txt with the exact
error text `load()` must give (the CLI prefixes the file name)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from relay import config as config_module
from relay.config import Config, ConfigError, Endpoint, UpstreamTarget

ROOT = Path(__file__).resolve().parents[2]
BAD = sorted((ROOT / "tests" / "configs").glob("bad-*"))


@pytest.mark.parametrize("case", BAD, ids=[p.name for p in BAD])
def test_bad_config_is_refused_with_the_exact_error(case):
    expected = (case / "error.txt").read_text().strip()
    with pytest.raises(ConfigError) as excinfo:
        config_module.load(case / "relay.toml")
    assert str(excinfo.value) == expected


def test_there_are_golden_cases():
    assert len(BAD) >= 20


def test_shipped_config_equals_the_embedded_defaults():
    # One documented exception: the shipped file turns inbound mail
    # authentication off so that a one-machine trial works without DNS.
    shipped = config_module.load(ROOT / "config" / "relay.toml")
    assert shipped.auth.inbound == "off" and Config().auth.inbound == "dmarc"
    assert replace(shipped, auth=Config().auth) == Config()


def test_empty_file_gives_the_defaults(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text("")
    config = config_module.load(path)
    assert config.domain == "marketplace.example"
    assert config.inbound.listen == Endpoint("127.0.0.1", 2525)
    assert config.upstream.url == UpstreamTarget("maildir", path="var/outbox")
    assert config.policy.daily_message_base == 600
    assert config.archive.retention_days == 730


@pytest.mark.parametrize("url, expected", [
    ("smtp://relay.example", UpstreamTarget("smtp", "relay.example", 25)),
    ("smtp://127.0.0.1:10026", UpstreamTarget("smtp", "127.0.0.1", 10026)),
    ("smtp+starttls://u%40x:p%3Aw@mail.example", UpstreamTarget("smtp+starttls", "mail.example", 587, "u@x", "p:w")),
    ("smtps://u:p@mail.example:4465", UpstreamTarget("smtps", "mail.example", 4465, "u", "p")),
    ("SMTP://Mail.Example:25", UpstreamTarget("smtp", "mail.example", 25)),
    ("maildir:/srv/outbox", UpstreamTarget("maildir", path="/srv/outbox")),
])
def test_upstream_urls(url, expected):
    assert config_module.parse_upstream_url("upstream.url", url) == expected


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:2525", Endpoint("127.0.0.1", 2525)),
    ("[::1]:25", Endpoint("::1", 25)),
    ("localhost:0", Endpoint("localhost", 0)),
    ("0.0.0.0:25", Endpoint("0.0.0.0", 25)),
])
def test_listen_addresses(text, expected):
    assert config_module.parse_endpoint("inbound.listen", text) == expected


def test_password_is_masked_in_effective_settings():
    config = config_module.from_mapping({"upstream": {"url": "smtps://u:hunter2@mail.example"}})
    assert "hunter2" not in repr(config_module.effective(config))
    assert "hunter2" not in repr(config)


def test_config_path_precedence(tmp_path):
    assert config_module.config_path("x.toml", {"RELAY_CONFIG": "y.toml"}) == Path("x.toml")
    assert config_module.config_path(None, {"RELAY_CONFIG": "y.toml"}) == Path("y.toml")
    assert config_module.config_path(None, {}) == Path("config/relay.toml")


def test_cli_exits_2_with_one_line_naming_the_key(tmp_path):
    case = ROOT / "tests" / "configs" / "bad-listen-no-port" / "relay.toml"
    result = subprocess.run([sys.executable, "-m", "relay", "--config", str(case), "check-config"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "inbound.listen" in result.stderr


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_default_worker_count_follows_the_cores_the_relay_may_use():
    # `[workers] count = 0` is one worker per core the process may run on:
    # pinned to one CPU by taskset (as `scripts/bench --cores 1` does, or a
    # container's cpuset), the relay starts one worker, not one per core of
    # the machine.
    probe = "from relay.config import WorkersConfig; print(WorkersConfig().processes, WorkersConfig(count=3).processes)"
    pinned = subprocess.run(["taskset", "--cpu-list", "0", sys.executable, "-c", probe],
                            capture_output=True, text=True, check=True)
    assert pinned.stdout.split() == ["1", "3"]
    free = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert free.stdout.split() == [str(len(os.sched_getaffinity(0))), "3"]


def test_webhook_url_password_is_masked_in_effective_settings():
    config = config_module.from_mapping({"webhooks": {"url": "https://relay:s3cret@marketplace.example/events"}})
    settings = config_module.effective(config)
    assert settings["webhooks"]["url"] == "https://relay:***@marketplace.example/events"
    assert "s3cret" not in repr(settings)
    assert settings["webhooks"]["events"] == ["message.delivered", "message.refused", "message.bounced"]
