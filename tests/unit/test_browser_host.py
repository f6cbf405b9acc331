"""Hosts read as browsers read them (relay.pipeline.links.browser_host):
UTS #46 non-transitional mapping (IDNA 2008), as Chromium, Firefox and the
WHATWG URL standard do, not Python's IDNA 2003 codec. Then the link rule
with `allowed_link_domains = ["classifieds.example", "xn--oxapmbu.example"]`
(the second is "λογοσ.example"): every look-alike a browser would open
elsewhere is removed, the genuine domains and their subdomains are kept,
and a host that cannot be normalised is never allowed.

The expected A-labels are the punycode of the label as a browser keeps it
(e.g. Chromium opens claßifieds.example as xn--claifieds-i1a.example).
"""

from __future__ import annotations

import pytest

from relay.config import PolicyConfig
from relay.pipeline.links import LINK_REMOVED, LinkPolicy, browser_host

ALLOWED = ("classifieds.example", "xn--oxapmbu.example")
ALIAS = "aaaaaaaaaaaaaaaa@marketplace.example"

# (host as written, host as a browser looks it up or None, note)
HOSTS = [
    ("classifieds.example", "classifieds.example", "the genuine domain"),
    ("shop.classifieds.example", "shop.classifieds.example", "a subdomain"),
    ("CLASSIFIEDS.EXAMPLE", "classifieds.example", "upper case"),
    ("\uff23\uff2c\uff21\uff33\uff33\uff29\uff26\uff29\uff25\uff24\uff33.example", "classifieds.example",
     "full-width capital letters"),
    ("classifieds\u3002example", "classifieds.example", "ideographic full stop U+3002"),
    ("classifieds\uff0eexample", "classifieds.example", "full-width full stop U+FF0E"),
    ("classifieds\uff61example", "classifieds.example", "half-width ideographic full stop U+FF61"),
    ("classifieds.example.", "classifieds.example", "trailing dot"),
    ("classifieds.example\u3002", "classifieds.example", "trailing ideographic full stop"),
    ("classi\u00adfieds.example", "classifieds.example", "soft hyphen: mapped to nothing, as browsers do"),
    ("%63lassifieds.example", "classifieds.example", "percent-encoded letter"),
    ("classifieds%2Eexample", "classifieds.example", "percent-encoded dot"),
    ("my_shop.classifieds.example", "my_shop.classifieds.example", "underscore: browsers accept it"),
    ("ab--cd.classifieds.example", "ab--cd.classifieds.example", "hyphens in 3rd and 4th place (CheckHyphens off)"),
    ("XN--OXAPMBU.EXAMPLE", "xn--oxapmbu.example", "upper-case A-label"),
    # The deviation characters: IDNA 2003 maps them away, browsers keep them.
    ("cla\u00dfifieds.example", "xn--claifieds-i1a.example", "sharp s: not ss"),
    ("CLA\u00dfIFIEDS.example", "xn--claifieds-i1a.example", "sharp s among capitals"),
    ("cla%C3%9Fifieds.example", "xn--claifieds-i1a.example", "percent-encoded sharp s"),
    ("xn--claifieds-i1a.example", "xn--claifieds-i1a.example", "the sharp s look-alike as an A-label"),
    ("\u03bb\u03bf\u03b3\u03bf\u03c2.example", "xn--oxapmbp.example", "final sigma: not sigma"),
    ("\u03bb\u03bf\u03b3\u03bf\u03c3.example", "xn--oxapmbu.example", "sigma: the genuine Greek domain"),
    ("cla\u03c2sifieds.example", "xn--clasifieds-hrh.example", "final sigma among Latin letters"),
    ("clas\u200dsifieds.example", None, "zero width joiner: IDNA 2008 context rule fails, browsers refuse"),
    ("clas\u200csifieds.example", None, "zero width non-joiner: the same"),
    ("cl\u0430ssifieds.example", "xn--clssifieds-0qi.example", "Cyrillic a"),
    ("stra\u00dfe.example", "xn--strae-oqa.example", "a real German name keeps its sharp s"),
    # Not names: never allowed.
    ("", None, "empty"),
    (".", None, "only the root"),
    ("classifieds.example..", None, "two trailing dots: an empty label"),
    (".classifieds.example", None, "leading dot"),
    ("classifieds..example", None, "empty label inside"),
    ("xn--zz.example", None, "A-label that does not decode"),
    ("%FF.example", None, "percent-escape that is not UTF-8"),
    ("evil.test%2F.classifieds.example", None, "encoded slash before an allowed suffix"),
    ("evil.test\uff0f.classifieds.example", None, "full-width slash before an allowed suffix"),
    ("evil.test%20.classifieds.example", None, "encoded space"),
    ("i\u2764.example", None, "symbol IDNA 2008 disallows"),
]


@pytest.mark.parametrize("host, expected", [pytest.param(h, e, id=n) for h, e, n in HOSTS])
def test_browser_host(host, expected):
    assert browser_host(host) == expected


def policy() -> LinkPolicy:
    return LinkPolicy(PolicyConfig(allowed_link_domains=ALLOWED), {ALIAS})


@pytest.mark.parametrize("host, expected", [pytest.param(h, e, id=n) for h, e, n in HOSTS])
def test_a_link_stays_only_if_the_browser_opens_an_allowed_domain(host, expected):
    kept = expected is not None and any(expected == d or expected.endswith("." + d) for d in ALLOWED)
    for url in (f"https://{host}/item/1", f"HTTP://{host}", f"//{host}/x", f"https://user@{host}:443/"):
        assert policy().url_allowed(url) is kept, url


def test_the_sharp_s_look_alike_is_no_longer_kept():
    """The hole of issue 18: IDNA 2003 made classifieds.example of it."""
    assert "cla\u00dfifieds.example".encode("idna") == b"classifieds.example"
    assert not policy().url_allowed("https://cla\u00dfifieds.example/deal")
    assert policy().url_allowed("https://classifieds.example/deal")


def test_capitals_mapped_before_lower_casing():
    """Capital sharp s and a word-final capital sigma: str.lower() (what
    urlsplit's `hostname` does) would make "ß" and "ς" of them; UTS #46
    maps the capital sigma to "σ", so ΛΟΓΟΣ.example is the genuine domain."""
    assert policy().url_allowed("https://\u039b\u039f\u0393\u039f\u03a3.example/")
    assert not policy().url_allowed("https://\u03bb\u03bf\u03b3\u03bf\u03c2.example/")


@pytest.mark.parametrize("text, expected", [
    ("see cla\u00dfifieds.example/deal now", f"see {LINK_REMOVED} now"),
    ("see https://cla\u00dfifieds.example/deal now", f"see {LINK_REMOVED} now"),
    ("see clas\u200dsifieds.example/x", f"see {LINK_REMOVED}"),
    ("see www.cla\u00dfifieds.example", f"see {LINK_REMOVED}"),
    ("see classifieds\u3002example/deal", "see classifieds\u3002example/deal"),
    ("see shop.classifieds.example/deal", "see shop.classifieds.example/deal"),
    ("see \u03bb\u03bf\u03b3\u03bf\u03c2.example", f"see {LINK_REMOVED}"),
    ("see \u03bb\u03bf\u03b3\u03bf\u03c3.example", "see \u03bb\u03bf\u03b3\u03bf\u03c3.example"),
], ids=["bare sharp s host", "sharp s URL", "joiner host", "www. sharp s", "ideographic dot genuine",
        "genuine subdomain", "final sigma host", "sigma genuine"])
def test_look_alikes_in_text(text, expected):
    assert policy().clean_text(text)[0] == expected
