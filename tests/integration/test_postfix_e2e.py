"""Postfix in front of the relay, for real: a private postfix instance on
loopback high ports, configured with what `relay postfix-config` generates,
the relay behind it, and a recording sink as "the internet".

    client (127.0.0.5) → postfix :public → aliasrelay transport → relay :relay_port
    relay upstream → postfix :reinject (127.0.0.1) → relayhost → sink

The instance has its own config, queue and data directories in a temporary
folder, listens only on 127.0.0.1, never on port 25, and is stopped with
`postfix -c DIR stop` in the fixture's finalizer; the system's own postfix
(if any) is never touched. Postfix is installed by .ci/run; when it cannot
be found these tests are skipped, saying so.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import random
import re
import shutil
import smtplib
import socket
import subprocess
import tempfile
from dataclasses import replace
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from relay import postfix
from relay.config import Endpoint, LimitsConfig
import support
from support import RecordingUpstream, RunningRelay, make_config, message

SBIN = ("/usr/sbin", "/usr/bin", "/sbin")


def _find(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


POSTFIX = _find("postfix")
POSTQUEUE = _find("postqueue")
POSTMAP = _find("postmap")
POSTCONF = _find("postconf")
POSTSUPER = _find("postsuper")

def _why_not() -> str | None:
    if not (POSTFIX and POSTQUEUE and POSTMAP and POSTCONF and POSTSUPER):
        return ("postfix is not installed (postfix, postqueue, postmap not found in PATH or /usr/sbin); "
                "`apt-get install postfix` (.ci/run does) to run the postfix end-to-end tests")
    try:
        pwd.getpwnam("postfix")
        grp.getgrnam("postdrop")
    except KeyError:
        return "postfix is installed but the `postfix` user or `postdrop` group is missing"
    if os.geteuid() != 0:
        return "starting a private postfix instance (`postfix -c DIR start`) needs root"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")

CLIENT_IP = "127.0.0.5"  # "the internet client", as postfix sees it

# Postfix's own services, without chroot; the relay's services are appended
# from relay.postfix.render_master_cf.
BASE_MASTER_CF = """\
pickup     unix  n - n 60   1 pickup
cleanup    unix  n - n -    0 cleanup
qmgr       unix  n - n 300  1 qmgr
rewrite    unix  - - n -    - trivial-rewrite
bounce     unix  - - n -    0 bounce
defer      unix  - - n -    0 bounce
trace      unix  - - n -    0 bounce
verify     unix  - - n -    1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -    - proxymap
proxywrite unix  - - n -    1 proxymap
smtp       unix  - - n -    - smtp
relay      unix  - - n -    - smtp
showq      unix  n - n -    - showq
error      unix  - - n -    - error
retry      unix  - - n -    - error
discard    unix  - - n -    - discard
anvil      unix  - - n -    1 anvil
scache     unix  - - n -    1 scache
postlog    unix-dgram n - n - 1 postlogd
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, instance=None):
    """support.wait_until, with postfix's queue and log in the failure."""
    try:
        return support.wait_until(predicate, what, timeout)
    except AssertionError:
        context = f"\n--- queue ---\n{instance.queue()}\n--- maillog ---\n{instance.log()}" if instance else ""
        raise AssertionError(f"timed out after {timeout} s waiting for {what}{context}") from None


