"""The benchmark's message mix, built deterministically from a seed.

Three kinds, in fixed proportions (DESIGN's "typical marketplace mail"):

- ``text`` (70 %): about 2 KB of plain text from the buyer, sometimes
  quoted-printable, naming the buyer's real address and, now and then, a
  marketplace link and an off-site link;
- ``html`` (25 %): about 20 KB, multipart/alternative with a text part and
  a quoted-printable HTML part laid out as mail clients write it (a head
  with a style block, an Outlook conditional comment, layout tables, inline
  styles, a quoted earlier message), with links to the marketplace (kept),
  links and images elsewhere (removed by the relay) and the buyer's real
  address in a mailto: link and in the text;
- ``pdf`` (5 %): a short text part and a 500 KB PDF attachment (a real PDF
  structure: header, objects, a Flate content stream, an image XObject,
  xref table, trailer), base64 in 76-character lines.

Every message is From: the buyer, To: the seller's alias, and DKIM-signed
by the buyer's domain with the test key from tests/zones/keys/ (selector
``bench``), so the relay's inbound check does SPF, DKIM and DMARC as for mail
from a real provider. The signature leaves out Message-ID, which the load
client adds per send.

`payload()` gives what the client writes after DATA: CRLF line ends,
dot-stuffed, ending in CRLF.CRLF.
"""

from __future__ import annotations

import base64
import quopri
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import dkim as dkimpy

ROOT = Path(__file__).resolve().parent.parent
TEST_KEY = ROOT / "tests" / "zones" / "keys" / "a.private.pem"  # test-only key, published nowhere real

SELLER = "sam@shop.example"
SELLER_NAME = "Sam's Shop"
BUYER = "bea.buyer@mail.example"
BUYER_NAME = "Bea Buyer"
BUYER_DOMAIN = "mail.example"
SELECTOR = "bench"
MARKETPLACE = "marketplace.example"  # the relay's domain and its allowed link domain
OFFSITE_HOST = "deals.othershop.example"  # a marker the relay must strip from every link

KINDS = ("text", "html", "pdf")
MIX = {"text": 0.70, "html": 0.25, "pdf": 0.05}
VARIANTS = {"text": 8, "html": 4, "pdf": 2}
TEXT_BYTES = 2 * 1024
HTML_BYTES = 20 * 1024
PDF_BYTES = 500 * 1024
BIG_PDF_BYTES = 10_000_000  # the policy limit is 10485760 decoded bytes

SIGNED_HEADERS = [b"from", b"to", b"subject", b"date", b"mime-version", b"content-type"]


def buyer_zone(private_pem: bytes) -> str:
    """The buyer's domain as the relay's checks see it: SPF allows
    127.0.0.1, the DKIM key is published under `bench`, DMARC says reject."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(private_pem, password=None)
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    record = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"
    chunks = " ".join(f'"{record[i:i + 200]}"' for i in range(0, len(record), 200))
    return f"""$ORIGIN {BUYER_DOMAIN}.
