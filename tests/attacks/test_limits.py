"""What one client may take of a listener ([limits]): connections overall
and per address, recipients per transaction, times one command may be sent,
and the idle, DATA and session timeouts against clients that hold a
connection open doing (almost) nothing. Each limit answers with its reply
and, where the session cannot go on, closes the connection; the server goes
on serving everyone else."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from attack_support import Client, Reply
from support import message

CONCURRENCY = 16  # client threads opening connections at once


def serve_honest_client(relay, upstream, deadline: float = 10.0) -> None:
    """A fresh client is greeted, its message delivered once. Retried while
    the server may still be noticing that earlier connections went away."""
    pair = relay.main
    before = len(upstream.messages)
    stop = time.monotonic() + deadline
    while True:
        client = Client(relay.port)
        greeting = client.greeting()
        if greeting.code == 220:
            break
        client.close()
        assert time.monotonic() < stop, f"still refused: {greeting}"
        time.sleep(0.1)
    client.ehlo()
    reply = client.transaction(pair.buyer, pair.seller_alias, message(pair.buyer, pair.seller_alias))
    assert reply.key == (250, "2.0.0"), reply
    client.quit()
    assert len(upstream.wait_for(before + 1)) == before + 1


def refused_connection(port: int) -> tuple[Reply | None, bool]:
    """Connect; (the first reply, whether the server then closed at once)."""
    with Client(port, timeout=10) as client:
        try:
            reply = client.reply()
        except Exception:
            return None, True
        return reply, client.closed_by_server(timeout=10)


# --- connections ------------------------------------------------------------

def test_a_thousand_connections_from_one_address(start, upstream):
    """The per-address limit: 50 are greeted and held idle; the other 950
    each get 421 4.7.0 and are closed; afterwards a new client is served."""
    relay = start(limits={"max_connections": 100, "max_connections_per_ip": 50},
                  inbound={"xforward_hosts": ()})  # 127.0.0.1 exempt otherwise
    held = []
    for _ in range(50):
        client = Client(relay.port, timeout=10)
        held.append(client)
        assert client.greeting().code == 220
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(refused_connection, [relay.port] * 950))
    refused = [(r.key if r else None, closed) for r, closed in results]
    assert refused == [((421, "4.7.0"), True)] * 950, sorted(set(map(repr, refused)))
    assert results[0][0].text == "Too many connections from your address, try again later"
    # The held ones were never cut off: they still answer.
    for client in held[:3]:
        assert client.command("NOOP").code == 250
    for client in held:
        client.close()
    serve_honest_client(relay, upstream)


def test_overall_connection_limit_counts_every_listener(start, upstream):
    """max_connections below the per-address limit: the overall one bites
    (421 4.3.2), whichever listener the connections are on."""
    relay = start(limits={"max_connections": 30, "max_connections_per_ip": 50},
                  inbound={"xforward_hosts": ()})
    held = []
    for i in range(30):
        port = relay.port if i % 3 else relay.submission_port
        client = Client(port, timeout=10)
        held.append(client)
        assert client.greeting().code == 220
    for port in (relay.port, relay.submission_port, relay.port):
        reply, closed = refused_connection(port)
        assert reply is not None and reply.key == (421, "4.3.2"), reply
        assert reply.text == "Too many connections, try again later"
        assert closed
    for client in held:
        client.close()
    serve_honest_client(relay, upstream)


def test_postfix_in_front_is_exempt_from_the_per_address_limit(start, upstream):
    """127.0.0.1 in xforward_hosts: postfix fans its queue out over many
    connections, so only the overall limit applies to it."""
    relay = start(limits={"max_connections": 40, "max_connections_per_ip": 5},
                  inbound={"xforward_hosts": ("127.0.0.1",)})
    held = []
    for _ in range(40):
        client = Client(relay.port, timeout=10)
        held.append(client)
        assert client.greeting().code == 220
    reply, closed = refused_connection(relay.port)
    assert reply is not None and reply.key == (421, "4.3.2"), reply
    for client in held:
        client.close()
    serve_honest_client(relay, upstream)


# --- recipients and repeated commands -------------------------------------------

def rcpt_addresses(pair, domain: str, count: int) -> list[str]:
    """The real alias first; then, alternately, the same alias again and
    an alias that does not exist."""
    return [pair.seller_alias] + [pair.seller_alias if i % 2 else f"nobody{i}@{domain}" for i in range(1, count)]


def expected_rcpt_reply(index: int, max_recipients: int) -> tuple[int, str]:
    """The reply to the index-th (0-based) RCPT of one transaction."""
    if index >= max_recipients:
        return 452, "4.5.3"
    if index == 0 or index % 2:
        return 250, "2.1.5"
    return 550, "5.1.1"


def send_pipelined(client: Client, lines: list[str], chunk: int = 100) -> list[Reply]:
    """Send in chunks, reading each chunk's replies before the next; stop
    at a 421 (the server closes)."""
    got: list[Reply] = []
    for at in range(0, len(lines), chunk):
        part = lines[at:at + chunk]
        client.send("".join(line + "\r\n" for line in part))
        for _ in part:
            reply = client.reply()
            got.append(reply)
            if reply.code == 421:
                return got
    return got


def test_recipients_past_the_limit_get_452_and_the_message_goes_once(start, upstream):
    relay = start()
    pair = relay.main
    limit = relay.config.limits.max_recipients
    client = Client(relay.port).hello()
    assert client.command(f"MAIL FROM:<{pair.buyer}>").code == 250
    addresses = rcpt_addresses(pair, relay.config.domain, limit + 50)
    got = send_pipelined(client, [f"RCPT TO:<{a}>" for a in addresses])
    assert [r.key for r in got] == [expected_rcpt_reply(i, limit) for i in range(len(addresses))]
    assert got[limit].text == "Too many recipients"
    reply = client.data(message(pair.buyer, pair.seller_alias))
    assert reply.key == (250, "2.0.0"), reply
    client.quit()
    [got_message] = upstream.wait_for(1)
    assert got_message.rcpt_tos == [pair.seller]
    assert len(upstream.messages) == 1


def test_ten_thousand_recipients_end_at_the_command_limit(start, upstream):
    """RCPT 1..100 answered as usual, 101..1000 with 452 4.5.3, and the
    1001st RCPT of the session is over command_call_limit: 421 4.7.0 and
    the connection closed. The rest of the 10,000 is never read."""
    relay = start()
    pair = relay.main
    limits = relay.config.limits
    assert (limits.max_recipients, limits.command_call_limit) == (100, 1000)
    client = Client(relay.port).hello()
    assert client.command(f"MAIL FROM:<{pair.buyer}>").code == 250
    addresses = rcpt_addresses(pair, relay.config.domain, 10_000)
    got = send_pipelined(client, [f"RCPT TO:<{a}>" for a in addresses])
    expected = [expected_rcpt_reply(i, 100) for i in range(1000)] + [(421, "4.7.0")]
    assert [r.key for r in got] == expected, f"{len(got)} replies, last {got[-1]}"
    assert got[-1].text == "RCPT sent too many times"
    assert client.closed_by_server()
    assert upstream.messages == []
    serve_honest_client(relay, upstream)


def test_a_thousand_and_one_noops(start, upstream):
    relay = start()
    assert relay.config.limits.command_call_limit == 1000
    other = Client(relay.port).hello()
    client = Client(relay.port).hello()
    got = send_pipelined(client, ["NOOP"] * 1001)
    assert [r.code for r in got[:1000]] == [250] * 1000
    assert len(got) == 1001 and got[1000].key == (421, "4.7.0"), got[-1]
    assert got[1000].text == "NOOP sent too many times"
    assert client.closed_by_server()
    # Another session, open all along, is unaffected; new ones are served.
    assert other.command("NOOP").code == 250
    serve_honest_client(relay, upstream)


# --- timeouts -------------------------------------------------------------------

def wait_for_close(client: Client, bound: float) -> Reply:
    """The reply the server sends before closing by itself (within `bound`)."""
    assert client.poll(bound), f"nothing from the server within {bound} s"
    reply = client.reply()
    assert client.closed_by_server(), f"not closed after {reply}"
    return reply


@pytest.mark.parametrize("stage", ["after-greeting", "after-ehlo", "in-transaction"])
def test_idle_timeout(start, upstream, stage):
    relay = start(limits={"idle_timeout": 1.0})
    pair = relay.main
    client = Client(relay.port)
    assert client.greeting().code == 220
    if stage != "after-greeting":
        client.ehlo()
    if stage == "in-transaction":
        assert client.command(f"MAIL FROM:<{pair.buyer}>").code == 250
        assert client.command(f"RCPT TO:<{pair.seller_alias}>").code == 250
    reply = wait_for_close(client, bound=15)
    assert reply.key == (421, "4.4.2"), reply
    assert upstream.messages == []


def test_idle_timeout_counts_from_the_last_complete_line(start):
    """A command dribbled one byte per 0.5 s never completes a line within
    the idle timeout: cut off, though bytes keep arriving."""
    relay = start(limits={"idle_timeout": 1.0})
    client = Client(relay.port).hello()
    for byte in b"NOOP NOOP NOOP NOOP\r\n" * 3:
        if client.poll(0.5):
            break
        try:
            client.send(bytes([byte]))
        except OSError:
            break
    else:
        pytest.fail("not cut off while dribbling for 30 s")
    reply = wait_for_close(client, bound=5)
    assert reply.key == (421, "4.4.2"), reply


def dribble(client: Client, data: bytes, every: float, piece: int = 3) -> bool:
    """Send `data` a few bytes at a time; True when the server spoke (or
    closed) before all of it was sent."""
    for at in range(0, len(data), piece):
        if client.poll(every):
            return True
        try:
            client.send(data[at:at + piece])
        except OSError:
            return True
    return client.poll(every)


def test_slowloris_data_is_cut_at_the_data_timeout(start, upstream):
    relay = start(limits={"data_timeout": 2.0})
    pair = relay.main
    client = Client(relay.port).hello()
    assert client.command(f"MAIL FROM:<{pair.buyer}>").code == 250
    assert client.command(f"RCPT TO:<{pair.seller_alias}>").code == 250
    assert client.command("DATA").code == 354
    # 3 bytes per 0.5 s: the message would take about a minute; the
    # DATA transfer gets 2 s.
    raw = message(pair.buyer, pair.seller_alias) + b".\r\n"
    assert len(raw) > 3 * 40
    assert dribble(client, raw[:3 * 40], every=0.5), "not cut off after 20 s of dribbling"
    reply = wait_for_close(client, bound=5)
    assert reply.key == (421, "4.4.2"), reply
    assert upstream.messages == []
    serve_honest_client(relay, upstream)


def test_session_timeout_cuts_a_busy_session(start, upstream):
    """A NOOP every 0.5 s keeps the idle timer happy; the session as a
    whole still ends at session_timeout."""
    relay = start(limits={"idle_timeout": 1.5, "data_timeout": 1.5, "session_timeout": 3.0})
    client = Client(relay.port).hello()
    for _ in range(40):  # at most 20 s
        if client.poll(0.5):  # the server spoke first
            reply = client.reply()
            break
        client.send(b"NOOP\r\n")
        reply = client.reply()
        if reply.code != 250:
            break
    else:
        pytest.fail("session not cut off within 20 s")
    assert reply.key == (421, "4.4.2"), reply
    assert client.closed_by_server()
