"""Links, other addresses and phone numbers in text (DESIGN §4).

`LinkPolicy.url_allowed()` is the one decision on a URL: it survives only if
it leads to one of `[policy] allowed_link_domains` (or a subdomain), is a
`mailto:` one of the two aliases, a `cid:` naming a part of this message, or
an in-page `#anchor`. The URL is read the way a browser reads it: entities
and percent-escapes undone, tabs and newlines dropped, backslashes as
slashes, userinfo ignored (``https://marketplace.example@evil.test/`` goes to
evil.test), and the host compared in the ASCII form a browser looks up
(`browser_host`: UTS #46 non-transitional, IDNA 2008), so a look-alike such
as ``mаrketplace.example`` with a Cyrillic "а", or ``claßifieds.example``
(which Python's IDNA 2003 codec made classifieds.example, but Chromium
opens as xn--claifieds-i1a.example) is another domain, and a host no
browser would open is never an allowed one.

`LinkPolicy.clean_text()` finds bare URLs and email addresses in text with
linkify-it-py (told every TLD in the Public Suffix List, so ``evil.xyz/x``
is a link too), gives the text between its matches a second look for the
addresses and host names it passes over (``'bob@evil.test'``,
``see:evil.com``), and replaces the ones not allowed with fixed
placeholders; optionally phone numbers too, found by Google's phonenumbers.
A bare IPv4 address ("server 10.0.0.1 is down", "version 1.2.3.4") is no
link: no client makes one of it. With a scheme, port or path it is.

The `strip_links` stage applies that to every text part that is not HTML
(HTML parts are handled token by token in `sanitize.py`, with the same
policy).
"""

from __future__ import annotations

import bisect
import html
import ipaddress
import re
import threading
from dataclasses import dataclass
import unicodedata
import urllib.parse
from collections import Counter
from email.message import EmailMessage
from email.utils import getaddresses
from importlib import resources

import phonenumbers
from linkify_it import LinkifyIt

from relay import addresses
from relay.config import PolicyConfig
from relay.idn import to_ascii
from relay.pipeline.message import content_type, read_text, text_parts, write_text

LINK_REMOVED = "[link removed]"
EMAIL_REMOVED = "[email removed]"
PHONE_REMOVED = "[phone removed]"

# Browsers drop these anywhere in a URL (WHATWG URL: tab and newline) and
# strip C0 controls and spaces around it.
_URL_NOISE = re.compile(r"[\t\n\r]")
# str.strip() takes a set of characters, not a range: " \x00-\x1f" stripped
# space, NUL, "-" and US only, so "\x01https://…" kept its control character
# and "-//host" lost its hyphen.
_C0_AND_SPACE = "".join(map(chr, range(0x21)))
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
_TLD_SET = frozenset(_TLDS)


def _is_tld(label: str) -> bool:
    label = unicodedata.normalize("NFKC", label).lower()
    if label.startswith("xn--"):
        try:
            label = label.encode("ascii").decode("idna")
        except UnicodeError:
            return False
    return label in _TLD_SET