class PostfixInstance:
    """A private postfix: `postfix -c <root>/etc`, queue in <root>/spool."""

    def __init__(self, root: Path, sink_port: int, template_config, mode: str, extra_main_cf=()):
        self.root = root
        self.etc = root / "etc"
        self.maps = root / "maps"
        self.public_port = free_port()
        for path in (self.etc, self.maps, root / "data", root / "spool"):
            path.mkdir()
        shutil.chown(root / "data", "postfix")
        self.template = template_config
        env = {"MAIL_CONFIG": str(self.etc)}
        self.env = {**os.environ, **env}
        public = f"127.0.0.1:{self.public_port}"
        generated = postfix.render(template_config, mode, map_dir=str(self.maps), smtpd_service=public)
        main_cf = "\n".join([
            "compatibility_level = 3.6",
            f"queue_directory = {root / 'spool'}",
            f"data_directory = {root / 'data'}",
            "mail_owner = postfix",
            "setgid_group = postdrop",
            "syslog_name = postfix-relay-e2e",
            f"maillog_file = {root / 'maillog'}",
            f"maillog_file_prefixes = {root}",
            "myhostname = mx.postfix.test",
            "mydomain = postfix.test",
            "myorigin = $myhostname",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "mydestination =",
            "local_recipient_maps =",
            "alias_maps =",
            "alias_database =",
            "mynetworks = 127.0.0.1/32",
            "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
            f"relayhost = [127.0.0.1]:{sink_port}",
            "smtp_dns_support_level = disabled",
            "smtp_tls_security_level = none",
            "smtpd_tls_security_level = none",
            "biff = no",
            # A fresh smtpd per connection: postfix notices a re-postmapped
            # table by its mtime, in whole seconds, and these tests rewrite
            # it faster than that (scripts/postfix/relay-postfix-recipients
            # runs `postfix reload` for the same reason).
            "max_use = 1",
            # Postfix's own retry times (300 s and up): a deferred message
            # stays in the deferred queue until a test says `postqueue -f`.
            # Never seconds: qmgr would take it back into the active queue
            # every second, and when the delivery agent that deferred it
            # still holds the queue file's lock (a busy machine), qmgr logs
            # "skipped, still being delivered" and parks the file in the
            # incoming queue for 60 s (qmgr_active.c), where a test waiting
            # for "deferred" cannot see it.
            "smtp_connect_timeout = 5s",
            *extra_main_cf,
            "",
        ]) + generated[postfix.MAIN_CF]
        master_cf = BASE_MASTER_CF
        if mode == "transport":  # the filter mode renders the public smtpd line itself
            master_cf += f"{public} inet n - n - - smtpd\n"
        master_cf += generated[postfix.MASTER_CF]
        (self.etc / "main.cf").write_text(main_cf)
        (self.etc / "master.cf").write_text(master_cf)
        for name in (postfix.TRANSPORT_MAP, postfix.BOUNCE_MAP):
            postfix.write_atomically(self.maps / name, generated[name])
        postfix.postmap(self.maps / postfix.TRANSPORT_MAP, POSTMAP, self.etc)
        self.set_aliases([])

    def command(self, *args, check=True) -> subprocess.CompletedProcess:
        result = subprocess.run(list(args), capture_output=True, text=True, timeout=30, env=self.env)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: exit {result.returncode}\n{result.stdout}{result.stderr}"
                                 f"\n--- maillog ---\n{self.log()}")
        return result

    def start(self) -> None:
        self.command(POSTFIX, "-c", str(self.etc), "start")
        wait_until(self._listening, 15, "postfix to listen")

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.public_port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self.command(POSTFIX, "-c", str(self.etc), "stop", check=False)

    def set_aliases(self, aliases) -> None:
        """What the operator's provisioning hook does: regenerate the alias
        table and postmap it (running smtpd processes notice the change)."""
        path = self.maps / postfix.RECIPIENT_MAP
        postfix.write_atomically(path, postfix.render_recipients(self.template, aliases))
        postfix.postmap(path, POSTMAP, self.etc)

    def queue(self) -> list[dict]:
        out = self.command(POSTQUEUE, "-c", str(self.etc), "-j").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def flush(self) -> None:
        self.command(POSTQUEUE, "-c", str(self.etc), "-f")

    def setting(self, name: str) -> str:
        return self.command(POSTCONF, "-c", str(self.etc), "-h", name).stdout.strip()

    def delete_queue(self) -> None:
        for item in self.queue():
            self.command(POSTSUPER, "-c", str(self.etc), "-d", item["queue_id"], check=False)

    def deliveries_to_relay(self) -> list[str]:
        """The maillog's status lines of the aliasrelay transport."""
        log = (self.root / "maillog").read_text(errors="replace")
        return [line for line in log.splitlines() if f"/{postfix.TRANSPORT_NAME}/" in line and " status=" in line]

    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace")[-6000:] if path.exists() else "(no maillog)"

    def send(self, sender: str, recipients: list[str], data: bytes) -> None:
        with smtplib.SMTP("127.0.0.1", self.public_port, source_address=(CLIENT_IP, 0), timeout=60) as client:
            client.ehlo("client.mail.example")
            client.sendmail(sender, recipients, data)


