"""relay/archive/ without a database: tables of cases for auto-reply
detection, the response-time rules, the chain verifier, mbox quoting, dates
and the SVG chart."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from xml.etree import ElementTree

import pytest

from relay import archive
from relay.archive import ChainVerifier, MessageFact, response_times
from relay.store import GENESIS_HASH, ArchiveEntry, PurgeCounts, chain_hash, sha256_hex

# --- auto-replies --------------------------------------------------------------------

AUTO_REPLY_CASES = [
    (b"Subject: hi\r\n\r\nbody", False),
    (b"Auto-Submitted: no\r\n\r\n", False),
    (b"Auto-Submitted: No (a person wrote this)\r\n\r\n", False),
    (b"Auto-Submitted: auto-replied\r\n\r\n", True),
    (b"auto-submitted: Auto-Generated; owner-email=\"x@y\"\r\n\r\n", True),
    (b"Auto-Submitted:\r\n auto-notified\r\n\r\n", True),
    (b"Precedence: bulk\r\n\r\n", True),
    (b"Precedence: JUNK\r\n\r\n", True),
    (b"Precedence: list\n\n", True),
    (b"Precedence: first-class\r\n\r\n", False),
    (b"Subject: x\r\n\r\nAuto-Submitted: auto-replied\r\n", False),  # in the body: not a header
    (b"Subject: caf\xe9\r\nPrecedence: bulk\r\n\r\n", True),  # 8-bit header bytes
]


@pytest.mark.parametrize("raw, expected", AUTO_REPLY_CASES)
def test_auto_reply(raw, expected):
    assert archive.is_auto_reply(raw) is expected


# --- response times --------------------------------------------------------------------

T = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
NOW = T + timedelta(days=10)


def facts(*items, relationship=1, seller="sam@shop.example"):
    """items: (direction letter b/s, minutes after T, auto-reply)"""
    return [MessageFact(n, relationship, seller, "buyer_to_seller" if d == "b" else "seller_to_buyer",
                        T + timedelta(minutes=m), auto)
            for n, (d, m, auto) in enumerate(items, start=relationship * 100)]


RESPONSE_CASES = [
    # name, facts, (within, late, waiting, overdue, response minutes)
    ("answered at 23 h 59 min", [("b", 0, False), ("s", 23 * 60 + 59, False)], (1, 0, 0, 0, [1439])),
    ("answered at exactly 24 h", [("b", 0, False), ("s", 24 * 60, False)], (1, 0, 0, 0, [1440])),
    ("answered at 24 h 01 min", [("b", 0, False), ("s", 24 * 60 + 1, False)], (0, 1, 0, 0, [1441])),
    ("two questions, one answer", [("b", 0, False), ("b", 60, False), ("s", 120, False)], (2, 0, 0, 0, [120, 60])),
    ("seller auto-reply answers nothing",
     [("b", 0, False), ("s", 1, True), ("s", 30 * 60, False)], (0, 1, 0, 0, [1800])),
    ("buyer auto-reply asks nothing", [("b", 0, True), ("s", 10, False)], (0, 0, 0, 0, [])),
    ("seller first: nothing to answer", [("s", 0, False), ("b", 5, False), ("s", 65, False)], (1, 0, 0, 0, [60])),
    ("only the first answer counts", [("b", 0, False), ("s", 10, False), ("s", 20, False)], (1, 0, 0, 0, [10])),
    ("never answered", [("b", 0, False)], (0, 0, 1, 1, [])),
    ("asked after the answer", [("b", 0, False), ("s", 10, False), ("b", 20, False)], (1, 0, 1, 1, [10])),
]


@pytest.mark.parametrize("name, items, expected", RESPONSE_CASES, ids=[c[0] for c in RESPONSE_CASES])
def test_response_time_rules(name, items, expected):
    result = response_times(facts(*items), NOW)
    within, late, waiting, overdue, minutes = expected
    if not result:
        assert expected == (0, 0, 0, 0, [])
        return
    [seller] = result
    assert (seller.answered_within, seller.answered_late, len(seller.waiting), seller.overdue) == expected[:4]
    assert seller.response_seconds == [m * 60.0 for m in minutes]


def test_waiting_is_measured_at_now_and_later_facts_are_ignored():
    items = facts(("b", 0, False), ("s", 60 * 30, False))
    [seller] = response_times(items, now=T + timedelta(hours=23))  # the answer has not happened yet
    assert (len(seller.waiting), seller.overdue, seller.due, seller.share_within) == (1, 0, 0, None)
    assert seller.waiting[0].waiting_seconds == 23 * 3600
    [seller] = response_times(items, now=T + timedelta(hours=25))
    assert (seller.overdue, seller.due, seller.share_within) == (1, 1, 0.0)


def test_since_excludes_earlier_questions_and_sellers_are_separate():
    items = facts(("b", 0, False), ("b", 100, False), ("s", 200, False))
    items += facts(("b", 0, False), ("b", 60, False), relationship=2, seller="ann@shop.example")
    sam, ann, zed = sorted(response_times(items, NOW, since=T + timedelta(minutes=50), sellers=["zed@shop.example"]),
                           key=lambda s: ["sam", "ann", "zed"].index(s.seller[:3]))
    assert sam.response_seconds == [6000.0] and sam.buyer_messages == 1  # the question at T is before since
    assert [w.archive_id for w in ann.waiting] == [201] and ann.response_seconds == []
    assert (zed.buyer_messages, zed.due, zed.share_within) == (0, 0, None)  # asked for: reported, empty


@pytest.mark.parametrize("values, q, expected", [
    ([], 0.5, None), ([5.0], 0.9, 5.0), ([1.0, 2.0, 3.0, 4.0], 0.5, 2.5), ([3.0, 1.0, 2.0], 0.5, 2.0),
    ([float(n) for n in range(1, 11)], 0.9, 9.1), ([0.0, 100.0], 0.9, 90.0),
])
def test_percentile(values, q, expected):
    assert archive.percentile(values, q) == expected


@pytest.mark.parametrize("seconds, text", [
    (None, "–"), (42, "42 s"), (60, "1 min"), (3599, "59 min"), (3600, "1 h"), (86340, "23 h 59 min"),
    (86460, "24 h 1 min"), (3 * 86400 + 3600, "3 d 1 h"), (7 * 86400, "7 d"),
])
def test_format_duration(seconds, text):
    assert archive.format_duration(seconds) == text


def test_histogram_bounds_are_inclusive():
    assert [archive.BUCKETS[archive.bucket_index(s)][0] for s in (0, 3600, 3601, 86400, 86401, 7 * 86400, 10 ** 9)] \
        == ["≤ 1 h", "≤ 1 h", "1–4 h", "12–24 h", "24–48 h", "2–7 d", "> 7 d"]


def test_svg_is_well_formed_and_escapes_names():
    items = facts(("b", 0, False), ("s", 60, False), ("b", 100, False),
                  seller='x"><script>alert(1)</script>@shop.example')
    [seller] = response_times(items, NOW)
    svg = archive.svg_chart(seller)
    root = ElementTree.fromstring(svg)  # parses: well-formed XML
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert "<script" not in svg and "&lt;script&gt;" in svg
    bars = [r for r in root.iter("{http://www.w3.org/2000/svg}rect") if r.find("{http://www.w3.org/2000/svg}title")
            is not None]
    assert [(r.find("{http://www.w3.org/2000/svg}title").text, r.get("fill")) for r in bars][:1] == \
        [("≤ 1 h: 1", "#2e7d32")]
    assert bars[-1].find("{http://www.w3.org/2000/svg}title").text == "overdue: 1"
    page = archive.render_html([seller], NOW, None)
    assert "<script" not in page



def test_a_bounced_buyer_message_never_waits_and_answers_still_count():
    items = facts(("b", 0, False), ("b", 60, False), ("s", 120, False), ("b", 200, False))
    items[1] = MessageFact(**{**items[1].__dict__, "bounced": True})  # the seller's mailbox refused it
    items[3] = MessageFact(**{**items[3].__dict__, "bounced": True})
    [seller] = response_times(items, NOW)
    assert (seller.buyer_messages, seller.response_seconds, seller.waiting, seller.bounced) == (1, [7200.0], [], 2)
    assert seller.to_json()["bounced"] == 2 and seller.due == 1


def test_sellers_come_in_natural_order():
    names = ["shop10@x.example", "shop2@x.example", "Shop1@x.example", "alpha@x.example", "shop2b@x.example"]
    items = [f for n, name in enumerate(names) for f in facts(("b", 0, False), relationship=n + 1, seller=name)]
    assert [s.seller for s in response_times(items, NOW)] == [
        "alpha@x.example", "Shop1@x.example", "shop2@x.example", "shop2b@x.example", "shop10@x.example"]


def test_the_page_for_5000_sellers_has_one_chart_and_stays_small():
    items = []
    for n in range(5000):
        items += facts(("b", 0, False), ("s", n % 3000, False), ("b", 14000 - n, False),
                       relationship=n + 1, seller=f"seller{n}@shop.example")
    sellers = response_times(items, NOW)
    page = archive.render_html(sellers, NOW, None)
    assert page.count("<svg ") == 1
    assert page.index("seller9@shop.example") < page.index("seller10@shop.example")
    # One table row per seller and one per waiting message: about 600 bytes a seller.
    assert len(page.encode()) < 5000 * 1000, len(page)
    assert "<script" not in page
    total = archive.all_sellers(sellers)
    assert (total.buyer_messages, len(total.waiting), total.answered_within + total.answered_late) == (10000, 5000, 5000)


# --- dates --------------------------------------------------------------------------

@pytest.mark.parametrize("value, end_of_day, expected", [
    ("2026-11-27", False, "2026-11-27T00:00:00.000000Z"),
    ("2026-11-27", True, "2026-11-28T00:00:00.000000Z"),
    ("2026-11-27T10:30", False, "2026-11-27T10:30:00.000000Z"),
    ("2026-11-27T10:30:00+02:00", True, "2026-11-27T08:30:00.000000Z"),
    ("2026-11-27T10:30:00Z", False, "2026-11-27T10:30:00.000000Z"),
])
def test_parse_when(value, end_of_day, expected):
    assert archive.parse_when(value, end_of_day) == expected


def test_parse_when_refuses_words():
    with pytest.raises(ValueError, match="not an ISO 8601 date or time: 'yesterday'"):
        archive.parse_when("yesterday")


def test_retention_cutoff_and_summary():
    assert archive.retention_cutoff(datetime(2026, 11, 27, tzinfo=timezone.utc), 730) == "2024-11-27T00:00:00.000000Z"
    line = archive.purge_summary(PurgeCounts(before="2024-11-27T00:00:00.000000Z", rows=3, bytes=12_345,
                                             message_ids=2, held=4, dry_run=True))
    assert line == ("would purge 3 archive row(s) received before 2024-11-27T00:00:00.000000Z "
                    "(12.3 kB of message bodies, 2 Message-ID map entries); 4 row(s) kept on hold")


# --- mbox ------------------------------------------------------------------------------

def test_mboxrd_quoting_round_trips():
    data = b"Subject: x\r\n\r\nFrom here\r\n>From there\r\n>>From far\r\nFrom:\r\nnot From \r\n"
    entry = archive.mbox_entry(data, "2026-11-27T10:00:00.000000Z")
    assert entry.startswith(b"From MAILER-DAEMON Fri Nov 27 10:00:00 2026\n")
    body = entry.split(b"\n", 1)[1]
    assert b"\r" not in body and body.endswith(b"\n\n")
    assert b"\n>From here\n>>From there\n>>>From far\nFrom:\nnot From \n" in body
    assert archive.mbox_unquote(body[:-1]).replace(b"\n", b"\r\n") == data


def test_header_changes():
    raw = b"Received: from a\r\n by b\r\nFrom: bea@mail.example\r\nSubject: Hi\r\n\r\nbody"
    delivered = b"From: Bea <x@marketplace.example>\r\nSubject: Hi\r\nX-Relay-Policy: clean\r\n\r\nbody"
    assert archive.header_changes(raw, delivered) == (
        ["Received: from a by b", "From: bea@mail.example"],
        ["From: Bea <x@marketplace.example>", "X-Relay-Policy: clean"])


# --- the chain verifier --------------------------------------------------------------

def chain(count: int) -> list[dict]:
    rows, prev = [], GENESIS_HASH
    for n in range(1, count + 1):
        entry = ArchiveEntry(received_at=f"2026-01-0{n}T00:00:00.000000Z", relationship_id=1,
                             direction="buyer_to_seller", client_address="127.0.0.1", mail_from="a@b",
                             rcpt_to=("c@d",), verdict="delivered", reply="250", changes=("x",),
                             raw=b"raw %d" % n, delivered=b"out %d" % n)
        raw_sha, delivered_sha = sha256_hex(entry.raw), sha256_hex(entry.delivered)
        row_sha = chain_hash(entry.metadata(), raw_sha, delivered_sha, prev)
        rows.append({**entry.metadata(), "id": n, "raw": entry.raw, "delivered": entry.delivered,
                     "raw_sha256": raw_sha, "delivered_sha256": delivered_sha, "prev_sha256": prev,
                     "row_sha256": row_sha, "purged_at": None, "purge_id": None, "decode_error": None})
        prev = row_sha
    return rows


def verify(rows, runs=None):
    verifier = ChainVerifier(purge_runs=runs or {})
    for row in rows:
        verifier.feed(row)
    return verifier


def tombstone(row, run=1):
    return {**row, "raw": None, "delivered": None, "mail_from": "", "rcpt_to": [], "reply": "", "changes": [],
            "client_address": "", "purged_at": "2026-06-01T00:00:00.000000Z", "purge_id": run}


def test_intact_chain():
    verifier = verify(chain(4))
    assert verifier.ok and verifier.rows == 4 and verifier.head == chain(4)[-1]["row_sha256"]
    assert verifier.summary() == f"archive chain verified: 4 row(s), head {verifier.head}"
    assert verify([]).summary() == f"archive chain verified: 0 row(s), head {GENESIS_HASH}"


def _edit(index, **changes):
    def apply(rows):
        rows[index] = {**rows[index], **changes}
        return rows
    return apply


VERIFY_CASES = [
    ("raw edited", _edit(1, raw=b"RAW 2"), [(2, "bytes", "its raw bytes do not match raw_sha256")]),
    ("delivered edited", _edit(1, delivered=b"x"), [(2, "bytes", "its delivered bytes do not match")]),
    ("undecodable", _edit(1, raw=None, decode_error="zstd: bad"), [(2, "bytes", "cannot be decoded (zstd: bad)")]),
    ("verdict edited", _edit(2, verdict="rejected"), [(3, "metadata", "edited metadata")]),
    ("changes edited", _edit(2, changes=[]), [(3, "metadata", "edited metadata")]),
    ("row hash edited", _edit(1, row_sha256="f" * 64),
     [(2, "metadata", "edited metadata"), (3, "link", "row 2's row_sha256 was edited")]),
    ("middle deleted", lambda rows: rows[:1] + rows[2:], [(3, "link", "row 2 deleted")]),
    ("two deleted", lambda rows: rows[:1] + rows[3:], [(4, "link", "rows 2–3 deleted")]),
    ("first deleted", lambda rows: rows[1:], [(2, "link", "does not start at the genesis hash")]),
    ("reordered", lambda rows: [rows[0], {**rows[2], "id": 2}, {**rows[1], "id": 3}, rows[3]],
     [(2, "link", ""), (3, "link", ""), (4, "link", "")]),
    ("tombstone", lambda rows: [rows[0], tombstone(rows[1]), rows[2], rows[3]], []),
    ("tombstone of no run", lambda rows: [rows[0], tombstone(rows[1], run=9), rows[2], rows[3]],
     [(2, "tombstone", "no purge run recorded it")]),
    ("tombstone newer than cutoff", lambda rows: [rows[0], {**tombstone(rows[1]), "received_at": "2027-01-01"},
                                                  rows[2], rows[3]],
     [(2, "tombstone", "after its purge run's cutoff")]),
    ("tombstone with a broken link", lambda rows: [rows[0], {**tombstone(rows[1]), "row_sha256": "e" * 64},
                                                   rows[2], rows[3]],
     [(3, "link", "")]),
]


@pytest.mark.parametrize("name, tamper, expected", VERIFY_CASES, ids=[c[0] for c in VERIFY_CASES])
def test_verifier_finds_each_break(name, tamper, expected):
    verifier = verify(tamper(chain(4)), runs={1: "2026-03-01T00:00:00.000000Z"})
    found = [(b.archive_id, b.kind, b.detail) for b in verifier.breaks]
    assert [(i, k) for i, k, _ in found] == [(i, k) for i, k, _ in expected]
    for (_, _, detail), (_, _, fragment) in zip(found, expected):
        assert fragment in detail


def test_link_break_explained_once_the_predecessor_is_known():
    rows = chain(4)
    swapped = [rows[0], {**rows[2], "id": 2}, {**rows[1], "id": 3}, rows[3]]
    first = verify(swapped).breaks[0]
    assert archive.explain_link_break(first, predecessor_id=3).line() == (
        "archive chain broken at row 2: it follows row 3 in the chain, not row 1: rows reordered or their ids changed")
    assert re.search(r"row 2 deleted", archive.explain_link_break(
        verify(rows[:1] + rows[2:]).breaks[0], None).detail)
