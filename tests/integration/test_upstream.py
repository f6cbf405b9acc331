"""Forwarding: the client hears 250 only after the upstream took the message;
every upstream failure maps to the right reply and the archive says so."""

from __future__ import annotations

import smtplib

import pytest
import trustme

from support import RecordingUpstream, closed_port, message, upstream_url


def data_reply(relay, pair, raw=None):
    raw = raw or message(pair.buyer, pair.seller_alias)
    with smtplib.SMTP(relay.host, relay.port, timeout=60) as client:
        client.ehlo()
        client.mail(pair.buyer)
        assert client.rcpt(pair.seller_alias)[0] == 250
        return client.data(raw)


@pytest.mark.parametrize("upstream_line, code, enhanced, verdict", [
    ("451 4.3.0 mailbox busy", 451, b"4.3.0", "deferred"),
    ("421 4.7.0 try later", 451, b"4.3.0", "deferred"),
    ("552 5.2.2 mailbox full for seller@shop.example", 554, b"5.0.0", "failed"),
    # postfix's message_size_limit: the sender hears that the message is too big.
    ("552 5.3.4 Message size exceeds fixed limit", 552, b"5.3.4", "failed"),
    ("552 message too big for seller@shop.example", 552, b"5.3.4", "failed"),
    ("554 5.7.1 rejected as spam", 554, b"5.0.0", "failed"),
    ("550 5.1.1 no such user seller@shop.example", 550, b"5.1.1", "failed"),
], ids=["451", "421", "552-mailbox-full", "552-too-big", "552-no-enhanced-code", "554", "550"])
def test_upstream_refusal_at_data(relay, upstream, upstream_line, code, enhanced, verdict):
    pair = relay.pair()
    upstream.fail_with(upstream_line)
    got_code, text = data_reply(relay, pair)
    assert (got_code, text[:5]) == (code, enhanced)
    # The upstream's words (which may name the real address) never reach the sender.
    assert pair.seller.encode() not in text
    [row] = relay.archive_rows()
    assert row["verdict"] == verdict
    assert row["reply"].startswith(str(code))
    assert any(upstream_line in change for change in row["changes"])


def test_upstream_refusing_the_recipient(relay, upstream):
    pair = relay.pair()
    upstream.rcpt_reply = "550 5.1.1 <seller@shop.example>: user unknown"
    code, text = data_reply(relay, pair)
    assert (code, text[:5]) == (550, b"5.1.1")
    assert b"shop.example" not in text


def test_upstream_down_is_451_and_nothing_lost(start_relay, upstream):
    relay = start_relay(f"smtp://127.0.0.1:{closed_port()}")
    pair = relay.pair()
    code, text = data_reply(relay, pair)
    assert (code, text[:5]) == (451, b"4.4.1")
    [row] = relay.archive_rows()
    assert row["verdict"] == "deferred"
    assert row["raw"]  # the message is kept for the record, and the client retries


def test_slow_upstream_times_out_with_451(start_relay, upstream):
    upstream.delay = 2.0
    relay = start_relay(upstream_url(upstream), upstream_timeout=0.5)
    pair = relay.pair()
    code, text = data_reply(relay, pair)
    assert (code, text[:5]) == (451, b"4.4.1")
    assert relay.archive_rows()[0]["verdict"] == "deferred"


