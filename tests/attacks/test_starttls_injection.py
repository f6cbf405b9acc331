"""STARTTLS command injection (CVE-2011-0411): commands sent in plaintext
in the same packet as STARTTLS must be thrown away with the plaintext
buffer, never executed inside the TLS session as if the client had sent
them encrypted. The first reply inside TLS is the answer to the client's
own EHLO."""

from __future__ import annotations

import base64

import pytest

from attack_support import PASSWORD, Client, unverified_context
from support import message

INJECTED = [
    ("RSET", "RSET\r\n"),
    ("HELP", "HELP\r\n"),
    ("MAIL", "MAIL FROM:<{seller}>\r\n"),
    ("AUTH", "AUTH PLAIN {token}\r\n"),
    ("AUTH-MAIL-RCPT", "AUTH PLAIN {token}\r\nMAIL FROM:<{seller}>\r\nRCPT TO:<{alias}>\r\n"),
]


@pytest.mark.parametrize("injected", [c[1] for c in INJECTED], ids=[c[0] for c in INJECTED])
def test_plaintext_after_starttls_is_discarded(start, upstream, injected):
    relay = start(seller_password=True)
    pair = relay.main
    token = base64.b64encode(f"\0{pair.seller}\0{PASSWORD}".encode()).decode()
    injected = injected.format(seller=pair.seller, alias=pair.buyer_alias, token=token)
    client = Client(relay.submission_port).hello()
    client.send(b"STARTTLS\r\n" + injected.encode())
    reply = client.reply()
    assert reply.code == 220, reply
    # Nothing more in plaintext: no reply to the injected commands before TLS.
    assert client.buffer == b""
    client.sock = unverified_context().wrap_socket(client.sock)
    # Inside TLS, the first reply answers our own EHLO, and says AUTH.
    reply = client.command("EHLO client.example")
    assert reply.code == 250 and reply.lines[0].startswith("250-"), reply
    assert any(line[4:].upper().startswith("AUTH") for line in reply.lines), reply
    # The injected AUTH did not log us in: MAIL still wants it.
    reply = client.command(f"MAIL FROM:<{pair.seller}>")
    assert reply.code == 530, reply
    assert client.auth_plain(pair.seller, PASSWORD).code == 235
    # The injected MAIL did not open a transaction: RCPT is out of sequence.
    reply = client.command(f"RCPT TO:<{pair.buyer_alias}>")
    assert reply.code == 503, reply
    # Our own transaction works, once.
    reply = client.transaction(pair.seller, pair.buyer_alias, message(pair.seller, pair.buyer_alias))
    assert reply.key == (250, "2.0.0"), reply
    client.quit()
    [got] = upstream.wait_for(1)
    assert got.rcpt_tos == [pair.buyer]
