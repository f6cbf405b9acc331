"""Raw 8-bit bytes in headers, as real clients send them (issue 14 §2), end
to end: smtplib speaks to a running relay, a recording upstream gets what is
delivered, and the real `relay archive` command reads the archive. The
email package leaves such bytes as surrogates, which neither database
stores; a message with them in Message-ID, In-Reply-To or References used
to get `451 4.3.0 Temporary lookup failure` on every retry. Now the ids are
stored in one spelling per byte string (relay/store/common.py), threading
works across them, what is delivered carries only ASCII ids, and no header
of a real message, made 8-bit in any of three ways, gets a 4xx.

Runs on SQLite, and on PostgreSQL with RELAY_TEST_DATABASE=postgresql.
"""

from __future__ import annotations

import email
import json
import re
import smtplib
from email import policy

import pytest

from archive_support import relay_cli
from corpus import CORPUS_DIR
from support import message

FLAVOURS = {
    "utf8": "Bücher-€".encode("utf-8"),
    "latin1": "Bücher".encode("latin-1"),
    "invalid-utf8": b"\xff\xfe\x80",
}
THREADING = ("Message-ID", "In-Reply-To", "References")


def cli_config(folder, relay):
    """A config for the `relay` command on the running relay's database,
    with the files a PostgreSQL node must share (no listeners needed)."""
    config = relay.config
    lines = [f'database = "{config.database}"', "", "[dkim]", f'key_file = "{config.dkim.key_file}"', "",
             "[submission]", 'listen = ""', 'listen_tls = ""']
    if config.bounce.secret_file:
        lines += ["", "[bounce]", f'secret_file = "{config.bounce.secret_file}"']
    path = folder / "cli.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def send(client: smtplib.SMTP, sender: str, recipient: str, raw: bytes) -> tuple[int, bytes]:
    """The final reply to one message on an open session (smtplib resets
    the transaction after a refusal, so the session goes on)."""
    try:
        client.sendmail(sender, [recipient], raw)
    except smtplib.SMTPDataError as refused:
        return refused.smtp_code, refused.smtp_error
    return 250, b""


def header_values(data: bytes, name: str) -> list[bytes]:
    """The raw (unfolded) values of `name` in the top-level header of `data`."""
    head = data.split(b"\r\n\r\n", 1)[0]
    unfolded = re.sub(rb"\r\n[ \t]", b" ", head)
    prefix = name.lower().encode() + b":"
    return [line[len(prefix):].strip() for line in unfolded.split(b"\r\n") if line.lower().startswith(prefix)]


def assert_ascii_threading(data: bytes) -> None:
    for name in THREADING:
        for value in header_values(data, name):
            assert re.fullmatch(rb"[\x21-\x7e ]*", value), (name, value)


def with_8bit_ids(sender: str, to: str, flavour: bytes, own: bytes, references: bytes) -> bytes:
    raw = message(sender, to, subject="Threads", message_id="<OWN>",
                  headers={"In-Reply-To": "<REF>", "References": "<older@client.example> <REF>"})
    return raw.replace(b"<OWN>", own).replace(b"<REF>", references)


# --- the Done-when case: raw UTF-8 in References ---------------------------------------


