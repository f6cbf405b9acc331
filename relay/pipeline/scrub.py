"""Address scrubbing: each party's real address becomes that party's alias.

Wherever the recipient could read it: the Subject (after decoding
encoded-words), the headers of MIME parts and embedded messages, and every
text part after undoing its transfer encoding (so a quoted-printable soft
break or base64 cannot hide an address) and its charset. In HTML a
character may be written as an entity (``&#64;``, ``&#x40;``, ``&commat;``)
and in a ``mailto:`` link percent-encoded (``%40``); the matcher accepts
each character in any of those spellings. Parts where nothing matched are
left exactly as received.
"""

from __future__ import annotations

import email.utils
import functools
import re
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.message import EmailMessage

from relay.pipeline.message import raw_values, read_text, text_parts, write_text

_NAMED_ENTITIES = {"@": ("&commat;",), ".": ("&period;",), "-": ("&hyphen;", "&dash;"),
                   "_": ("&lowbar;",), "+": ("&plus;",)}


def _char_pattern(char: str) -> str:
    """A regex for one character in any spelling HTML or a URL allows."""
    spellings = [re.escape(char)]
    # Both cases: IGNORECASE covers the literal letter but not the code in
    # an escape, and "%55" (U) reaches the same mailbox as "%75" (u).
    for code in sorted({ord(char.lower()), ord(char.upper())}):
        spellings.extend([f"&#0*{code};?", f"&#[xX]0*{code:x};?"])
        if code < 128:
            spellings.append(f"%{code:02x}")
    spellings.extend(_NAMED_ENTITIES.get(char, ()))
    return "(?:" + "|".join(spellings) + ")"


def address_pattern(address: str, loose: bool = False) -> str:
    """`loose`: in headers, a party address inside a longer word is still
    replaced (a file name "receipt-bea@mail.example.pdf" shows the address
    to any reader); a false hit there only ever puts in an alias."""
    local, at, domain = address.rpartition("@")
    body = "".join(_char_pattern(c) for c in local)
    # The @ is a named group: the substitute keeps its spelling (`_spelled_like`).
    body += f"(?P<at>{_char_pattern(at)})" if at else ""
    body += "".join(_char_pattern(c) for c in domain)
    # Not a piece of a longer address: no domain continuing right after.
    # (What may stand right before is decided in `_after_address_char`.)
    if loose:
        return rf"{body}(?![\w\-])"
    return rf"{body}(?![\w\-]|\.[\w\-])"


# A character that, right before a match, makes it the tail of a longer
# address. "=" is not one of them although RFC 5322 allows it in a local
# part: before an address it is nearly always a key=value delimiter
# (`mailto:?to=`, `?email=`, an unquoted HTML attribute), and in the rare
# real local part with "=" (BATV `prvs=tag=user@`) the mailbox behind it is
# the party's own, so replacing is the safe side.
_ADDRESS_CHAR = re.compile(r"[\w.+\-&#%]")
# A %-escape or an HTML character reference without its ";" ending right
# before a match: its last character ("C" of "%3C", "0" of "&#60") is no
# address character, whatever the escape stands for. Reading it as a
# boundary even when it encodes a letter ("&#120buyer@…") errs on the safe
# side: in text/plain nobody decodes the escape, and the address would
# stand there readable.
_ESCAPE_AT_END = re.compile(r"(?:%[0-9a-f]{2}|&#x[0-9a-f]+|&#[0-9]+)\Z", re.IGNORECASE)


def _after_address_char(text: str, start: int) -> bool:
    """True when the character before `start` belongs to an address, i.e. a
    match at `start` is the tail of a longer address."""
    if start == 0 or _ADDRESS_CHAR.fullmatch(text[start - 1]) is None:
        return False
    return _ESCAPE_AT_END.search(text, max(0, start - 40), start) is None


@functools.lru_cache(maxsize=4096)
def _compiled(address: str, loose: bool) -> re.Pattern:
    # A party's pattern is the same for each of its messages: build it once.
    return re.compile(address_pattern(address, loose), re.IGNORECASE)


class AddressReplacer:
    """Replaces each of a fixed set of addresses with its substitute."""

    def __init__(self, substitutes: dict[str, str], loose: bool = False):
        self.loose = loose
        self._substitutes = {k.lower(): v for k, v in substitutes.items()}
        self._patterns = [(_compiled(address, loose), substitute)
                          for address, substitute in self._substitutes.items()]

    def replace(self, text: str) -> tuple[str, int]:
        total = 0
        for pattern, substitute in self._patterns:
            pieces, pos, scan = [], 0, 0
            while (match := pattern.search(text, scan)) is not None:
                if not self.loose and _after_address_char(text, match.start()):
                    # Part of a longer address; a real one may still start
                    # inside this match, so go on one character later.
                    scan = match.start() + 1
                    continue
                pieces += [text[pos:match.start()], _spelled_like(substitute, match)]
                pos = scan = match.end()
                total += 1
            text = "".join(pieces) + text[pos:]
        return text, total


def _spelled_like(substitute: str, match: re.Match) -> str:
    """`substitute` with its @ spelled "%40" where the match had it so: in
    an RFC 2231 file name (filename*=utf-8''…) or a URL a bare "@" is not
    allowed, and a parser cuts the value short there."""
    if (match.groupdict().get("at") or "").startswith("%"):
        return substitute.replace("@", "%40")
    return substitute


