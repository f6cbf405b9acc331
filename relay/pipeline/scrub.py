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

import re
from email.message import EmailMessage

from relay.pipeline.message import read_text, text_parts, write_text

_NAMED_ENTITIES = {"@": ("&commat;",), ".": ("&period;",), "-": ("&hyphen;", "&dash;"),
                   "_": ("&lowbar;",), "+": ("&plus;",)}


def _char_pattern(char: str) -> str:
    """A regex for one character in any spelling HTML or a URL allows."""
    code = ord(char)
    spellings = [re.escape(char), f"&#0*{code};?", f"&#[xX]0*{code:x};?"]
    if code < 128:
        spellings.append(f"%{code:02x}")
    spellings.extend(_NAMED_ENTITIES.get(char, ()))
    return "(?:" + "|".join(spellings) + ")"


def address_pattern(address: str) -> str:
    body = "".join(_char_pattern(c) for c in address)
    # Not a piece of a longer address: no address character right before,
    # no domain continuing right after.
    return rf"(?<![\w.+\-=&#%]){body}(?![\w\-]|\.[\w\-])"


class AddressReplacer:
    """Replaces each of a fixed set of addresses with its substitute."""

    def __init__(self, substitutes: dict[str, str]):
        self._substitutes = {k.lower(): v for k, v in substitutes.items()}
        self._patterns = [
            (re.compile(address_pattern(address), re.IGNORECASE), substitute)
            for address, substitute in self._substitutes.items()
        ]

    def replace(self, text: str) -> tuple[str, int]:
        total = 0
        for pattern, substitute in self._patterns:
            text, count = pattern.subn(substitute, text)
            total += count
        return text, total


def replacer_for(context) -> AddressReplacer:
    return AddressReplacer({
        context.sender.address: context.sender_alias,
        context.recipient.address: context.recipient_alias,
    })


def scrub_addresses(message: EmailMessage, context, changes: list[str]) -> None:
    replacer = replacer_for(context)
    _scrub_subject(message, replacer, changes)
    for index, part in enumerate(message.walk()):
        if part is not message:
            _scrub_part_headers(part, index, replacer, changes)
    for index, part in enumerate(text_parts(message)):
        text = read_text(part)
        new_text, count = replacer.replace(text)
        if count:
            write_text(part, new_text)
            changes.append(f"replaced {count} party address(es) in {part.get_content_type()} part {index}")
    _scrub_top_content_headers(message, replacer, changes)


def _scrub_subject(message: EmailMessage, replacer: AddressReplacer, changes: list[str]) -> None:
    subjects = message.get_all("Subject", [])
    if not subjects:
        return
    new_values, total = [], 0
    for value in subjects:
        # str() of the parsed header is the decoded text (encoded-words undone).
        text, count = replacer.replace(str(value))
        new_values.append(text)
        total += count
    if total:
        del message["Subject"]
        for text in new_values:
            message["Subject"] = _without_surrogates(text)
        changes.append(f"replaced {total} party address(es) in Subject")


def _scrub_part_headers(part: EmailMessage, index: int, replacer: AddressReplacer, changes: list[str]) -> None:
    """Headers of a MIME part or embedded message, matched on the raw value
    and on the decoded one (an encoded-word can spell an address)."""
    for name, value in list(part.items()):
        raw = _raw(part, name)
        new_raw, count = replacer.replace(raw)
        if not count:
            decoded, count = replacer.replace(str(value))
            if not count:
                continue
            new_raw = _without_surrogates(decoded)
        _replace_header(part, name, raw, new_raw)
        changes.append(f"replaced {count} party address(es) in {name} of part {index}")


def _scrub_top_content_headers(message: EmailMessage, replacer: AddressReplacer, changes: list[str]) -> None:
    for name in list(message.keys()):
        if not name.lower().startswith("content-"):
            continue
        raw = _raw(message, name)
        new_raw, count = replacer.replace(raw)
        if count:
            _replace_header(message, name, raw, new_raw)
            changes.append(f"replaced {count} party address(es) in {name}")


def _raw(part: EmailMessage, name: str) -> str:
    for key, value in part._headers:
        if key == name:
            return str(value)
    return ""


def _replace_header(part: EmailMessage, name: str, old_raw: str, new_raw: str) -> None:
    # Keep the header's position: the header list is order-sensitive for
    # embedded messages, and rebuilding it would refold untouched headers.
    for i, (key, value) in enumerate(part._headers):
        if key == name and str(value) == old_raw:
            unfolded = re.sub(r"\r?\n(?=[ \t])", "", new_raw)
            part._headers[i] = part.policy.header_store_parse(key, unfolded)
            return


def _without_surrogates(text: str) -> str:
    return text.encode("utf-8", errors="replace").decode("utf-8") if _has_surrogates(text) else text


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
