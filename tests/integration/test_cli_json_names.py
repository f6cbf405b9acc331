"""`--json` outputs speak one vocabulary (docs/cli.md, "JSON field
names"): every command's output, on a small store with a delivered, a
refused and a bounced message, has exactly the fields documented for it,
and every command that takes --json is documented."""

from __future__ import annotations

import argparse
import json
import smtplib

import pytest

from archive_support import relay_cli
from json_names import check, documented
from relay import cli
from relay.config import WebhooksConfig
from support import closed_port, message, shared_dkim_key_file, upstream_url

def json_commands(parser: argparse.ArgumentParser, prefix: str = "") -> set[str]:
    """Every (sub)command of the parser that has a --json flag."""
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= json_commands(sub, f"{prefix}{name} ")
        elif "--json" in action.option_strings:
            found.add(prefix.strip())
    return found


DSN = ("From: MAILER-DAEMON@mx.shop.example\r\nTo: {verp}\r\nSubject: Undelivered\r\nMIME-Version: 1.0\r\n"
       'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
       "--B\r\nContent-Type: text/plain\r\n\r\nNot delivered.\r\n"
       "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.shop.example\r\n\r\n"
       "Final-Recipient: rfc822; {to}\r\nAction: failed\r\nStatus: 5.1.1\r\n--B--\r\n")


@pytest.fixture
def store(start_relay, upstream, tmp_path):
    """The relay's store after a delivered message (bounced) and a refused
    one, with their webhook events (for an endpoint that is down), and a
    CLI config on it."""
    secret = tmp_path / "webhook.key"
    secret.write_text("0" * 64)
    relay = start_relay(upstream_url(upstream), webhooks=WebhooksConfig(
        url=f"http://127.0.0.1:{closed_port()}/events", secret_file=str(secret)))
    pair = relay.pair()
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.sendmail(pair.buyer, [pair.seller_alias], message(pair.buyer, pair.seller_alias))
    [got] = upstream.wait_for(1)
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.sendmail("", [got.mail_from], DSN.format(verp=got.mail_from, to=pair.seller).encode())
    upstream.fail_with("554 5.7.1 refused")
    with smtplib.SMTP(relay.host, relay.port) as client:
        with pytest.raises(smtplib.SMTPDataError):
            client.sendmail(pair.buyer, [pair.seller_alias], message(pair.buyer, pair.seller_alias))
    config = tmp_path / "cli.toml"
    secret = relay.config.bounce.secret_file or str(tmp_path / "bounce.key")
    config.write_text(f'database = "{relay.config.database}"\n\n[bounce]\nsecret_file = "{secret}"\n\n'
                      f'[dkim]\nkey_file = "{shared_dkim_key_file()}"\n\n[submission]\nlisten = ""\nlisten_tls = ""\n')
    relay.stop()
    return config, pair


def test_every_json_output_has_the_documented_names(store, tmp_path):
    config, pair = store
    table = documented()
    runs = {
        "seller add": ["seller", "add", "sam@shop2.example", "--name", "Sam Two", "--json"],
        "buyer add": ["buyer", "add", "bea@mail2.example", "--json"],
        "order add": ["order", "add", "O-2", "--seller", "sam@shop2.example", "--buyer", "bea@mail2.example",
                      "--json"],
        "seller show": ["seller", "show", pair.seller, "--json"],
        "relationship show": ["relationship", "show", "--alias", pair.seller_alias, "--json"],
        "archive list": ["archive", "list", "--json"],
        "archive show": ["archive", "show", "1", "--json"],
        "archive show --changes": ["archive", "show", "1", "--changes", "--json"],
        "archive export": ["archive", "export", "--relationship", "1", "--format", "mbox",
                           str(tmp_path / "case.mbox"), "--json"],
        "archive export --format eml-dir": ["archive", "export", "--relationship", "1", "--format", "eml-dir",
                                            "--as", "delivered", str(tmp_path / "case"), "--json"],
        "archive hold": ["archive", "hold", "1", "--reason", "case 7"],
        "archive holds": ["archive", "holds", "--json"],
        "archive verify": ["archive", "verify", "--json"],
        "purge": ["purge", "--dry-run", "--json"],
        "report response-time": ["report", "response-time", "--json"],
        "dkim keygen": ["dkim", "keygen", "--out", str(tmp_path / "new.pem"), "--json"],
        "api-token add": ["api-token", "add", "shop-backend", "--role", "provisioning", "--json"],
        "api-token list": ["api-token", "list", "--json"],
        "webhooks list": ["webhooks", "list", "--json"],
    }
    for command, argv in runs.items():
        result = relay_cli(config, *argv)
        assert result.returncode == 0, (command, result.stderr)
        if "--json" in argv:
            check(command, json.loads(result.stdout), table)
    archived = [json.loads(relay_cli(config, "archive", "show", str(n), "--json").stdout) for n in (1, 2)]
    assert [row["verdict"] for row in archived] == ["delivered", "failed"]
    assert archived[0]["bounces"]  # the bounce's fields were checked above
    events = json.loads(relay_cli(config, "webhooks", "list", "--json").stdout)
    assert [e["event_type"] for e in events] == ["message.refused", "message.bounced", "message.delivered"]


def test_every_command_with_json_is_documented():
    commands = json_commands(cli.build_parser())
    table = documented()
    # check-config --json is the configuration itself (docs/configuration.md).
    assert commands - {"check-config"} <= {name.split(" --")[0] for name in table}
    assert {name.split(" --")[0] for name in table} <= commands
