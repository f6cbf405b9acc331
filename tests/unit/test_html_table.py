"""HTML sanitizing (DESIGN §4) as a table of cases: tests/cases/html/*.txt.

Each file ``NNN-short-name.txt`` is one case; adding a case is adding a file.
Free text before the first section describes the case. Sections start with
a line of their own:

``--- input``
    the HTML of a text/html part (required; the newline before the next
    section line is not part of it);
``--- expected``
    what `MailHtmlCleaner.clean_html` returns, compared exactly once
    surrounding whitespace is stripped from both; the part must count as
    changed;
``--- removed``
    lines ``key=N`` (``links=1``, ``emails=1``, ``images=2``, ``tags=1``,
    ``attributes=2``, ``comments=1`` …), each checked against the returned
    removal counts for that key only;
``--- unchanged`` (empty)
    the part must count as unchanged, so it is delivered with its original
    bytes; the output is not compared (unless ``--- expected`` is given too).

Every case runs with the default `PolicyConfig` and a `LinkPolicy` whose
aliases are the two below and whose message has one part, Content-ID
``<logo@shop.example>``.

The second half runs whole messages through `pipeline.parse` and
`pipeline.process`: charset and transfer encoding kept, inline images and
clean parts byte-identical, the X-Relay-Policy summary.
"""

from __future__ import annotations

import base64
import email
import email.policy
import quopri
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from relay import pipeline
from relay.config import PolicyConfig
from relay.pipeline.links import LinkPolicy
from relay.pipeline.sanitize import MailHtmlCleaner
from test_rewrite_hostile import BUYER_ALIAS, SELLER_ALIAS, crlf, make_context, single

CASES_DIR = Path(__file__).resolve().parent.parent / "cases" / "html"
CASE_FILE = re.compile(r"\d{3}-[a-z0-9-]+\.txt")
SECTION = re.compile(r"^--- (input|expected|removed|unchanged)[ \t]*$", re.MULTILINE)
ALIASES = {BUYER_ALIAS, SELLER_ALIAS}
CONTENT_IDS = {"logo@shop.example"}


@dataclass
class HtmlCase:
    name: str
    input: str
    expected: str | None = None
    unchanged: bool = False
    removed: dict[str, int] = field(default_factory=dict)


def load_case(path: Path) -> HtmlCase:
    text = path.read_text(encoding="utf-8")
    sections: dict[str, str] = {}
    marks = list(SECTION.finditer(text))
    for mark, following in zip(marks, marks[1:] + [None]):
        kind = mark.group(1)
        assert kind not in sections, f"{path.name}: two '--- {kind}' sections"
        body = text[mark.end() + 1:following.start() if following else len(text)]
        sections[kind] = body[:-1] if body.endswith("\n") else body
    assert "input" in sections, f"{path.name}: no '--- input' section"
    assert "expected" in sections or "unchanged" in sections, \
        f"{path.name}: needs '--- expected' or '--- unchanged'"
    assert not sections.get("unchanged", "").strip(), f"{path.name}: '--- unchanged' takes no content"
    removed = {}
    for line in sections.get("removed", "").splitlines():
        if line.strip():
            key, sep, count = line.strip().partition("=")
            assert sep and count.isdigit(), f"{path.name}: bad '--- removed' line {line!r}"
            removed[key.strip()] = int(count)
    return HtmlCase(path.name, sections["input"], sections.get("expected"), "unchanged" in sections, removed)


CASE_FILES = sorted(p for p in CASES_DIR.iterdir() if CASE_FILE.fullmatch(p.name))


@pytest.fixture(scope="module")
def cleaner() -> MailHtmlCleaner:
    return MailHtmlCleaner(PolicyConfig())


def link_policy() -> LinkPolicy:
    return LinkPolicy(PolicyConfig(), set(ALIASES), set(CONTENT_IDS))


@pytest.mark.parametrize("path", CASE_FILES, ids=[p.name for p in CASE_FILES])
def test_html_case(path: Path, cleaner: MailHtmlCleaner):
    case = load_case(path)
    cleaned, counts, changed = cleaner.clean_html(case.input, link_policy())
    if case.expected is not None:
        assert cleaned.strip() == case.expected.strip()
    assert changed is not case.unchanged, "changed" if changed else "unchanged"
    assert {key: counts[key] for key in case.removed} == case.removed


def test_enough_cases():
    assert len(CASE_FILES) >= 40
    # Every file in the directory is a case: a misnamed one would be skipped.
    assert sorted(CASES_DIR.iterdir()) == CASE_FILES


def test_case_numbers_are_unique():
    numbers = [p.name[:3] for p in CASE_FILES]
    assert len(numbers) == len(set(numbers))


