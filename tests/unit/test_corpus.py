"""Every message of CPython's email test corpus goes through the whole
pipeline: delivered, or refused with a permanent reason. Never an exception,
never a transient (4xx) answer for a cause that would recur on every retry."""

from __future__ import annotations

import email.utils
from datetime import datetime, timezone
from pathlib import Path

import pytest

from relay import pipeline
from relay.config import PolicyConfig
from relay.replies import SmtpError
from relay.store import Party

from corpus import CANDIDATES, CORPUS, CORPUS_DIR


def test_the_corpus_is_there():
    # .ci/run installs Debian's libpython3.11-testsuite where Python lacks it.
    assert CORPUS_DIR is not None, f"no CPython email test data in {CANDIDATES}"
    assert len(CORPUS) >= 40


def context_for(raw: bytes) -> pipeline.Context:
    message = pipeline.parse(raw)
    sender = "someone@corpus.example"
    try:
        found = email.utils.getaddresses([str(v) for v in message.get_all("From", [])])
        if found and found[0][1]:
            sender = found[0][1].lower()
    except Exception:  # an unparsable From: the sender check refuses it
        pass
    return pipeline.Context(
        domain="marketplace.example", hostname="marketplace.example", direction="buyer_to_seller",
        sender=Party(1, "buyer", sender, "Corpus Sender"),
        recipient=Party(2, "seller", "seller@shop.example", "Seller"),
        sender_alias="bbbbbbbbbbbbbbbb@marketplace.example",
        recipient_alias="ssssssssssssssss@marketplace.example",
        relay_message_id="<r1@marketplace.example>",
        received_at=datetime(2026, 11, 27, tzinfo=timezone.utc), transaction_id="t1",
        policy=PolicyConfig(redact_phone_numbers=True),
    )


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_corpus_message(path: Path):
    raw = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    changes: list[str] = []
    try:
        result = pipeline.process(pipeline.parse(raw), context_for(raw), changes)
    except SmtpError as refusal:
        assert refusal.reply.permanent, refusal.reply
        assert changes and changes[-1].startswith("refused:"), changes
        return
    # Delivered: parseable, CRLF throughout, and the relay's own headers on it.
    assert b"\n" not in result.delivered.replace(b"\r\n", b"")
    out = email.message_from_bytes(result.delivered)
    assert out["Message-ID"] == "<r1@marketplace.example>"
    assert out["X-Relay-Policy"]
