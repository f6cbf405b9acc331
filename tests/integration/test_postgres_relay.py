"""The relay itself on PostgreSQL: a conversation over SMTP that threads
(the Message-ID map) and counts against the cap, and a database that goes
away and comes back — `451 4.3.0` meanwhile, as for SQLite, and nothing
lost."""

from __future__ import annotations

import email
import smtplib
from dataclasses import replace

import pytest

from support import RunningRelay, make_config, message, upstream_url


@pytest.fixture
def pg_relay(tmp_path, upstream, postgres_url):
    """start(**policy) -> a relay on a fresh PostgreSQL database."""
    running = []

    def start(**policy) -> RunningRelay:
        config = make_config(tmp_path, upstream_url(upstream))
        (tmp_path / "bounce.key").write_bytes(b"b" * 32)
        config = replace(config, database=postgres_url,
                         bounce=replace(config.bounce, secret_file=str(tmp_path / "bounce.key")),
                         submission=replace(config.submission, listen=None, listen_tls=None),
                         policy=replace(config.policy, **policy))
        relay = RunningRelay(config)
        running.append(relay)
        return relay

    yield start
    for relay in running:
        relay.stop()


def send(relay, sender, recipient, data):
    with smtplib.SMTP(relay.host, relay.port, timeout=30) as client:
        client.ehlo()
        client.mail(sender)
        code, text = client.rcpt(recipient)
        if code != 250:
            return code, text
        return client.data(data)


def test_a_conversation_threads_and_counts_on_postgresql(pg_relay, upstream):
    relay = pg_relay(daily_message_base=1, daily_message_per_order=0)
    pair = relay.pair()
    assert send(relay, pair.buyer, pair.seller_alias,
                message(pair.buyer, pair.seller_alias, message_id="<q1@mail.example>"))[0] == 250
    relay_id = email.message_from_bytes(upstream.wait_for(1)[0].data)["Message-ID"]
    answer = message(pair.seller, pair.buyer_alias, subject="Re: Hello", message_id="<a1@shop.example>",
                     headers={"In-Reply-To": relay_id})
    assert send(relay, pair.seller, pair.buyer_alias, answer)[0] == 250
    # The buyer's client sees the answer in reply to its own Message-ID.
    delivered = email.message_from_bytes(upstream.wait_for(2)[1].data)
    assert delivered["In-Reply-To"] == "<q1@mail.example>"
    # The cap (1) is used up: the next seller message is refused at RCPT.
    code, text = send(relay, pair.seller, pair.buyer_alias, message(pair.seller, pair.buyer_alias))
    assert (code, text[:5]) == (450, b"4.7.1")
    rows = relay.archive_rows()
    assert [row["verdict"] for row in rows] == ["delivered", "delivered"]
    seller = relay.call(relay.store.get_party("seller", pair.seller))
    assert relay.call(relay.store.seller_sends_since(seller.id, "2000"))[0] == 1


def test_database_gone_is_451_and_nothing_is_lost(pg_relay, upstream, postgres_url, postgres_cluster):
    relay = pg_relay()
    pair = relay.pair()
    name = postgres_url.rsplit("/", 1)[1]
    postgres_cluster.psql(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false")
    postgres_cluster.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
    try:
        code, text = send(relay, pair.buyer, pair.seller_alias, message(pair.buyer, pair.seller_alias))
        assert (code, text[:5]) == (451, b"4.3.0")
        code, text = send(relay, pair.seller, pair.buyer_alias, message(pair.seller, pair.buyer_alias))
        assert (code, text[:5]) == (451, b"4.3.0")
    finally:
        postgres_cluster.psql(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true")
    assert upstream.messages == []
    # The database is back: the same store serves again, the retries go through.
    assert send(relay, pair.buyer, pair.seller_alias, message(pair.buyer, pair.seller_alias))[0] == 250
    assert send(relay, pair.seller, pair.buyer_alias, message(pair.seller, pair.buyer_alias,
                                                              message_id="<m2@x>"))[0] == 250
    assert len(upstream.wait_for(2)) == 2
    assert [row["verdict"] for row in relay.archive_rows()] == ["delivered", "delivered"]
