"""`relay dkim keygen` as an operator runs it: the key file it writes signs
mail that verifies against the record it prints, and the printed record is
a zone file as is (read back by dnspython's zone parser), its TXT strings
each at most 255 bytes as DNS requires (RFC 1035 §3.3.14)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dkim as dkimpy
import dns.rdatatype
import dns.zone
import pytest

from relay import dkim

NAME = "relay._domainkey.marketplace.example"
MESSAGE = b"From: a@marketplace.example\r\nSubject: x\r\n\r\nbody\r\n"


def relay_cmd(cwd, *args):
    return subprocess.run([sys.executable, "-m", "relay", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "RELAY_CONFIG": ""})


@pytest.fixture
def workdir(tmp_path):
    """The shipped defaults (domain marketplace.example, selector relay)."""
    (tmp_path / "relay.toml").write_text("")
    return tmp_path


def published(text: str) -> list[bytes]:
    """The TXT strings at NAME in `text` read as a zone file; SOA and NS
    records are what a real zone adds around it."""
    zone = dns.zone.from_text(
        "$ORIGIN marketplace.example.\n$TTL 3600\n"
        "@ IN SOA ns1 hostmaster 1 7200 900 1209600 3600\n@ IN NS ns1\nns1 IN A 192.0.2.1\n" + text,
        relativize=False)
    [rdata] = zone.find_rdataset(NAME + ".", dns.rdatatype.TXT)
    return list(rdata.strings)


@pytest.mark.parametrize("bits", [2048, 4096])
def test_the_record_publishes_as_is(workdir, bits):
    result = relay_cmd(workdir, "--config", "relay.toml", "dkim", "keygen", "--out", "keys/relay.pem",
                       "--bits", str(bits))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('; wrote keys/relay.pem; set [dkim] key_file = "keys/relay.pem"')
    strings = published(result.stdout)
    assert len(strings) > 2 and all(len(s) <= 255 for s in strings)
    assert strings[0] == b"v=DKIM1; k=rsa; "
    key = (workdir / "keys" / "relay.pem").read_bytes()
    record = b"".join(strings)
    assert record == dkim.dns_record(key).encode()
    assert oct((workdir / "keys" / "relay.pem").stat().st_mode & 0o777) == "0o600"
    # What receivers do: look the record up and verify a signature with it.
    signed = dkimpy.sign(MESSAGE, b"relay", b"marketplace.example", key) + MESSAGE
    assert dkimpy.verify(signed, dnsfunc=lambda name, timeout=5: record)


def test_json_carries_the_same_record(workdir):
    result = relay_cmd(workdir, "--config", "relay.toml", "dkim", "keygen", "--out", "k.pem", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["key_file"] == "k.pem" and out["bits"] == 2048 and out["name"] == NAME
    assert out["value"] == dkim.dns_record((workdir / "k.pem").read_bytes())
    assert "".join(out["strings"]) == out["value"]
    assert [s.encode() for s in out["strings"]] == published(out["zone"])


def test_an_existing_key_is_kept(workdir):
    assert relay_cmd(workdir, "--config", "relay.toml", "dkim", "keygen", "--out", "k.pem").returncode == 0
    before = (workdir / "k.pem").read_bytes()
    again = relay_cmd(workdir, "--config", "relay.toml", "dkim", "keygen", "--out", "k.pem")
    assert (again.returncode, again.stderr) == (2, "relay: k.pem exists; give --force to replace it\n")
    assert (workdir / "k.pem").read_bytes() == before


@pytest.mark.parametrize("value, expected", [
    ("v=DKIM1; k=rsa; p=" + "A" * 253, ["v=DKIM1; k=rsa; ", "p=" + "A" * 253]),
    ("v=DKIM1; k=rsa; p=" + "A" * 254, ["v=DKIM1; k=rsa; ", "p=" + "A" * 253, "A"]),
    ("v=DKIM1; k=rsa; p=" + "B" * 763, ["v=DKIM1; k=rsa; ", "p=" + "B" * 253, "B" * 255, "B" * 255]),
    ("p=" + "C" * 10, ["p=" + "C" * 10]),
])
def test_txt_strings(value, expected):
    assert dkim.txt_strings(value) == expected
    assert dkim.zone_record("x.example", value, one_line=True) == (
        "x.example. IN TXT ( " + " ".join(f'"{s}"' for s in expected) + " )")
