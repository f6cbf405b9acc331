"""The marketplace's events as pure functions (relay/events.py): which
verdict makes which event, the body a stored row makes, the signature
against a vector computed outside the relay, a receiver's checks, and the
backoff that ends in giving up."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from relay import events

SECRET = b"whsec-test-0123456789abcdef0123456789abcdef"
# `printf '1765152000.{"id":1}' | openssl dgst -sha256 -hmac 'whsec-test-0123456789abcdef0123456789abcdef'`
VECTOR = "v1=01b49cd3ee1be030cf54405cc17be5699e327eb595adaf0f06a17c0b97667fe4"


@pytest.mark.parametrize("verdict, event", [
    ("delivered", "message.delivered"), ("rejected", "message.refused"), ("failed", "message.refused"),
    ("deferred", None)])
def test_each_verdict_makes_its_event(verdict, event):
    assert events.for_verdict(verdict) == event


def test_the_signature_is_hmac_sha256_over_timestamp_dot_body():
    assert events.signature(SECRET, 1765152000, b'{"id":1}') == VECTOR


def test_a_receiver_refuses_a_changed_body_another_key_and_an_old_timestamp():
    body = events.body(7, "message.delivered", "2026-12-07T10:00:00.000000Z", json.dumps({"archive_id": 3}))
    header = events.signature(SECRET, 1765152000, body)
    assert events.verify(SECRET, body, "1765152000", header, now=1765152100)
    assert not events.verify(SECRET, body + b" ", "1765152000", header, now=1765152100)
    assert not events.verify(b"another key of enough length, really", body, "1765152000", header, now=1765152100)
    assert not events.verify(SECRET, body, "1765152000", header, now=1765152000 + 301)
    assert not events.verify(SECRET, body, "not-a-number", header, now=1765152100)
    # Several signatures in one header (a key being rotated): one must match.
    assert events.verify(SECRET, body, "1765152000", f"v1=00, {header}", now=1765152100)


def test_the_body_is_the_same_bytes_every_time_and_keeps_unicode():
    data = json.dumps({"reply": "550 5.7.1 Nachricht abgelehnt: \u00fcberpr\u00fcfen"}, ensure_ascii=False)
    first = events.body(9, "message.refused", "2026-12-07T10:00:00.000000Z", data)
    assert first == events.body(9, "message.refused", "2026-12-07T10:00:00.000000Z", data)
    assert json.loads(first) == {"id": 9, "type": "message.refused", "created_at": "2026-12-07T10:00:00.000000Z",
                                 "data": {"reply": "550 5.7.1 Nachricht abgelehnt: \u00fcberpr\u00fcfen"}}
    assert "\u00fc".encode() in first


def test_backoff_doubles_to_its_cap_and_gives_up_past_the_age():
    assert [events.retry_delay(n, 30, 3600) for n in range(1, 10)] == [
        30, 60, 120, 240, 480, 960, 1920, 3600, 3600]
    created = datetime(2026, 12, 7, tzinfo=timezone.utc)
    age = timedelta(hours=72)
    now = created + timedelta(hours=10)
    assert events.next_attempt(now, created, 3, 30, 3600, age) == now + timedelta(seconds=120)
    late = created + timedelta(hours=71, minutes=30)
    assert events.next_attempt(late, created, 12, 30, 3600, age) is None  # an hour on would be past 72 h
