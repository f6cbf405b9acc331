"""Threading ids (DESIGN §3): which ids the handler looks up, and how
`rewrite.translate_ids` maps the ids one party's client wrote to ids the
other party's client knows. Pure functions, no store: the Message-ID map
rows are written out by hand.
"""

from __future__ import annotations

import pytest

from relay import pipeline
from relay.pipeline.message import MAX_REFERENCES
from relay.pipeline.rewrite import translate_ids
from relay.store import MessageIdRow

BUYER, SELLER = 1, 2

# The map of one relationship. Each row: who wrote the message, the id the
# writer's client gave it, the id the relay delivered it under.
B1 = MessageIdRow(sender_id=BUYER, original_id="<b1@mail.example>", relay_id="<rb1@marketplace.example>")
B2 = MessageIdRow(sender_id=BUYER, original_id="<b2@mail.example>", relay_id="<rb2@marketplace.example>")
S1 = MessageIdRow(sender_id=SELLER, original_id="<s1@shop.example>", relay_id="<rs1@marketplace.example>")
# Sent through the relay's submission listener without a Message-ID.
S2 = MessageIdRow(sender_id=SELLER, original_id=None, relay_id="<rs2@marketplace.example>")
# A hostile buyer gave its message the relay id of one of the seller's.
B_CLASH = MessageIdRow(sender_id=BUYER, original_id="<rs1@marketplace.example>", relay_id="<rb9@marketplace.example>")
ROWS = (B1, B2, S1, S2)

# Clients that minted 8-bit ids (raw UTF-8, latin-1): the email package
# spells each 8-bit byte as a surrogate, and so do the store's rows.
B8 = MessageIdRow(sender_id=BUYER, original_id="<b\udcc3\udcbc8@mail.example>",
                  relay_id="<rb8@marketplace.example>")
S8 = MessageIdRow(sender_id=SELLER, original_id="<s\udcfc8@shop.example>", relay_id="<rs8@marketplace.example>")

MANY_ROWS = tuple(
    MessageIdRow(sender_id=SELLER, original_id=f"<s{i}@shop.example>", relay_id=f"<rs{i}@marketplace.example>")
    for i in range(100, 180)
)

# (id, ids in the sender's message, rows, sender, recipient, expected ids out)
TRANSLATIONS = [
    # The buyer replies to the seller.
    ("recipient-message-by-relay-id", ["<rs1@marketplace.example>"], ROWS, BUYER, SELLER,
     ["<s1@shop.example>"]),
    ("recipient-message-without-original-id", ["<rs2@marketplace.example>"], ROWS, BUYER, SELLER,
     ["<rs2@marketplace.example>"]),
    ("sender-own-original-id", ["<b1@mail.example>"], ROWS, BUYER, SELLER,
     ["<rb1@marketplace.example>"]),
    ("sender-own-relay-id-stays", ["<rb1@marketplace.example>"], ROWS, BUYER, SELLER,
     ["<rb1@marketplace.example>"]),
    ("recipient-own-original-id-stays", ["<s1@shop.example>"], ROWS, BUYER, SELLER,
     ["<s1@shop.example>"]),
    ("unknown-id-dropped", ["<CAFoo=bar@mail.gmail.example>"], ROWS, BUYER, SELLER, []),
    ("id-that-is-the-senders-address-dropped", ["<buyer@mail.example>"], ROWS, BUYER, SELLER, []),
    ("order-kept-unknown-dropped",
     ["<b1@mail.example>", "<x@laptop.mail.example>", "<rs1@marketplace.example>", "<rs2@marketplace.example>"],
     ROWS, BUYER, SELLER,
     ["<rb1@marketplace.example>", "<s1@shop.example>", "<rs2@marketplace.example>"]),
    ("two-spellings-of-one-message-collapse",
     ["<rs1@marketplace.example>", "<s1@shop.example>", "<rs1@marketplace.example>"], ROWS, BUYER, SELLER,
     ["<s1@shop.example>"]),
    ("nothing-in", [], ROWS, BUYER, SELLER, []),
    ("no-rows", ["<rs1@marketplace.example>", "<b1@mail.example>"], (), BUYER, SELLER, []),
    # The seller replies to the buyer: the same map read the other way.
    ("reverse-recipient-message-by-relay-id", ["<rb1@marketplace.example>"], ROWS, SELLER, BUYER,
     ["<b1@mail.example>"]),
    ("reverse-sender-own-original-id", ["<s1@shop.example>"], ROWS, SELLER, BUYER,
     ["<rs1@marketplace.example>"]),
    ("reverse-sender-message-without-original-id", ["<rs2@marketplace.example>"], ROWS, SELLER, BUYER,
     ["<rs2@marketplace.example>"]),
    ("reverse-whole-thread",
     ["<b1@mail.example>", "<s1@shop.example>", "<rb2@marketplace.example>"], ROWS, SELLER, BUYER,
     ["<b1@mail.example>", "<rs1@marketplace.example>", "<b2@mail.example>"]),
    # Relay ids win over a clashing original id: the seller's client gets
    # its own id back, not the hostile buyer's message.
    ("clashing-original-id", ["<rs1@marketplace.example>"], ROWS + (B_CLASH,), BUYER, SELLER,
     ["<s1@shop.example>"]),
    # 8-bit ids are looked up like any other, but never written: the relay
    # id of their message stands in for the recipient's own 8-bit id.
    ("recipient-8bit-original-by-relay-id", ["<rs8@marketplace.example>"], ROWS + (S8,), BUYER, SELLER,
     ["<rs8@marketplace.example>"]),
    ("recipient-8bit-original-id-as-is", ["<s\udcfc8@shop.example>"], ROWS + (S8,), BUYER, SELLER,
     ["<rs8@marketplace.example>"]),
    ("sender-8bit-own-original-id", ["<b\udcc3\udcbc8@mail.example>"], ROWS + (B8,), BUYER, SELLER,
     ["<rb8@marketplace.example>"]),
    ("unknown-8bit-id-dropped", ["<x\udcff@mail.example>", "<rs1@marketplace.example>"], ROWS, BUYER, SELLER,
     ["<s1@shop.example>"]),
    # At most MAX_REFERENCES out, the newest ones.
    ("eighty-known-keeps-last-fifty", [row.relay_id for row in MANY_ROWS], MANY_ROWS, BUYER, SELLER,
     [row.original_id for row in MANY_ROWS][-MAX_REFERENCES:]),
    ("five-hundred-mostly-unknown",
     [f"<junk{i}@mail.example>" for i in range(420)] + [row.relay_id for row in MANY_ROWS], MANY_ROWS, BUYER, SELLER,
     [row.original_id for row in MANY_ROWS][-MAX_REFERENCES:]),
]


