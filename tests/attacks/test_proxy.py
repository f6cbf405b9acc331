"""The PROXY protocol header ([limits] proxy_hosts). Only a configured
proxy may say who the client is: from anyone else "PROXY ..." is an unknown
command and the address it claims is never used; a proxy host must begin
with a valid header or is cut off."""

from __future__ import annotations

import pytest

from attack_support import Client, archive_id
from support import message

CLAIMED = "203.0.113.9"
HEADER = f"PROXY TCP4 {CLAIMED} 127.0.0.1 5555 25\r\n".encode()


def deliver(client: Client, relay) -> int:
    pair = relay.main
    client.ehlo()
    reply = client.transaction(pair.buyer, pair.seller_alias, message(pair.buyer, pair.seller_alias))
    assert reply.key == (250, "2.0.0"), reply
    client.quit()
    return archive_id(reply)


def test_proxy_header_from_anyone_else_is_an_unknown_command(start, upstream):
    relay = start(inbound={"xforward_hosts": ()})
    assert relay.config.limits.proxy_hosts == ()
    client = Client(relay.port)
    client.send(HEADER)  # before the greeting, as a proxy would
    assert client.greeting().code == 220
    reply = client.reply()
    assert reply.code == 500 and reply.enhanced is not None and reply.enhanced.startswith("5.5."), reply
    row = relay.archive(deliver(client, relay))
    assert row["client_address"] == "127.0.0.1"
    assert len(upstream.wait_for(1)) == 1


def test_proxy_header_after_ehlo_from_anyone_is_refused(start, upstream):
    relay = start(inbound={"xforward_hosts": ()})
    client = Client(relay.port).hello()
    reply = client.command(HEADER.rstrip(b"\r\n"))
    assert reply.code == 500 and reply.enhanced is not None and reply.enhanced.startswith("5.5."), reply
    assert relay.archive(deliver(client, relay))["client_address"] == "127.0.0.1"


def test_proxy_header_from_a_proxy_host_names_the_client(start, upstream):
    relay = start(limits={"proxy_hosts": ("127.0.0.1",)}, inbound={"xforward_hosts": ()})
    client = Client(relay.port)
    client.send(HEADER)
    assert client.greeting().code == 220
    row = relay.archive(deliver(client, relay))
    assert row["client_address"] == CLAIMED
    assert len(upstream.wait_for(1)) == 1


@pytest.mark.parametrize("first", [
    b"EHLO client.example\r\n",
    b"PROXY TCP4 not-an-address 127.0.0.1 5555 25\r\n",
    b"PROXY TCP4 203.0.113.9\r\n",
    b"PROXY UDP4 203.0.113.9 127.0.0.1 5555 25\r\n",
    b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 25 extra\r\n",
    b"\r\n",
], ids=["EHLO", "bad-address", "truncated", "bad-protocol", "trailing-field", "empty-line"])
def test_proxy_host_without_a_valid_header_is_cut_off(start, upstream, first):
    relay = start(limits={"proxy_hosts": ("127.0.0.1",)}, inbound={"xforward_hosts": ()})
    client = Client(relay.port, timeout=15)
    client.send(first)
    client.send(b"MAIL FROM:<x@mail.example>\r\n")
    # No greeting and no reply to anything; at most a 4xx/5xx, then the close.
    answers = client.remaining_replies()
    assert all(reply.code >= 400 for reply in answers), [str(r) for r in answers]
    assert upstream.messages == []
