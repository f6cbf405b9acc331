"""HTML sanitizing with bleach, and the link policy applied inside HTML.

One html5lib parse per text/html part, then one token stream through:

1. `_DropWithContent` — script, style, iframe, object, embed, form, meta,
   base, link, svg, math, title, noscript, template and friends go with
   everything inside them (bleach alone would keep their text);
2. bleach's `BleachSanitizerFilter` — the tag/attribute allowlist from
   `[policy]`, a disallowed tag removed with its children kept, comments
   removed (`<!--[if mso]>` conditionals are comments), event handlers
   never allowed, CSS reduced to `[policy] html_css_properties` by bleach's
   CSS sanitizer;
3. `_LinkFilter` — every URL-bearing attribute through `LinkPolicy`: an
   off-site `href` is removed and the link text kept, an `img` whose `src`
   leads off-site is removed, a `style` with an off-site `url()` is dropped;
   text nodes through `LinkPolicy.clean_text` (bare URLs, other addresses,
   phones).

The part is rewritten only if that changed something: the same DOM is also
serialized without filters, and when both serializations agree the part
keeps its original bytes. It keeps its charset and transfer encoding either
way.
"""

from __future__ import annotations

import html
from collections import Counter
from email.message import EmailMessage

import tinycss2
from bleach import html5lib_shim
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
_CSS_URL_FUNCTIONS = frozenset({"url", "src", "image", "image-set", "-webkit-image-set", "cross-fade"})


class _Baseline(Filter):
    """For the unfiltered baseline only: normalize the stream the way bleach's
    sanitizer does when it removes nothing — entities in text become
    Entity tokens, and each style attribute is written the way the CSS
    sanitizer writes it, keeping every declaration — so a part the
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
                        names = {d.lower_name for d in tinycss2.parse_declaration_list(value)
                                 if d.type == "declaration"}
                        data[key] = CSSSanitizer(allowed_css_properties=names,
                                                 allowed_svg_properties=names).sanitize_css(value)
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
        pending: list[dict] = []
        for token in super().__iter__():
            if token["type"] in _TEXT_TOKENS:
                pending.append(token)
                continue
            yield from self._text(pending)
            pending = []
            if token["type"] in ("StartTag", "EmptyTag"):
                token = self._tag(token)
                if token is None:
                    continue
            yield token
        yield from self._text(pending)

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

        parsed = tinycss2.parse_blocks_contents(html.unescape(value))
        return all(self.policy.url_allowed(url) for url in urls(parsed))

    def _text(self, tokens: list[dict]):
        if not tokens:
            return
        text = "".join(html.unescape(f"&{t['name']};") if t["type"] == "Entity" else t["data"] for t in tokens)
        cleaned, removed = self.policy.clean_text(text)
        if not removed:
            yield from tokens
            return
        self.counts.update(removed)
        yield {"type": "Characters", "data": cleaned}


class MailHtmlCleaner(Cleaner):
    """bleach's Cleaner, run as the stream described in the module docstring."""

    def __init__(self, policy: PolicyConfig):
        super().__init__(
            tags=frozenset(policy.html_tags),
            attributes=policy.attribute_map(),
            protocols=frozenset({"http", "https", "mailto", "cid"}),
            strip=True,
            strip_comments=True,
            css_sanitizer=CSSSanitizer(allowed_css_properties=frozenset(policy.html_css_properties)),
        )
        # Parse every tag (tags=None): bleach would otherwise drop disallowed
        # tags in the tokenizer, where _DropWithContent cannot see them and
        # the unchanged-part check cannot notice.
        self.parser = html5lib_shim.BleachHTMLParser(
            tags=None, strip=True, consume_entities=False, namespaceHTMLElements=False)

    def clean_html(self, text: str, links: LinkPolicy) -> tuple[str, Counter, bool]:
        """(clean HTML, removal counts, whether anything changed)."""
        dom = self.parser.parseFragment(text)
        baseline = self.serializer.render(_Baseline(self.walker(dom)))
        counts: Counter = Counter()
        before: Counter = Counter()
        after: Counter = Counter()
        stream = _DropWithContent(self.walker(dom), counts)
        stream = _Census(stream, before)
        stream = BleachSanitizerFilter(
            source=stream,
            allowed_tags=self.tags,
            attributes=self.attributes,
            strip_disallowed_tags=True,
            strip_html_comments=True,
            css_sanitizer=self.css_sanitizer,
            allowed_protocols=self.protocols,
        )
        stream = _Census(stream, after)
        stream = _LinkFilter(stream, links, counts)
        cleaned = self.serializer.render(stream)
        for key, count in (before - after).items():
            if key.startswith("tag:"):
                counts["tags"] += count
                counts[key] += count
            elif key == "attributes":
                counts["attributes"] += count
        return cleaned, counts, cleaned != baseline


_cleaners: dict[PolicyConfig, MailHtmlCleaner] = {}


def cleaner_for(policy: PolicyConfig) -> MailHtmlCleaner:
    # Cleaner holds no per-call state (clean_html builds its own stream), so
    # one per policy is shared between worker threads.
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
