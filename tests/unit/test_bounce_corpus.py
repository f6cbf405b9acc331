"""Every bounce of flufl.bounce's corpus (tests/cases/bounces/, real mail
from real MTAs) is read as its expected verdict: a permanent failure, a
delay, or nothing we can read. The relay never needs the addresses the
detectors find (the VERP address says which message bounced), only the
verdict and which reader gave it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relay.bounces import RFC3464, read_report

CORPUS = Path(__file__).parent.parent / "cases" / "bounces"


def expectations() -> list[tuple[str, str]]:
    rows = []
    for line in (CORPUS / "expected.tsv").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, expected, *_ = line.split("\t")
            rows.append((name, expected))
    return rows


def test_the_table_names_every_file_of_the_corpus():
    assert sorted(name for name, _ in expectations()) == sorted(p.name for p in CORPUS.glob("*.txt"))
    assert len(expectations()) > 100


@pytest.mark.parametrize(("name", "expected"), expectations())
def test_each_real_bounce_gets_its_verdict(name, expected):
    reports = read_report((CORPUS / name).read_bytes())
    if expected == "none":
        assert reports == []
        return
    assert reports, f"{name}: no report read"
    # A DSN may list several recipients; the verdict is what the relay acts on.
    assert {r.action for r in reports} == {expected}
    assert all(r.detector for r in reports)
    # A status is kept only when it is one (dsn_02 is `failed` with 4.4.7: a
    # queue that gave up is a failure whatever the class says).
    assert all(r.status == "" or re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", r.status) for r in reports)


def test_plain_text_bounces_name_their_detector():
    [qmail] = read_report((CORPUS / "qmail_01.txt").read_bytes())
    assert (qmail.action, qmail.detector) == ("failed", "qmail")
    [warning] = read_report((CORPUS / "simple_03.txt").read_bytes())
    assert (warning.action, warning.detector) == ("delayed", "simplewarning")
    [exim] = read_report((CORPUS / "exim_01.txt").read_bytes())
    assert (exim.action, exim.detector) == ("failed", "exim")


def test_a_commented_action_is_the_action():
    reports = read_report((CORPUS / "dsn_12.txt").read_bytes())
    assert [(r.action, r.detector) for r in reports] == [("failed", RFC3464)]


@pytest.mark.parametrize("raw", [
    b"",
    b"Subject: nothing\r\n\r\nnot a bounce at all\r\n",
    b"Content-Type: multipart/report; boundary=B\r\n\r\n--B\r\n\r\n--B--\r\n",
    b"Content-Type: multipart/report; report-type=delivery-status; boundary=B\r\n\r\n"
    b"--B\r\nContent-Type: message/delivery-status\r\n\r\n\r\n--B--\r\n",
    b"From: MAILER-DAEMON\r\nContent-Type: text/plain; charset=x-unknown\r\n\r\n\xff\xfe\x00 failed\r\n",
])
def test_hostile_or_empty_reports_are_no_verdict(raw):
    assert read_report(raw) == []
