"""The attachment check (DESIGN §4) as a table: tests/cases/attachments.tsv.

Each row is one attachment part. The test builds a multipart/mixed message
from the buyer (a short text/plain body, then the part with the row's
headers and content, base64-encoded in 64-character lines), runs the whole
pure pipeline and checks the verdict: delivered with the part's encoded
lines and headers exactly as sent, or refused with the row's reply. The
file's header explains the columns, the content kinds and the options;
adding a case is adding a row.
"""

from __future__ import annotations

import base64
import email
import email.policy
import gzip
import io
import random
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import filetype
import pytest

from relay import pipeline
from relay.config import PolicyConfig
from relay.replies import SmtpError
from test_rewrite_hostile import eml, make_context

TABLE = Path(__file__).resolve().parent.parent / "cases" / "attachments.tsv"
COLUMNS = ["name", "content_type_header", "disposition_header", "content", "expected", "note", "options"]
OPTIONS = {"limit", "types", "cid", "count", "cte", "top", "removed"}


# --- content kinds: symbolic name -> bytes ----------------------------------------

FILLER = bytes(range(256)) * 4


def _png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1, 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


def _zip(entries: list[tuple[str, str]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in entries:
            # A fixed date: the same bytes on every run.
            archive.writestr(zipfile.ZipInfo(name, date_time=(2026, 11, 26, 9, 30, 0)), text)
    return out.getvalue()


def _text(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("ascii")


KINDS = {
    "pdf": lambda: (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"
                    + FILLER[:300] + b"\n%%EOF\n"),
    "png": _png,
    "gif": lambda: (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
                    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"),
    "jpg": lambda: b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + FILLER[:200] + b"\xff\xd9",
    # What Word writes first: [Content_Types].xml, the package rels, the document.
    "docx": lambda: _zip([
        ("[Content_Types].xml", '<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.'
                                'openxmlformats.org/package/2006/content-types"/>'),
        ("_rels/.rels", '<?xml version="1.0" encoding="UTF-8"?><Relationships/>'),
        ("word/document.xml", '<?xml version="1.0" encoding="UTF-8"?><w:document/>'),
    ]),
    "doc": lambda: b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504) + b"\xec\xa5\xc1\x00" + bytes(1020),
    "exe": lambda: (b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" + bytes(44) + b"\x80\x00\x00\x00"
                    + b"This program cannot be run in DOS mode.\r\r\n$".ljust(64, b"\x00") + b"PE\x00\x00"
                    + FILLER[:200]),
    "elf": lambda: b"\x7fELF\x02\x01\x01\x00" + bytes(8) + b"\x02\x00\x3e\x00" + FILLER[:200],
    "zip": lambda: _zip([("readme.txt", "hello\n"), ("setup.exe", "MZ")]),
    "rar": lambda: b"Rar!\x1a\x07\x01\x00" + FILLER[:200],
    "7z": lambda: b"7z\xbc\xaf\x27\x1c\x00\x04" + FILLER[:200],
    "gz": lambda: gzip.compress(b"MZ not really an executable\n", mtime=0),
    "html": lambda: _text("<!DOCTYPE html>\n<html><body><script>location.replace(atob('aHR0cDovL2V2aWw='))"
                          "</script></body></html>\n"),
    "text": lambda: _text("Notes from Tuesday\n- the blue chair is in stock\n- pickup on Friday\n"),
    "utf16-text": lambda: b"\xff\xfe" + "Notes from Tuesday\r\nthe blue chair\r\n".encode("utf-16-le"),
    "js": lambda: _text("var shell = new ActiveXObject('WScript.Shell');\nshell.Run('calc');\n"),
    "random": lambda: random.Random(20261127).randbytes(2048),
    "empty": lambda: b"",
    "eml": lambda: _text("Subject: our chat\nDate: Wed, 25 Nov 2026 08:00:00 +0100\n\nSee you Friday.\n"),
    "pgp-sig": lambda: _text("-----BEGIN PGP SIGNATURE-----\n\niHUEARYKAB0WIQTrhbtfozp14V6UTmPyMVUMT0fjjgUCZ0h1vQAKCRDyMVUMT0fj\n"
                             "jlZtAP9o3nn0bSWW0rMbTnuAl1jc2I4CV9fDT2rHjMUUPmOjrwD/bZX8Y8p1bBuC\n"
                             "=Qz2b\n-----END PGP SIGNATURE-----\n"),
    "p7s": lambda: b"\x30\x82\x01\x20\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x07\x02\xa0\x82\x01\x11" + FILLER[:270],
}


def content_bytes(kind: str) -> bytes:
    """`kind`, or `kind-big:N` for that content padded to exactly N bytes."""
    match = re.fullmatch(r"(?P<base>[\w-]+?)-big:(?P<size>\d+)", kind)
    if match is None:
        return KINDS[kind]()
    data, size = KINDS[match["base"]](), int(match["size"])
    assert size >= len(data), f"{kind}: {match['base']} alone is {len(data)} bytes"
    return data + (FILLER * (size // len(FILLER) + 1))[:size - len(data)]


# --- the table ------------------------------------------------------------------------

def unescape(cell: str) -> str:
    r"""`\uXXXX` is that character, `\n` a line break; other backslashes are literal."""
    return re.sub(r"\\u([0-9a-fA-F]{4})|\\n", lambda m: chr(int(m[1], 16)) if m[1] else "\n", cell)


@dataclass(frozen=True)
class Row:
    line: int
    name: str | None  # as the recipient's client reads it; None: the part has no name
    content_type: str | None  # header values; None: no such header
    disposition: str | None
    content: str
    expected: str
    note: str
    options: dict[str, str]
    says: str = ""  # for a 550 on content: the reply after the quoted name

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.name or self.content_type}"

    @property
    def policy(self) -> PolicyConfig:
        values = {}
        if "limit" in self.options:
            values["max_attachment_bytes"] = int(self.options["limit"])
        if "types" in self.options:
            values["attachment_types"] = tuple(self.options["types"].split(","))
        return PolicyConfig(**values)


def load_rows() -> list[Row]:
    rows, header = [], None
    for number, text in enumerate(TABLE.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip() or text.startswith("#"):
            continue
        cells = text.split("\t")
        if header is None:
            header = cells
            assert header == COLUMNS or header == COLUMNS[:-1], f"{TABLE}:{number}: columns {header}"
            continue
        assert len(cells) in (6, 7), f"{TABLE}:{number}: {len(cells)} cells"
        # Not stripped: a trailing space in a name is a case ("evil.exe ").
        name, content_type, disposition, content, expected, note, *rest = (unescape(c) for c in cells)
        options = {}
        for option in (rest[0].split() if rest else []):
            key, _, value = option.partition("=")
            assert key in OPTIONS, f"{TABLE}:{number}: unknown option {key!r}"
            options[key] = value
        expected, _, says = expected.partition(" ")
        assert expected in ("ok", "550", "552"), f"{TABLE}:{number}: expected {expected!r}"
        assert not says or expected == "550", f"{TABLE}:{number}: a reply text for {expected}"
        assert content.split(":")[0].removesuffix("-big") in KINDS, f"{TABLE}:{number}: content {content!r}"
        rows.append(Row(number, None if name == "-" else name, None if content_type == "-" else content_type,
                        None if disposition == "-" else disposition, content, expected, note, options,
                        says))
    return rows


ROWS = load_rows()


# --- building and running --------------------------------------------------------

def base64_lines(data: bytes) -> list[str]:
    # 64 characters a line, not the 76 a re-encoder would write: a part
    # the relay decoded and encoded again would not come out the same.
    return re.findall(".{1,64}", base64.b64encode(data).decode("ascii"))


def part_headers(row: Row, number: int) -> list[str]:
    headers = []
    if row.content_type is not None:
        headers.append(f"Content-Type: {row.content_type}")
    if row.disposition is not None:
        headers.append(f"Content-Disposition: {row.disposition}")
    if "cid" in row.options:
        headers.append(f"Content-ID: <{row.options['cid']}-{number}@mail.example>")
    if row.options.get("cte", "base64") == "base64":
        headers.append("Content-Transfer-Encoding: base64")
    return headers


def part_text(row: Row, number: int, data: bytes) -> str:
    """The part as sent, up to the line break before the next boundary
    (which belongs to the boundary, RFC 2046 §5.1.1)."""
    if row.options.get("cte", "base64") == "base64":
        body = "\n".join(base64_lines(data))
    else:
        body = data.decode("ascii").replace("\r\n", "\n")
    return "\n".join(part_headers(row, number)) + "\n\n" + body


def build(row: Row) -> bytes:
    data = content_bytes(row.content)
    parts = ["Content-Type: text/plain; charset=utf-8\n\nThe file you asked for."]
    parts.extend(part_text(row, number, data) for number in range(int(row.options.get("count", "1"))))
    body = "".join(f"--BOUNDARY\n{part}\n" for part in parts) + "--BOUNDARY--\n"
    top = row.options.get("top", "mixed")
    if top == "signed":
        top = 'signed; micalg=pgp-sha256; protocol="application/pgp-signature"'
    else:
        assert top == "mixed", f"{TABLE}:{row.line}: top={top}"
    return eml(f"MIME-Version: 1.0\nContent-Type: multipart/{top}; boundary=BOUNDARY", body)


def run(row: Row, changes: list[str]) -> pipeline.Result:
    return pipeline.process(pipeline.parse(build(row)), make_context(policy=row.policy), changes)


def readable(name: str) -> str:
    """A name as a reply line can carry it: printable ASCII, no quotes or
    backslashes, at most 60 characters."""
    name = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in name)
    return name if len(name) <= 60 else name[:57] + "..."


# --- the tests ------------------------------------------------------------------------

def test_table_has_enough_rows():
    assert len(ROWS) >= 30
    assert {row.expected for row in ROWS} == {"ok", "550", "552"}


def test_every_kind_is_what_its_name_says():
    """The content kinds are real files of their type, so that an "ok" row
    tests the check and not a made-up byte string."""
    for kind in ("pdf", "png", "gif", "jpg", "docx", "exe", "elf", "zip", "rar", "7z", "gz"):
        assert filetype.guess(KINDS[kind]()).extension == kind, kind
    assert zipfile.ZipFile(io.BytesIO(KINDS["docx"]())).namelist()[0] == "[Content_Types].xml"


@pytest.mark.parametrize("row", [r for r in ROWS if r.expected == "ok"], ids=lambda r: r.id)
def test_delivered(row: Row):
    changes: list[str] = []
    result = run(row, changes)
    out = email.message_from_bytes(result.delivered, policy=email.policy.default)
    data = content_bytes(row.content)
    if "removed" in row.options:
        # A detached signature: gone, the rest delivered and no longer "signed".
        assert all(p.get_content_type() != row.content_type.split(";")[0] for p in out.walk())
        assert any("detached signature" in change for change in changes), changes
        assert out.get_content_type() == "multipart/mixed"
        assert out.get_param("protocol") is None
        assert [p.get_content_type() for p in out.iter_parts()] == ["text/plain"]
        return
    parts = list(out.iter_parts())[1:]  # after the text body
    assert len(parts) == int(row.options.get("count", "1"))
    for number, part in enumerate(parts):
        # Byte-identical: the part's headers and encoded lines as sent.
        block = part_text(row, number, data) + "\n--BOUNDARY"
        assert block.replace("\n", "\r\n").encode("ascii") in result.delivered
        if not part.is_multipart():  # an attached message has no bytes of its own
            assert part.get_payload(decode=True) == data
        names = [part[header].params.get(param) for header, param in
                 (("Content-Disposition", "filename"), ("Content-Type", "name")) if part[header]]
        assert next((name for name in names if name), None) == row.name


@pytest.mark.parametrize("row", [r for r in ROWS if r.expected != "ok"], ids=lambda r: r.id)
def test_refused(row: Row):
    changes: list[str] = []
    with pytest.raises(SmtpError) as caught:
        run(row, changes)
    reply = caught.value.reply
    # The archive keeps why (for the arbiter), not just the reply.
    assert changes[-1].startswith("refused: attachment"), changes
    policy = row.policy
    if row.expected == "550":
        assert (reply.code, reply.enhanced) == (550, "5.7.1")
        named = readable(row.name) if row.name is not None else f"unnamed {row.content_type.split(';')[0]} part"
        if row.says:  # an allowed name on other content: what the content is, no list
            assert reply.text == f'Attachment "{named}" {row.says}'
        else:
            assert f'Attachment "{named}" is not allowed' in reply.text
            assert reply.text.endswith("allowed types: " + ", ".join(policy.attachment_types))
    else:
        assert (reply.code, reply.enhanced) == (552, "5.3.4")
        total = len(content_bytes(row.content)) * int(row.options.get("count", "1"))
        assert f"total {total} bytes, over the limit of {policy.max_attachment_bytes} bytes" in reply.text