def test_one_cleaner_serves_many_threads(cleaner: MailHtmlCleaner):
    """One cleaner per policy is shared by the worker threads. Its parser
    used to be shared too: concurrent parses mixed their DOMs (text of one
    message in another) or failed half-way."""
    errors: list[str] = []

    def work(n: int) -> None:
        html = "".join(f"<p>thread{n} paragraph {i} <b>bold</b></p>" for i in range(150))
        for _ in range(10):
            try:
                cleaned, _, changed = cleaner.clean_html(html, link_policy())
            except Exception as exc:  # noqa: BLE001 — reported below
                errors.append(repr(exc))
                continue
            if cleaned != html or changed:
                errors.append(f"thread {n}: output differs from its input")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# --- whole messages through the pipeline ---------------------------------------------

def deliver(raw: bytes) -> tuple[bytes, email.message.EmailMessage, list[str]]:
    changes: list[str] = []
    result = pipeline.process(pipeline.parse(raw), make_context(policy=PolicyConfig()), changes)
    assert b"\r\n" in result.delivered and b"\n" not in result.delivered.replace(b"\r\n", b"")
    return result.delivered, email.message_from_bytes(result.delivered, policy=email.policy.default), changes


def html_part(msg):
    [part] = [p for p in msg.walk() if p.get_content_type() == "text/html"]
    return part


