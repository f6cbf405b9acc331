"""Two relay nodes on one PostgreSQL database: two `relay serve` processes,
started together on an empty database (so both migrate it at once), the
same shared files (bounce key, DKIM key, submission certificate), one
recording upstream. A seller whose cap is 5 sends 8 messages through both
nodes' submission listeners at once while buyers write through both
inbound listeners; two provisioning commands create the same pair at once.
The cap holds across the nodes, the pair gets one relationship, the archive
is one valid chain, and every message the relay said 250 to was delivered
exactly once."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
from collections import Counter
from email import message_from_bytes
from pathlib import Path

import pytest
import trustme

from relay.store.common import migrations
from support import RecordingUpstream, message, shared_dkim_key_file

PASSWORD = "correct horse battery"
SELLER, BUYER, OTHER = "sam@shop.example", "bea@mail.example", "cleo@mail.example"
CAP = 5


def relay_cmd(config: Path, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay", "--config", str(config), *args], capture_output=True,
                          text=True, input=stdin, timeout=60, env={**os.environ, "RELAY_CONFIG": ""})


class Node:
    """`relay serve` as a child process; its ports come from its log."""

    def __init__(self, config: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "relay", "--config", str(config), "serve"],
                                     cwd=config.parent, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "RELAY_CONFIG": ""})
        self.lines: list[str] = []
        self.port = self.submission_port = None
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            inbound = re.search(r"inbound listener on 127\.0\.0\.1:(\d+)", line)
            if inbound:
                self.port = int(inbound.group(1))
            submission = re.search(r"submission listener \(STARTTLS\) on 127\.0\.0\.1:(\d+)", line)
            if submission:
                self.submission_port = int(submission.group(1))
                self.ready.set()

    def wait_ready(self):
        if not self.ready.wait(60):
            self.stop(signal.SIGKILL)
            raise AssertionError("relay serve did not start:\n" + "".join(self.lines))

    def stop(self, signum=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        status = self.proc.wait(60)
        self._reader.join(10)
        self.proc.stderr.close()
        return status


@pytest.fixture
def cluster_of_two(tmp_path, postgres_url):
    """(the two nodes' configs, a client TLS context, the upstream): the
    configs are identical, as on real nodes; each node runs in its own
    folder."""
    upstream = RecordingUpstream().start()
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    shared = tmp_path / "shared"  # in production: the same files on every node
    shared.mkdir()
    cert.private_key_pem.write_to_path(str(shared / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(shared / "cert.pem"))
    (shared / "bounce.key").write_bytes(os.urandom(32))
    text = (f'database = "{postgres_url}"\n'
            '[inbound]\nlisten = "127.0.0.1:0"\n'
            f'[submission]\nlisten = "127.0.0.1:0"\nlisten_tls = ""\n'
            f'tls_cert = "{shared / "cert.pem"}"\ntls_key = "{shared / "key.pem"}"\n'
            f'[upstream]\nurl = "smtp://127.0.0.1:{upstream.port}"\n'
            f'[policy]\ndaily_message_base = {CAP}\ndaily_message_per_order = 0\n'
            '[auth]\ninbound = "off"\n'
            '[workers]\ncount = 2\n'
            f'[bounce]\nsecret_file = "{shared / "bounce.key"}"\n'
            f'[dkim]\nkey_file = "{shared_dkim_key_file()}"\n')
    configs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "relay.toml").write_text(text)
        configs.append(tmp_path / name / "relay.toml")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    try:
        yield configs, context, upstream
    finally:
        upstream.stop()


def seller_sends(node: Node, context, buyer_alias: str, tag: str, barrier: threading.Barrier, results: dict):
    """Log in, pass RCPT, wait until every seller has, then DATA."""
    try:
        with smtplib.SMTP("127.0.0.1", node.submission_port, timeout=60) as client:
            client.starttls(context=context)
            client.login(SELLER, PASSWORD)
            client.mail("sam@shop.example")
            code, text = client.rcpt(buyer_alias)
            barrier.wait(60)
            if code != 250:
                results[tag] = (code, text)
                return
            results[tag] = client.data(message(SELLER, buyer_alias, subject=tag, message_id=f"<{tag}@shop.example>"))
    except Exception as exc:  # recorded, so the test fails with it rather than a thread dying quietly
        results[tag] = (None, repr(exc).encode())


def buyer_sends(node: Node, seller_alias: str, tag: str, results: dict):
    try:
        with smtplib.SMTP("127.0.0.1", node.port, timeout=60) as client:
            client.sendmail(BUYER, [seller_alias], message(BUYER, seller_alias, subject=tag,
                                                            message_id=f"<{tag}@mail.example>"))
            results[tag] = (250, b"")
    except smtplib.SMTPException as exc:
        results[tag] = (getattr(exc, "smtp_code", None), repr(exc).encode())


def test_two_nodes_share_the_cap_the_relationships_and_one_chain(cluster_of_two):
    (config_a, config_b), context, upstream = cluster_of_two
    # Both nodes start at once on the empty database: both migrate it.
    nodes = [Node(config_a), Node(config_b)]
    try:
        for node in nodes:
            node.wait_ready()
        assert relay_cmd(config_a, "db", "upgrade").stdout.endswith(f"up to date at version {migrations('postgresql')[-1][0]}\n")

        # Provisioning through either node's config: the same database.
        assert relay_cmd(config_a, "seller", "add", SELLER, "--name", "Sam", "--password-stdin",
                         stdin=PASSWORD + "\n").returncode == 0
        assert relay_cmd(config_b, "buyer", "add", BUYER, "--name", "Bea").returncode == 0
        assert relay_cmd(config_a, "buyer", "add", OTHER, "--name", "Cleo").returncode == 0
        # The first orders of one pair recorded on two nodes at once: one relationship.
        provisioning = [subprocess.Popen(
            [sys.executable, "-m", "relay", "--config", str(config), "order", "add", f"ORDER-{n}",
             "--seller", SELLER, "--buyer", BUYER, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "RELAY_CONFIG": ""}) for n, config in enumerate((config_a, config_b))]
        orders = []
        for proc in provisioning:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            orders.append(json.loads(out))
        assert orders[0]["relationship"] == orders[1]["relationship"]
        assert (orders[0]["seller_alias"], orders[0]["buyer_alias"]) == (orders[1]["seller_alias"],
                                                                         orders[1]["buyer_alias"])
        assert sorted(order["created"] for order in orders) == [False, True]
        pair = orders[0]

        # 8 seller messages through both submission listeners, all past RCPT
        # before any DATA; 6 buyer messages through both inbound listeners.
        results: dict[str, tuple] = {}
        barrier = threading.Barrier(8)
        threads = [threading.Thread(target=seller_sends, args=(nodes[n % 2], context, pair["buyer_alias"],
                                                               f"seller-{n}", barrier, results))
                   for n in range(8)]
        threads += [threading.Thread(target=buyer_sends, args=(nodes[n % 2], pair["seller_alias"], f"buyer-{n}",
                                                              results)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not any(thread.is_alive() for thread in threads)
    finally:
        statuses = [node.stop() for node in nodes]
    assert statuses == [0, 0], "".join(nodes[0].lines + nodes[1].lines)

    sellers = {tag: result for tag, result in results.items() if tag.startswith("seller-")}
    codes = sorted(code for code, _ in sellers.values())
    assert codes == [250] * CAP + [450] * (8 - CAP), sellers
    for code, text in sellers.values():
        if code == 450:
            assert text.startswith(b"4.7.1 Daily sending limit of 5 messages reached"), text
    assert all(results[f"buyer-{n}"][0] == 250 for n in range(6)), results

    # Delivered exactly once each: what got 250, and nothing else.
    delivered = Counter(message_from_bytes(received.data)["Subject"] for received in upstream.messages)
    accepted = {tag for tag, (code, _) in results.items() if code == 250}
    assert delivered == Counter({tag: 1 for tag in accepted})
    # Both nodes did their share.
    for node in nodes:
        assert sum("verdict=delivered" in line for line in node.lines) >= 3

    # One chain: every message, on whichever node, in one verified archive.
    verified = json.loads(relay_cmd(config_b, "archive", "verify", "--json").stdout)
    assert (verified["ok"], verified["rows"]) == (True, 14), verified
    listed = json.loads(relay_cmd(config_a, "archive", "list", "--limit", "50", "--json").stdout)
    assert Counter(row["verdict"] for row in listed) == Counter({"delivered": 11, "deferred": 3})
    assert {row["relationship"] for row in listed} == {pair["relationship"]}
    shown = json.loads(relay_cmd(config_a, "seller", "show", SELLER, "--json").stdout)
    assert (shown["daily_cap"], shown["sent_in_window"]) == (CAP, CAP)
    relationships = json.loads(relay_cmd(config_b, "relationship", "show", "--seller", SELLER, "--buyer", BUYER,
                                         "--json").stdout)
    assert relationships["relationship"] == pair["relationship"] and relationships["orders"] == 2
