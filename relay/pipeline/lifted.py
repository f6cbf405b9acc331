"""Big base64 attachments left out of the parse and delivered as received.

The email package holds a part's body as one text line per line of the
wire, joined and split again as it goes: a 10 MB attachment cost about 8×
its size in the worker while parsed, and most of a PDF message's parsing
and serialising time (docs/benchmark.md). No stage changes the bytes of a
non-text attachment: the attachment check reads its first octets (the magic
bytes) and its decoded size, and lines over 998 octets are the only reason
to re-encode one. So such a body is taken out before parsing, a short token
stands in its place, and the serialiser puts the original bytes back where
the token is written (DESIGN §4: an unchanged part leaves byte for byte as
it came in).

Only a body that the parser could not read differently lifts: it must be
*canonical* base64 — lines of one length L (a multiple of 4, at most 998),
the last no longer, nothing but the base64 alphabet, `=` only at the very
end — found lexically from the end of a header block (a blank line) to the
next line starting with `--` or the end of the message. Such lines hold no
`:` or `-` and no blank line, so they cannot end a header block or be a
MIME boundary: the parser sees the one-line token exactly where it would
have seen them. After parsing, every token must stand alone as the body of
a leaf part that is neither text, nor multipart, nor message, with
Content-Transfer-Encoding base64; if any does not (a base64 run inside a
text part, say), the message is parsed again in full. A lifted part reads
as before: `get_payload(decode=True)` decodes the original bytes, and a
stage that sets a new payload replaces the token, and with it the lifted
bytes.
"""

from __future__ import annotations

import base64
import os
from email.message import EmailMessage

from relay.pipeline.message import content_type

# Smaller bodies are parsed as they are: the saving is in the lines not made.
LIFT_MIN_OCTETS = 32 * 1024
_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_CHECK_CHUNK = 1 << 20  # octets checked per slice (bounded extra memory)


class LiftedBody:
    """One canonical base64 body as received (`source`: its lines, without
    the last line's CRLF), and what the stages ask of it."""

    __slots__ = ("token", "source", "start", "line_length", "decoded_size")

    def __init__(self, token: str, source: memoryview, line_length: int, decoded_size: int, start: int):
        self.token = token
        self.source = source
        self.start = start  # where `source` begins in the raw message
        self.line_length = line_length
        self.decoded_size = decoded_size

    def head(self, octets: int) -> bytes:
        """The first `octets` decoded bytes (or all, if fewer)."""
        stride = self.line_length + 2
        lines = -(-octets * 4 // 3 // self.line_length) + 1
        return base64.b64decode(self.source[:lines * stride])[:octets]

    def decoded(self) -> bytes:
        # binascii skips the CRLFs; the alphabet and padding were checked.
        return base64.b64decode(self.source)


class LiftedPart(EmailMessage):
    """A leaf whose body is a `LiftedBody` while its payload is the token."""

    lifted: LiftedBody

    def holds_lifted(self) -> bool:
        payload = self._payload
        return isinstance(payload, str) and payload.rstrip("\r\n") == self.lifted.token

    def get_payload(self, i=None, decode=False):
        if decode and i is None and self.holds_lifted():
            return self.lifted.decoded()
        return super().get_payload(i, decode)


def canonical_base64(raw: bytes, start: int, end: int) -> tuple[int, int] | None:
    """(line length, decoded size) if raw[start:end] is canonical base64
    (see the module's docstring), else None."""
    total = end - start
    first = raw.find(b"\r\n", start, end)
    length = total if first == -1 else first - start
    if length == 0 or length % 4 or length > 998:
        return None
    stride = length + 2
    full = (total - 1) // stride  # lines before the last, each with its CRLF
    last = total - full * stride
    if last > length or last % 4:
        return None
    if (raw.count(b"\r", start, end) != full or raw.count(b"\n", start, end) != full
            or raw[start + length:start + full * stride:stride] != b"\r" * full
            or raw[start + length + 1:start + full * stride:stride] != b"\n" * full):
        return None
    padding = raw.count(b"=", start, end)
    if padding > 2 or raw[end - padding:end] != b"=" * padding:
        return None
    for offset in range(start, end, _CHECK_CHUNK):
        chunk = raw[offset:min(offset + _CHECK_CHUNK, end)]
        if chunk.translate(None, _ALPHABET + b"\r\n"):
            return None
    return length, (full * length + last) // 4 * 3 - padding


def lift(raw: bytes) -> tuple[bytes, list[LiftedBody]]:
    """`raw` with each big canonical base64 body replaced by a token, and
    the bodies; (raw, []) when there is none."""
    found = []
    size, position = len(raw), 0
    while position < size:
        segment_end = raw.find(b"\r\n--", position)
        if segment_end == -1:
            segment_end = size
        if segment_end - position >= LIFT_MIN_OCTETS:
            header_end = raw.find(b"\r\n\r\n", position, segment_end)
            if header_end != -1:
                start, end = header_end + 4, segment_end
                while end - start >= 2 and raw[end - 2:end] == b"\r\n":
                    end -= 2  # trailing line ends stay in place
                if end - start >= LIFT_MIN_OCTETS:
                    shape = canonical_base64(raw, start, end)
                    if shape is not None:
                        found.append((start, end, *shape))
        position = segment_end + 4
    if not found:
        return raw, []
    prefix = _token_prefix(raw)
    view, pieces, bodies, kept = memoryview(raw), [], [], 0
    for index, (start, end, length, decoded_size) in enumerate(found):
        body = LiftedBody(f"{prefix}{index:06d}", view[start:end], length, decoded_size, start)
        pieces += (view[kept:start], body.token.encode("ascii"))
        bodies.append(body)
        kept = end
    pieces.append(view[kept:])
    return b"".join(pieces), bodies


def _token_prefix(raw: bytes) -> str:
    """A token prefix found nowhere in `raw` (letters and digits: base64
    alphabet itself, so a token is the same kind of line it stands for)."""
    while True:
        prefix = f"RelayLiftedBody{os.urandom(12).hex()}x"
        if prefix.encode("ascii") not in raw:
            return prefix


def place(message: EmailMessage, bodies: list[LiftedBody]) -> bool:
    """Make each token's leaf a `LiftedPart`; False unless every token
    stands alone in a base64 leaf that no stage reads as text."""
    by_token = {body.token: body for body in bodies}
    prefix = bodies[0].token[:-6]
    placed = 0
    for part in message.walk():
        payload = part._payload
        if not isinstance(payload, str) or prefix not in payload:
            continue
        body = by_token.get(payload.rstrip("\r\n"))
        cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
        if (body is None or part.is_multipart() or cte != "base64"
                or content_type(part).split("/", 1)[0] in ("text", "multipart", "message")):
            return False
        part.__class__ = LiftedPart
        part.lifted = body
        placed += 1
    return placed == len(bodies)


def splice(serialized: bytes, bodies: list[LiftedBody]) -> bytes:
    """`serialized` with each token written in it replaced by its body's
    original bytes (a body a stage dropped is simply not there)."""
    if not bodies:
        return serialized
    by_token = {body.token.encode("ascii"): body for body in bodies}
    prefix = bodies[0].token[:-6].encode("ascii")
    width = len(bodies[0].token)
    pieces, position = [], 0
    while (found := serialized.find(prefix, position)) != -1:
        # The prefix is in no message (lift() made sure), so what follows
        # it is one of the tokens, as written.
        pieces += (serialized[position:found], by_token[serialized[found:found + width]].source)
        position = found + width
    if not pieces:
        return serialized
    pieces.append(serialized[position:])
    return b"".join(pieces)
