"""The link policy (DESIGN §4) as tables in tests/cases/:

- link_urls.tsv: `LinkPolicy.url_allowed()`, one URL and its verdict a row;
- link_texts.tsv: `LinkPolicy.clean_text()`, text in and text out a row;
- link_messages.tsv: the strip_links stage through the whole pipeline on
  text/plain parts in several charsets and transfer encodings.

Each file's header explains its columns, options and escapes; adding a case
is adding a row. One test per row, with the row's note as its id.
"""

from __future__ import annotations

import base64
import email
import email.policy
import quopri
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay import pipeline
from relay.config import PolicyConfig
from relay.pipeline.links import EMAIL_REMOVED, LINK_REMOVED, PHONE_REMOVED, LinkPolicy
from test_rewrite_hostile import BUYER_ALIAS, SELLER_ALIAS, eml, make_context

CASES = Path(__file__).resolve().parent.parent / "cases"
ALIASES = {BUYER_ALIAS, SELLER_ALIAS}
CONTENT_IDS = {"img1@shop.example"}
MINIMUM_ROWS = {"link_urls.tsv": 60, "link_texts.tsv": 40, "link_messages.tsv": 15}

assert ALIASES == {"aaaaaaaaaaaaaaaa@marketplace.example", "bbbbbbbbbbbbbbbb@marketplace.example"}


# --- loading ----------------------------------------------------------------------

_ESCAPE = re.compile(r"\\(\\|t|n|r|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|.|$)")
_SIMPLE = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def unescape(cell: str) -> str:
    """A cell's text with the escapes the file headers describe undone."""
    def one(match: re.Match) -> str:
        code = match.group(1)
        if code in _SIMPLE:
            return _SIMPLE[code]
        if code[:1] in ("x", "u") and len(code) > 1:
            return chr(int(code[1:], 16))
        raise ValueError(f"unknown escape \\{code} in {cell!r} (write a backslash as \\\\)")
    return _ESCAPE.sub(one, cell)


@dataclass(frozen=True)
class Row:
    line: int
    cells: tuple[str, ...]


def load(name: str, columns: int) -> list[Row]:
    rows = []
    for number, line in enumerate((CASES / name).read_text(encoding="utf-8").splitlines(), 1):
        # A comment holds no tab: a row may start with "#" (an anchor URL).
        if not line.strip() or (line.startswith("#") and "\t" not in line):
            continue
        cells = line.split("\t")
        assert len(cells) == columns, f"{name}:{number}: {len(cells)} columns, expected {columns}: {line!r}"
        rows.append(Row(number, tuple(cells)))
    return rows


def params(name: str, columns: int, note_column: int, fallback_column: int = 0):
    return [pytest.param(row, id=row.cells[note_column] or row.cells[fallback_column])
            for row in load(name, columns)]


def phone_policy(options: str) -> PolicyConfig:
    """The policy an options cell asks for (`phones`, `phones=gb,us`)."""
    policy = PolicyConfig()
    for option in options.split():
        key, _, value = option.partition("=")
        if key == "phones":
            regions = tuple(value.split(",")) if value else ("us",)
            policy = PolicyConfig(redact_phone_numbers=True, phone_regions=regions)
        elif key not in ("multipart", "rawlacks"):
            raise ValueError(f"unknown option {option!r}")
    return policy


@pytest.mark.parametrize("name, columns, note_column", [
    ("link_urls.tsv", 3, 2), ("link_texts.tsv", 4, 3), ("link_messages.tsv", 7, 6),
])
def test_table_is_complete(name, columns, note_column):
    rows = load(name, columns)
    assert len(rows) >= MINIMUM_ROWS[name], f"{name}: {len(rows)} rows, at least {MINIMUM_ROWS[name]} wanted"
    ids = [row.cells[note_column] or row.cells[0] for row in rows]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"{name}: test ids must be unique: {duplicates}"
    for row in rows:
        for cell in row.cells:
            unescape(cell)  # raises on an unknown escape


# --- link_urls.tsv ------------------------------------------------------------------

@pytest.mark.parametrize("row", params("link_urls.tsv", 3, 2))
def test_url(row: Row):
    url_cell, verdict, _note = row.cells
    assert verdict in ("allow", "remove"), f"line {row.line}: verdict {verdict!r}"
    policy = LinkPolicy(PolicyConfig(), ALIASES, CONTENT_IDS)
    url = unescape(url_cell)
    assert policy.url_allowed(url) is (verdict == "allow"), f"line {row.line}: {url!r} should be {verdict}d"


