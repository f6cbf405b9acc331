"""Links, other addresses and phone numbers in text (DESIGN §4).

`LinkPolicy.url_allowed()` is the one decision on a URL: it survives only if
it leads to one of `[policy] allowed_link_domains` (or a subdomain), is a
`mailto:` one of the two aliases, a `cid:` naming a part of this message, or
an in-page `#anchor`. The URL is read the way a browser reads it: entities
and percent-escapes undone, tabs and newlines dropped, backslashes as
slashes, userinfo ignored (``https://marketplace.example@evil.test/`` goes to
evil.test), and the host compared in its IDNA (punycode) form, so a
look-alike such as ``mаrketplace.example`` with a Cyrillic "а" is another
domain.

`LinkPolicy.clean_text()` finds bare URLs and email addresses in text with
linkify-it-py (told every TLD in the Public Suffix List, so ``evil.xyz/x``
is a link too) and replaces the ones not allowed with fixed placeholders;
optionally phone numbers too, found by Google's phonenumbers.

The `strip_links` stage applies that to every text part that is not HTML
(HTML parts are handled token by token in `sanitize.py`, with the same
policy).
"""

from __future__ import annotations

import html
import re
import threading
import urllib.parse
from collections import Counter
from email.message import EmailMessage
from email.utils import getaddresses
from importlib import resources

import phonenumbers
from linkify_it import LinkifyIt

from relay import addresses
from relay.config import PolicyConfig
from relay.pipeline.message import read_text, text_parts, write_text

LINK_REMOVED = "[link removed]"
EMAIL_REMOVED = "[email removed]"
PHONE_REMOVED = "[phone removed]"

# Browsers drop these anywhere in a URL (WHATWG URL: tab and newline) and
# strip C0 controls and spaces around it.
_URL_NOISE = re.compile(r"[\t\n\r]")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*):")
# RFC 2606 names are not in the Public Suffix List but are what tests and
# examples use; a link to them is still a link.
_RESERVED_TLDS = ("test", "example", "invalid", "localhost")


def _all_tlds() -> list[str]:
    """Every top-level label of the Public Suffix List shipped with the
    publicsuffixlist package (ICANN and private sections)."""
    text = resources.files("publicsuffixlist").joinpath("public_suffix_list.dat").read_text(encoding="utf-8")
    tlds = set()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("//"):
            continue
        tlds.add(line.lstrip("*.!").rsplit(".", 1)[-1].lower())
    return sorted(tlds | set(_RESERVED_TLDS))


_TLDS = _all_tlds()
# LinkifyIt keeps per-call state on the instance, and stages run in worker
# threads: one instance per thread.
_local = threading.local()


def _linkify() -> LinkifyIt:
    finder = getattr(_local, "linkify", None)
    if finder is None:
        finder = LinkifyIt(options={"fuzzy_link": True, "fuzzy_email": True, "fuzzy_ip": True})
        finder.tlds(_TLDS, True)
        _local.linkify = finder
    return finder


def _idna_host(host: str) -> str | None:
    """The host as a browser would look it up, in ASCII; None if not a name."""
    host = urllib.parse.unquote(host).strip().rstrip(".").lower()
    if not host:
        return None
    try:
        return host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None


