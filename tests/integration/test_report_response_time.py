"""`relay report response-time`: archive rows with chosen times (through the
store, and through a running relay with an injected clock), read by the
real command."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import datetime, timedelta, timezone

import pytest

from relay.store import ArchiveEntry, iso, open_store
from support import RecordingUpstream, RunningRelay, make_config, message, upstream_url
from archive_support import clock_at, relay_cli, send, write_config

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
UNTIL = T0 + timedelta(days=3)
AUTO = {"Auto-Submitted": "auto-replied"}


def row(relationship, direction, when, verdict="delivered", headers=None):
    raw = message("x@example.com", "y@example.com", headers=headers)
    return ArchiveEntry(received_at=iso(when), relationship_id=relationship, direction=direction,
                        client_address="127.0.0.1", mail_from="x@example.com", rcpt_to=("y@example.com",),
                        verdict=verdict, reply="250", changes=(), raw=raw,
                        delivered=raw if verdict == "delivered" else None)


@pytest.fixture(scope="module")
def report_db(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    database = folder / "relay.sqlite3"
    b2s, s2b = "buyer_to_seller", "seller_to_buyer"

    async def build():
        store = await open_store(str(database))
        await store.upgrade()
        try:
            ids = {}
            for seller, buyer in [("sam@shop.example", "bea@mail.example"), ("sam@shop.example", "bob@mail.example"),
                                  ("sam@shop.example", "cy@mail.example"), ("ann@<b>shop</b>.example", "dee@mail.example")]:
                if await store.get_party("seller", seller) is None:
                    await store.add_party("seller", seller, "Sam's <Shop>" if seller.startswith("sam") else "")
                await store.add_party("buyer", buyer, "")
                relationship, _ = await store.add_order(f"o-{buyer}", seller, buyer, iso(T0), "marketplace.example")
                ids[buyer.split("@")[0]] = relationship.id
            a, b, c, d = ids["bea"], ids["bob"], ids["cy"], ids["dee"]
            for entry in [
                row(a, b2s, T0), row(a, s2b, T0 + timedelta(hours=23, minutes=59)),  # within 24 h
                row(b, b2s, T0), row(b, s2b, T0 + timedelta(hours=24, minutes=1)),  # late
                # Two questions, one answer; the seller's auto-reply answers neither,
                # the buyer's bulk mail asks nothing.
                row(c, b2s, T0), row(c, s2b, T0 + timedelta(minutes=5), headers=AUTO),
                row(c, b2s, T0 + timedelta(hours=1)), row(c, s2b, T0 + timedelta(hours=2)),
                row(c, b2s, T0 + timedelta(hours=3), headers={"Precedence": "bulk"}),
                # Still waiting: one for 30 hours (overdue), one for 2; a refused one is no question.
                row(d, b2s, UNTIL - timedelta(hours=30)), row(d, b2s, UNTIL - timedelta(hours=2)),
                row(d, b2s, UNTIL - timedelta(hours=1), verdict="rejected"),
                row(a, b2s, UNTIL + timedelta(hours=1)),  # after --until: not yet happened
            ]:
                await store.record(entry)
        finally:
            await store.close()

    asyncio.run(build())
    return write_config(folder, database)


def test_report_json_counts_shares_and_percentiles(report_db):
    result = relay_cli(report_db, "report", "response-time", "--until", UNTIL.isoformat(), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["as_of"] == iso(UNTIL)
    ann, sam = report["sellers"]
    assert sam["seller"] == "sam@shop.example" and sam["name"] == "Sam's <Shop>"
    assert (sam["buyer_messages"], sam["answered_within_24h"], sam["answered_later"], sam["due"]) == (4, 3, 1, 4)
    assert sam["share_within_24h"] == 0.75
    # Response times 1 h, 2 h, 23 h 59 min, 24 h 01 min.
    assert sam["median_seconds"] == (7200 + 86340) / 2
    assert sam["p90_seconds"] == 86340 + 0.7 * 120
    assert sam["waiting_messages"] == []
    assert [(h["bucket"], h["count"]) for h in sam["histogram"]][:5] == [
        ("≤ 1 h", 1), ("1–4 h", 1), ("4–12 h", 0), ("12–24 h", 1), ("24–48 h", 1)]
    assert (ann["waiting"], ann["overdue"], ann["due"], ann["share_within_24h"], ann["median_seconds"]) == \
        (2, 1, 1, 0.0, None)
    assert [w["overdue"] for w in ann["waiting_messages"]] == [True, False]
    assert ann["waiting_messages"][0]["waiting_seconds"] == 30 * 3600


def test_report_text_html_and_errors(report_db, tmp_path):
    text = relay_cli(report_db, "report", "response-time", "--seller", "SAM@shop.example",
                     "--until", UNTIL.isoformat(), "--format", "text")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.decode().splitlines()
    assert lines[0] == "Response times as of 2026-03-05 09:00 UTC: share of buyer messages answered within 24 h"
    assert lines[1].split() == ["seller", "within", "24", "h", "median", "90th", "pct", "waiting", "overdue",
                                "bounced"]
    # 90th percentile: 23 h 59 min + 0.7 × 2 min = 24 h 0 min 24 s.
    assert lines[2].split() == ["sam@shop.example", "3/4", "75.0%", "12", "h", "59", "min", "24", "h", "0", "0",
                                "0"]
    assert len(lines) == 3

    out = tmp_path / "report.html"
    made = relay_cli(report_db, "report", "response-time", "--until", UNTIL.isoformat(), "--format", "html",
                     "--out", str(out))
    assert made.returncode == 0, made.stderr
    assert made.stdout.decode() == f"response-time report (html) written to {out}\n"
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<svg ") == 1 and page.count("</svg>") == 1  # one chart, whatever the number of sellers
    assert "<script" not in page.lower() and "javascript:" not in page.lower()
    assert "ann@&lt;b&gt;shop&lt;/b&gt;.example" in page and "<b>shop</b>" not in page
    assert "default-src 'none'" in page
    assert re.search(r"3 of 5 buyer messages answered within 24 h \(60\.0%\)", page)  # every seller
    assert "<td>sam@shop.example (Sam&#x27;s &lt;Shop&gt;)</td><td>3 of 4 (75.0%)</td>" in page
    assert "<td>2026-03-04 03:00 UTC</td><td>30 h</td>" in page  # ann's overdue message, readable
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]

    unknown = relay_cli(report_db, "report", "response-time", "--seller", "nobody@shop.example")
    assert (unknown.returncode, unknown.stderr) == (1, "relay: no seller nobody@shop.example\n")
    both = relay_cli(report_db, "report", "response-time", "--json", "--format", "html")
    assert (both.returncode, both.stderr) == (2, "relay: --json is --format json; give one of them\n")


def test_answers_at_23h59m_and_24h01m_through_a_running_relay(tmp_path):
    upstream = RecordingUpstream().start()
    asked = (datetime.now(timezone.utc) - timedelta(days=5)).replace(microsecond=0)
    clock = clock_at(asked)
    relay = RunningRelay(make_config(tmp_path, upstream_url(upstream)), clock=clock)
    try:
        bea = relay.pair()
        bob = relay.pair(buyer="bob@mail.example", buyer_name="Bob", order="ORDER-2")
        for pair in (bea, bob):
            assert send(relay, pair.buyer, pair.seller_alias,
                        message(pair.buyer, pair.seller_alias, body="Has it shipped?\n"))[0] == 250
        for pair, delay in ((bea, timedelta(hours=23, minutes=59)), (bob, timedelta(hours=24, minutes=1))):
            clock.now = asked + delay
            assert send(relay, pair.seller, pair.buyer_alias,
                        message(pair.seller, pair.buyer_alias, body="Yes, this morning.\n"))[0] == 250
        upstream.wait_for(4)
    finally:
        relay.stop()
        upstream.stop()
    config = write_config(tmp_path, tmp_path / "relay.sqlite3")
    result = relay_cli(config, "report", "response-time", "--seller", bea.seller, "--json")
    assert result.returncode == 0, result.stderr
    [seller] = json.loads(result.stdout)["sellers"]
    assert (seller["answered_within_24h"], seller["answered_later"], seller["waiting"]) == (1, 1, 0)
    assert seller["share_within_24h"] == 0.5
    assert seller["median_seconds"] == 24 * 3600.0
    assert [h["count"] for h in seller["histogram"]][3:5] == [1, 1]  # 12–24 h and 24–48 h


def test_a_buyer_message_that_bounced_is_not_waiting_on_the_seller(tmp_path):
    """The seller's mailbox refused the buyer's message (a real DSN came back
    to its return path): the seller never had it, so it does not wait."""
    upstream = RecordingUpstream().start()
    relay = RunningRelay(make_config(tmp_path, upstream_url(upstream)))
    try:
        pair = relay.pair()
        for body in ("Has it shipped?\n", "Hello?\n"):
            assert send(relay, pair.buyer, pair.seller_alias, message(pair.buyer, pair.seller_alias, body=body))[0] == 250
        first, _ = upstream.wait_for(2)
        dsn = (f"From: MAILER-DAEMON@mx.shop.example\r\nTo: {first.mail_from}\r\nAuto-Submitted: auto-replied\r\n"
               "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
               'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
               "--B\r\nContent-Type: text/plain\r\n\r\nmailbox full\r\n"
               "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.shop.example\r\n\r\n"
               f"Final-Recipient: rfc822; {pair.seller}\r\nAction: failed\r\nStatus: 5.2.2\r\n--B--\r\n").encode()
        assert send(relay, "", first.mail_from, dsn)[0] == 250
    finally:
        relay.stop()
        upstream.stop()
    config = write_config(tmp_path, tmp_path / "relay.sqlite3")
    result = relay_cli(config, "report", "response-time", "--json")
    assert result.returncode == 0, result.stderr
    [seller] = json.loads(result.stdout)["sellers"]
    assert (seller["waiting"], seller["bounced"], seller["buyer_messages"]) == (1, 1, 1)