# linkify-it finds a bare address or host name only after a space or one of
# a few characters, and its local part takes in more than an address has.
# So 'bob@evil.test' (quoted), *bob@evil.test*, [bob@evil.test],
# alias,bob@evil.test, ?cc=bob@evil.test, bøb@evil.test, `evil.com`,
# _evil.com_, see:evil.com, x/evil.com and evil。com (a full stop browsers
# read as ".") went through untouched, while "Email:alias@…" counted as one
# address and took the alias with it. Text between its matches therefore
# gets a second look (`_between`) with the two patterns below.
#
# An address: a local part of letters, digits and ". + - _ &" (not quotes or
# brackets, which wrap addresses far more often than they belong to one; not
# ": = , ;", which end a label, a key or a list item: "cc=alias@…" is the
# alias, "&alias@…" is another address) and a dotted domain whose last label
# is letters (or punycode). Any such address that is not an alias goes,
# whatever its TLD. Possessive, and a run of local-part characters is tried
# from its start only, so the scan stays linear.
_EMAIL = re.compile(
    r"(?<![\w.+\-&])[\w.+\-&]++@"
    r"(?:[^\W_](?:[\w\-]*[^\W_])?\.)+(?:[xX][nN]--[a-zA-Z0-9\-]+|[^\W\d_]{2,63})"
    r"(?![^\W_]|[.\-][^\W_])"
)
# A host name: text is cut into runs of word characters, hyphens and dots
# (any of the four dots IDNA knows); a run that is, once "_", "-" and dots
# are trimmed off its ends, labels ending in a TLD of the Public Suffix List
# is a host, like linkify-it's fuzzy links. Runs do not overlap: linear.
# The ideographic full stops count only between labels that are ASCII (after
# NFKC, so full-width letters too): "。" ends CJK sentences, and "…です。みんな"
# is Japanese text, not a host in the TLD "みんな".
_DOTS = ".\u3002\uff0e\uff61"
# Only runs with a dot can be hosts, so only those are found: a run is
# matched from its start (the lookbehind) or not at all, which keeps the
# scan linear however long a dotless run is.
_RUN = re.compile(rf"(?<![\w\-{_DOTS}])[\w\-]*+[{_DOTS}][\w\-{_DOTS}]*")
_RUN_EDGES = "_-" + _DOTS
_DOT = re.compile(rf"[{_DOTS}]")
_MAY_LINK = re.compile(rf"[{_DOTS}:/@]")
_DIGIT = re.compile(r"\d")
_LABEL = re.compile(r"[^\W_]+(?:-+[^\W_]+)*")
_PORT_PATH = re.compile(r"(?::\d{1,5})?(?:[/?#][^\s<>\"'`|]*)?")
_TRAILING_PUNCT = ".,;:!?)]}*_'\""
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


@dataclass(frozen=True)
class _Found:
    """A linkify-it match, placed in the text it was found in."""

    index: int
    last_index: int
    schema: str
    url: str


# A token that linkify-it could find something in: a dot before a letter or
# digit (a host, an IP address), an "@", a ":" (a scheme) or "//".
# Whole tokens holding one, found in one pass: matched from a token's start
# only (the lookbehind), so the scan is linear.
_CANDIDATE_TOKEN = re.compile(rf"(?<!\S)\S*?(?:[{_DOTS}][^\W_]|@|:|//)\S*")


def _link_matches(text: str) -> list[_Found]:
    """linkify-it's matches in `text`, found in its candidate tokens only.

    linkify-it costs about 0.2 ms per kilobyte it reads, and most of a
    message's text cannot hold a link. No link, address or host it finds
    contains white space (its patterns exclude Unicode separators and
    controls, of which Python's \\s is a subset), and white space before
    a token is a boundary just like the start of the text: so it is run
    once over the candidate tokens joined by spaces, and each match is put
    back where its token was."""
    starts, joined, length = [], [], 0
    for token in _CANDIDATE_TOKEN.finditer(text):
        starts.append((length, token.start()))
        joined.append(token.group())
        length += len(token.group()) + 1
    if not joined:
        return []
    found = []
    positions = [joined_start for joined_start, _ in starts]
    for match in _linkify().match(" ".join(joined)) or ():
        slot = bisect.bisect_right(positions, match.index) - 1
        joined_start, text_start = starts[slot]
        offset = text_start - joined_start
        found.append(_Found(match.index + offset, match.last_index + offset, match.schema, match.url))
    return found


# What an ASCII label may be made of (letters, digits, hyphens; underscores,
# which browsers accept).
_ASCII_LABEL = re.compile(r"[a-z0-9_\-]+")


