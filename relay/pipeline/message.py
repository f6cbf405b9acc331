"""Parsing and serialising messages, and reading/writing text parts.

One parse per message, with the standard library's email package. The
policy keeps every header we do not touch exactly as received
(``refold_source='none'``) and writes CRLF line ends, so a MIME part the
relay did not change leaves byte-for-byte as it came in; headers the relay
sets are folded by the policy.

Text parts are decoded (transfer encoding, then charset) for the stages
that edit text, and written back with the same charset and the same
transfer encoding, so a quoted-printable part stays quoted-printable.
"""

from __future__ import annotations

import base64
import functools
import email
import os
import codecs
import io
import quopri
import re
from email import policy as email_policy
from email.generator import BytesGenerator
from email.message import EmailMessage
from email.parser import BytesParser

from relay import replies
from relay.replies import SmtpError

class _Policy(email_policy.EmailPolicy):
    """The SMTP policy, remembering parsed headers.

    The email package parses a header anew each time it is read, and the
    parser, the generator and the stages read Content-Type alone dozens of
    times per message: well over half of the pipeline's time went there.
    Header objects are immutable, so equal (name, value) pairs share one,
    across messages too. Long values are not kept (bounded memory).
    """

    def header_fetch_parse(self, name, value):
        if hasattr(value, "name") or len(value) > _CACHED_HEADER_CHARS:
            return super().header_fetch_parse(name, value)
        return _parsed_header(name, value)


_CACHED_HEADER_CHARS = 998
POLICY = _Policy(linesep="\r\n", refold_source="none")


@functools.lru_cache(maxsize=4096)
def _parsed_header(name: str, value: str):
    return email_policy.EmailPolicy.header_fetch_parse(POLICY, name, value)

_MSGID_RE = re.compile(r"<[^<>\s]{1,250}>")
# Ids kept in a translated References header; older ones add nothing to
# threading and an endless References header is a cheap attack.
MAX_REFERENCES = 50


_EMAIL_PACKAGE = os.path.dirname(email.__file__)


def raised_by_email_package(error: BaseException) -> bool:
    """True if `error` was raised inside the standard library's email
    package: its header parser has corner cases that raise IndexError and
    the like on malformed input. Such a failure is a property of the
    message, so it recurs on every retry: a permanent refusal, not a 451.
    Running out of memory is not one of them: the worker's limit decides
    that (relay/workers.py)."""
    if isinstance(error, MemoryError):
        return False
    tb = error.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    return last is not None and last.tb_frame.f_code.co_filename.startswith(_EMAIL_PACKAGE)


def parse(raw: bytes, lift: bool = False) -> EmailMessage:
    """The parsed message. With `lift`, big base64 attachments stay out of
    the parse (relay/pipeline/lifted.py); only `serialize` may then write
    the message, since it puts their bytes back."""
    if lift:
        from relay.pipeline import lifted

        skeleton, bodies = lifted.lift(raw)
        if bodies:
            try:
                message = _parse(skeleton)
            except SmtpError:
                message = None  # the full parse below gives the refusal
            if message is not None and lifted.place(message, bodies):
                message.lifted_bodies = bodies
                return message
    return _parse(raw)


def _parse(raw: bytes) -> EmailMessage:
    try:
        return BytesParser(policy=POLICY).parsebytes(raw)
    except RecursionError:
        # The parser recurses per nesting level; no real mail nests thousands deep.
        raise SmtpError(replies.TOO_DEEPLY_NESTED) from None
    except Exception as error:
        if raised_by_email_package(error):
            raise SmtpError(replies.UNPARSEABLE) from error
        raise


def serialize(message: EmailMessage, prepend: list[str] = ()) -> bytes:
    out = io.BytesIO()
    for line in prepend:
        out.write(line.encode("ascii") + b"\r\n")
    BytesGenerator(out, policy=POLICY).flatten(message)
    bodies = getattr(message, "lifted_bodies", None)
    if bodies:
        from relay.pipeline import lifted

        return lifted.splice(out.getvalue(), bodies)
    return out.getvalue()


def message_ids_in(value: str | None) -> list[str]:
    """The <id> tokens of a Message-ID, In-Reply-To or References value."""
    if not value:
        return []
    return _MSGID_RE.findall(str(value))


def is_seven_bit_id(msgid: str) -> bool:
    """True for an id of printable ASCII only (RFC 5322 msg-id). The parser
    leaves 8-bit bytes as surrogates, so they fail here, and so do control
    characters."""
    return all("!" <= char <= "~" for char in msgid)


def raw_values(message: EmailMessage, name: str) -> list[str]:
    """A header's values as received, undecoded and unparsed: id lists need
    no structured parsing, and a hostile one must not reach the parser."""
    # _headers holds the source strings for headers we did not set ourselves.
    return [str(value) for key, value in message._headers if key.lower() == name.lower()]