class LinkPolicy:
    def __init__(self, policy: PolicyConfig, aliases: set[str], content_ids: set[str] = frozenset()):
        self.allowed_domains = tuple(policy.allowed_link_domains)
        self.aliases = {addresses.normalize(a) for a in aliases}
        self.content_ids = {cid.strip("<>").lower() for cid in content_ids}
        self.redact_phones = policy.redact_phone_numbers
        self.phone_regions = [region.upper() for region in policy.phone_regions]

    # --- URLs ---------------------------------------------------------------

    def host_allowed(self, host: str | None) -> bool:
        ascii_host = _idna_host(host or "")
        if ascii_host is None:
            return False
        return any(ascii_host == d or ascii_host.endswith("." + d) for d in self.allowed_domains)

    def url_allowed(self, url: str) -> bool:
        url = _URL_NOISE.sub("", html.unescape(url)).strip(" \x00-\x1f").replace("\\", "/")
        scheme_match = _SCHEME.match(url)
        scheme = scheme_match.group(1).lower() if scheme_match else ""
        if not scheme:
            if url.startswith("//"):
                return self._http_allowed("http:" + url)
            # An in-page anchor goes nowhere; any other relative URL has no
            # base in a mail and would be resolved by the client's whims.
            return url.startswith("#")
        if scheme in ("http", "https"):
            return self._http_allowed(url)
        if scheme == "mailto":
            return self._mailto_allowed(url[len("mailto:"):])
        if scheme == "cid":
            return urllib.parse.unquote(url[len("cid:"):]).strip("<>").lower() in self.content_ids
        return False  # javascript:, data:, vbscript:, file:, ftp:, tel:, …

    def _mailto_allowed(self, rest: str) -> bool:
        """RFC 6068: addresses in the path and in to/cc/bcc fields; every
        one must be an alias, and there must be one."""
        path, _, query = rest.partition("?")
        fields = [urllib.parse.unquote(path)]
        for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
            if key.lower() in ("to", "cc", "bcc"):
                fields.append(value)
        recipients = [addresses.normalize(addr) for _, addr in getaddresses(fields) if addr]
        return bool(recipients) and all(r in self.aliases for r in recipients)

    def _http_allowed(self, url: str) -> bool:
        try:
            parts = urllib.parse.urlsplit(url)
            host = parts.hostname
            parts.port  # noqa: B018 — raises ValueError on a malformed port
        except ValueError:
            return False
        return self.host_allowed(host)

    # --- text -----------------------------------------------------------------

    def clean_text(self, text: str) -> tuple[str, Counter]:
        """`text` with disallowed links, other addresses and (if configured)
        phone numbers replaced by placeholders; and what was removed."""
        removed: Counter = Counter()
        pieces, pos = [], 0
        for match in _linkify().match(text) or ():
            start, end = match.index, match.last_index
            if start < pos:
                continue
            pieces.append(self._phones(text[pos:start], removed))
            if match.schema == "mailto:":
                address = match.url[len("mailto:"):]
                if addresses.normalize(address) in self.aliases:
                    pieces.append(text[start:end])
                else:
                    pieces.append(EMAIL_REMOVED)
                    removed["emails"] += 1
            elif self.url_allowed(match.url):
                pieces.append(text[start:end])
            else:
                pieces.append(LINK_REMOVED)
                removed["links"] += 1
            pos = end
        pieces.append(self._phones(text[pos:], removed))
        return "".join(pieces), removed

    def _phones(self, text: str, removed: Counter) -> str:
        if not self.redact_phones or not any(c.isdigit() for c in text):
            return text
        for region in self.phone_regions:
            spans = [(m.start, m.end) for m in phonenumbers.PhoneNumberMatcher(text, region)]
            for start, end in reversed(spans):
                text = text[:start] + PHONE_REMOVED + text[end:]
                removed["phones"] += 1
        return text


def content_ids(message: EmailMessage) -> set[str]:
    """The Content-IDs of this message's parts: what a cid: URL may name."""
    ids = set()
    for part in message.walk():
        value = part.get("Content-ID")
        if value:
            ids.add(str(value).strip().strip("<>").lower())
    return ids


def policy_for(message: EmailMessage, context) -> LinkPolicy:
    return LinkPolicy(context.policy, {context.sender_alias, context.recipient_alias}, content_ids(message))


def strip_links(message: EmailMessage, context, changes) -> None:
    """Links, other addresses and phone numbers in every non-HTML text part."""
    policy = policy_for(message, context)
    for index, part in enumerate(text_parts(message)):
        if part.get_content_type() == "text/html":
            continue
        text = read_text(part)
        new_text, removed = policy.clean_text(text)
        if removed:
            write_text(part, new_text)
            changes.record(removed, f"{part.get_content_type()} part {index}")