def test_raw_utf8_references_is_delivered_threads_and_is_listed(relay, upstream, tmp_path):
    pair = relay.pair()
    earlier = "<früher-1@client.example>".encode("utf-8")
    raw = message(pair.buyer, pair.seller_alias, subject="About my order", message_id="<b1@client.example>",
                  headers={"References": "<EARLIER>", "In-Reply-To": "<EARLIER>"}).replace(b"<EARLIER>", earlier)
    assert earlier in raw
    with smtplib.SMTP(relay.host, relay.port, timeout=60) as client:
        code, text = send(client, pair.buyer, pair.seller_alias, raw)
        assert (code, text) == (250, b""), text
        [to_seller] = upstream.wait_for(1)
        # The unknown 8-bit id is dropped like any id the relay cannot translate.
        assert earlier not in to_seller.data
        assert_ascii_threading(to_seller.data)
        [relay_id] = header_values(to_seller.data, "Message-ID")

        # The seller answers the id it received: the buyer gets her own id back.
        answer = message(pair.seller, pair.buyer_alias, subject="Re: About my order", message_id="<s1@shop.example>",
                         headers={"In-Reply-To": relay_id.decode(), "References": relay_id.decode()})
        assert send(client, pair.seller, pair.buyer_alias, answer) == (250, b"")
    [_, to_buyer] = upstream.wait_for(2)
    assert header_values(to_buyer.data, "In-Reply-To") == [b"<b1@client.example>"]
    assert header_values(to_buyer.data, "References") == [b"<b1@client.example>"]

    config = cli_config(tmp_path, relay)
    listed = relay_cli(config, "archive", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert sorted(row["verdict"] for row in rows) == ["delivered", "delivered"]
    assert all(row["reply"].startswith("250 2.0.0") for row in rows)
    first = min(row["id"] for row in rows)
    shown = relay_cli(config, "archive", "show", str(first), "--raw")
    assert shown.returncode == 0, shown.stderr
    assert earlier in shown.stdout  # the archive keeps the bytes as received
    verified = relay_cli(config, "archive", "verify")
    assert verified.returncode == 0, verified.stderr


@pytest.mark.parametrize("flavour", FLAVOURS, ids=list(FLAVOURS))
def test_an_8bit_message_id_is_stored_once_and_found_again(relay, upstream, flavour):
    """The buyer's own Message-ID holds 8-bit bytes. Its map entry is found
    under the same bytes later (her next message's References) and under
    the relay id (the seller's answer, which an opted-out buyer receives
    only as a reply to her); the buyer's 8-bit id is never written out."""
    pair = relay.pair()
    relay.call(relay.store.set_opted_out(pair.buyer, True))
    bits = FLAVOURS[flavour]
    own = b"<" + bits + b"-1@client.example>"
    with smtplib.SMTP(relay.host, relay.port, timeout=60) as client:
        first = with_8bit_ids(pair.buyer, pair.seller_alias, bits, own, b"<" + bits + b"-0@client.example>")
        assert send(client, pair.buyer, pair.seller_alias, first) == (250, b"")
        [to_seller] = upstream.wait_for(1)
        assert_ascii_threading(to_seller.data)
        [relay_id] = header_values(to_seller.data, "Message-ID")
        assert header_values(to_seller.data, "References") == []  # nothing the relay knows yet

        answer = message(pair.seller, pair.buyer_alias, subject="Re: Threads", message_id="<s1@shop.example>",
                         headers={"In-Reply-To": relay_id.decode()})
        assert send(client, pair.seller, pair.buyer_alias, answer) == (250, b"")  # a reply: opt-out allows it
        [_, to_buyer] = upstream.wait_for(2)
        assert_ascii_threading(to_buyer.data)
        # Her own id would be 8-bit: the relay id of her message stands in.
        assert header_values(to_buyer.data, "In-Reply-To") == [relay_id]

        again = with_8bit_ids(pair.buyer, pair.seller_alias, bits, b"<b2@client.example>", own)
        assert send(client, pair.buyer, pair.seller_alias, again) == (250, b"")
        [_, _, to_seller_again] = upstream.wait_for(3)
    # The same bytes, the same map entry: the seller gets the id it received.
    assert header_values(to_seller_again.data, "In-Reply-To") == [relay_id]
    assert header_values(to_seller_again.data, "References") == [relay_id]
    rows = relay.archive_rows()
    assert [row["verdict"] for row in rows] == ["delivered"] * 3
    assert rows[0]["raw"] == first


# --- every header of a real message, made 8-bit --------------------------------------


CORPUS_MESSAGE = "msg_16.txt"  # the corpus message with the most headers, folded ones among them


def corpus_message() -> tuple[str, bytes]:
    """A real message (a DSN forwarded by a mailing list: Received chains,
    List-*, a multipart/report body) with CRLF line ends and, since it has
    none, an In-Reply-To and a References header; and its From address."""
    assert CORPUS_DIR is not None, "no CPython email test data (tests/corpus.py)"
    raw = (CORPUS_DIR / CORPUS_MESSAGE).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    head, body = raw.split(b"\r\n\r\n", 1)
    head += (b"\r\nIn-Reply-To: <0GK500B01D0B8Y@cougar.noc.ucla.edu>"
             b"\r\nReferences: <0GK500B01D0B8X@cougar.noc.ucla.edu>\r\n <0GK500B01D0B8Y@cougar.noc.ucla.edu>")
    sender = email.message_from_bytes(raw, policy=policy.default)["From"].addresses[0].addr_spec.lower()
    return sender, head + b"\r\n\r\n" + body


def fields(head: bytes) -> list[list[bytes]]:
    """The header block as fields, each a list of its lines (folded ones too)."""
    out: list[list[bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and out:
            out[-1].append(line)
        else:
            out.append([line])
    return out


def variants(raw: bytes, bits: bytes):
    """(field index, label, message) for every header: `bits` inside its
    first <…> (an id, an address, a URL) if it has one, and at the end of
    its first line."""
    head, body = raw.split(b"\r\n\r\n", 1)
    parsed = fields(head)
    for index, field in enumerate(parsed):
        name = field[0].split(b":", 1)[0].decode()
        first = field[0]
        spots = []
        if b"<" in first:
            spots.append(("inside <>", first.replace(b"<", b"<" + bits, 1)))
        spots.append(("at the end", first + bits))
        for where, changed in spots:
            new = parsed[:index] + [[changed, *field[1:]]] + parsed[index + 1:]
            yield index, f"{name} {where}", b"\r\n".join(b"\r\n".join(f) for f in new) + b"\r\n\r\n" + body


@pytest.mark.parametrize("flavour", FLAVOURS, ids=list(FLAVOURS))
def test_every_header_of_a_real_message_as_8bit_is_never_a_451(relay, upstream, tmp_path, flavour):
    sender, raw = corpus_message()
    pair = relay.pair(buyer=sender)
    cases = list(variants(raw, FLAVOURS[flavour]))
    assert {index for index, _, _ in cases} == set(range(len(fields(raw.split(b"\r\n\r\n", 1)[0]))))
    delivered, refused = 0, {}
    with smtplib.SMTP(relay.host, relay.port, timeout=120) as client:
        # The message as it is goes through: what follows is about the bytes.
        assert send(client, sender, pair.seller_alias, raw) == (250, b"")
        for _, label, variant in cases:
            code, text = send(client, sender, pair.seller_alias, variant)
            assert code == 250 or code >= 500, (label, code, text)
            if code == 250:
                delivered += 1
            else:
                # A refusal says why, with an enhanced status code.
                assert re.match(rb"5\.\d+\.\d+ \S.{10,}", text), (label, code, text)
                refused[label] = (code, text)
        # And the same session still delivers an ordinary message.
        assert send(client, sender, pair.seller_alias, message(sender, pair.seller_alias)) == (250, b"")
    got = upstream.wait_for(delivered + 2)
    for received in got:
        assert_ascii_threading(received.data)
    # Policy may refuse a sender it cannot recognise; the rest is delivered.
    assert set(refused) <= {"From inside <>", "From at the end"}, refused
    assert delivered >= len(cases) - 2

    rows = relay.archive_rows()
    assert len(rows) == len(cases) + 2
    assert {row["verdict"] for row in rows} <= {"delivered", "rejected"}
    verified = relay_cli(cli_config(tmp_path, relay), "archive", "verify")
    assert verified.returncode == 0, verified.stderr