@contextlib.contextmanager
def private_postfix(mode: str, limits: LimitsConfig | None = None, extra_main_cf=()):
    """(postfix, sink, relay template config): a private postfix configured
    from the template, which `behind`-style relays then run with."""
    sink = RecordingUpstream().start()
    relay_port, reinject_port = free_port(), free_port()
    root = Path(tempfile.mkdtemp(prefix="relay-postfix-e2e-"))
    root.chmod(0o755)  # postfix's daemons run as `postfix` and must reach the queue
    template = make_config(root, f"smtp://127.0.0.1:{reinject_port}")
    template = replace(template, inbound=replace(template.inbound, listen=Endpoint("127.0.0.1", relay_port)))
    if limits is not None:
        template = replace(template, limits=limits)
    instance = PostfixInstance(root, sink.port, template, mode, extra_main_cf)
    try:
        instance.start()
        yield instance, sink, template
    finally:
        instance.stop()
        sink.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module", params=["transport", "filter"])
def mta(request):
    """(postfix, sink, relay template config) — one postfix per mode for the module."""
    with private_postfix(request.param) as started:
        yield started


@pytest.fixture
def behind(mta, tmp_path):
    """start() -> a RunningRelay on the port postfix delivers to, with a
    database of this test's own; its aliases are in postfix's table."""
    instance, sink, template = mta
    with sink.lock:
        sink.messages.clear()
    assert instance.queue() == []
    config = replace(template, database=str(tmp_path / "relay.sqlite3"))
    running = []

    def start() -> RunningRelay:
        relay = RunningRelay(config)
        running.append(relay)
        return relay

    yield start
    for relay in running:
        relay.stop()
    # Leave an empty queue for the next test (nothing may still be in flight).
    instance.delete_queue()


def provision(instance, relay):
    pair = relay.pair()
    # The production path: the alias table comes from the database.
    instance.set_aliases(postfix.aliases_from_db(relay.config.database))
    return pair


def test_buyer_to_seller_through_postfix(mta, behind):
    instance, sink, _ = mta
    relay = behind()
    pair = provision(instance, relay)
    instance.send(pair.buyer, [pair.seller_alias],
                  message(pair.buyer, pair.seller_alias, body=f"Hi, write me at {pair.buyer}\n"))
    [got] = sink.wait_for(1, timeout=20)
    assert got.rcpt_tos == [pair.seller]
    assert got.mail_from.startswith("bounce+") and got.mail_from.endswith("@marketplace.example")
    assert pair.buyer.encode() not in got.data
    assert f"From: \"Bea Buyer\" <{pair.buyer_alias}>".encode() in got.data \
        or f"From: Bea Buyer <{pair.buyer_alias}>".encode() in got.data
    # XFORWARD: the relay recorded the client postfix saw, not postfix itself.
    [row] = relay.archive_rows()
    assert row["client_address"] == CLIENT_IP
    assert row["verdict"] == "delivered"


