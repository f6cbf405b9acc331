"""Threading across replies, attachments that must arrive untouched, and
many clients at once."""

from __future__ import annotations

import base64
import email
import os
import smtplib
import threading
from email import policy
from email.message import EmailMessage

from support import message


def send(relay, sender, recipient, raw):
    with smtplib.SMTP(relay.host, relay.port, timeout=60) as client:
        assert client.sendmail(sender, [recipient], raw) == {}


def headers_of(received):
    msg = email.message_from_bytes(received.data, policy=policy.default)
    return msg["Message-ID"], msg["In-Reply-To"], msg["References"]


def test_threading_across_three_replies(relay, upstream):
    pair = relay.pair()
    # 1. The buyer asks.
    send(relay, pair.buyer, pair.seller_alias,
         message(pair.buyer, pair.seller_alias, message_id="<b1@mail.example>"))
    r1, irt, refs = headers_of(upstream.wait_for(1)[0])
    assert r1.endswith("@marketplace.example>") and "b1@mail.example" not in r1
    assert irt is None and refs is None

    # 2. The seller's client replies to what it saw (r1).
    send(relay, pair.seller, pair.buyer_alias,
         message(pair.seller, pair.buyer_alias, message_id="<s1@shop.example>",
                 headers={"In-Reply-To": r1, "References": r1}))
    r2, irt, refs = headers_of(upstream.wait_for(2)[1])
    # The buyer's client sees its own original id.
    assert (irt, refs) == ("<b1@mail.example>", "<b1@mail.example>")
    assert "s1@shop.example" not in r2

    # 3. The buyer replies to r2, quoting the whole thread.
    send(relay, pair.buyer, pair.seller_alias,
         message(pair.buyer, pair.seller_alias, message_id="<b2@mail.example>",
                 headers={"In-Reply-To": r2, "References": f"<b1@mail.example> {r2}"}))
    r3, irt, refs = headers_of(upstream.wait_for(3)[2])
    # The seller sees its own id for its message and the relay id it got for b1.
    assert irt == "<s1@shop.example>"
    assert refs == f"{r1} <s1@shop.example>"

    # 4. The seller replies once more, with a stray id from elsewhere.
    send(relay, pair.seller, pair.buyer_alias,
         message(pair.seller, pair.buyer_alias, message_id="<s2@shop.example>",
                 headers={"In-Reply-To": r3,
                          "References": f"{r1} <s1@shop.example> {r3} <other@internal.shop.example>"}))
    _, irt, refs = headers_of(upstream.wait_for(4)[3])
    assert irt == "<b2@mail.example>"
    assert refs == f"<b1@mail.example> {r2} <b2@mail.example>"
    delivered = b"".join(m.data for m in upstream.messages)
    assert b"internal.shop.example" not in delivered
    for own_id in (b"b1@mail.example", b"b2@mail.example"):
        # buyer ids only ever go to the buyer
        assert all(own_id not in m.data for m in upstream.messages if m.rcpt_tos == [pair.seller])


def test_attachment_arrives_byte_identical(relay, upstream):
    pair = relay.pair()
    pdf = b"%PDF-1.4\n" + os.urandom(50_000) + b"\n%%EOF\n"
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = pair.buyer
    msg["To"] = pair.seller_alias
    msg["Subject"] = "invoice"
    msg.set_content(f"See attached, from {pair.buyer}.\n")
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="invoice.pdf")
    raw = msg.as_bytes()
    send(relay, pair.buyer, pair.seller_alias, raw)
    [got] = upstream.wait_for(1)
    out = email.message_from_bytes(got.data, policy=policy.default)
    [attachment] = list(out.iter_attachments())
    assert attachment.get_content() == pdf
    # Not only the decoded bytes: the encoded part is exactly as sent.
    encoded = base64.encodebytes(pdf).replace(b"\n", b"\r\n")
    assert encoded in raw and encoded in got.data
    assert pair.buyer.encode() not in got.data


def test_twenty_concurrent_clients_lose_and_duplicate_nothing(relay, upstream):
    pair = relay.pair()
    errors = []

    def client(n):
        try:
            send(relay, pair.buyer, pair.seller_alias,
                 message(pair.buyer, pair.seller_alias, subject=f"message {n}",
                         message_id=f"<c{n}@mail.example>"))
        except Exception as exc:  # collected and asserted below
            errors.append((n, exc))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    got = upstream.wait_for(20)
    subjects = sorted(email.message_from_bytes(m.data)["Subject"] for m in got)
    assert subjects == sorted(f"message {n}" for n in range(20))
    rows = relay.archive_rows()
    assert len(rows) == 20 and {row["verdict"] for row in rows} == {"delivered"}
    # One unbroken chain even under concurrency.
    assert all(b["prev_sha256"] == a["row_sha256"] for a, b in zip(rows, rows[1:]))
    relay_ids = {email.message_from_bytes(m.data)["Message-ID"] for m in got}
    assert len(relay_ids) == 20
