"""HTML sanitizing with bleach, and the link policy applied inside HTML.

One html5lib parse per text/html part, then one token stream through:

1. `_DropWithContent` — script, style, iframe, object, embed, form, meta,
   base, link, svg, math, title, noscript, template and friends go with
   everything inside them (bleach alone would keep their text);
2. bleach's `BleachSanitizerFilter` — the tag/attribute allowlist from
   `[policy]`, a disallowed tag removed with its children kept, comments
   removed (`<!--[if mso]>` conditionals are comments), event handlers
   never allowed, CSS reduced to `[policy] html_css_properties` by
   `_MailCSSSanitizer` (bleach's CSS sanitizer, reading the style the way a
   browser does, and refusing CSS functions such as expression());
3. `_LinkFilter` — every URL-bearing attribute through `LinkPolicy`: an
   off-site `href` is removed and the link text kept, an `img` whose `src`
   leads off-site is removed, a `style` with an off-site `url()` is dropped;
   text nodes through `LinkPolicy.clean_text` (bare URLs, other addresses,
   phones).

The part is rewritten only if that changed something: the same DOM is also
serialized without filters, and when both serializations agree the part
keeps its original bytes. It keeps its charset and transfer encoding either
way. What the fragment parse cannot see (the attributes of <html> and
<body>, a <frameset>) is noticed by `_MailHTMLParser` and forces a rewrite.

Each call parses with a parser of its own: an html5lib parser holds the
state of the parse in progress, and stages run in worker threads.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from email.message import EmailMessage
from html.entities import html5 as _HTML5_ENTITIES

import tinycss2
from bleach import html5lib_shim
from bleach._vendor.html5lib.constants import tokenTypes
from bleach._vendor.html5lib.filters.base import Filter
from bleach.css_sanitizer import CSSSanitizer
from bleach.sanitizer import BleachSanitizerFilter, Cleaner

from relay import replies
from relay.config import PolicyConfig
from relay.pipeline.links import LinkPolicy, policy_for
from relay.pipeline.message import read_text, text_parts, write_text
from relay.replies import SmtpError

# Removed with everything inside them, whatever the allowlist says.
DROP_WITH_CONTENT = frozenset({
    "script", "style", "iframe", "frame", "frameset", "object", "embed", "applet", "form",
    "meta", "base", "link", "svg", "math", "title", "noscript", "template", "xml", "head",
})
# Attributes whose value is a URL a client may fetch or follow.
URL_ATTRIBUTES = frozenset({
    "href", "src", "srcset", "background", "action", "formaction", "poster", "cite", "longdesc",
    "lowsrc", "dynsrc", "data", "codebase", "xlink:href", "ping", "usemap", "manifest",
})
_TEXT_TOKENS = ("Characters", "SpaceCharacters", "Entity")
# Formatting that does not break a line: text on both sides reads as one.
_INLINE = frozenset({"a", "abbr", "b", "big", "cite", "code", "del", "em", "font", "i", "ins", "kbd",
                     "q", "s", "small", "span", "strike", "strong", "sub", "sup", "tt", "u"})
_CSS_URL_FUNCTIONS = frozenset({"url", "src", "image", "image-set", "-webkit-image-set", "cross-fade"})
# The CSS functions a declaration may call: colours, lengths, and url() (which
# `_LinkFilter` judges). A declaration calling anything else goes, above all
# expression(), which Internet Explorer ran as script (also spelled
# e\78pression( or, in old versions, ex/**/pression().
_CSS_FUNCTIONS = frozenset({
    "rgb", "rgba", "hsl", "hsla", "hwb", "lab", "lch", "oklab", "oklch", "color",
    "calc", "min", "max", "clamp", "var", "url",
})
# Start tags that the fragment parse ignores, attributes and all, but that a
# mail client parsing the whole document honours: <body onload=…>,
# <body background="http://…">, <html style=…>, <frameset onload=…>.
_DOCUMENT_TAGS = frozenset({"html", "body", "frameset"})
# Namespace declarations and xml:lang, inert in text/html and on the <html>
# of every XHTML-style template: no reason to rewrite a part.
_INERT_HTML_ATTRIBUTE = re.compile(r"(xmlns(:.*)?|xml:lang)\Z")
# A character reference, as html.unescape finds them.
_CHARREF = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")
_BLOCKS_LEGACY_REFERENCE = re.compile(r"[A-Za-z0-9=]")


def _decode_attribute(value: str) -> str:
    """An attribute value as the HTML tokenizer decodes it.

    html.unescape decodes text content; in an attribute value a named
    reference without its ";" followed by "=" or a letter or digit stays as
    written (``&quot=x`` is five characters, not ``"=x``). Reading a style
    any other way than the browser does would let the two disagree on where
    a CSS string ends, and so on which declarations there are."""
    def decode(match: re.Match) -> str:
        ref = match.group(1)
        if ref[0] == "#":
            return html.unescape(match.group(0))
        for end in range(len(ref), 1, -1):  # the longest name that is one
            name = ref[:end]
            if name in _HTML5_ENTITIES:
                following = ref[end:end + 1] or match.string[match.end():match.end() + 1]
                if not name.endswith(";") and _BLOCKS_LEGACY_REFERENCE.match(following):
                    return match.group(0)
                return _HTML5_ENTITIES[name] + ref[end:]
        return match.group(0)

    return _CHARREF.sub(decode, value)


class _MailCSSSanitizer(CSSSanitizer):
    """bleach's CSS sanitizer, with two corrections for mail.

    bleach's tokenizer leaves character references in attribute values as
    written, and its CSS sanitizer parsed that raw text: in
    ``style="font-family: &quot;Segoe UI&quot;, sans-serif; color: #333"``
    (as Thunderbird, Apple Mail and CSS inliners write it) the ``;`` of
    ``&quot;`` ended the declaration, and what came back was
    ``font-family: &quot; color: #333``: an unterminated string that
    swallowed every later declaration once the part was rewritten. So the
    value is decoded first, as a browser decodes it (`_decode_attribute`),
    and written back in the
    form the tokenizer gives every other value: ``&`` and ``"`` escaped, and
    any other character the decoding made as a reference (so a us-ascii part
    gains no 8-bit bytes). The browser reads exactly the CSS checked here.

    A declaration calling a function outside `_CSS_FUNCTIONS` is dropped.
    `allowed_css_properties=None` keeps every declaration (the baseline).
    """

    def __init__(self, allowed_css_properties: frozenset[str] | None):
        super().__init__(allowed_css_properties=allowed_css_properties or frozenset())
        self.keep_all = allowed_css_properties is None
        # Mail repeats the same few style attributes on every cell and
        # paragraph; the result depends on the value alone.
        self._sanitized: dict[str, str] = {}

    def sanitize_css(self, style: str) -> str:
        if len(style) > 1024:  # kept short: the cache lives as long as the worker
            return self._sanitize_css(style)
        cached = self._sanitized.get(style)
        if cached is None:
            cached = self._sanitize_css(style)
            if len(self._sanitized) >= 4096:
                self._sanitized.clear()
            self._sanitized[style] = cached
        return cached

    def _sanitize_css(self, style: str) -> str:
        kept = []
        for node in tinycss2.parse_declaration_list(_decode_attribute(style)):
            if node.type == "declaration":
                if self.keep_all or (
                        (node.lower_name in self.allowed_css_properties
                         or node.lower_name in self.allowed_svg_properties)
                        and _functions_allowed(node.value)):
                    kept.append(node)
            elif node.type in ("comment", "whitespace"):
                if kept and kept[-1].type != node.type:
                    kept.append(node)
            # At-rules and parse errors go, as in bleach.
        css = tinycss2.serialize(kept).strip().replace("&", "&amp;").replace('"', "&quot;")
        if css.isascii():
            return css
        literal = set(style)
        return "".join(c if c.isascii() or c in literal else f"&#{ord(c)};" for c in css)


def _functions_allowed(nodes) -> bool:
    for node in nodes or ():
        kind = getattr(node, "type", None)
        if kind == "function":
            if node.lower_name not in _CSS_FUNCTIONS or not _functions_allowed(node.arguments):
                return False
        elif kind in ("() block", "[] block", "{} block") and not _functions_allowed(node.content):
            return False
    return True


_STYLE_NORMALIZER = _MailCSSSanitizer(allowed_css_properties=None)


class _RecordingTokenizer(html5lib_shim.BleachHTMLTokenizer):
    """bleach's tokenizer, telling its parser about `_DOCUMENT_TAGS`."""

    def __iter__(self):
        for token in super().__iter__():
            if token["type"] == tokenTypes["StartTag"] and token["name"] in _DOCUMENT_TAGS:
                self.parser.document_tags.append((token["name"], dict(token.get("data") or {})))
            yield token


class _MailHTMLParser(html5lib_shim.BleachHTMLParser):
    """bleach's parser, recording in `document_tags` the start tags that the
    fragment parse drops (`_DOCUMENT_TAGS`), as (name, attributes).
    Without that, ``<body onload="…">`` serialized alike with and without
    filters, so the part counted as unchanged and went out with its original
    bytes, handler and all."""

    def __init__(self):
        self.document_tags: list[tuple[str, dict[str, str]]] = []
        # Parse every tag (tags=None): bleach would otherwise drop disallowed
        # tags in the tokenizer, where _DropWithContent cannot see them and
        # the unchanged-part check cannot notice.
        super().__init__(tags=None, strip=True, consume_entities=False, namespaceHTMLElements=False)

    def _parse(self, stream, innerHTML=False, container="div", scripting=True, **kwargs):
        # BleachHTMLParser._parse, with `_RecordingTokenizer`.
        self.innerHTMLMode = innerHTML
        self.container = container
        self.scripting = scripting
        self.tokenizer = _RecordingTokenizer(
            stream=stream, consume_entities=self.consume_entities, parser=self, **kwargs)
        self.reset()
        try:
            self.mainLoop()
        except html5lib_shim.ReparseException:
            self.reset()
            self.mainLoop()


class _Baseline(Filter):
    """For the unfiltered baseline only: normalize the stream the way bleach's
    sanitizer does when it removes nothing — entities in text become
    Entity tokens, and each style attribute is written the way
    `_MailCSSSanitizer` writes it, keeping every declaration — so a part the
    sanitizer leaves alone does not count as a change."""

    def __iter__(self):
        for token in super().__iter__():
            if token["type"] == "Characters":
                # A method that reads only its token argument.
                result = BleachSanitizerFilter.sanitize_characters(None, dict(token))
                yield from (result if isinstance(result, list) else [result])
                continue
            if token["type"] in ("StartTag", "EmptyTag") and token.get("data"):
                data = dict(token["data"])
                for key, value in data.items():
                    attr = key[1] if isinstance(key, tuple) else key
                    if str(attr).lower() == "style":
                        data[key] = _STYLE_NORMALIZER.sanitize_css(value)
                token = {**token, "data": data}
            yield token


class _DropWithContent(Filter):
    def __init__(self, source, counts: Counter):
        super().__init__(source)
        self.counts = counts

    def __iter__(self):
        depth = 0
        for token in super().__iter__():
            kind = token["type"]
            name = (token.get("name") or "").lower()
            if kind == "Comment":
                self.counts["comments"] += 1
                continue
            if depth:
                if kind == "StartTag" and name in DROP_WITH_CONTENT:
                    depth += 1
                elif kind == "EndTag" and name in DROP_WITH_CONTENT:
                    depth -= 1
                continue
            if name in DROP_WITH_CONTENT and kind in ("StartTag", "EmptyTag", "EndTag"):
                if kind == "StartTag":
                    depth = 1
                if kind != "EndTag":
                    self.counts["tags"] += 1
                    self.counts[f"tag:{name}"] += 1
                continue
            yield token


class _Census(Filter):
    """Counts elements and attributes passing by (to tell what bleach removed)."""

    def __init__(self, source, counts: Counter):
        super().__init__(source)
        self.counts = counts

    def __iter__(self):
        for token in super().__iter__():
            if token["type"] in ("StartTag", "EmptyTag"):
                self.counts[f"tag:{token['name'].lower()}"] += 1
                self.counts["attributes"] += len(token.get("data") or {})
            yield token


class _LinkFilter(Filter):
    def __init__(self, source, policy: LinkPolicy, counts: Counter):
        super().__init__(source)
        self.policy = policy
        self.counts = counts

    def __iter__(self):
        # A run is the text between block boundaries, inline formatting tags
        # included: "www.evil<b></b>.com" reads as one URL on screen, so it
        # must be judged as one.
        pending: list[dict] = []
        for token in super().__iter__():
            if token["type"] in _TEXT_TOKENS or (
                    token["type"] in ("StartTag", "EndTag") and token["name"].lower() in _INLINE):
                pending.append(token)
                continue
            yield from self._run(pending)
            pending = []
            if token["type"] in ("StartTag", "EmptyTag"):
                token = self._tag(token)
                if token is None:
                    continue
            yield token
        yield from self._run(pending)

    def _run(self, tokens: list[dict]):
        """A run of text and inline tags. Each stretch of text is judged on
        its own, unless the run as a whole hides more (a URL or address
        split by empty or formatting tags): then the run becomes its
        cleaned text alone, and its inline tags go."""
        groups, texts = [], []
        for token in tokens:
            if token["type"] in _TEXT_TOKENS:
                texts.append(token)
            else:
                groups.append(texts)
                groups.append(token)
                texts = []
        groups.append(texts)
        # What a reader sees after each stretch is cleaned on its own: if
        # that still holds something to remove, it was hidden across tags.
        results = [self.policy.clean_text("".join(self._plain(t) for t in group))
                   if isinstance(group, list) else None for group in groups]
        seen = "".join(result[0] for result in results if result is not None)
        # With no tag in the run there is nothing that joining could reveal.
        if len(groups) > 1 and seen and self.policy.clean_text(seen)[1]:
            whole = "".join(self._plain(t) for t in tokens if t["type"] in _TEXT_TOKENS)
            cleaned, removed = self.policy.clean_text(whole)
            self.counts.update(removed)
            self.counts["tags"] += sum(1 for t in tokens if t["type"] == "StartTag")
            yield {"type": "Characters", "data": cleaned}
            return
        for group, result in zip(groups, results):
            if isinstance(group, list):
                yield from self._text(group, result)
            elif group["type"] == "StartTag":
                token = self._tag(group)
                if token is not None:
                    yield token
            else:
                yield group

    @staticmethod
    def _plain(token: dict) -> str:
        return html.unescape(f"&{token['name']};") if token["type"] == "Entity" else token["data"]

    def _tag(self, token: dict) -> dict | None:
        name = token["name"].lower()
        attributes = dict(token.get("data") or {})
        for key in list(attributes):
            attr = key[1].lower() if isinstance(key, tuple) else str(key).lower()
            value = attributes[key]
            if attr in URL_ATTRIBUTES:
                if attr == "srcset":
                    kept = self._srcset(value)
                    if kept == value:
                        continue
                    if kept:
                        attributes[key] = kept
                        continue
                elif self.policy.url_allowed(value):
                    continue
                if name == "img" and attr in ("src", "srcset", "lowsrc", "dynsrc"):
                    # An image from elsewhere is a tracking pixel or an ad: drop it.
                    self.counts["images"] += 1
                    return None
                del attributes[key]
                self.counts["links"] += 1
            elif attr in ("title", "alt"):
                # Shown on hover or instead of an image: text like any other.
                cleaned, removed = self.policy.clean_text(html.unescape(value))
                if removed:
                    attributes[key] = cleaned
                    self.counts.update(removed)
            elif attr == "style" and not self._style_allowed(value):
                del attributes[key]
                self.counts["links"] += 1
        token = dict(token)
        token["data"] = attributes
        return token

    def _srcset(self, value: str) -> str:
        kept = []
        for candidate in html.unescape(value).split(","):
            url = candidate.strip().split(" ", 1)[0]
            if url and self.policy.url_allowed(url):
                kept.append(candidate.strip())
        return ", ".join(kept) if len(kept) != len(value.split(",")) else value

    def _style_allowed(self, value: str) -> bool:
        def urls(nodes):
            for node in nodes:
                kind = getattr(node, "type", None)
                if kind == "url":
                    yield node.value
                elif kind == "function" and node.lower_name in _CSS_URL_FUNCTIONS:
                    for arg in node.arguments:
                        if getattr(arg, "type", None) in ("string", "url"):
                            yield arg.value
                    yield from urls(node.arguments)
                elif kind in ("function", "() block", "[] block", "{} block"):
                    yield from urls(getattr(node, "arguments", None) or getattr(node, "content", None) or [])
                elif kind == "declaration":
                    yield from urls(node.value)

        return _style_urls_allowed(self.policy, value, urls)

    def _text(self, tokens: list[dict], result=None):
        """A stretch of text tokens; `result` is its clean_text() if known."""
        if not tokens:
            return
        if result is None:
            result = self.policy.clean_text("".join(self._plain(t) for t in tokens))
        cleaned, removed = result
        if not removed:
            yield from tokens
            return
        self.counts.update(removed)
        # The run is written anew. A character that came only from a
        # reference (&nbsp;, &eacute;, &#8364;) stays a reference: written
        # as a character it would be a raw 8-bit byte in a us-ascii part
        # (write_text keeps such a part's bytes latin-1). ASCII ones (&lt;,
        # &amp;) the serializer escapes as needed anyway.
        literal = set().union(*(t["data"] for t in tokens if t["type"] != "Entity"))
        references = {}
        for token in tokens:
            if token["type"] == "Entity":
                char = html.unescape(f"&{token['name']};")
                if len(char) == 1 and not char.isascii() and char not in literal:
                    references.setdefault(char, token["name"])
        if not references:
            yield {"type": "Characters", "data": cleaned}
            return
        for piece in re.split(f"([{re.escape(''.join(references))}])", cleaned):
            if piece in references:
                yield {"type": "Entity", "name": references[piece]}
            elif piece:
                yield {"type": "Characters", "data": piece}


def _style_urls_allowed(policy: LinkPolicy, value: str, urls) -> bool:
    """Whether every URL in a style attribute leads somewhere allowed. Kept
    on the link policy, which is the message's own (its aliases decide
    mailto: links): styles repeat on every cell of a table."""
    verdicts = policy.__dict__.setdefault("style_verdicts", {})
    verdict = verdicts.get(value)
    if verdict is None:
        parsed = tinycss2.parse_blocks_contents(html.unescape(value))
        verdict = verdicts[value] = all(policy.url_allowed(url) for url in urls(parsed))
    return verdict


class MailHtmlCleaner(Cleaner):
    """bleach's Cleaner, run as the stream described in the module docstring."""

    def __init__(self, policy: PolicyConfig):
        super().__init__(
            tags=frozenset(policy.html_tags),
            attributes=policy.attribute_map(),
            protocols=frozenset({"http", "https", "mailto", "cid"}),
            strip=True,
            strip_comments=True,
            css_sanitizer=_MailCSSSanitizer(frozenset(policy.html_css_properties)),
        )
        # One cleaner serves every thread (see cleaner_for): the parser, which
        # is stateful, is made per call in clean_html and bleach's is not used.
        self.parser = None
        # Always quote attribute values with '"'. Values are kept as written
        # (entities and all), and bleach's serializer undoes html5lib's
        # escaping of their "&" only in a '"'-quoted value: a value holding a
        # '"' was quoted with "'" and came out double-escaped, so
        # title='say "hi" &amp; bye' read "&amp;" once the part was rewritten.
        # html5lib writes a '"' in a value as &quot;, which bleach keeps.
        self.serializer.use_best_quote_char = False

    def clean_html(self, text: str, links: LinkPolicy) -> tuple[str, Counter, bool]:
        """(clean HTML, removal counts, whether anything changed)."""
        # A parser per call (about 20 µs): one shared between the worker
        # threads mixed the DOMs of concurrent parses — text of one message
        # in another — or failed half-way.
        parser = _MailHTMLParser()
        dom = parser.parseFragment(text)
        counts: Counter = Counter()
        before: Counter = Counter()
        after: Counter = Counter()
        stream = _DropWithContent(self.walker(dom), counts)
        stream = _Census(stream, before)
        stream = self._sanitizer(stream)
        stream = _Census(stream, after)
        stream = _LinkFilter(stream, links, counts)
        cleaned = self.serializer.render(stream)
        for key, count in (before - after).items():
            if key.startswith("tag:"):
                counts["tags"] += count
                counts[key] += count
            elif key == "attributes":
                counts["attributes"] += count
        outside = self._document_tags_changed(parser.document_tags, links, counts)
        if outside or +counts:
            # Something was removed: changed, without rendering the baseline.
            return cleaned, counts, True
        baseline = self.serializer.render(_Baseline(self.walker(dom)))
        return cleaned, counts, cleaned != baseline

    def _sanitizer(self, stream):
        return BleachSanitizerFilter(
            source=stream,
            allowed_tags=self.tags,
            attributes=self.attributes,
            strip_disallowed_tags=True,
            strip_html_comments=True,
            css_sanitizer=self.css_sanitizer,
            allowed_protocols=self.protocols,
        )

    def _document_tags_changed(self, tags: list[tuple[str, dict[str, str]]], links: LinkPolicy,
                               counts: Counter) -> bool:
        """Whether the <html>, <body> and <frameset> start tags, which never
        reach the stream, oblige a rewrite (which leaves them out).

        A <frameset> always does. The attributes of <html> and <body> are
        judged as if they were on a <div> (the "*" allowlist, CSS, links):
        ``<body style="margin:0" bgcolor="#fff">`` leaves the part alone,
        ``<body onload=…>`` or ``<body background="http://…">`` does not."""
        changed = False
        for name, data in tags:
            if name == "frameset":
                counts["tags"] += 1
                counts["tag:frameset"] += 1
                counts["attributes"] += len(data)
                changed = True
                continue
            attributes = {(None, key): value for key, value in data.items()
                          if not (name == "html" and _INERT_HTML_ATTRIBUTE.match(key))}
            if not attributes:
                continue
            div = {"type": "StartTag", "name": "div", "namespace": None, "data": attributes}
            # The sanitizer sets the token's "data": give each filter a copy.
            [sanitized] = [t for t in self._sanitizer([dict(div)]) if t["type"] == "StartTag"]
            counts["attributes"] += len(attributes) - len(sanitized["data"])
            kept = list(_LinkFilter([sanitized], links, counts))
            [as_is] = [t for t in _Baseline([dict(div)]) if t["type"] == "StartTag"]
            changed = changed or not kept or dict(kept[0]["data"]) != dict(as_is["data"])
        return changed


_cleaners: dict[PolicyConfig, MailHtmlCleaner] = {}


def cleaner_for(policy: PolicyConfig) -> MailHtmlCleaner:
    # Cleaner holds no per-call state (clean_html builds its own parser and
    # stream), so one per policy is shared between worker threads.
    cleaner = _cleaners.get(policy)
    if cleaner is None:
        cleaner = _cleaners.setdefault(policy, MailHtmlCleaner(policy))
    return cleaner


def check_text_sizes(message: EmailMessage, context, changes) -> None:
    """A text part too big to sanitize safely is refused, not passed on."""
    limit = context.policy.max_text_part_bytes
    for index, part in enumerate(text_parts(message)):
        size = len(part.get_payload(decode=True) or b"")
        if size > limit:
            changes.append(f"refused: {part.get_content_type()} part {index} is {size} bytes (limit {limit})")
            raise SmtpError(replies.TEXT_PART_TOO_BIG.with_text(
                f"A text part of {size} bytes exceeds the limit of {limit} bytes"))


def sanitize_html(message: EmailMessage, context, changes) -> None:
    cleaner = cleaner_for(context.policy)
    links = policy_for(message, context)
    for index, part in enumerate(text_parts(message)):
        if part.get_content_type() != "text/html":
            continue
        cleaned, counts, changed = cleaner.clean_html(read_text(part), links)
        if not changed:
            continue
        write_text(part, cleaned, html=True)
        tags = sorted(k[4:] for k in counts if k.startswith("tag:"))
        summary = Counter({k: v for k, v in counts.items() if not k.startswith("tag:")})
        changes.record(summary, f"text/html part {index}" + (f" (elements: {', '.join(tags)})" if tags else ""))
        if not summary:
            changes.append(f"normalized text/html part {index}")
