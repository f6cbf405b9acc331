"""A big message while a worker has it (relay/spool.py): the event loop's
process keeps it in an unlinked temporary file, not in memory, and reads it
back only when the archive needs the bytes as received — a message refused
or failed after the worker read it. Whatever the outcome, the archive holds
the exact bytes the client sent and the upstream got; a temporary directory
that cannot be written costs the saving, never the message."""

from __future__ import annotations

import random
import smtplib
import tempfile
from email.message import EmailMessage

import pytest

from relay import archive as archive_logic
from relay import spool


def big_message(sender: str, to: str, size: int = 3_000_000, ctype: str = "application/pdf",
                filename: str = "invoice.pdf") -> bytes:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = sender, to, "The invoice"
    message["Message-ID"] = "<big1@client.example>"
    message.set_content("The invoice is attached.\n")
    maintype, subtype = ctype.split("/")
    message.add_attachment(b"%PDF-1.4\n" + random.Random(3).randbytes(size), maintype=maintype,
                           subtype=subtype, filename=filename)
    return message.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@pytest.fixture
def spills(monkeypatch):
    """The sizes of the messages written to a temporary file (the real
    function runs; this only counts)."""
    written = []
    real = spool._written

    def counting(data):
        written.append(len(data))
        return real(data)

    monkeypatch.setattr(spool, "_written", counting)
    return written


def send(relay, pair, raw: bytes):
    with smtplib.SMTP(relay.host, relay.port, timeout=60) as client:
        client.ehlo()
        client.mail(pair.buyer)
        assert client.rcpt(pair.seller_alias)[0] == 250
        return client.data(raw)


def test_a_big_delivered_message_is_archived_as_sent(relay, upstream, spills):
    pair = relay.pair()
    raw = big_message(pair.buyer, pair.seller_alias)
    code, text = send(relay, pair, raw)
    assert code == 250, text
    [received] = upstream.wait_for(1)
    assert spills == [len(raw)]
    [row] = relay.archive_rows()
    assert (row["verdict"], row["raw"], row["delivered"]) == ("delivered", raw, received.data)
    assert row["raw_size"] == len(raw)
    assert archive_logic.content_problem(row) is None  # its hashes hold for the bytes read back


def test_a_big_message_the_upstream_refuses_is_read_back_for_the_archive(relay, upstream, spills):
    pair = relay.pair()
    upstream.fail_with("552 5.3.4 Message too big for this mailbox")
    raw = big_message(pair.buyer, pair.seller_alias)
    code, text = send(relay, pair, raw)
    assert (code, text[:5]) == (552, b"5.3.4")
    assert spills == [len(raw)]
    [row] = relay.archive_rows()
    assert (row["verdict"], row["raw"], row["delivered"]) == ("failed", raw, None)


def test_a_big_message_a_rule_refuses_is_archived_as_sent(relay, upstream, spills):
    pair = relay.pair()
    raw = big_message(pair.buyer, pair.seller_alias, ctype="application/octet-stream", filename="tool.exe")
    code, text = send(relay, pair, raw)
    assert code == 550 and text[:1] == b"5", text
    assert spills == [len(raw)]
    [row] = relay.archive_rows()
    assert (row["verdict"], row["raw"]) == ("rejected", raw)
    assert upstream.messages == []


def test_a_small_message_stays_in_memory(relay, upstream, spills):
    pair = relay.pair()
    raw = big_message(pair.buyer, pair.seller_alias, size=10_000)
    assert send(relay, pair, raw)[0] == 250
    assert spills == []
    assert relay.archive_rows()[0]["raw"] == raw


def test_an_unwritable_temporary_directory_costs_the_saving_not_the_message(relay, upstream, monkeypatch,
                                                                            tmp_path, caplog):
    pair = relay.pair()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    raw = big_message(pair.buyer, pair.seller_alias)
    code, text = send(relay, pair, raw)
    assert code == 250, text
    [received] = upstream.wait_for(1)
    [row] = relay.archive_rows()
    assert (row["raw"], row["delivered"]) == (raw, received.data)
    assert any("kept in memory: temporary file failed" in r.getMessage() for r in caplog.records)