def browser_host(host: str) -> str | None:
    """The host as a browser looks it up, in ASCII (A-labels, lower case, no
    trailing dot); None if a browser would refuse it or it is no name.

    Browsers (the WHATWG URL standard) percent-decode the host, then map it
    with UTS #46 non-transitional processing (IDNA 2008): "ß", "ς" and the
    joiners U+200C/U+200D stay what they are, so "claßifieds.example" is
    xn--claifieds-i1a.example, not classifieds.example as Python's IDNA 2003
    codec has it (it maps "ß" to "ss"); upper-case and full-width letters
    are folded and the full stops U+3002, U+FF0E, U+FF61 become ".". The
    `idna` package does that mapping and checks each Unicode label against
    IDNA 2008 (a joiner outside the scripts that need one, a disallowed
    character: an error, and browsers refuse such a host too). ASCII labels
    are taken as browsers take them: lower-cased, underscores and any
    hyphens allowed (UTS #46 with CheckHyphens off); an "xn--" label must
    decode. A host that cannot be mapped is None, which `host_allowed`
    reads as off the marketplace: removed, never kept."""
    host = to_ascii(urllib.parse.unquote(host))
    if host is None:
        return None
    labels = []
    for ascii_label in host.split("."):
        # A %-escape or a full-width form can put a delimiter into the host:
        # "evil.test%2f.marketplace.example" decodes to "evil.test/.marketplace
        # .example", which ends in an allowed domain but is read as evil.test by
        # any client that decodes before splitting (browsers refuse such a host
        # outright). A label with anything but name characters is no name; so
        # is an empty one ("a..b", ".a").
        if not _ASCII_LABEL.fullmatch(ascii_label):
            return None
        labels.append(ascii_label)
    return ".".join(labels)


_WIDE_DOTS = _DOTS[1:]
_AFTER_HOST = re.compile(r"[/?#]")
_TAIL_LABEL = re.compile(rf"[{_DOTS}]([^\W_](?:[\w\-]*[^\W_])?)")


def _host_tail(text: str, end: int) -> int:
    """Where a URL that linkify-it found ending in its host at `end`
    really ends.

    linkify-it ends a host at a full stop it does not know: to it
    "https://shop。classifieds.example/x" is "https://shop", and the rest
    would be judged apart (the genuine link torn in two, "[link removed]。
    classifieds.example/x"). Browsers read U+3002, U+FF0E and U+FF61 as
    "."; so the labels after such a dot join the host, then its port and
    path. As in `_hosts`, a full-width dot joins only a label that is ASCII
    after NFKC: "https://classifieds.example。ありがとう" ends a Japanese
    sentence with the link."""
    if end >= len(text) or text[end] not in _WIDE_DOTS:
        return end
    pos = end
    while (label := _TAIL_LABEL.match(text, pos)) is not None:
        if label.group()[0] in _WIDE_DOTS and not unicodedata.normalize("NFKC", label.group(1)).isascii():
            break
        pos = label.end()
    if pos == end:
        return end
    tail = _PORT_PATH.match(text, pos).end()
    while tail > pos and text[tail - 1] in _TRAILING_PUNCT:
        tail -= 1
    return tail


def _bare_ipv4(text: str) -> bool:
    """`text` is a dotted-quad IPv4 address and nothing else."""
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