def replacer_for(context, loose: bool = False) -> AddressReplacer:
    return AddressReplacer({
        context.sender.address: context.sender_alias,
        context.recipient.address: context.recipient_alias,
    }, loose)


# Top-level headers the header pass leaves alone: From, To and Message-ID
# are the relay's own (To must keep the recipient's real address),
# In-Reply-To and References hold translated ids only, and Subject has a
# pass of its own. Every other header left at the top after the rewrite
# (Date, MIME-Version, Auto-Submitted, Content-*) is scrubbed: each may
# carry a comment or parameter, and an address in one reaches the recipient.
_TOP_HEADERS_SKIPPED = frozenset({"from", "to", "message-id", "in-reply-to", "references", "subject"})


def scrub_addresses(message: EmailMessage, context, changes: list[str]) -> None:
    replacer = replacer_for(context)
    in_headers = replacer_for(context, loose=True)
    _scrub_subject(message, replacer, changes)
    for index, part in enumerate(message.walk()):
        if part is message:
            _scrub_headers(part, in_headers, changes, "", skip=_TOP_HEADERS_SKIPPED)
        else:
            _scrub_headers(part, in_headers, changes, f" of part {index}")
            _scrub_file_names(part, in_headers, changes, index)
        if part.is_multipart():
            _scrub_preamble_epilogue(part, index, replacer, changes)
    for index, part in enumerate(text_parts(message)):
        text = read_text(part)
        new_text, count = replacer.replace(text)
        if count:
            write_text(part, new_text)
            changes.append(f"replaced {count} party address(es) in {part.get_content_type()} part {index}")


def _scrub_subject(message: EmailMessage, replacer: AddressReplacer, changes: list[str]) -> None:
    subjects = message.get_all("Subject", [])
    if not subjects:
        return
    raw_subjects = raw_values(message, "Subject")
    new_values, total = [], 0
    for position, value in enumerate(subjects):
        # str() of the parsed header is the decoded text (encoded-words undone).
        text, count = replacer.replace(str(value))
        if not count and position < len(raw_subjects):
            # Lenient clients also decode an encoded-word glued to other text
            # ("x=?utf-8?q?bea=40mail.example?="), which the parser leaves as is.
            lenient = _lenient_decode(raw_subjects[position])
            lenient_text, count = replacer.replace(lenient)
            if count:
                text = lenient_text
        new_values.append(text)
        total += count
    if total:
        del message["Subject"]
        for text in new_values:
            message["Subject"] = _without_surrogates(text)
        changes.append(f"replaced {total} party address(es) in Subject")


def _lenient_decode(raw: str) -> str:
    try:
        return str(make_header(decode_header(raw)))
    except (UnicodeError, LookupError, ValueError, HeaderParseError):
        return raw


def _scrub_headers(part: EmailMessage, replacer: AddressReplacer, changes: list[str],
                   where: str, skip: frozenset[str] = frozenset()) -> None:
    """Headers of a MIME part or embedded message (or the kept top-level
    ones), matched on the raw value and on the decoded one (an encoded-word
    can spell an address).

    Header by header in place, by position: a name may repeat (the
    Received lines of a forwarded message, a doubled Content-Description)
    and every copy must be seen; looking a value up by name finds only the
    first. In place also keeps the order and leaves untouched headers
    byte-for-byte as received.
    """
    for i, (name, value) in enumerate(list(part._headers)):
        if name.lower() in skip:
            continue
        raw = str(value)  # the source text for headers as received
        new_raw, count = replacer.replace(raw)
        if not count:
            decoded, count = replacer.replace(str(part.policy.header_fetch_parse(name, value)))
            if not count:
                continue
            new_raw = _without_surrogates(decoded)
        unfolded = re.sub(r"\r?\n(?=[ \t])", "", new_raw)
        part._headers[i] = part.policy.header_store_parse(name, unfolded)
        changes.append(f"replaced {count} party address(es) in {name}{where}")


def _scrub_file_names(part: EmailMessage, replacer: AddressReplacer, changes: list[str], index: int) -> None:
    """A file name as clients read it: RFC 2231 continuations joined
    (`filename*0="invoice-bea"; filename*1="@mail.example.pdf"`), which no
    single raw header piece shows whole."""
    for header, param in (("Content-Disposition", "filename"), ("Content-Type", "name")):
        try:
            value = part.get_param(param, header=header)
        except Exception:  # a parameter the email package cannot read is left to the attachment check
            continue
        if not value:
            continue
        text = email.utils.collapse_rfc2231_value(value)
        new_text, count = replacer.replace(text)
        if count:
            part.set_param(param, new_text, header=header)
            changes.append(f"replaced {count} party address(es) in the {param} of part {index}")


def _scrub_preamble_epilogue(part: EmailMessage, index: int, replacer: AddressReplacer,
                             changes: list[str]) -> None:
    """The text before the first and after the last boundary of a multipart
    is no part, but it is in the delivered bytes, and some clients (and any
    "view source") show it."""
    for attr in ("preamble", "epilogue"):
        text = getattr(part, attr)
        if not text:
            continue
        new_text, count = replacer.replace(text)
        if count:
            setattr(part, attr, new_text)
            changes.append(f"replaced {count} party address(es) in the {attr} of part {index}")


def _without_surrogates(text: str) -> str:
    return text.encode("utf-8", errors="replace").decode("utf-8") if _has_surrogates(text) else text


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