def body_of(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[1]


def mime_segment(raw: bytes, needle: bytes) -> bytes:
    """The one MIME part (headers and body, between boundary lines) that
    contains `needle`, as bytes."""
    chunks = [c for c in re.split(rb"\r\n--[^\s]+\r\n", raw) if needle in c]
    assert len(chunks) == 1, chunks
    return chunks[0]


HOSTILE_LATIN = ("<p>Grüße aus Köln, Preis 12&nbsp;&euro;.</p>"
                 "<script>alert(1)</script><p>Billiger bei https://evil.test/angebot</p>\n")


def test_quoted_printable_utf8_keeps_charset_and_encoding():
    html = ("<p>Café crème – 12 € <a href=\"https://evil.test/\">mein Laden</a></p>"
            "<script>alert(1)</script>\n" + "<p>" + "Lange Zeile mit Umlauten äöü " * 5 + "</p>\n")
    raw = single("Content-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: quoted-printable",
                 quopri.encodestring(html.encode("utf-8")))
    delivered, msg, _ = deliver(raw)
    part = html_part(msg)
    assert part.get_content_charset() == "utf-8"
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    encoded = body_of(mime_segment(delivered, b"text/html"))
    assert encoded.isascii() and max(len(line) for line in encoded.split(b"\r\n")) <= 76
    text = part.get_payload(decode=True).decode("utf-8")
    assert "<p>Café crème – 12 € <a>mein Laden</a></p>" in text
    assert "Lange Zeile mit Umlauten äöü " * 5 in text
    assert "script" not in text and "evil.test" not in text


def test_base64_latin1_keeps_charset_and_encoding():
    raw = single("Content-Type: text/html; charset=iso-8859-1\nContent-Transfer-Encoding: base64",
                 base64.encodebytes(HOSTILE_LATIN.encode("iso-8859-1")))
    delivered, msg, _ = deliver(raw)
    part = html_part(msg)
    assert part.get_content_charset() == "iso-8859-1"
    assert part["Content-Transfer-Encoding"] == "base64"
    data = part.get_payload(decode=True)
    # Latin-1 bytes, not UTF-8 ones; the entities (&euro; is not in
    # Latin-1 at all) stay entities.
    assert data.decode("iso-8859-1") == (
        "<p>Grüße aus Köln, Preis 12&nbsp;&euro;.</p><p>Billiger bei [link removed]</p>\n")


def test_7bit_us_ascii_with_entities_stays_ascii():
    html = ("<p>Caf&eacute;&nbsp;cr&egrave;me &copy; 2026 &#8364;12 &#x2014; "
            "more at http://evil.test/menu</p><p onclick=\"x()\">&Uuml;ber uns</p>\n")
    raw = single("Content-Type: text/html; charset=us-ascii\nContent-Transfer-Encoding: 7bit", html)
    delivered, msg, _ = deliver(raw)
    part = html_part(msg)
    assert part.get_content_charset() == "us-ascii"
    assert part["Content-Transfer-Encoding"] == "7bit"
    body = body_of(mime_segment(delivered, b"text/html"))
    # A us-ascii part must not gain 8-bit bytes: the references stay references.
    assert body.isascii(), body
    assert body == crlf(b"<p>Caf&eacute;&nbsp;cr&egrave;me &copy; 2026 &#8364;12 &#x2014; "
                        b"more at [link removed]</p><p>&Uuml;ber uns</p>\n")


RELATED = """MIME-Version: 1.0
Content-Type: multipart/alternative; boundary=ALT

--ALT
Content-Type: text/plain; charset=utf-8

Hello, see the logo. Cheaper at https://evil.test/
--ALT
Content-Type: multipart/related; boundary=REL

--REL
Content-Type: text/html; charset=utf-8
Content-Transfer-Encoding: quoted-printable

<p>Hello, <img src=3D"cid:logo-1@shop.example" alt=3D"Logo" width=3D"120"></p>
<p>Cheaper at <a href=3D"https://evil.test/">my shop</a><img src=3D"https://evi=
l.test/pixel.gif"></p>
--REL
Content-Type: image/png
Content-Transfer-Encoding: base64
Content-ID: <logo-1@shop.example>
Content-Disposition: inline; filename="logo.png"

iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLv
AAAAAElFTkSuQmCC
--REL--
--ALT--
"""


def test_related_inline_image_survives():
    raw = crlf(RELATED.encode("ascii"))
    raw = crlf(b"From: Bea <buyer@mail.example>\nTo: Shop <" + SELLER_ALIAS.encode()
               + b">\nDate: Thu, 26 Nov 2026 09:30:00 +0100\nMessage-ID: <orig-1@mail.example>\n") + raw
    delivered, msg, _ = deliver(raw)
    # The image part is untouched, headers and base64 lines alike.
    assert mime_segment(delivered, b"image/png") == mime_segment(raw, b"image/png")
    text = html_part(msg).get_content()
    assert '<img src="cid:logo-1@shop.example" alt="Logo" width="120">' in text
    assert "<a>my shop</a>" in text and "evil" not in text and "pixel" not in text
    assert msg["X-Relay-Policy"] == "images-removed=1; links-removed=2"


CLEAN_ALTERNATIVE = """MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="=_alt"

--=_alt
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Hello! Your order ships today. Track it at https://marketplace.example/orders/42 =
=E2=80=94 Sam

--=_alt
Content-Type: text/html; charset=utf-8
Content-Transfer-Encoding: quoted-printable

<html><body style=3D"margin:0"><table width=3D"100%" cellpadding=3D"0"><tr><td style=
=3D"font-family: &quot;Segoe UI&quot;, Arial; color:#333">Hello! Your order ships t=
oday. <a href=3D"https://marketplace.example/orders/42">Track it</a> =E2=80=94 Sam<=
/td></tr></table></body></html>

--=_alt--
"""


def test_clean_alternative_is_byte_identical():
    head = (b"From: Bea <buyer@mail.example>\nTo: Shop <" + SELLER_ALIAS.encode()
            + b">\nDate: Thu, 26 Nov 2026 09:30:00 +0100\nMessage-ID: <orig-1@mail.example>\n")
    raw = crlf(head + CLEAN_ALTERNATIVE.encode("ascii"))
    delivered, msg, changes = deliver(raw)
    assert body_of(delivered) == body_of(raw)
    assert msg["X-Relay-Policy"] == "clean"
    assert not any("text/html" in change for change in changes)


def test_clean_html_part_kept_when_the_plain_part_changes():
    head = (b"From: Bea <buyer@mail.example>\nTo: Shop <" + SELLER_ALIAS.encode()
            + b">\nDate: Thu, 26 Nov 2026 09:30:00 +0100\nMessage-ID: <orig-1@mail.example>\n")
    raw = crlf(head + CLEAN_ALTERNATIVE.replace(
        "Track it at https://marketplace.example/orders/42", "Track it at https://evil.test/42").encode("ascii"))
    delivered, msg, _ = deliver(raw)
    assert mime_segment(delivered, b"text/html") == mime_segment(raw, b"text/html")
    assert "[link removed]" in msg.get_body(("plain",)).get_content()
    assert msg["X-Relay-Policy"] == "links-removed=1"


def test_policy_header_summarizes_html_removals():
    html = ("<html><head><title>x</title></head><body>\n"
            "<!-- tracking --><p onclick=\"x()\">Hi <a href=\"https://evil.test/\">shop</a>"
            "<img src=\"https://evil.test/p.gif\"> mail bob@evil.test</p>"
            "<script>alert(1)</script><blink>!</blink></body></html>\n")
    raw = single("Content-Type: text/html; charset=utf-8", html)
    delivered, msg, changes = deliver(raw)
    assert msg["X-Relay-Policy"] == ("attributes-removed=1; comments-removed=1; emails-removed=1; "
                                     "images-removed=1; links-removed=1; tags-removed=3")
    assert any(change.startswith("removed ") and "text/html part 0 (elements: blink, script, title)" in change
               for change in changes), changes
    assert html_part(msg).get_content().replace("\r\n", "\n") == (
        "\n<p>Hi <a>shop</a> mail [email removed]</p>!\n")


def test_body_handler_is_not_delivered():
    """The fragment parse drops <body> and its attributes; both
    serializations agreed and the part used to go out with its original
    bytes, onload and tracking background included."""
    html = '<html><body onload="alert(1)" background="https://evil.test/bg.png"><p>Hello</p></body></html>\n'
    raw = single("Content-Type: text/html; charset=utf-8", html)
    delivered, msg, _ = deliver(raw)
    assert b"onload" not in delivered and b"evil.test" not in delivered
    assert html_part(msg).get_content().replace("\r\n", "\n") == "<p>Hello</p>\n"
    assert msg["X-Relay-Policy"] == "attributes-removed=2"
