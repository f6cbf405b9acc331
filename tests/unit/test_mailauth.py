"""relay.mailauth: SPF, DKIM and DMARC against a real DNS server.

Zones are in tests/zones/ (README.md there has the table of domains);
messages are signed here with dkimpy and the test-only keys in
tests/zones/keys/. One table says, per case, what each check finds and what
decide() answers in each mode."""

from __future__ import annotations

import concurrent.futures
import dataclasses

import dkim
import idna
import pytest

from dnsserver import ZONES, DNSServer
from relay import mailauth
from relay.dns import make_resolver

KEY_A = (ZONES / "keys" / "a.private.pem").read_bytes()  # published as a._domainkey.<domain>
KEY_B = (ZONES / "keys" / "b.private.pem").read_bytes()  # published nowhere
AUTHSERV_ID = "relay.example"
GOOD_IP = "127.0.0.1"  # in every test domain's SPF record
BAD_IP = "127.0.0.2"  # in none


def message(author: str = "bea@reject.example", body: bytes = b"Is the lamp still available?\r\n",
            from_header: str | None = None) -> bytes:
    from_line = f"From: {from_header}\r\n" if from_header is not None else f"From: Bea <{author}>\r\n"
    return (
        from_line
        + "To: shop-7f3k2m9x@marketplace.example\r\n"
        "Subject: Lamp\r\n"
        "Date: Tue, 04 Mar 2025 10:00:00 +0000\r\n"
        "Message-ID: <lamp-1@mail.example>\r\n"
        "\r\n"
    ).encode() + body