def set_id_list(message: EmailMessage, name: str, ids: list[str]) -> None:
    """Set an id-list header (In-Reply-To, References), folded between ids.

    The policy's own folder treats the value as unstructured text and can
    put the first id alone on a continuation line; ids must not be split,
    so fold here, at the spaces between them, and store the header raw.
    """
    lines, line = [], f"{name}:"
    for msgid in ids:
        if len(line) + 1 + len(msgid) > 78 and line != f"{name}:":
            lines.append(line)
            line = ""
        line += f" {msgid}"
    lines.append(line)
    del message[name]
    value = "\r\n".join(lines)[len(name) + 2:]
    message._headers.append((name, value))


def referenced_ids(message: EmailMessage) -> list[str]:
    """Every id the message names: its own and those it replies to."""
    ids = []
    # References first: the slice below keeps the newest ids, and the
    # parent (In-Reply-To, normally also the last of References) and the
    # message's own id must survive a long References header. Listed first
    # they were cut by it, and a reply in a thread of 52+ messages lost
    # its In-Reply-To.
    for name in ("References", "In-Reply-To", "Message-ID"):
        for value in raw_values(message, name):
            ids.extend(message_ids_in(value))
    return list(dict.fromkeys(ids))[-(MAX_REFERENCES + 2):]


# --- content types ----------------------------------------------------------------

def content_type(part: EmailMessage) -> str:
    """`part.get_content_type()`, read from the raw header.

    The stdlib's version builds a fully parsed header object (parameters
    and all) on every call, and the stages ask for types dozens of times per
    message; this is the same rule (RFC 2045 §5.2: a malformed type is
    text/plain) on the raw value, at a fraction of the cost.
    """
    for key, value in part._headers:
        if key.lower() == "content-type":
            ctype = str(value).split(";", 1)[0].strip().lower()
            return ctype if ctype.count("/") == 1 else "text/plain"
    return part.get_default_type()


def maintype(part: EmailMessage) -> str:
    return content_type(part).split("/", 1)[0]


# --- text parts -----------------------------------------------------------------

def text_parts(message: EmailMessage):
    """Every leaf part a person could read as text (in embedded messages
    too): text/*, and a multipart or message part that the parser could not
    split (a missing boundary leaves its whole body as one string, which
    must not slip past the scrubbing as an opaque container)."""
    for part in message.walk():
        if part.is_multipart():
            continue
        if maintype(part) in ("text", "multipart", "message"):
            yield part


def _codec(part: EmailMessage) -> str:
    """The part's charset as a Python codec that reads this part's bytes
    and writes them back unchanged; otherwise latin-1, which maps every byte
    to one character and back, so undecodable text survives.

    A charset parameter is the sender's to choose: Python knows names that
    are no text encodings at all (hex, base64, zlib, rot13), and some that
    refuse this part's bytes (an odd number of bytes in utf-16, idna);
    trusting them would fail the same way on every retry.
    """
    try:
        charset = part.get_content_charset() or "us-ascii"
        info = codecs.lookup(charset)
    except (LookupError, ValueError, TypeError):
        return "latin-1"
    if info.name == "ascii" or not getattr(info, "_is_text_encoding", True):
        return "latin-1"
    data = part.get_payload(decode=True) or b""
    try:
        if data.decode(info.name, errors="surrogateescape").encode(info.name, errors="surrogateescape") != data:
            return "latin-1"
    except (UnicodeError, LookupError, ValueError, TypeError):
        return "latin-1"
    return info.name


def read_text(part: EmailMessage) -> str:
    """The part's text after undoing transfer encoding and charset."""
    data = part.get_payload(decode=True) or b""
    return data.decode(_codec(part), errors="surrogateescape")


def write_text(part: EmailMessage, text: str, html: bool = False) -> None:
    """Store `text` in `part` with its original charset and transfer encoding.

    Characters the charset cannot hold (a sanitized HTML part may gain some)
    become character references in HTML and "?" elsewhere.
    """
    codec = _codec(part)
    try:
        data = text.encode(codec, errors="surrogateescape")
    except UnicodeEncodeError:
        data = text.encode(codec, errors="xmlcharrefreplace" if html else "replace")
    cte = (part.get("Content-Transfer-Encoding") or "7bit").strip().lower()
    if cte == "base64":
        payload = base64.encodebytes(data).decode("ascii")
    elif cte == "quoted-printable":
        # quopri treats a bare CR as data (=0D); the generator writes CRLF.
        data = data.replace(b"\r\n", b"\n")
        payload = quopri.encodestring(data).decode("ascii")
    else:
        payload = data.decode("ascii", errors="surrogateescape")
    part.set_payload(payload)
