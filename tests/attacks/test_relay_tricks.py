"""Open-relay tricks and control characters in envelope addresses. The
relay takes mail for its own aliases only: every old trick to make a server
forward elsewhere (%-hack, bang paths, source routes, quoted or double @,
address literals) is a 5xx with an enhanced code at RCPT, on the inbound
listener from the real counterpart and on submission after AUTH; CR, LF and
NUL inside MAIL FROM/RCPT TO are refused without harm to the session."""

from __future__ import annotations

import pytest

from attack_support import PASSWORD, Client, Reply, unverified_context
from support import message

TRICKS = [
    ("percent-hack", "u%ext.example@{domain}"),
    ("percent-hack-real-token", "{token}%ext.example@{domain}"),
    ("quoted-local-with-at", '"u@ext.example"@{domain}'),
    ("quoted-real-alias-with-at", '"{token}@ext.example"@{domain}'),
    ("double-at", "u@ext.example@{domain}"),
    ("double-at-real-token", "{token}@ext.example@{domain}"),
    ("source-route", "@{domain}:u@ext.example"),
    ("source-route-two-hops", "@{domain},@relay.example:u@ext.example"),
    ("bang-path", "ext.example!u@{domain}"),
    ("bang-path-real-token", "ext.example!{token}@{domain}"),
    ("address-literal", "u@[1.2.3.4]"),
    ("real-token-at-address-literal", "{token}@[127.0.0.1]"),
    ("real-token-other-domain", "{token}@ext.example"),
    ("domain-suffix", "{token}@{domain}.ext.example"),
    ("no-domain", "{token}"),
]


def trick_address(template: str, alias: str, domain: str) -> str:
    return template.format(domain=domain, token=alias.split("@", 1)[0])


def inbound_session(relay) -> tuple[Client, str, str, str]:
    """(client in a transaction, its counterpart alias, that alias's real owner, the sender's real address)."""
    pair = relay.main
    client = Client(relay.port).hello()
    assert client.command(f"MAIL FROM:<{pair.buyer}>").key == (250, "2.1.0")
    return client, pair.seller_alias, pair.seller, pair.buyer


def submission_session(relay) -> tuple[Client, str, str, str]:
    pair = relay.main
    client = Client(relay.submission_tls_port, tls=unverified_context()).hello()
    assert client.auth_plain(pair.seller, PASSWORD).code == 235
    assert client.command(f"MAIL FROM:<{pair.seller}>").key == (250, "2.1.0")
    return client, pair.buyer_alias, pair.buyer, pair.seller


SIDES = {"inbound": inbound_session, "submission": submission_session}


def assert_refused(reply: Reply) -> None:
    assert 500 <= reply.code < 600, reply
    assert reply.enhanced is not None and reply.enhanced.startswith("5."), f"no enhanced code: {reply}"


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("template", [t[1] for t in TRICKS], ids=[t[0] for t in TRICKS])
def test_relay_trick_is_refused_at_rcpt(start, upstream, side, template):
    relay = start(seller_password=True)
    client, alias, owner, sender = SIDES[side](relay)
    trick = trick_address(template, alias, relay.config.domain)
    reply = client.command(f"RCPT TO:<{trick}>")
    assert_refused(reply)
    # Nothing accepted: no DATA.
    assert client.command("DATA").code == 503
    assert upstream.messages == []
    # The trick beside a real recipient is dropped; the message goes to the
    # alias's owner alone.
    assert client.command(f"RCPT TO:<{alias}>").key == (250, "2.1.5")
    assert_refused(client.command(f"RCPT TO:<{trick}>"))
    reply = client.data(message(sender, alias, subject="with a trick"))
    assert reply.key == (250, "2.0.0"), reply
    [got] = upstream.wait_for(1)
    assert got.rcpt_tos == [owner]
    client.quit()
    assert len(upstream.messages) == 1


# Control characters inside the envelope: (name, command line as bytes, needs MAIL first).
CONTROL = [
    ("MAIL-CR-in-local-part", b"MAIL FROM:<x\r@mail.example>", False),
    ("MAIL-LF-in-local-part", b"MAIL FROM:<x\n@mail.example>", False),
    ("MAIL-NUL-in-local-part", b"MAIL FROM:<x\x00y@mail.example>", False),
    ("MAIL-real-sender-then-NUL", b"MAIL FROM:<{buyer}\x00>", False),
    ("MAIL-real-sender-then-CR", b"MAIL FROM:<{buyer}\r>", False),
    ("MAIL-NUL-after-bracket", b"MAIL FROM:<{buyer}>\x00", False),
    ("RCPT-NUL-in-local-part", b"RCPT TO:<a\x00b@{domain}>", True),
    ("RCPT-CR-in-local-part", b"RCPT TO:<a\rb@{domain}>", True),
    ("RCPT-LF-in-local-part", b"RCPT TO:<a\nb@{domain}>", True),
    ("RCPT-real-alias-then-NUL", b"RCPT TO:<{alias}\x00>", True),
    ("RCPT-real-alias-then-CR", b"RCPT TO:<{alias}\r>", True),
    ("RCPT-real-alias-NUL-other-domain", b"RCPT TO:<{alias}\x00@ext.example>", True),
    ("RCPT-real-alias-LF-second-rcpt", b"RCPT TO:<{alias}\nRCPT TO:<victim@ext.example>", True),
    ("RCPT-NUL-in-domain", b"RCPT TO:<{token}@{domain}\x00.ext.example>", True),
]


def is_help(reply: Reply) -> bool:
    return reply.code == 214 or "commands" in reply.text.lower()


@pytest.mark.parametrize("line, needs_mail", [c[1:] for c in CONTROL], ids=[c[0] for c in CONTROL])
def test_control_characters_in_envelope_addresses(start, upstream, line, needs_mail):
    relay = start()
    pair = relay.main
    line = (line.replace(b"{buyer}", pair.buyer.encode()).replace(b"{alias}", pair.seller_alias.encode())
            .replace(b"{token}", pair.seller_alias.split("@")[0].encode())
            .replace(b"{domain}", relay.config.domain.encode()))
    client = Client(relay.port).hello()
    if needs_mail:
        assert client.command(f"MAIL FROM:<{pair.buyer}>").key == (250, "2.1.0")
    # The hostile line, then HELP as a marker: every reply before HELP's
    # belongs to the hostile line (a bare LF may make it two commands).
    client.send(line + b"\r\nHELP\r\n")
    answers = []
    while not is_help(reply := client.reply()):
        answers.append(reply)
        assert len(answers) < 5, [str(r) for r in answers]
    assert answers, "no reply to the hostile line"
    for reply in answers:
        assert 500 <= reply.code < 600, reply
    if not needs_mail:
        # Nothing was accepted as a sender: RCPT is out of sequence.
        assert client.command(f"RCPT TO:<{pair.seller_alias}>").code == 503
    else:
        # Nothing was accepted as a recipient.
        assert client.command("DATA").code == 503
    assert upstream.messages == []
    # The session still works: an honest transaction, delivered once.
    assert client.command("RSET").code == 250
    reply = client.transaction(pair.buyer, pair.seller_alias, message(pair.buyer, pair.seller_alias))
    assert reply.key == (250, "2.0.0"), reply
    client.quit()
    [got] = upstream.wait_for(1)
    assert got.rcpt_tos == [pair.seller]