class LinkPolicy:
    def __init__(self, policy: PolicyConfig, aliases: set[str], content_ids: set[str] = frozenset()):
        self.allowed_domains = tuple(policy.allowed_link_domains)
        self.aliases = {addresses.normalize(a) for a in aliases}
        self.content_ids = {cid.strip("<>").lower() for cid in content_ids}
        self.redact_phones = policy.redact_phone_numbers
        self.phone_regions = [region.upper() for region in policy.phone_regions]

    # --- URLs ---------------------------------------------------------------

    def host_allowed(self, host: str | None) -> bool:
        ascii_host = browser_host(host or "")
        if ascii_host is None:
            return False
        return any(ascii_host == d or ascii_host.endswith("." + d) for d in self.allowed_domains)

    def url_allowed(self, url: str) -> bool:
        url = _URL_NOISE.sub("", html.unescape(url)).strip(_C0_AND_SPACE).replace("\\", "/")
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
        fields, texts = [urllib.parse.unquote(path)], []
        for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
            (fields if key.lower() in ("to", "cc", "bcc") else texts).append(value)
        pairs = getaddresses(fields)
        recipients = [addresses.normalize(addr) for _, addr in pairs if addr]
        if not recipients or not all(r in self.aliases for r in recipients):
            return False
        # The rest of the link is text that lands in the reader's compose
        # window: display names and comments ("alias (bob@evil.test)"),
        # subject=, body= and any other header field. An address, link or
        # phone number there is as readable as in the message itself.
        texts += [name for name, _ in pairs]
        return not any(self.clean_text(text)[1] for text in texts)

    def _http_allowed(self, url: str) -> bool:
        try:
            parts = urllib.parse.urlsplit(url)
            host = parts.hostname
            parts.port  # noqa: B018 — raises ValueError on a malformed port
        except ValueError:
            return False
        hostinfo = parts.netloc.rpartition("@")[2]
        if not hostinfo.startswith("["):
            # The host as written, not `hostname`, which str.lower()s it:
            # that turns "ẞ" into "ß" and a final "Σ" into "ς", where UTS #46
            # (and so a browser) makes "ss" and "σ" of them.
            host = hostinfo.partition(":")[0]
        return self.host_allowed(host)

    # --- text -----------------------------------------------------------------

    def clean_text(self, text: str, keep_bare_ipv4: bool = True) -> tuple[str, Counter]:
        """`text` with disallowed links, other addresses and (if configured)
        phone numbers replaced by placeholders; and what was removed.

        A bare IPv4 address is kept unless `keep_bare_ipv4` is false (the
        headers of an attached message, where it names a party's machine)."""
        removed: Counter = Counter()
        if not self._may_hold_something(text):
            return text, removed
        pieces, pos = [], 0
        for match in _link_matches(text):
            start, end = match.index, match.last_index
            if start < pos:
                continue
            pieces.append(self._between(text[pos:start], removed))
            url = match.url
            if match.schema in ("http:", "https:", "//") and not _AFTER_HOST.search(url.partition("//")[2]):
                end = _host_tail(text, end)
                url += text[match.last_index:end]
            found = text[start:end]
            if (match.schema == "mailto:" and not found.lower().startswith("mailto:")
                    and _EMAIL.search(found)):
                # A bare address as linkify-it took it ("Email:bob@…",
                # "cc=alias@…"): decide on the address itself.
                pieces.append(self._emails(found, removed, rest=str))
            elif keep_bare_ipv4 and not match.schema and _bare_ipv4(found):
                # "server 10.0.0.1 is down", "version 1.2.3.4": no client
                # makes a link of a bare address, and it names no domain.
                # With a scheme, a port or a path it is a web address
                # ("http://10.0.0.1/x", "10.0.0.1:8080") and is judged.
                pieces.append(found)
            elif match.schema == "mailto:":
                address = match.url[len("mailto:"):]
                if addresses.normalize(address) in self.aliases:
                    pieces.append(text[start:end])
                else:
                    pieces.append(EMAIL_REMOVED)
                    removed["emails"] += 1
            elif self.url_allowed(url):
                # An allowed link is still text the reader sees:
                # "https://marketplace.example/?u=bob@evil.test" must not
                # carry an address through. (Its path is not searched for
                # host names: product slugs would suffer.)
                pieces.append(self._emails(found, removed, rest=str))
            else:
                pieces.append(LINK_REMOVED)
                removed["links"] += 1
            pos = end
        pieces.append(self._between(text[pos:], removed))
        return "".join(pieces), removed

    def _may_hold_something(self, text: str) -> bool:
        """False when `text` cannot hold anything `clean_text` removes: a
        link needs a dot (host), a colon (scheme) or "//"; an address an
        "@"; a phone number a digit. Most runs of HTML text ("Dear", "Order
        details") have none, and linkify-it costs tens of µs per run."""
        if _MAY_LINK.search(text):
            return True
        return self.redact_phones and _DIGIT.search(text) is not None

    def _between(self, text: str, removed: Counter) -> str:
        """Text linkify-it found nothing in: addresses and host names it
        passed over (see `_EMAIL`), then phone numbers."""
        return self._emails(text, removed, rest=lambda rest: self._hosts(rest, removed))

    def _emails(self, text: str, removed: Counter, rest) -> str:
        """Every address in `text` but the aliases replaced; `rest` applied
        to the text around them."""
        pieces, pos = [], 0
        for match in _EMAIL.finditer(text):
            if addresses.normalize(match.group()) in self.aliases:
                continue
            pieces += [rest(text[pos:match.start()]), EMAIL_REMOVED]
            removed["emails"] += 1
            pos = match.end()
        pieces.append(rest(text[pos:]))
        return "".join(pieces)

    def _hosts(self, text: str, removed: Counter) -> str:
        """Host names (with port and path) not allowed replaced; phone
        numbers looked for around them."""
        pieces, pos, scanned = [], 0, 0
        for run in _RUN.finditer(text):
            if run.start() < scanned:
                continue
            host = run.group().strip(_RUN_EDGES)
            if not _DOT.search(host):
                continue
            labels = _DOT.split(host)
            if not all(_LABEL.fullmatch(label) for label in labels) or not _is_tld(labels[-1]):
                continue
            if (any(dot in host for dot in _DOTS[1:])
                    and not unicodedata.normalize("NFKC", "".join(labels)).isascii()):
                continue
            start = run.start() + len(run.group()) - len(run.group().lstrip(_RUN_EDGES))
            end = start + len(host)
            if end == run.end():
                end = _PORT_PATH.match(text, end).end()
                while end > start + len(host) and text[end - 1] in _TRAILING_PUNCT:
                    end -= 1
            scanned = end
            if self.url_allowed("http://" + text[start:end]):
                continue
            pieces += [self._phones(text[pos:start], removed), LINK_REMOVED]
            removed["links"] += 1
            pos = end
        pieces.append(self._phones(text[pos:], removed))
        return "".join(pieces)

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


