"""The last content stage: nothing delivered has a line over 998 octets.

The relay takes DATA lines of up to 64 KiB (relay/protocol.py), as postfix
does: real Outlook replies and newsletters have lines of thousands of
octets, and the sanitizer's own output can too. RFC 5322 §2.1.1 allows 998
octets and a strict upstream answers `500 Line too long`, which the sender
would get as a permanent 554. So after every other stage, and before the
trace headers and DKIM signing, each leaf part with a longer line is
re-encoded: quoted-printable for text (still readable in the raw), base64
for anything else. The decoded content is unchanged; the charset stays, only
Content-Transfer-Encoding is replaced. A part whose lines are all within the
limit is left as it is, byte for byte. Header lines over the limit are
refolded.
"""

from __future__ import annotations

import base64
import quopri
from email.message import EmailMessage

from relay.pipeline.message import POLICY, maintype

MAX_OCTETS = 998  # RFC 5322 §2.1.1, without the CRLF


def too_long(text: str) -> bool:
    """True if a line of `text` (as the generator writes it) is over 998 octets.
    A character may be up to 4 octets in UTF-8 (8-bit payloads are held as
    one surrogate per byte, which counts as one); lines under 250
    characters need no encoding to be measured."""
    # str.splitlines() would also split at \x1c-\x1e, \x85 and others, which
    # the generator writes as they are: only LF ends a line on the wire.
    for line in text.split("\n"):
        if len(line) > MAX_OCTETS // 4 and _octets(line) > MAX_OCTETS:
            return True
    return False


def _octets(line: str) -> int:
    """Octets of one line as written, without its line ending."""
    return len(line.removesuffix("\r").encode("utf-8", errors="surrogateescape"))


def reencode(part: EmailMessage) -> str | None:
    """Re-encode one leaf part whose payload has a line over the limit;
    the encoding chosen, or None if the part was left alone."""
    payload = part.get_payload()
    if not isinstance(payload, str) or not too_long(payload):
        return None
    data = part.get_payload(decode=True) or b""
    if maintype(part) == "text":
        # Hard line breaks of text are CRLF on the wire; quopri would write a
        # CR before LF as =0D, so it is given LF and the generator writes CRLF.
        encoded = quopri.encodestring(data.replace(b"\r\n", b"\n")).decode("ascii")
        cte = "quoted-printable"
    else:
        encoded = base64.encodebytes(data).decode("ascii")
        cte = "base64"
    del part["Content-Transfer-Encoding"]
    part["Content-Transfer-Encoding"] = cte
    part.set_payload(encoded)
    return cte


def refold_headers(part: EmailMessage) -> list[str]:
    """Refold, with the policy's folder, each header of `part` that has a
    line over the limit as received; the names of those refolded."""
    refolded = []
    for index, (name, value) in enumerate(part._headers):
        text = str(value)
        if not any(_octets(line) + (len(name) + 2 if i == 0 else 0) > MAX_OCTETS
                   for i, line in enumerate(text.split("\n"))):
            continue
        # Unfold, then let the policy parse and fold it (encoded words for
        # a run without spaces), as for a header the relay sets itself.
        unfolded = text.replace("\r", "").replace("\n", "")
        part._headers[index] = (name, POLICY.header_store_parse(name, unfolded)[1])
        refolded.append(name)
    return refolded


def limit_line_lengths(message: EmailMessage, context, changes) -> None:
    """Pipeline stage: no line of what is delivered is over 998 octets."""
    for part in message.walk():
        for name in refold_headers(part):
            changes.append(f"refolded the {name} header: a line over {MAX_OCTETS} octets")
        if part.is_multipart() or maintype(part) in ("multipart", "message"):
            # A container's lines are its parts' (walked next); one the
            # parser could not split may not be base64 or quoted-printable
            # (RFC 2045 §6.4) and is left as it is.
            continue
        cte = reencode(part)
        if cte is not None:
            changes.append(f"re-encoded a {maintype(part)} part as {cte}: a line over {MAX_OCTETS} octets")