def test_recovered_upstream_delivers_the_retry_once(relay, upstream):
    pair = relay.pair()
    upstream.fail_with("451 4.3.0 not now")
    assert data_reply(relay, pair)[0] == 451
    upstream.reply_code = 250
    assert data_reply(relay, pair)[0] == 250
    assert len(upstream.wait_for(1)) == 1
    assert [row["verdict"] for row in relay.archive_rows()] == ["deferred", "delivered"]


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def tls_upstream(request, ca, tmp_path):
    mode = request.param
    server_context = __import__("ssl").create_default_context(__import__("ssl").Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    recorder = RecordingUpstream(tls=mode, tls_context=server_context,
                                 credentials=("relayuser", "s3cret/pass")).start()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    yield recorder, str(ca_file)
    recorder.stop()


def relay_on_tls_upstream(start_relay, tls_upstream, scheme: str):
    """A relay forwarding to the TLS upstream with its credentials, and a pair."""
    recorder, ca_file = tls_upstream
    relay = start_relay(upstream_url(recorder, scheme, "relayuser:s3cret%2Fpass"), ca_file=ca_file)
    return relay, recorder, relay.pair()


@pytest.mark.parametrize("tls_upstream, scheme", [("starttls", "smtp+starttls"), ("implicit", "smtps")],
                         indirect=["tls_upstream"], ids=["starttls", "smtps"])
def test_tls_upstream_with_auth(start_relay, tls_upstream, scheme):
    relay, recorder, pair = relay_on_tls_upstream(start_relay, tls_upstream, scheme)
    assert data_reply(relay, pair)[0] == 250
    [got] = recorder.wait_for(1)
    assert got.rcpt_tos == [pair.seller]


@pytest.mark.parametrize("tls_upstream", ["implicit"], indirect=True)
def test_tls_upstream_with_untrusted_certificate_is_451(start_relay, tls_upstream):
    recorder, _ = tls_upstream
    relay = start_relay(upstream_url(recorder, "smtps", "relayuser:s3cret%2Fpass"))  # system CAs only
    pair = relay.pair()
    code, text = data_reply(relay, pair)
    assert (code, text[:5]) == (451, b"4.4.1")
    assert recorder.messages == []


@pytest.mark.parametrize("tls_upstream", ["starttls"], indirect=True)
def test_wrong_upstream_password_is_451_not_a_bounce(start_relay, tls_upstream):
    recorder, ca_file = tls_upstream
    relay = start_relay(upstream_url(recorder, "smtp+starttls", "relayuser:wrong"), ca_file=ca_file,
                        upstream_timeout=1.0)
    pair = relay.pair()
    code, _ = data_reply(relay, pair)
    assert code == 451


def test_maildir_upstream_writes_one_eml_per_message(start_relay, tmp_path):
    outbox = tmp_path / "outbox"
    relay = start_relay(f"maildir:{outbox}")
    pair = relay.pair()
    assert data_reply(relay, pair)[0] == 250
    assert data_reply(relay, pair, message(pair.buyer, pair.seller_alias, message_id="<m2@c>"))[0] == 250
    files = sorted(outbox.glob("*.eml"))
    assert len(files) == 2
    assert list((outbox / ".tmp").iterdir()) == []
    for path, row in zip(files, relay.archive_rows()):
        assert path.read_bytes() == row["delivered"]
        assert pair.buyer.encode() not in path.read_bytes()


def test_unwritable_maildir_is_451(start_relay, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the outbox should be")
    relay = start_relay(f"maildir:{blocker}")
    pair = relay.pair()
    code, text = data_reply(relay, pair)
    assert (code, text[:5]) == (451, b"4.4.1")


def big_attachment_message(pair) -> tuple[bytes, bytes]:
    """A message with a 3 MB attachment (several of the forwarder's pieces)
    and text lines that start with a dot; and the attachment's lines."""
    import base64
    import random
    encoded = base64.b64encode(b"%PDF-1.4\n" + random.Random(16).randbytes(3_000_000)).decode()
    lines = "\r\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    raw = (f"From: Bea <{pair.buyer}>\r\nTo: {pair.seller_alias}\r\nSubject: the scan\r\n"
           "Message-ID: <scan-1@mail.example>\r\nDate: Mon, 07 Dec 2026 10:00:00 +0000\r\n"
           "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
           "--B\r\nContent-Type: text/plain\r\n\r\nThe scan.\r\n.\r\n..two dots\r\n.one dot\r\n"
           "--B\r\nContent-Type: application/pdf; name=scan.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           f"{lines}\r\n--B--\r\n").encode()
    return raw, lines.encode()


@pytest.mark.parametrize("tls_upstream, scheme", [("starttls", "smtp+starttls"), ("implicit", "smtps")],
                         indirect=["tls_upstream"], ids=["starttls", "smtps"])
def test_a_big_message_reaches_a_tls_upstream_whole(start_relay, tls_upstream, scheme):
    # The forwarder writes DATA in pieces under the transport's flow control
    # (relay/forward.py): over TLS too, every octet arrives, dots unstuffed.
    relay, recorder, pair = relay_on_tls_upstream(start_relay, tls_upstream, scheme)
    raw, lines = big_attachment_message(pair)
    assert data_reply(relay, pair, raw)[0] == 250
    [got] = recorder.wait_for(1)
    assert lines in got.data
    assert b"\r\nThe scan.\r\n.\r\n..two dots\r\n.one dot\r\n--B\r\n" in got.data
    assert got.data.endswith(b"--B--\r\n")
    assert relay.archive_rows()[-1]["delivered"] == got.data


def test_a_big_message_refused_at_the_end_of_data(relay, upstream):
    # The upstream's reply to the last piece is the reply the client gets.
    pair = relay.pair()
    raw, _ = big_attachment_message(pair)
    upstream.reply_code, upstream.reply_line = 552, "552 5.3.4 Message size exceeds fixed limit"
    reply = data_reply(relay, pair, raw)
    assert reply[0] == 552 and b"5.3.4" in reply[1]
    upstream.reply_code, upstream.reply_line = 250, ""
    assert data_reply(relay, pair, raw)[0] == 250
    [got] = upstream.wait_for(1)
    assert got.data.endswith(b"--B--\r\n")