$TTL 300
@ IN SOA ns.{BUYER_DOMAIN}. hostmaster.{BUYER_DOMAIN}. 1 3600 600 86400 300
@ IN NS ns.{BUYER_DOMAIN}.
ns IN A 127.0.0.1
@ IN TXT "v=spf1 ip4:127.0.0.1 -all"
_dmarc IN TXT "v=DMARC1; p=reject"
{SELECTOR}._domainkey IN TXT {chunks}
"""


@dataclass(frozen=True)
class Message:
    kind: str
    name: str
    data: bytes  # the message, CRLF line ends, DKIM-signed, no Message-ID

    def payload(self) -> bytes:
        return payload(self.data)


def payload(data: bytes) -> bytes:
    """`data` as written after DATA: dot-stuffed, ending in CRLF.CRLF."""
    lines = data.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)
    return stuffed + b"\r\n.\r\n"


# --- content ------------------------------------------------------------------------

SENTENCES = [
    "Thank you for the quick dispatch, the parcel arrived this morning.",
    "Unfortunately the blue mug in the set has a chip on its rim.",
    "The saucer that should come with it was not in the box at all.",
    "Could you send a replacement, or refund that part of the order?",
    "I attached the receipt, and photos of the damage can follow if you need them.",
    "The packaging itself looked fine, so it probably happened before shipping.",
    "I would also like to order two more of the small bowls if they are back in stock.",
    "Would it be possible to ship them together with the replacement?",
    "I am at home most afternoons this week, so delivery any day is fine.",
    "The tracking page said the parcel was delivered yesterday, but it came today.",
    "My neighbour took it in, which is why I am only writing now.",
    "Do you also sell the matching plates, or only the mugs and bowls?",
    "The colour is a little darker than on the photos, but I like it.",
    "Please let me know which option works best for you.",
    "If you need the order number again, it is on the receipt.",
    "I left a good review already, the rest of the set is lovely.",
]


def _paragraphs(rng: random.Random, target: int, extras: list[str]) -> list[str]:
    out: list[str] = []
    size = 0
    while size < target:
        paragraph = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(2, 4)))
        if extras and rng.random() < 0.5:
            paragraph += " " + extras.pop(0)
        out.append(paragraph)
        size += len(paragraph) + 2
    out.extend(extras)
    return out


def _wrap(text: str, width: int = 72) -> str:
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\r\n".join(lines)


def _headers(to: str, subject: str, index: int, content_type: str, extra: str = "") -> str:
    day = 1 + index % 28
    return (f"From: {BUYER_NAME} <{BUYER}>\r\n"
            f"To: {to}\r\n"
            f"Subject: {subject}\r\n"
            f"Date: Thu, {day:02d} Oct 2026 10:{index % 60:02d}:00 +0000\r\n"
            f"MIME-Version: 1.0\r\n"
            f"Content-Type: {content_type}\r\n"
            f"{extra}"
            f"X-Mailer: BenchMail 1.0\r\n")


def _qp(text: str) -> bytes:
    return quopri.encodestring(text.replace("\r\n", "\n").encode("utf-8")).replace(b"\n", b"\r\n")


def text_message(rng: random.Random, to: str, index: int) -> bytes:
    extras = [f"You can also write to me directly at {BUYER}."]
    if index % 2 == 0:
        extras.append(f"The order page is https://{MARKETPLACE}/orders/111-{index:03d} for reference.")
    if index % 3 == 0:
        extras.append(f"I found a cheaper one at https://{OFFSITE_HOST}/mugs?ref={index} by the way.")
    body = "\r\n\r\n".join(_wrap(p) for p in _paragraphs(rng, TEXT_BYTES - 1150, extras))
    body += f"\r\n\r\nBest regards,\r\n{BUYER_NAME}\r\n"
    if index % 2:
        head = _headers(to, f"Question about order 111-{index:03d}", index, "text/plain; charset=utf-8",
                        "Content-Transfer-Encoding: quoted-printable\r\n")
        return head.encode() + b"\r\n" + _qp(body.replace("Best", "Kind"))
    head = _headers(to, f"Question about order 111-{index:03d}", index, "text/plain; charset=us-ascii",
                    "Content-Transfer-Encoding: 7bit\r\n")
    return (head + "\r\n" + body).encode()


def _html(rng: random.Random, index: int, target: int) -> tuple[str, str]:
    """An HTML body of about `target` bytes and its plain-text alternative."""
    links = [
        (f"https://{MARKETPLACE}/orders/111-{index:03d}", "your order"),
        (f"https://help.{MARKETPLACE}/returns", "the returns page"),
        (f"https://{OFFSITE_HOST}/mugs?utm_source=mail&amp;ref={index}", "this offer"),
        ("http://track.carrier.example/p/JD0146000012345", "tracking"),
        (f"https://www.{MARKETPLACE}/shop/sam-s-shop", "Sam's shop"),
        ("https://social.example/bea.buyer", "my profile"),
    ]
    head = (
        "<!DOCTYPE html>\r\n<html><head>\r\n"
        "<meta http-equiv=\"Content-Type\" content=\"text/html; charset=utf-8\">\r\n"
        "<style type=\"text/css\">body{margin:0;padding:0} .q{color:#555;border-left:2px solid #ccc;"
        "padding-left:8px} @media (max-width:600px){.w{width:100%!important}}</style>\r\n"
        "<!--[if mso]><xml><o:OfficeDocumentSettings><o:AllowPNG/></o:OfficeDocumentSettings></xml>"
        "<![endif]-->\r\n</head>\r\n"
        "<body style=\"margin:0;padding:0;background-color:#f4f4f4;\">\r\n"
        "<table role=\"presentation\" width=\"100%\" cellpadding=\"0\" cellspacing=\"0\" border=\"0\" "
        "bgcolor=\"#f4f4f4\"><tr><td align=\"center\">\r\n"
        "<table class=\"w\" width=\"600\" cellpadding=\"16\" cellspacing=\"0\" border=\"0\" "
        "style=\"background-color:#ffffff;font-family:Arial,Helvetica,sans-serif;font-size:14px;"
        "line-height:20px;color:#222222;\">\r\n"
    )
    tail = (
        f"<tr><td><p style=\"margin:0 0 12px 0;\">Best regards,<br>{BUYER_NAME}<br>"
        f"<a href=\"mailto:{BUYER}\" style=\"color:#1a73e8;\">{BUYER}</a></p>\r\n"
        f"<img src=\"https://{MARKETPLACE}/static/logo.png\" alt=\"Marketplace\" width=\"120\" height=\"30\">\r\n"
        f"<img src=\"https://{OFFSITE_HOST}/pixel.gif?u={index}\" width=\"1\" height=\"1\" alt=\"\">\r\n"
        "</td></tr>\r\n</table>\r\n</td></tr></table>\r\n</body></html>\r\n"
    )
    rows, text_rows = [], []
    size = len(head) + len(tail)
    n = 0
    while size < target:
        sentences = [rng.choice(SENTENCES) for _ in range(rng.randint(3, 6))]
        url, label = links[n % len(links)]
        n += 1
        html_sentences = list(sentences)
        html_sentences.insert(rng.randrange(len(sentences) + 1),
                              f"See <a href=\"{url}\" target=\"_blank\" style=\"color:#1a73e8;"
                              f"text-decoration:underline;\">{label}</a>.")
        if n % 5 == 0:
            html_sentences.append(f"My address is <b>{BUYER}</b> if the form does not work.")
            sentences.append(f"My address is {BUYER} if the form does not work.")
        paragraph = " ".join(html_sentences)
        if n % 4 == 0:
            row = (f"<tr><td><blockquote class=\"q\" style=\"margin:0 0 12px 0;\">"
                   f"<div><font color=\"#555555\" face=\"Arial\">{paragraph}</font></div>"
                   f"</blockquote></td></tr>\r\n")
        else:
            row = (f"<tr><td><p style=\"margin:0 0 12px 0;font-size:14px;line-height:20px;\">"
                   f"<span style=\"color:#222222;\">{paragraph}</span></p></td></tr>\r\n")
        rows.append(row)
        text_rows.append(" ".join(sentences) + f" ({label}: {url.replace('&amp;', '&')})")
        size += len(row)
    html = head + "".join(rows) + tail
    text = "\r\n\r\n".join(_wrap(p) for p in text_rows) + f"\r\n\r\nBest regards,\r\n{BUYER_NAME} <{BUYER}>\r\n"
    return html, text


def html_message(rng: random.Random, to: str, index: int) -> bytes:
    boundary = f"==bench-alt-{index:04d}-{rng.getrandbits(48):012x}"
    html, text = _html(rng, index, int(HTML_BYTES * 0.54))
    head = _headers(to, f"Re: Damaged item in order 111-{index:03d}", index,
                    f"multipart/alternative; boundary=\"{boundary}\"")
    parts = [
        head.encode(), b"\r\n",
        f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: quoted-printable\r\n\r\n".encode(), _qp(text), b"\r\n",
        f"--{boundary}\r\nContent-Type: text/html; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: quoted-printable\r\n\r\n".encode(), _qp(html), b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts)


def pdf_bytes(size: int, seed: int) -> bytes:
    """A structurally valid PDF of exactly `size` bytes: one page with a
    text content stream and an image XObject whose (incompressible) data
    makes up the size."""
    rng = random.Random(seed)
    text_ops = "BT /F1 12 Tf 72 720 Td (Receipt for order 111-222) Tj ET\n" + "".join(
        f"BT /F1 10 Tf 72 {700 - 14 * i} Td (Item {i}: ceramic mug, blue, 1 x 12.00 EUR) Tj ET\n"
        for i in range(30))
    content = zlib.compress(text_ops.encode("latin-1"))

    def build(image: bytes) -> bytes:
        objects = [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
            b"/Resources << /Font << /F1 5 0 R >> /XObject << /Im1 6 0 R >> >> >>",
            b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(content) + content + b"\nendstream",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
            b"<< /Type /XObject /Subtype /Image /Width 512 /Height 512 /ColorSpace /DeviceRGB "
            b"/BitsPerComponent 8 /Filter /FlateDecode /Length %d >>\nstream\n" % len(image)
            + image + b"\nendstream",
            b"<< /Producer (BenchPDF 1.0) /CreationDate (D:20261001100000Z) >>",
        ]
        out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
        offsets = []
        for number, body in enumerate(objects, start=1):
            offsets.append(len(out))
            out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
        xref = len(out)
        out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
        for offset in offsets:
            out += b"%010d 00000 n \n" % offset
        out += (b"trailer\n<< /Size %d /Root 1 0 R /Info 7 0 R >>\nstartxref\n%d\n%%%%EOF\n"
                % (len(objects) + 1, xref))
        return bytes(out)

    overhead = len(build(b""))
    # The /Length digits change with the image's size; fix up until exact.
    image_size = max(0, size - overhead - 8)
    for _ in range(4):
        pdf = build(rng.randbytes(image_size))
        if len(pdf) == size:
            return pdf
        image_size += size - len(pdf)
    return pdf


def _base64_lines(data: bytes) -> bytes:
    encoded = base64.b64encode(data)
    return b"\r\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76)) + b"\r\n"


def pdf_message(rng: random.Random, to: str, index: int, size: int = PDF_BYTES) -> bytes:
    boundary = f"==bench-mixed-{index:04d}-{rng.getrandbits(48):012x}"
    text = "\r\n\r\n".join(_wrap(p) for p in _paragraphs(
        rng, 600, [f"The receipt is attached. You can reach me at {BUYER}."]))
    head = _headers(to, f"Receipt for order 111-{index:03d}", index,
                    f"multipart/mixed; boundary=\"{boundary}\"")
    return b"".join([
        head.encode(), b"\r\n",
        f"--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n"
        f"Content-Transfer-Encoding: 7bit\r\n\r\n{text}\r\n\r\n{BUYER_NAME}\r\n".encode(),
        f"--{boundary}\r\nContent-Type: application/pdf; name=\"receipt-{index:03d}.pdf\"\r\n"
        f"Content-Disposition: attachment; filename=\"receipt-{index:03d}.pdf\"\r\n"
        f"Content-Transfer-Encoding: base64\r\n\r\n".encode(),
        _base64_lines(pdf_bytes(size, seed=rng.getrandbits(32))),
        f"--{boundary}--\r\n".encode(),
    ])


def sign(data: bytes, private_pem: bytes) -> bytes:
    signature = dkimpy.sign(data, SELECTOR.encode(), BUYER_DOMAIN.encode(), private_pem,
                            canonicalize=(b"relaxed", b"relaxed"), include_headers=SIGNED_HEADERS)
    return signature + data


BUILDERS = {"text": text_message, "html": html_message, "pdf": pdf_message}


def build_variants(to: str, seed: int, private_pem: bytes) -> list[Message]:
    """Every variant of every kind, signed; the same for the same seed."""
    rng = random.Random(seed)
    out = []
    index = 0
    for kind in KINDS:
        for variant in range(VARIANTS[kind]):
            index += 1
            data = BUILDERS[kind](random.Random(rng.getrandbits(64)), to, index)
            out.append(Message(kind, f"{kind}-{variant}", sign(data, private_pem)))
    return out


def big_message(to: str, seed: int, private_pem: bytes) -> Message:
    """One message with a BIG_PDF_BYTES attachment (decoded)."""
    data = pdf_message(random.Random(seed), to, 999, size=BIG_PDF_BYTES)
    return Message("pdf", "pdf-10mb", sign(data, private_pem))


def sequence(variants: list[Message], count: int, seed: int) -> list[int]:
    """`count` indexes into `variants`: the kinds in the MIX proportions
    (rounded; the rest is text), shuffled, each kind cycling its variants."""
    by_kind = {kind: [i for i, m in enumerate(variants) if m.kind == kind] for kind in KINDS}
    counts = {kind: round(count * MIX[kind]) for kind in ("html", "pdf")}
    counts["text"] = count - sum(counts.values())
    picks = []
    for kind in KINDS:
        pool = by_kind[kind]
        picks.extend(pool[i % len(pool)] for i in range(counts[kind]))
    random.Random(seed).shuffle(picks)
    return picks
