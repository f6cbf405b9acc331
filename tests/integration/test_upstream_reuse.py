"""Connections to the smarthost are reused: one connection carries many
messages, up to `[upstream] reuse_count`, and waits `reuse_idle_seconds`
for the next; one the upstream closed or refused with 421 meanwhile is
replaced before DATA, so the message is delivered once; stopping the relay
says QUIT on every idle connection. A real relay, a real recording aiosmtpd
upstream (plain and STARTTLS), real SMTP clients."""

from __future__ import annotations

import smtplib
import ssl
import threading

import pytest
import trustme

from support import RecordingUpstream, message, upstream_url, wait_until


def send(relay, pair, number: int) -> tuple[int, bytes]:
    raw = message(pair.buyer, pair.seller_alias, body=f"Message {number}\n", message_id=f"<m{number}@client.test>")
    with smtplib.SMTP(relay.host, relay.port, timeout=60) as client:
        client.ehlo()
        client.mail(pair.buyer)
        assert client.rcpt(pair.seller_alias)[0] == 250
        return client.data(raw)


def bodies(upstream) -> list[str]:
    """The 'Message N' line of each delivered message, in arrival order."""
    return [next(line for line in got.data.decode().splitlines() if line.startswith("Message "))
            for got in upstream.messages]


def test_one_connection_carries_many_messages_and_is_closed_on_stop(start_relay, upstream):
    relay = start_relay(upstream_url(upstream), upstream_reuse_idle_seconds=30.0)
    pair = relay.pair()
    for number in range(1, 6):
        assert send(relay, pair, number)[0] == 250
    upstream.wait_for(5)
    assert bodies(upstream) == [f"Message {n}" for n in range(1, 6)]
    assert (upstream.connections, upstream.quits) == (1, 0)
    relay.stop()
    wait_until(lambda: upstream.open_connections() == 0, "the pooled connection to close")
    assert (upstream.connections, upstream.quits) == (1, 1)  # stopping said QUIT on it


def test_reuse_count_caps_the_messages_of_a_connection(start_relay, upstream):
    relay = start_relay(upstream_url(upstream), upstream_reuse_count=2, upstream_reuse_idle_seconds=30.0)
    pair = relay.pair()
    for number in range(1, 6):
        assert send(relay, pair, number)[0] == 250
    upstream.wait_for(5)
    assert upstream.connections == 3  # 2 + 2 + 1
    wait_until(lambda: upstream.quits == 2, "QUIT on the two full connections")
    relay.stop()
    wait_until(lambda: upstream.quits == 3, "QUIT on the last one at stop")


def test_reuse_count_zero_is_one_connection_per_message(start_relay, upstream):
    relay = start_relay(upstream_url(upstream), upstream_reuse_count=0)
    pair = relay.pair()
    for number in range(1, 4):
        assert send(relay, pair, number)[0] == 250
    upstream.wait_for(3)
    assert upstream.connections == 3
    wait_until(lambda: upstream.quits == 3, "a QUIT after each message")


def test_an_idle_connection_is_closed_after_the_idle_time(start_relay, upstream):
    relay = start_relay(upstream_url(upstream), upstream_reuse_idle_seconds=0.2)
    pair = relay.pair()
    assert send(relay, pair, 1)[0] == 250
    wait_until(lambda: upstream.quits == 1, "QUIT once the connection was idle for 0.2 s")
    assert send(relay, pair, 2)[0] == 250
    assert upstream.connections == 2


def test_a_connection_the_upstream_closed_is_replaced_and_the_message_sent_once(start_relay, upstream):
    relay = start_relay(upstream_url(upstream), upstream_reuse_idle_seconds=30.0)
    pair = relay.pair()
    assert send(relay, pair, 1)[0] == 250
    upstream.hang_up()  # its idle timeout: the relay's pooled connection is gone
    wait_until(lambda: upstream.open_connections() == 0, "the upstream to hang up")
    code, text = send(relay, pair, 2)
    assert (code, text[:5]) == (250, b"2.0.0"), text
    upstream.wait_for(2)
    assert bodies(upstream) == ["Message 1", "Message 2"]
    assert upstream.connections == 2
    assert [row["verdict"] for row in relay.archive_rows()] == ["delivered", "delivered"]


def test_a_421_on_a_reused_connection_before_data_goes_to_a_fresh_one(start_relay, upstream):
    relay = start_relay(upstream_url(upstream), upstream_reuse_idle_seconds=30.0)
    pair = relay.pair()
    assert send(relay, pair, 1)[0] == 250
    upstream.mail_reply = "421 4.3.2 shutting down"  # the next MAIL FROM, on the reused connection
    code, text = send(relay, pair, 2)
    assert (code, text[:5]) == (250, b"2.0.0"), text
    upstream.wait_for(2)
    assert bodies(upstream) == ["Message 1", "Message 2"]  # once each
    assert upstream.connections == 2


def test_a_refusal_at_data_is_not_retried_and_the_next_message_goes_through(start_relay, upstream):
    relay = start_relay(upstream_url(upstream), upstream_reuse_idle_seconds=30.0)
    pair = relay.pair()
    assert send(relay, pair, 1)[0] == 250
    upstream.fail_with("421 4.7.0 try later")  # after DATA: the upstream may have the message
    code, text = send(relay, pair, 2)
    assert (code, text[:5]) == (451, b"4.3.0")
    upstream.reply_code = 250
    assert send(relay, pair, 3)[0] == 250
    upstream.wait_for(2)
    assert bodies(upstream) == ["Message 1", "Message 3"]


def test_concurrent_deliveries_each_get_a_connection_then_reuse_them(start_relay, upstream):
    upstream.delay = 0.3  # so that the four overlap at the upstream
    relay = start_relay(upstream_url(upstream), upstream_reuse_idle_seconds=30.0)
    pair = relay.pair()
    codes = []
    threads = [threading.Thread(target=lambda n=n: codes.append(send(relay, pair, n)[0])) for n in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert codes == [250] * 4
    opened = upstream.connections
    assert 1 <= opened <= 4
    upstream.delay = 0.0
    for number in range(5, 9):
        assert send(relay, pair, number)[0] == 250
    upstream.wait_for(8)
    assert sorted(bodies(upstream), key=lambda b: int(b.split()[1])) == [f"Message {n}" for n in range(1, 9)]
    assert upstream.connections == opened  # the sequential ones reused the pool
    relay.stop()
    wait_until(lambda: upstream.open_connections() == 0, "every pooled connection to close")
    assert upstream.quits == opened


@pytest.fixture
def starttls_upstream(tmp_path):
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    recorder = RecordingUpstream(tls="starttls", tls_context=server_context,
                                 credentials=("relayuser", "s3cret")).start()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    yield recorder, str(ca_file)
    recorder.stop()


def test_a_starttls_upstream_with_auth_is_reused(start_relay, starttls_upstream):
    recorder, ca_file = starttls_upstream
    relay = start_relay(upstream_url(recorder, "smtp+starttls", "relayuser:s3cret"), ca_file=ca_file,
                        upstream_reuse_idle_seconds=30.0)
    pair = relay.pair()
    for number in range(1, 4):
        assert send(relay, pair, number)[0] == 250
    recorder.wait_for(3)
    assert recorder.connections == 1  # one TLS handshake and one login for the three
    relay.stop()
    wait_until(lambda: recorder.open_connections() == 0, "the TLS connection to close")
    assert recorder.quits == 1