# Headers a reader sees as text: the Subject, a part's description, and
# every header of an attached message (its From, Received, …). Not file
# names: "notes.md" or "photos.zip" would read as links.
_READABLE_PART_HEADERS = frozenset({"content-description"})
_NOT_TEXT_HEADERS = frozenset({"content-type", "content-disposition", "content-transfer-encoding",
                               "content-id", "mime-version", "message-id", "in-reply-to", "references",
                               "date"})


def _clean_headers(message: EmailMessage, policy: LinkPolicy, changes) -> None:
    embedded = set()
    for part in message.walk():
        if content_type(part) == "message/rfc822" and part.is_multipart():
            embedded.update(id(inner) for inner in part.get_payload())
    for index, part in enumerate(message.walk()):
        for i, (name, value) in enumerate(list(part._headers)):
            lower = name.lower()
            readable = (lower == "subject" if part is message
                        else lower in _READABLE_PART_HEADERS
                        or (id(part) in embedded and lower not in _NOT_TEXT_HEADERS))
            if not readable:
                continue
            text = str(part.policy.header_fetch_parse(name, value))
            # An attached message's headers are trace data: "Received: from
            # [203.0.113.9]" is the sender's machine, not a version number.
            cleaned, removed = policy.clean_text(text, keep_bare_ipv4=id(part) not in embedded)
            if removed:
                part._headers[i] = part.policy.header_store_parse(name, cleaned.replace("\r", " ").replace("\n", " "))
                changes.record(removed, f"the {name} header" + (f" of part {index}" if part is not message else ""))


def strip_links(message: EmailMessage, context, changes) -> None:
    """Links, other addresses and phone numbers in every non-HTML text part,
    and in the headers a reader sees as text."""
    policy = policy_for(message, context)
    _clean_headers(message, policy, changes)
    for index, part in enumerate(text_parts(message)):
        if part.get_content_type() == "text/html":
            continue
        text = read_text(part)
        new_text, removed = policy.clean_text(text)
        if removed:
            write_text(part, new_text)
            changes.record(removed, f"{part.get_content_type()} part {index}")
