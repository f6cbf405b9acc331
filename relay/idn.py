"""Domain names in ASCII the way browsers and mail servers resolve them.

Internationalized names are mapped with UTS #46 non-transitional
processing (IDNA 2008), as browsers (the WHATWG URL standard) and
IDNA 2008 resolvers do: "ß", "ς" and the joiners U+200C/U+200D stay what
they are, so "faß.example" is xn--fa-hia.example. Python's own "idna"
codec is IDNA 2003, which maps "ß" to "ss": it would name another domain
(fass.example), which may belong to someone else. Upper-case and
full-width letters are folded and the full stops U+3002, U+FF0E, U+FF61
become ".". The `idna` package does the mapping and checks each Unicode
label against IDNA 2008.

Used by the link rule (relay/pipeline/links.py: which host a click opens)
and by the inbound SPF/DKIM/DMARC check (relay/mailauth.py: which domain's
records are asked for).
"""

from __future__ import annotations

import idna


def to_ascii(name: str) -> str | None:
    """`name` as A-labels, lower case, without the root's trailing dot; None
    if it cannot be mapped (a disallowed character, a joiner outside the
    scripts that need one, an "xn--" label that does not decode). ASCII
    labels are taken as they are, lower-cased (underscores and any hyphens
    allowed: UTS #46 with CheckHyphens and STD3 rules off), so "_dmarc" and
    "a--b" pass; what a label may hold is the caller's rule."""
    try:
        name = idna.uts46_remap(name, std3_rules=False, transitional=False)
    except (idna.IDNAError, UnicodeError, ValueError):
        return None
    if name.endswith("."):
        name = name[:-1]
    labels = []
    for label in name.split("."):
        try:
            if label.startswith("xn--"):
                idna.ulabel(label)  # checks that it decodes to a valid label
            elif not label.isascii():
                label = idna.alabel(label).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            return None
        labels.append(label.lower())
    return ".".join(labels)