def test_relay_down_message_waits_in_the_queue(mta, behind):
    instance, sink, _ = mta
    relay = behind()
    pair = provision(instance, relay)
    relay.stop()

    instance.send(pair.buyer, [pair.seller_alias], message(pair.buyer, pair.seller_alias))
    [queued] = wait_until(lambda: [q for q in instance.queue() if q["queue_name"] == "deferred"], 20,
                          "the message to be deferred", instance)
    [recipient] = queued["recipients"]
    assert recipient["address"] == pair.seller_alias
    assert "refused" in recipient["delay_reason"].lower()
    assert sink.messages == []

    relay = behind()  # same database, same port
    instance.flush()
    [got] = sink.wait_for(1, timeout=20)
    assert got.rcpt_tos == [pair.seller]
    wait_until(lambda: instance.queue() == [], 20, "the queue to empty")
    assert len(sink.messages) == 1  # delivered once: nothing is left to deliver it again
    [row] = relay.archive_rows()
    assert row["verdict"] == "delivered" and row["client_address"] == CLIENT_IP


def test_unknown_alias_refused_at_postfix_rcpt(mta, behind):
    instance, sink, _ = mta
    relay = behind()
    pair = provision(instance, relay)
    unknown = "aaaaaaaaaaaaaaaa@marketplace.example"
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        instance.send(pair.buyer, [unknown], message(pair.buyer, unknown))
    code, text = refused.value.recipients[unknown]
    assert code == 550 and text.startswith(b"5.1.1") and b"relay recipient table" in text
    # Nor does postfix relay anywhere else for an outside client.
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        instance.send(pair.buyer, ["someone@elsewhere.example"], message(pair.buyer, "someone@elsewhere.example"))
    assert refused.value.recipients["someone@elsewhere.example"][0] == 554
    assert relay.archive_rows() == [] and instance.queue() == []


def test_relay_refusal_becomes_a_bounce(mta, behind):
    """The relay's 550 (here: a sender who is not the counterpart) → postfix
    bounces to the envelope sender instead of retrying."""
    instance, sink, _ = mta
    relay = behind()
    pair = provision(instance, relay)
    stranger = "stranger@mail.example"
    instance.send(stranger, [pair.seller_alias], message(stranger, pair.seller_alias))
    [dsn] = sink.wait_for(1, timeout=20)
    assert dsn.mail_from in ("", "<>") and dsn.rcpt_tos == [stranger]
    assert b"5.7.1" in dsn.data and pair.seller.encode() not in dsn.data
    wait_until(lambda: instance.queue() == [], 20, "the queue to empty")


# --- the generated limits, for real ---------------------------------------------

def pdf_of(size: int) -> bytes:
    """A PDF of exactly `size` bytes, as the relay's content check reads one
    (header, a catalog object, random body, trailer; tests/cases/attachments.tsv)."""
    head = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"
    tail = b"\n%%EOF\n"
    return head + random.Random(20261207).randbytes(size - len(head) - len(tail)) + tail