@pytest.mark.parametrize(
    "ids, rows, sender, recipient, expected",
    [pytest.param(*case[1:], id=case[0]) for case in TRANSLATIONS],
)
def test_translate_ids(ids, rows, sender, recipient, expected):
    assert translate_ids(ids, rows, sender, recipient) == expected


def _message(*headers: str) -> bytes:
    return ("From: buyer@mail.example\r\n" + "".join(f"{h}\r\n" for h in headers) + "\r\nhi\r\n").encode("ascii")


def _refs(ids) -> str:
    return "References: " + "\r\n ".join(ids)


THREAD = [f"<m{i}@mail.example>" for i in range(60)]

# (id, message headers, ids that must be looked up, ids that must not)
LOOKUPS = [
    ("short-thread-all",
     ["Message-ID: <own@mail.example>", "In-Reply-To: <m2@mail.example>", _refs(THREAD[:3])],
     ["<own@mail.example>", *THREAD[:3]], []),
    # A thread of 60 messages: the parent is the last of References and in
    # In-Reply-To; the oldest ids are the ones to go.
    ("long-thread-keeps-parent-and-own-id",
     ["Message-ID: <own@mail.example>", "In-Reply-To: <m59@mail.example>", _refs(THREAD)],
     ["<own@mail.example>", "<m59@mail.example>", *THREAD[-MAX_REFERENCES:]], THREAD[:8]),
    ("long-thread-parent-missing-from-references",
     ["Message-ID: <own@mail.example>", "In-Reply-To: <parent@mail.example>", _refs(THREAD)],
     ["<own@mail.example>", "<parent@mail.example>"], THREAD[:9]),
    ("five-hundred-references",
     ["Message-ID: <own@mail.example>", "In-Reply-To: <p@mail.example>",
      _refs(f"<n{i}@mail.example>" for i in range(500))],
     ["<own@mail.example>", "<p@mail.example>", "<n499@mail.example>", "<n450@mail.example>"],
     ["<n0@mail.example>", "<n449@mail.example>"]),
]


@pytest.mark.parametrize(
    "headers, looked_up, not_looked_up",
    [pytest.param(*case[1:], id=case[0]) for case in LOOKUPS],
)
def test_referenced_ids(headers, looked_up, not_looked_up):
    ids = pipeline.referenced_ids(pipeline.parse(_message(*headers)))
    assert len(ids) <= MAX_REFERENCES + 2
    assert len(ids) == len(set(ids))
    for msgid in looked_up:
        assert msgid in ids
    for msgid in not_looked_up:
        assert msgid not in ids
