"""Round trip: a message with nothing prohibited keeps every MIME part
byte-identical; only the top-level header is rewritten."""

from __future__ import annotations

import email
import sys
from datetime import datetime, timezone
from email import policy
from pathlib import Path

from relay import pipeline
from relay.config import PolicyConfig
from relay.store import Party

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from newsletter import leaf_parts, newsletter  # noqa: E402


def context(phones: bool = False) -> pipeline.Context:
    return pipeline.Context(
        domain="marketplace.example", hostname="marketplace.example", direction="seller_to_buyer",
        sender=Party(1, "seller", "sam@shop.example", "Sam's Shop"),
        recipient=Party(2, "buyer", "bea@mail.example", "Bea"),
        sender_alias="ssssssssssssssss@marketplace.example",
        recipient_alias="bbbbbbbbbbbbbbbb@marketplace.example",
        relay_message_id="<r1@marketplace.example>",
        received_at=datetime(2026, 11, 27, tzinfo=timezone.utc), transaction_id="t1",
        policy=PolicyConfig(redact_phone_numbers=phones),
        latest_order_at=datetime(2026, 11, 20, tzinfo=timezone.utc),
    )


def test_newsletter_parts_are_byte_identical():
    raw = newsletter("sam@shop.example", "bbbbbbbbbbbbbbbb@marketplace.example")
    changes: list[str] = []
    result = pipeline.process(pipeline.parse(raw), context(), changes)
    assert leaf_parts(result.delivered) == leaf_parts(raw)
    assert len(leaf_parts(raw)) == 5  # text, html, two images, pdf
    out = email.message_from_bytes(result.delivered, policy=policy.default)
    assert out["X-Relay-Policy"] == "clean"
    assert not any(change.startswith(("removed", "normalized")) for change in changes), changes


def test_phone_redaction_leaves_order_ids_and_prices_alone():
    raw = newsletter("sam@shop.example", "bbbbbbbbbbbbbbbb@marketplace.example")
    result = pipeline.process(pipeline.parse(raw), context(phones=True), [])
    assert leaf_parts(result.delivered) == leaf_parts(raw)
