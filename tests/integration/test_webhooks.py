"""Webhooks to a real HTTP receiver (aiohttp on loopback, in a thread): a
delivered, a refused and a bounced message each make one signed event; a
receiver that fails is tried again with backoff; a receiver that hangs
holds up no mail; events wait in the store across a restart. The
signature is checked here with hmac itself, as a marketplace would, not
with the relay's own function alone."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import re
import smtplib
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import pytest
from aiohttp import web

from relay import events
from relay.config import WebhooksConfig
from archive_support import relay_cli
import support
from support import Clock, RunningRelay, closed_port, make_config, message, upstream_url
from test_api import cli_config
from test_bounces import dsn, send_dsn

SECRET = b"9f2c4e6a8b0d1f3e5a7c9b1d3f5e7a9c0b2d4f6e8a0c2e4f6a8b0d2f4e6a8c0e"


@dataclass
class Post:
    headers: dict
    body: bytes

    @property
    def document(self) -> dict:
        return json.loads(self.body)


class Receiver:
    """The marketplace's endpoint: records every POST, answers each with
    the next of `statuses` (then 204), and while `hold()` is on keeps its
    answer back until `release()`."""

    def __init__(self, port: int = 0):
        self.port = port
        self.posts: list[Post] = []
        self.statuses: list[int] = []
        self.answered = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._gate: asyncio.Event | None = None
        self._runner = None

    def start(self) -> "Receiver":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self):
        self._gate = asyncio.Event()
        self._gate.set()
        app = web.Application()
        app.router.add_post("/relay/events", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            self.posts.append(Post(dict(request.headers), body))
            status = self.statuses.pop(0) if self.statuses else 204
        await self._gate.wait()
        with self._lock:
            self.answered += 1
        return web.Response(status=status)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/relay/events"

    def hold(self):
        self._loop.call_soon_threadsafe(self._gate.clear)

    def release(self):
        self._loop.call_soon_threadsafe(self._gate.set)

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Post]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.posts) >= count:
                    return list(self.posts)
            time.sleep(0.02)
        raise AssertionError(f"receiver got {len(self.posts)} POST(s), expected {count}")

    def stop(self):
        self.release()
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def receiver():
    receiver = Receiver().start()
    yield receiver
    receiver.stop()


def webhook_config(tmp_path, upstream, url: str, **settings):
    secret_file = tmp_path / "webhook.key"
    secret_file.write_bytes(SECRET + b"\n")  # the relay reads the text without its newline
    webhooks = WebhooksConfig(url=url, secret_file=str(secret_file), timeout=5.0, retry_seconds=0.2,
                              max_retry_seconds=1.0, **settings)
    return make_config(tmp_path, upstream_url(upstream), webhooks=webhooks)


@pytest.fixture
def make_relay():
    started = []

    def start(config) -> RunningRelay:
        relay = RunningRelay(config)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


def send(relay, sender: str, alias: str, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP(relay.host, relay.port) as client:
        try:
            client.sendmail(sender, [alias], data)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error
        return 250, client.noop()[1]  # sendmail keeps DATA's reply to itself


def deliver(relay, sender: str, alias: str, data: bytes) -> int:
    """Send one message; the archive id its 250 names."""
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo()
        assert client.mail(sender)[0] == 250
        assert client.rcpt(alias)[0] == 250
        code, text = client.data(data)
    assert code == 250, text
    return int(re.search(rb"\(archive (\d+)\)", text).group(1))


def assert_signed(post: Post, now: float) -> None:
    """The checks docs/webhooks.md tells a receiver to make, made with hmac
    itself; and the relay's own `events.verify` agrees, and refuses a body
    changed by one byte."""
    timestamp = post.headers["Relay-Timestamp"]
    expected = hmac.new(SECRET, timestamp.encode() + b"." + post.body, hashlib.sha256).hexdigest()
    assert post.headers["Relay-Signature"] == f"v1={expected}"
    assert abs(now - int(timestamp)) < 300
    assert events.verify(SECRET, post.body, timestamp, post.headers["Relay-Signature"], now)
    assert not events.verify(SECRET, post.body.replace(b"}", b" }", 1), timestamp,
                             post.headers["Relay-Signature"], now)
    assert not events.verify(SECRET, post.body, timestamp, post.headers["Relay-Signature"], now + 3600)
    assert post.headers["Content-Type"] == "application/json"
    assert post.headers["Relay-Event"] == post.document["type"]
    assert post.headers["Relay-Event-Id"] == str(post.document["id"])


def stored_events(relay) -> list[dict]:
    return relay.call(relay.store.webhook_events())[::-1]


# Retries, a restart and a second relay's start-up fit in 20 s on a slow CI machine.
wait_until = functools.partial(support.wait_until, timeout=20.0)


def all_sent(relay) -> list[dict]:
    """The stored events, once there are some and every one was sent; else []."""
    found = stored_events(relay)
    return found if found and all(e["sent_at"] for e in found) else []


def test_delivered_and_refused_messages_each_make_one_signed_event(tmp_path, upstream, receiver, make_relay):
    relay = make_relay(webhook_config(tmp_path, upstream, receiver.url))
    pair = relay.pair()
    delivered_id = deliver(relay, pair.buyer, pair.seller_alias, message(pair.buyer, pair.seller_alias))
    # The envelope is the buyer's, the From a stranger's: refused after DATA, and archived.
    code, _ = send(relay, pair.buyer, pair.seller_alias, message("stranger@else.example", pair.seller_alias))
    assert code == 550
    posts = receiver.wait_for(2)
    by_type = {post.document["type"]: post for post in posts}
    assert sorted(by_type) == ["message.delivered", "message.refused"]
    for post in posts:
        assert_signed(post, time.time())
        # Aliases and ids only: no party's real address.
        assert pair.buyer.encode() not in post.body and pair.seller.encode() not in post.body
    delivered = by_type["message.delivered"].document
    assert delivered["data"]["archive_id"] == delivered_id
    assert (delivered["data"]["relationship"], delivered["data"]["direction"], delivered["data"]["verdict"]) == (
        pair.relationship_id, "buyer_to_seller", "delivered")
    assert delivered["data"]["reply"].startswith("250 2.0.0")
    refused = by_type["message.refused"].document["data"]
    assert refused["verdict"] == "rejected" and refused["reply"].startswith("550 5.7.")
    assert refused["archive_id"] == delivered_id + 1
    # What an archive row says and what its event says agree (one transaction wrote both).
    row = relay.archive(refused["archive_id"])
    assert (row["reply"], row["received_at"]) == (refused["reply"], refused["received_at"])
    rows = wait_until(lambda: all_sent(relay), "both events sent")
    assert [(e["event"], e["attempts"], e["next_attempt_at"], e["last_error"]) for e in rows] == [
        ("message.delivered", 1, None, ""), ("message.refused", 1, None, "")]
    # The same bytes as the row makes: a retry would send this body again.
    for event in rows:
        sent = next(p for p in posts if p.document["id"] == event["id"])
        assert sent.body == events.body(event["id"], event["event"], event["created_at"], event["data"])


def test_a_failing_receiver_is_retried_and_a_hanging_one_holds_up_no_mail(tmp_path, upstream, receiver,
                                                                          make_relay):
    relay = make_relay(webhook_config(tmp_path, upstream, receiver.url))
    pair = relay.pair()
    receiver.statuses = [500, 503]
    receiver.hold()
    first = deliver(relay, pair.buyer, pair.seller_alias, message(pair.buyer, pair.seller_alias))
    receiver.wait_for(1)
    # The first event's POST is open and unanswered; mail goes on all the same.
    second = deliver(relay, pair.seller, pair.buyer_alias,
                     message(pair.seller, pair.buyer_alias, subject="Re: Hello", message_id="<m2@shop.example>"))
    assert len(upstream.wait_for(2)) == 2
    assert receiver.answered == 0
    receiver.release()
    # The first two POSTs were answered 500 and 503; each event is sent at its next attempt.
    events_by_archive = {e["archive_id"]: e for e in wait_until(lambda: all_sent(relay), "both events sent")}
    assert sorted(events_by_archive) == [first, second]
    posts = receiver.posts
    assert len(posts) == sum(e["attempts"] for e in events_by_archive.values()) == 4
    for archive_id, event in events_by_archive.items():
        tries = [p for p in posts if p.document["data"]["archive_id"] == archive_id]
        assert len(tries) == event["attempts"] >= 2
        assert {p.document["id"] for p in tries} == {event["id"]}  # the same event each time
        assert len({p.body for p in tries}) == 1  # and the same body
        for post in tries:
            assert_signed(post, time.time())
        assert event["last_error"] == ""  # cleared once sent
    metrics = relay.threaded.server.metrics.webhooks
    assert metrics.labels("message.delivered", "failed")._value.get() == 2
    assert metrics.labels("message.delivered", "sent")._value.get() == 2


def test_events_wait_in_the_store_across_a_restart(tmp_path, upstream, make_relay):
    port = closed_port()
    config = webhook_config(tmp_path, upstream, f"http://127.0.0.1:{port}/relay/events")
    relay = make_relay(config)
    pair = relay.pair()
    archive_id = deliver(relay, pair.buyer, pair.seller_alias, message(pair.buyer, pair.seller_alias))
    assert len(upstream.wait_for(1)) == 1  # delivered while the marketplace is down
    [event] = wait_until(lambda: [e for e in stored_events(relay) if e["attempts"] >= 2], "a second failed attempt")
    assert event["sent_at"] is None and "Connect" in event["last_error"]
    relay.stop()
    receiver = Receiver(port).start()
    try:
        again = make_relay(config)  # the same database
        [post] = receiver.wait_for(1)
        assert (post.document["id"], post.document["data"]["archive_id"]) == (event["id"], archive_id)
        assert_signed(post, time.time())
        [sent] = wait_until(lambda: all_sent(again), "the event sent after the restart")
        assert sent["attempts"] > event["attempts"] and sent["next_attempt_at"] is None
    finally:
        receiver.stop()


def test_a_bounce_makes_a_bounced_event(tmp_path, upstream, receiver, make_relay):
    relay = make_relay(webhook_config(tmp_path, upstream, receiver.url, events=("message.bounced",)))
    pair = relay.pair()
    archive_id = deliver(relay, pair.seller, pair.buyer_alias, message(pair.seller, pair.buyer_alias))
    [original] = upstream.wait_for(1)
    code, text = send_dsn(relay, original.mail_from, dsn(original.mail_from, pair.buyer))
    assert code == 250, text
    [post] = receiver.wait_for(1)  # delivered is not among `events`: only the bounce is sent
    assert_signed(post, time.time())
    document = post.document
    assert document["type"] == "message.bounced"
    [bounce] = relay.call(relay.store.bounces_for(archive_id))
    assert document["data"] == {
        "bounce_id": bounce["id"], "archive_id": archive_id, "relationship": pair.relationship_id,
        "received_at": bounce["received_at"], "action": "failed", "status": "5.1.1", "detector": "rfc3464",
        "notified": True}
    assert [e["event"] for e in stored_events(relay)] == ["message.bounced"]


def test_an_event_is_given_up_at_its_age_and_sent_again_by_the_operator(tmp_path, upstream, receiver):
    clock = Clock()
    relay = RunningRelay(webhook_config(tmp_path, upstream, receiver.url, max_age_hours=1), clock=clock)
    try:
        pair = relay.pair()
        receiver.statuses = [500, 500]
        archive_id = deliver(relay, pair.buyer, pair.seller_alias, message(pair.buyer, pair.seller_alias))
        wait_until(lambda: [e for e in stored_events(relay) if e["attempts"] == 1 and e["last_error"]],
                   "the first attempt failed")
        clock.now += timedelta(hours=2)  # the retry comes due past the event's max age: the last attempt
        [event] = wait_until(lambda: [e for e in stored_events(relay)
                                      if e["attempts"] == 2 and e["next_attempt_at"] is None], "the event given up")
        assert (event["sent_at"], event["last_error"]) == (None, "HTTP 500 Internal Server Error")
        assert relay.threaded.server.metrics.webhooks.labels("message.delivered", "given_up")._value.get() == 1
        # The operator sees it and, the endpoint fixed, sends it again.
        config = cli_config(relay, tmp_path / "cli")
        [listed] = json.loads(relay_cli(config, "webhooks", "list", "--unsent", "--json").stdout)
        assert (listed["event_id"], listed["archive_id"], listed["state"], listed["attempts"]) == (
            event["id"], archive_id, "given_up", 2)
        retried = relay_cli(config, "webhooks", "retry", str(event["id"]))
        assert retried.returncode == 0, retried.stderr
        [sent] = wait_until(lambda: all_sent(relay), "the retried event sent")
        assert sent["attempts"] == 3 and len(receiver.posts) == 3
        assert json.loads(relay_cli(config, "webhooks", "list", "--unsent", "--json").stdout) == []
        missing = relay_cli(config, "webhooks", "retry", str(event["id"]))  # sent: nothing to retry
        assert missing.returncode == 1 and "no unsent webhook event" in missing.stderr
    finally:
        relay.stop()


def test_without_a_url_no_event_is_written(relay, upstream):
    pair = relay.pair()
    deliver(relay, pair.buyer, pair.seller_alias, message(pair.buyer, pair.seller_alias))
    assert relay.threaded.server.webhooks is None
    assert stored_events(relay) == []