# --- link_texts.tsv -----------------------------------------------------------------

_PLACEHOLDERS = {"links": LINK_REMOVED, "emails": EMAIL_REMOVED, "phones": PHONE_REMOVED}


@pytest.mark.parametrize("row", params("link_texts.tsv", 4, 3))
def test_text(row: Row):
    input_cell, expected_cell, options, _note = row.cells
    text = unescape(input_cell)
    expected = text if expected_cell == "=" else unescape(expected_cell)
    policy = LinkPolicy(phone_policy(options), ALIASES)
    cleaned, removed = policy.clean_text(text)
    assert cleaned == expected, f"line {row.line}"
    # Placeholders are inert: a second pass finds nothing more.
    assert policy.clean_text(cleaned) == (cleaned, {}), f"line {row.line}"
    # The tally (X-Relay-Policy, the archive) says what the placeholders say.
    tally = {kind: expected.count(mark) - text.count(mark) for kind, mark in _PLACEHOLDERS.items()}
    assert +removed == {kind: n for kind, n in tally.items() if n}, f"line {row.line}"


# --- link_messages.tsv ----------------------------------------------------------------

def encode_body(text: str, charset: str, cte: str) -> bytes:
    data = text.encode(charset)
    if cte == "base64":
        return base64.encodebytes(data)
    if cte == "quoted-printable":
        return quopri.encodestring(data)
    return data


def build_message(body: bytes, charset: str, cte: str, multipart: bool) -> bytes:
    part = f"Content-Type: text/plain; charset={charset}\nContent-Transfer-Encoding: {cte}\n".encode()
    if not multipart:
        return eml("MIME-Version: 1.0\n" + part.decode(), body)
    # The line break before a boundary belongs to the boundary (RFC 2046).
    wrapped = b"--BOUNDARY\n" + part + b"\n" + body + b"\n--BOUNDARY--\n"
    return eml("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=BOUNDARY", wrapped)


def body_lines(raw: bytes) -> list[bytes]:
    """The body lines of the single text/plain part of a message, as sent."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    (part,) = [p for p in msg.walk() if p.get_content_type() == "text/plain"]
    payload = part.get_payload()
    return payload.encode("utf-8", "surrogateescape").splitlines()


def well_formed(lines: list[bytes], cte: str) -> bool:
    if cte == "base64":
        return all(re.fullmatch(rb"[A-Za-z0-9+/]{0,76}={0,2}", line) for line in lines)
    if cte == "quoted-printable":
        return all(len(line) <= 76 and re.fullmatch(rb"[\x20-\x7e\t]*", line) for line in lines)
    if cte == "7bit":
        return all(line.isascii() and len(line) <= 998 for line in lines)
    return all(len(line) <= 998 for line in lines)


@pytest.mark.parametrize("row", params("link_messages.tsv", 7, 6))
def test_message(row: Row):
    charset, cte, input_cell, expected_cell, summary, options, _note = row.cells
    text = unescape(input_cell)
    expected = text if expected_cell == "=" else unescape(expected_cell)
    opts = dict(option.partition("=")[::2] for option in options.split())
    raw = build_message(encode_body(text + "\n", charset, cte), charset, cte, "multipart" in opts)
    if "rawlacks" in opts:
        assert opts["rawlacks"].encode() not in raw, "the row should hide this in the encoding"

    result = pipeline.process(pipeline.parse(raw), make_context(policy=phone_policy(options)), [])

    out = email.message_from_bytes(result.delivered, policy=email.policy.default)
    assert out["X-Relay-Policy"] == summary
    (part,) = [p for p in out.walk() if p.get_content_type() == "text/plain"]
    assert part.get_content_charset() == charset.lower()
    assert part["Content-Transfer-Encoding"] == cte
    decoded = (part.get_payload(decode=True) or b"").decode(charset).replace("\r\n", "\n")
    assert decoded == expected + "\n"
    lines = body_lines(result.delivered)
    assert well_formed(lines, cte), lines
    if summary == "clean":
        assert lines == body_lines(raw), "a part with nothing removed leaves as it came"
