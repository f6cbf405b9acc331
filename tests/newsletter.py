"""A realistic, legitimate seller message: a newsletter-style HTML body with
a table layout, inline styles, inline images referenced by cid:, an allowed
link, a plain-text alternative and a PDF attachment. Nothing in it is
prohibited, so every MIME part must arrive exactly as sent."""

from __future__ import annotations

import base64
import zlib
from email import policy
from email.message import EmailMessage
from email.utils import make_msgid


def png(width: int = 4, height: int = 4) -> bytes:
    """A real (tiny) PNG image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))
    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", width.to_bytes(4, "big") + height.to_bytes(4, "big")
                                         + b"\x08\x02\x00\x00\x00")
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def newsletter(sender: str, to: str) -> bytes:
    logo_cid = make_msgid(domain="shop.example")
    banner_cid = make_msgid(domain="shop.example")
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = f"Sam's Shop <{sender}>"
    msg["To"] = to
    msg["Subject"] = "Your order has shipped — thank you!"
    msg["Date"] = "Thu, 26 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = "<news-1@shop.example>"
    msg.set_content("Hello!\n\nYour order 112-4567890-1234567 has shipped.\n"
                    "Track it at https://marketplace.example/orders/112-4567890-1234567\n\n"
                    "Total: $1,234.56\n-- \nSam's Shop\n")
    html = f"""<html><body style="margin:0;padding:0">
<table width="600" cellpadding="0" cellspacing="0" border="0" style="font-family:Arial,sans-serif">
<tr><td align="center" bgcolor="#f4f4f4" style="padding:20px"><img src="cid:{logo_cid[1:-1]}" alt="Sam's Shop" width="120" height="40"></td></tr>
<tr><td style="padding:20px;color:#333333;font-size:14px">
<h1 style="font-size:22px;color:#222222">Your order has shipped</h1>
<p>Hello! Order <b>112-4567890-1234567</b> is on its way. Caf&eacute; cr&egrave;me &amp; more &mdash; &euro;12.</p>
<p><a href="https://marketplace.example/orders/112-4567890-1234567" style="color:#0066cc">Track your parcel</a></p>
<ul><li>Blue mug &times; 2</li><li>Tea towel</li></ul>
<img src="cid:{banner_cid[1:-1]}" alt="Autumn sale" width="560">
</td></tr>
<tr><td style="padding:10px;font-size:11px;color:#999999" align="center">Sam's Shop &middot; Thank you for your order</td></tr>
</table></body></html>
"""
    msg.add_alternative(html, subtype="html")
    html_part = msg.get_payload()[1]
    html_part.add_related(png(), "image", "png", cid=logo_cid, filename="logo.png")
    html_part.add_related(png(8, 2), "image", "png", cid=banner_cid, filename="banner.png")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="invoice-1234.pdf")
    return msg.as_bytes()


def leaf_parts(data: bytes) -> list[bytes]:
    """The raw bytes of every leaf MIME part (headers and body), found by the
    boundaries: what must be byte-identical between sent and delivered."""
    import email
    message = email.message_from_bytes(data, policy=policy.SMTP)
    boundaries = [p.get_boundary() for p in message.walk() if p.is_multipart()]
    pieces = [data]
    for boundary in boundaries:
        marker = b"--" + boundary.encode()
        pieces = [chunk for piece in pieces for chunk in piece.split(marker)]
    leaves = []
    for chunk in pieces[1:]:
        head = chunk.lstrip(b"\r\n").split(b"\r\n\r\n", 1)[0]
        if b"Content-Type" in head and b"multipart/" not in head:
            leaves.append(chunk.strip(b"-\r\n"))
    return sorted(leaves)


__all__ = ["newsletter", "leaf_parts", "png", "PDF", "base64"]