def sign(raw: bytes, domain: str, selector: str = "a", key: bytes = KEY_A) -> bytes:
    signature = dkim.sign(raw, selector.encode(), domain.encode(), key,
                          include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return signature + raw


def tamper(raw: bytes) -> bytes:
    """Change the body after signing, as a forwarder that edits it would."""
    return raw.replace(b"Is the lamp", b"Is the LAMP")


# --- the table ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    expect: tuple[str, str, str, str]  # spf, dkim, dmarc, dmarc_policy
    dmarc_mode: str | None  # "550 5.7.26"… or None (accepted) in mode "dmarc"
    strict_mode: str | None  # the same in mode "strict"
    ip: str = GOOD_IP
    mail_from: str = "bea@reject.example"
    author: str = "bea@reject.example"
    helo: str = "mail.reject.example"
    signers: tuple[tuple[str, str, bytes], ...] = ()  # (d=, s=, key), the last one on top
    tampered: bool = False
    faults: tuple[tuple[str, str], ...] = ()  # (name, "timeout" | "servfail")

    def raw(self) -> bytes:
        raw = message(self.author)
        for domain, selector, key in self.signers:
            raw = sign(raw, domain, selector, key)
        return tamper(raw) if self.tampered else raw


REJECT_A = ("reject.example", "a", KEY_A)
REFUSED_DMARC = "550 5.7.26"
REFUSED_SPF = "550 5.7.23"
TEMPORARY = "451 4.7.5"

CASES = [
    # SPF, each result (DMARC of reject.example: p=reject)
    Case("spf-pass", ("pass", "none", "pass", "reject"), None, None),
    Case("spf-fail", ("fail", "none", "fail", "reject"), REFUSED_DMARC, REFUSED_DMARC, ip=BAD_IP),
    Case("spf-softfail", ("softfail", "none", "fail", "quarantine"), REFUSED_DMARC, REFUSED_DMARC,
         ip=BAD_IP, mail_from="bea@quarantine.example", author="bea@quarantine.example"),
    Case("spf-neutral", ("neutral", "none", "none", ""), REFUSED_DMARC, REFUSED_DMARC,
         mail_from="bea@neutral.example", author="bea@neutral.example"),
    Case("spf-none", ("none", "none", "fail", "none"), None, REFUSED_DMARC,
         mail_from="bea@monitor.example", author="bea@monitor.example"),
    Case("spf-permerror-and-unusable-dmarc-record", ("permerror", "none", "permerror", ""),
         REFUSED_DMARC, REFUSED_DMARC, mail_from="bea@broken.example", author="bea@broken.example"),
    Case("spf-mx-mechanism", ("pass", "none", "none", ""), None, REFUSED_DMARC,
         ip="127.0.0.3", mail_from="bea@include.example", author="bea@include.example"),
    Case("spf-include-mechanism", ("pass", "none", "none", ""), None, REFUSED_DMARC,
         mail_from="bea@include.example", author="bea@include.example"),
    Case("spf-include-mechanism-fail", ("fail", "none", "none", ""), REFUSED_SPF, REFUSED_DMARC,
         ip=BAD_IP, mail_from="bea@include.example", author="bea@include.example"),
    Case("spf-null-sender-checks-helo", ("pass", "none", "pass", "reject"), None, None, mail_from=""),
    Case("spf-null-sender-helo-fails", ("fail", "none", "fail", "reject"), REFUSED_DMARC, REFUSED_DMARC,
         ip=BAD_IP, mail_from=""),
    Case("spf-timeout", ("temperror", "none", "temperror", "reject"), TEMPORARY, TEMPORARY,
         faults=(("reject.example", "timeout"),)),
    Case("spf-servfail", ("temperror", "none", "temperror", "reject"), TEMPORARY, TEMPORARY,
         faults=(("reject.example", "servfail"),)),
    Case("spf-include-servfail", ("temperror", "none", "none", ""), TEMPORARY, REFUSED_DMARC,
         mail_from="bea@include.example", author="bea@include.example",
         faults=(("esp.example", "servfail"),)),
    # DKIM (SPF fails, so DKIM alone decides DMARC)
    Case("dkim-valid", ("fail", "pass", "pass", "reject"), None, None, ip=BAD_IP, signers=(REJECT_A,)),
    Case("dkim-broken-body", ("fail", "fail", "fail", "reject"), REFUSED_DMARC, REFUSED_DMARC,
         ip=BAD_IP, signers=(REJECT_A,), tampered=True),
    Case("dkim-wrong-key", ("fail", "fail", "fail", "reject"), REFUSED_DMARC, REFUSED_DMARC,
         ip=BAD_IP, signers=(("reject.example", "a", KEY_B),)),
    Case("dkim-missing-key", ("fail", "fail", "fail", "reject"), REFUSED_DMARC, REFUSED_DMARC,
         ip=BAD_IP, signers=(("reject.example", "gone", KEY_A),)),
    Case("dkim-key-timeout", ("fail", "temperror", "temperror", "reject"), TEMPORARY, TEMPORARY,
         ip=BAD_IP, signers=(REJECT_A,), faults=(("a._domainkey.reject.example", "timeout"),)),
    Case("dkim-key-servfail", ("fail", "temperror", "temperror", "reject"), TEMPORARY, TEMPORARY,
         ip=BAD_IP, signers=(REJECT_A,), faults=(("a._domainkey.reject.example", "servfail"),)),
    Case("dkim-one-good-of-two", ("fail", "pass", "pass", "reject"), None, None,
         ip=BAD_IP, signers=(("reject.example", "a", KEY_B), REJECT_A)),
    Case("dkim-valid-spf-servfail", ("temperror", "pass", "pass", "reject"), None, None,
         signers=(REJECT_A,), faults=(("reject.example", "servfail"),)),
    Case("dkim-unaligned-timeout-spf-pass", ("pass", "temperror", "pass", "reject"), None, None,
         signers=(("esp.example", "a", KEY_A),), faults=(("a._domainkey.esp.example", "servfail"),)),
    # DMARC policies
    Case("dmarc-reject", ("fail", "none", "fail", "reject"), REFUSED_DMARC, REFUSED_DMARC, ip=BAD_IP),
    Case("dmarc-quarantine-dkim-pass", ("softfail", "pass", "pass", "quarantine"), None, None,
         ip=BAD_IP, mail_from="bea@quarantine.example", author="bea@quarantine.example",
         signers=(("quarantine.example", "a", KEY_A),)),
    Case("dmarc-none-unsigned", ("none", "none", "fail", "none"), None, REFUSED_DMARC,
         mail_from="bea@monitor.example", author="bea@monitor.example"),
    Case("dmarc-none-signed", ("none", "pass", "pass", "none"), None, None,
         mail_from="bea@monitor.example", author="bea@monitor.example",
         signers=(("monitor.example", "a", KEY_A),)),
    Case("dmarc-absent-spf-pass", ("pass", "none", "none", ""), None, REFUSED_DMARC,
         mail_from="bea@nodmarc.example", author="bea@nodmarc.example"),
    Case("dmarc-absent-dkim-pass", ("fail", "pass", "none", ""), None, REFUSED_DMARC,
         ip=BAD_IP, mail_from="bea@nodmarc.example", author="bea@nodmarc.example",
         signers=(("nodmarc.example", "a", KEY_A),)),
    Case("dmarc-absent-spf-fail-only", ("fail", "none", "none", ""), REFUSED_SPF, REFUSED_DMARC,
         ip=BAD_IP, mail_from="bea@nodmarc.example", author="bea@nodmarc.example"),
    Case("dmarc-absent-all-fail", ("fail", "fail", "none", ""), REFUSED_DMARC, REFUSED_DMARC,
         ip=BAD_IP, mail_from="bea@nodmarc.example", author="bea@nodmarc.example",
         signers=(("nodmarc.example", "a", KEY_A),), tampered=True),
    Case("dmarc-absent-spf-servfail", ("temperror", "none", "none", ""), TEMPORARY, REFUSED_DMARC,
         mail_from="bea@nodmarc.example", author="bea@nodmarc.example",
         faults=(("nodmarc.example", "servfail"),)),
    Case("dmarc-two-records-do-not-apply", ("fail", "none", "none", ""), REFUSED_SPF, REFUSED_DMARC,
         ip=BAD_IP, mail_from="bea@twodmarc.example", author="bea@twodmarc.example"),
    Case("dmarc-record-timeout-spf-fail", ("fail", "none", "temperror", ""), TEMPORARY, TEMPORARY,
         ip=BAD_IP, faults=(("_dmarc.reject.example", "timeout"),)),
    Case("dmarc-record-servfail-aligned-pass", ("pass", "none", "temperror", ""), None, TEMPORARY,
         faults=(("_dmarc.reject.example", "servfail"),)),
    # Alignment
    Case("aligned-relaxed-dkim-subdomain", ("fail", "pass", "pass", "reject"), None, None,
         ip=BAD_IP, signers=(("mail.reject.example", "a", KEY_A),)),
    Case("aligned-relaxed-from-subdomain", ("none", "pass", "pass", "reject"), None, None,
         mail_from="bea@shop.reject.example", author="bea@shop.reject.example", signers=(REJECT_A,)),
    Case("from-subdomain-gets-org-policy", ("none", "none", "fail", "reject"), REFUSED_DMARC, REFUSED_DMARC,
         mail_from="bea@shop.reject.example", author="bea@shop.reject.example"),
    Case("unaligned-esp-spf-and-dkim", ("pass", "pass", "fail", "reject"), REFUSED_DMARC, REFUSED_DMARC,
         mail_from="bounce@esp.example", signers=(("esp.example", "a", KEY_A),)),
    Case("unaligned-esp-without-dmarc", ("pass", "pass", "none", ""), REFUSED_DMARC, REFUSED_DMARC,
         mail_from="bounce@esp.example", author="bea@nodmarc.example", signers=(("esp.example", "a", KEY_A),)),
    Case("strict-alignment-subdomain-dkim", ("fail", "pass", "fail", "reject"), REFUSED_DMARC, REFUSED_DMARC,
         ip=BAD_IP, mail_from="bea@strict.example", author="bea@strict.example",
         signers=(("mail.strict.example", "a", KEY_A),)),
    Case("strict-alignment-same-domain", ("fail", "pass", "pass", "reject"), None, None,
         ip=BAD_IP, mail_from="bea@strict.example", author="bea@strict.example",
         signers=(("strict.example", "a", KEY_A),)),
    Case("strict-alignment-spf", ("pass", "none", "pass", "reject"), None, None,
         mail_from="bea@strict.example", author="bea@strict.example"),
    # The From domain as IDNA 2008 reads it: faß.example is xn--fa-hia.example,
    # never the look-alike fass.example (IDNA 2003), whose own SPF and DKIM
    # pass here and would align.
    Case("idna2008-from-domain-is-not-its-idna2003-look-alike", ("pass", "pass", "fail", "reject"),
         REFUSED_DMARC, REFUSED_DMARC, ip=BAD_IP, mail_from="bea@fass.example", author="bea@faß.example",
         signers=(("fass.example", "a", KEY_A),)),
    Case("idna2008-from-domain-aligned-pass", ("pass", "none", "pass", "reject"), None, None,
         mail_from="bea@faß.example", author="bea@faß.example"),
    Case("subdomain-policy-sp-none", ("none", "none", "fail", "none"), None, REFUSED_DMARC,
         mail_from="bea@news.subpolicy.example", author="bea@news.subpolicy.example"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_authenticate_and_decide(case, server, resolver):
    for name, how in case.faults:
        server.fail(name, how)
    verdict = mailauth.authenticate(case.raw(), case.ip, case.helo, case.mail_from,
                                    resolver=resolver, authserv_id=AUTHSERV_ID)
    assert (verdict.spf, verdict.dkim, verdict.dmarc, verdict.dmarc_policy) == case.expect

    def outcome(mode):
        reply = mailauth.decide(verdict, mode)
        return None if reply is None else f"{reply.code} {reply.enhanced}"
    assert (outcome("dmarc"), outcome("strict"), outcome("off")) == (case.dmarc_mode, case.strict_mode, None)

    assert verdict.header.startswith(f"{AUTHSERV_ID}; spf={verdict.spf}")
    assert "bea" not in verdict.header and "bounce" not in verdict.header  # domains only, never an address
    if case.author:  # in A-labels: faß.example is xn--fa-hia.example
        assert verdict.from_domain == idna.encode(case.author.partition("@")[2], uts46=True).decode()


def test_every_case_name_is_unique():
    assert len({case.id for case in CASES}) == len(CASES)


# --- the Authentication-Results value -----------------------------------------------

@pytest.mark.parametrize("case_id, header", [
    ("spf-pass",
     "relay.example; spf=pass smtp.mailfrom=reject.example; dkim=none; "
     "dmarc=pass (p=reject) header.from=reject.example"),
    ("dkim-valid",
     "relay.example; spf=fail smtp.mailfrom=reject.example; dkim=pass header.d=reject.example; "
     "dmarc=pass (p=reject) header.from=reject.example"),
    ("dkim-one-good-of-two",  # one resinfo per signature, top one first
     "relay.example; spf=fail smtp.mailfrom=reject.example; dkim=pass header.d=reject.example; "
     "dkim=fail header.d=reject.example; dmarc=pass (p=reject) header.from=reject.example"),
    ("spf-null-sender-checks-helo",
     "relay.example; spf=pass smtp.helo=mail.reject.example; dkim=none; "
     "dmarc=pass (p=reject) header.from=reject.example"),
    ("spf-servfail",
     "relay.example; spf=temperror smtp.mailfrom=reject.example; dkim=none; "
     "dmarc=temperror (p=reject) header.from=reject.example"),
    ("dkim-key-servfail",
     "relay.example; spf=fail smtp.mailfrom=reject.example; dkim=temperror header.d=reject.example; "
     "dmarc=temperror (p=reject) header.from=reject.example"),
    ("dmarc-absent-spf-fail-only",
     "relay.example; spf=fail smtp.mailfrom=nodmarc.example; dkim=none; dmarc=none header.from=nodmarc.example"),
    ("unaligned-esp-spf-and-dkim",
     "relay.example; spf=pass smtp.mailfrom=esp.example; dkim=pass header.d=esp.example; "
     "dmarc=fail (p=reject) header.from=reject.example"),
])
def test_authentication_results_header(case_id, header, server, resolver):
    case = next(case for case in CASES if case.id == case_id)
    for name, how in case.faults:
        server.fail(name, how)
    verdict = mailauth.authenticate(case.raw(), case.ip, case.helo, case.mail_from,
                                    resolver=resolver, authserv_id=AUTHSERV_ID)
    assert verdict.header == header


def test_verdict_details(resolver):
    raw = sign(sign(message(), "esp.example"), "mail.reject.example")
    verdict = mailauth.authenticate(raw, BAD_IP, "mail.reject.example", "bea@reject.example",
                                    resolver=resolver, authserv_id=AUTHSERV_ID)
    assert verdict.dkim_domains == ("mail.reject.example", "esp.example")
    assert verdict.dkim_signatures == (
        mailauth.DkimSignature("mail.reject.example", "a", "pass", aligned=True),
        mailauth.DkimSignature("esp.example", "a", "pass", aligned=False),
    )
    assert verdict.spf_domain == "reject.example" and verdict.spf_aligned
    assert verdict.aligned_pass and not verdict.aligned_temperror


# --- odd messages and envelopes --------------------------------------------------------

@pytest.mark.parametrize("from_header, from_domain", [
    ("Bea <bea@reject.example>", "reject.example"),
    ("bea@Reject.Example.", "reject.example"),
    ('"bea@esp.example" <bea@reject.example>', "reject.example"),  # the address, not the display name
    ("Bea <bea@reject.example>, Al <al@esp.example>", ""),  # two authors: DMARC does not apply
    ("Friends: bea@reject.example, al@esp.example;", ""),
    ("undisclosed-recipients:;", ""),
    ("Bea", ""),
    ("", ""),
    ("Bea <bea@bücher.example>", "xn--bcher-kva.example"),
    ("Bea <bea@faß.example>", "xn--fa-hia.example"),  # IDNA 2008: not fass.example
    ("Bea <bea@ＦＡß．example>", "xn--fa-hia.example"),  # full-width letters and dot, folded
    ("Bea <bea@a\u200db.example>", ""),  # a joiner between Latin letters: no valid name
    ("Bea <bea@[127.0.0.1]>", ""),  # an address literal is no domain
])
def test_header_from_domain(from_header, from_domain):
    assert mailauth.header_from_domain(message(from_header=from_header)) == from_domain


def test_header_from_domain_needs_exactly_one_from_field():
    raw = message()
    assert mailauth.header_from_domain(b"From: Al <al@esp.example>\r\n" + raw) == ""
    assert mailauth.header_from_domain(raw.replace(b"From:", b"X-From:")) == ""
    assert mailauth.header_from_domain(b"From: bea@reject.example\n\nbody\n") == "reject.example"


def test_a_message_without_a_usable_from(resolver):
    verdict = mailauth.authenticate(message(from_header="undisclosed-recipients:;"), GOOD_IP,
                                    "mail.reject.example", "bea@reject.example",
                                    resolver=resolver, authserv_id=AUTHSERV_ID)
    assert (verdict.spf, verdict.dmarc, verdict.from_domain) == ("pass", "permerror", "")
    assert verdict.header == "relay.example; spf=pass smtp.mailfrom=reject.example; dkim=none; dmarc=permerror"
    assert mailauth.decide(verdict, "dmarc").enhanced == "5.7.26"


@pytest.mark.parametrize("raw", [
    b"",
    b"no header at all",
    b"From: bea@reject.example\r\nDKIM-Signature: v=1; d=reject.example\r\n\r\nbody\r\n",  # no b=, s=…
    b"DKIM-Signature: nonsense\r\nFrom bea@reject.example\r\n\r\n",  # a header line without a colon
    b"From: bea@reject.example\r\nDKIM-Signature: v=1; a=rsa-sha256; d=reject.example; s=a; "
    b"h=from; bh=AAAA; b=!!!!\r\n\r\nbody\r\n",
])
def test_malformed_messages_fail_closed(raw, resolver):
    verdict = mailauth.authenticate(raw, GOOD_IP, "mail.reject.example", "bea@reject.example",
                                    resolver=resolver, authserv_id=AUTHSERV_ID)
    assert verdict.dkim in ("none", "fail")
    assert not verdict.dkim_domains


def test_signatures_past_the_limit_are_not_checked(resolver, server):
    raw = message()
    for _ in range(mailauth.MAX_DKIM_SIGNATURES + 2):
        raw = sign(raw, "reject.example", key=KEY_B)
    before = len(server.queries)
    verdict = mailauth.authenticate(raw, BAD_IP, "mail.reject.example", "bea@reject.example",
                                    resolver=resolver, authserv_id=AUTHSERV_ID)
    assert len(verdict.dkim_signatures) == mailauth.MAX_DKIM_SIGNATURES
    assert verdict.dkim == "fail"
    key_lookups = [q for q in server.queries[before:] if q[0] == "a._domainkey.reject.example"]
    assert len(key_lookups) == 1  # and the key was fetched once: the resolver caches


@pytest.mark.parametrize("client_ip, helo, mail_from, expected", [
    ("::ffff:127.0.0.1", "mail.reject.example", "bea@reject.example", ("pass", "reject.example")),
    ("::1", "mail.reject.example", "bea@reject.example", ("fail", "reject.example")),
    ("", "mail.reject.example", "bea@reject.example", ("permerror", "reject.example")),
    ("not-an-ip", "mail.reject.example", "bea@reject.example", ("permerror", "reject.example")),
    ("127.0.0.1", "[127.0.0.1]", "", ("none", "")),  # null sender, HELO an address literal
    ("127.0.0.1", "", "", ("none", "")),
    ("127.0.0.1", "mail.reject.example", "<bea@reject.example>", ("pass", "reject.example")),
    ("127.0.0.1", "mail.reject.example", "bea@bücher.example", ("none", "xn--bcher-kva.example")),
])
def test_spf_inputs(client_ip, helo, mail_from, expected, resolver):
    verdict = mailauth.authenticate(message(), client_ip, helo, mail_from,
                                    resolver=resolver, authserv_id=AUTHSERV_ID)
    assert (verdict.spf, verdict.spf_domain) == expected


# --- DMARC pieces without DNS ---------------------------------------------------------------

@pytest.mark.parametrize("text, tags", [
    ("v=DMARC1; p=reject", {"v": "DMARC1", "p": "reject"}),
    (b"v=DMARC1;p=none;", {"v": "DMARC1", "p": "none"}),
    ("v = DMARC1 ; P=Quarantine ; sp=none; adkim=s", {"v": "DMARC1", "p": "Quarantine", "sp": "none", "adkim": "s"}),
    ("v=DMARC1; p=reject; rua=mailto:a@x.example,mailto:b@x.example", {
        "v": "DMARC1", "p": "reject", "rua": "mailto:a@x.example,mailto:b@x.example"}),
    ("v=DMARC1; p=reject; junk; pct=50", {"v": "DMARC1", "p": "reject", "pct": "50"}),
    ("v=DMARC1", {"v": "DMARC1"}),
    ("p=reject; v=DMARC1", None),  # v= must come first
    ("v=dmarc1; p=reject", None),  # DMARC1 is case-sensitive
    ("v=DMARC2; p=reject", None),
    ("v=spf1 -all", None),
    ("", None),
])
def test_parse_dmarc_record(text, tags):
    assert mailauth.parse_dmarc_record(text) == tags


@pytest.mark.parametrize("domain, org", [
    ("reject.example", "reject.example"),
    ("mail.reject.example", "reject.example"),
    ("a.b.c.reject.example", "reject.example"),
    ("Shop.Example.Co.UK.", "example.co.uk"),
    ("co.uk", "co.uk"),  # a public suffix is its own organizational domain
    ("gmail.com", "gmail.com"),
    ("shop.github.io", "shop.github.io"),  # the private section counts too
])
def test_organizational_domain(domain, org):
    assert mailauth.organizational_domain(domain) == org


@pytest.mark.parametrize("identifier, from_domain, strict, result", [
    ("reject.example", "reject.example", False, True),
    ("mail.reject.example", "reject.example", False, True),
    ("reject.example", "shop.reject.example", False, True),
    ("mail.reject.example", "shop.reject.example", False, True),
    ("mail.reject.example", "reject.example", True, False),
    ("Reject.Example.", "reject.example", True, True),
    ("esp.example", "reject.example", False, False),
    ("a.example.co.uk", "b.example.co.uk", False, True),
    ("example.co.uk", "other.co.uk", False, False),
    ("co.uk", "example.co.uk", False, False),
    ("", "reject.example", False, False),
    ("reject.example", "", False, False),
])
def test_alignment(identifier, from_domain, strict, result):
    assert mailauth.aligned(identifier, from_domain, strict=strict) is result


# --- decide() on its own ----------------------------------------------------------------------

def verdict(**fields) -> mailauth.AuthVerdict:
    values = dict(spf="none", spf_domain="reject.example", spf_identity="mailfrom", spf_aligned=True, dkim="none", dkim_domains=(),
                  dkim_signatures=(), dmarc="none", dmarc_policy="", from_domain="reject.example", header="")
    values.update(fields)
    return mailauth.AuthVerdict(**values)


def test_decide_texts_name_the_domain_and_policy():
    reply = mailauth.decide(verdict(spf="fail", dmarc="fail", dmarc_policy="reject"), "dmarc")
    assert reply.line() == ("550 5.7.26 Message refused by the DMARC policy of reject.example (p=reject): "
                            "no aligned SPF or DKIM pass")
    reply = mailauth.decide(verdict(spf="fail"), "dmarc")
    assert reply.line() == ("550 5.7.23 Message refused: reject.example does not permit this server "
                            "to send its mail (SPF fail)")
    reply = mailauth.decide(verdict(spf="none"), "strict")
    assert reply.line() == ("550 5.7.26 Message refused: reject.example publishes no DMARC policy; "
                            "this relay accepts only mail that passes DMARC")
    assert mailauth.decide(verdict(dmarc="temperror"), "strict") is mailauth.AUTH_TEMPORARY_FAILURE
    assert mailauth.AUTH_TEMPORARY_FAILURE.line().startswith("451 4.7.5 ")


def test_decide_off_never_refuses():
    assert mailauth.decide(verdict(spf="fail", dmarc="fail", dmarc_policy="reject"), "off") is None
    assert mailauth.decide(verdict(dmarc="temperror"), "off") is None


def test_decide_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="'relaxed'"):
        mailauth.decide(verdict(), "relaxed")


# --- threads ------------------------------------------------------------------------------------

def test_concurrent_checks_each_use_their_own_resolver(server):
    # pyspf's lookup hook is process-wide; the resolver it uses is per call.
    # A second server publishes a different SPF record for reject.example.
    other_zone = (ZONES / "reject.example.zone").read_text().replace(
        '"v=spf1 ip4:127.0.0.1 -all"', '"v=spf1 ip4:127.0.0.2 -all"')
    with DNSServer([other_zone]) as other:
        resolvers = {GOOD_IP: make_resolver([server.address], lifetime=2),
                     BAD_IP: make_resolver([other.address], lifetime=2)}

        def check(ip):
            verdict = mailauth.authenticate(message(), ip, "mail.reject.example", "bea@reject.example",
                                            resolver=resolvers[ip], authserv_id=AUTHSERV_ID)
            return verdict.spf

        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(check, [GOOD_IP, BAD_IP] * 10))
    assert results == ["pass", "pass"] * 10


def test_public_suffix_list_is_read_once_when_the_first_checks_come_together(monkeypatch):
    # The checks run in threads: eight first messages arriving at once must
    # share one read of the list (each read is ~5 ms of the event loop's
    # GIL), so every thread gets the very same object.
    import threading

    monkeypatch.setattr(mailauth, "_psl", None)
    start = threading.Barrier(8)
    got = []

    def first_check():
        start.wait()
        got.append(mailauth._public_suffix_list())

    threads = [threading.Thread(target=first_check) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 8 and all(lists is got[0] for lists in got)
    assert mailauth.organizational_domain("mail.example.co.uk") == "example.co.uk"