def ehlo_size(port: int) -> int:
    """The SIZE a server on 127.0.0.1:`port` advertises."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.mail.example")
        return int(client.esmtp_features["size"])


def test_large_allowed_attachment_through_postfix(mta, behind):
    """A 9.5 MB PDF, under the relay's attachment limit: postfix's
    message_size_limit from `relay postfix-config` lets it in (postfix's
    default, 10240000, is below its base64) and lets the relay's output back
    in for the reinjection."""
    instance, sink, template = mta
    relay = behind()
    relay_size = ehlo_size(relay.port)
    assert relay_size == template.size_limit
    # What postfix runs with is the generated value, and above the relay's SIZE.
    assert instance.setting("message_size_limit") == str(postfix.message_size_limit(template))
    assert int(instance.setting("message_size_limit")) >= relay_size
    assert ehlo_size(instance.public_port) >= relay_size

    pair = provision(instance, relay)
    pdf = pdf_of(9_500_000)
    assert len(pdf) < template.policy.max_attachment_bytes
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = pair.buyer
    msg["To"] = pair.seller_alias
    msg["Subject"] = "the scanned contract"
    msg["Message-ID"] = "<contract@client.example>"
    msg.set_content("The contract, signed.\n")
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="contract.pdf")
    raw = msg.as_bytes()
    assert len(raw) > 10240000  # over postfix's own default
    earlier = len(instance.deliveries_to_relay())  # the maillog is the module's

    with smtplib.SMTP("127.0.0.1", instance.public_port, source_address=(CLIENT_IP, 0), timeout=120) as client:
        client.ehlo("client.mail.example")
        assert client.mail(pair.buyer, [f"SIZE={len(raw)}"])[0] == 250
        assert client.rcpt(pair.seller_alias)[0] == 250
        code, text = client.data(raw)
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued")

    [got] = sink.wait_for(1, timeout=120)
    assert got.rcpt_tos == [pair.seller]
    out = message_from_bytes(got.data, policy=policy.default)
    [attachment] = list(out.iter_attachments())
    assert attachment.get_filename() == "contract.pdf"
    assert attachment.get_content() == pdf
    assert pair.buyer.encode() not in got.data
    # The relay's reply to postfix's aliasrelay delivery, and its archive.
    [status] = instance.deliveries_to_relay()[earlier:]
    assert f"to=<{pair.seller_alias}>" in status
    assert " status=sent (250 2.0.0 " in status
    [row] = relay.archive_rows()
    assert row["verdict"] == "delivered"
    wait_until(lambda: instance.queue() == [], 20, "the queue to empty", instance)


def test_connection_reuse_stays_under_the_command_limit(tmp_path):
    """After the relay was down, postfix has a backlog for it and delivers
    it over cached connections. With `[limits] command_call_limit = 40` the
    relay would say 421 at the 21st delivery on one connection (two XFORWARD
    each); the generated smtp_connection_reuse_count_limit closes each
    connection after 19. One delivery at a time, so a connection does carry
    as many as it may."""
    limits = replace(LimitsConfig(), command_call_limit=40)
    extra = [f"{postfix.TRANSPORT_NAME}_destination_concurrency_limit = 1"]
    with private_postfix("transport", limits, extra) as (instance, sink, template):
        reuse = postfix.connection_reuse(template)
        assert reuse.count_limit == 18
        count = 2 * (reuse.count_limit + 1) + 3  # more than two connections take
        config = replace(template, database=str(tmp_path / "relay.sqlite3"))
        relay = RunningRelay(config)
        try:
            pair = provision(instance, relay)
            relay.stop()
            for n in range(count):
                instance.send(pair.buyer, [pair.seller_alias],
                              message(pair.buyer, pair.seller_alias, subject=f"message {n}",
                                      message_id=f"<backlog{n}@client.example>"))
            wait_until(lambda: len([q for q in instance.queue() if q["queue_name"] == "deferred"]) == count,
                       60, f"{count} messages to be deferred", instance)

            relay = RunningRelay(config)  # same database, same port
            instance.flush()
            got = sink.wait_for(count, timeout=120)
            wait_until(lambda: instance.queue() == [], 60, "the queue to empty", instance)
            subjects = sorted(message_from_bytes(m.data)["Subject"] for m in got)
            assert subjects == sorted(f"message {n}" for n in range(count))  # each once
            rows = relay.archive_rows()
            assert len(rows) == count and {row["verdict"] for row in rows} == {"delivered"}

            log = (instance.root / "maillog").read_text(errors="replace")
            assert not re.search(r"\b421\b", log), log[-6000:]
            sent = [line for line in instance.deliveries_to_relay() if " status=sent " in line]
            assert len(sent) == count
            # Postfix logs conn_use=N for the Nth delivery on a reused connection.
            uses = [int(m[1]) for line in sent if (m := re.search(r"\bconn_use=(\d+)", line))]
            assert max(uses) == reuse.count_limit + 1, "\n".join(sent)
        finally:
            relay.stop()
