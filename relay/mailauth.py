"""Inbound mail authentication: SPF, DKIM and DMARC for one message.

`authenticate()` checks a message as it arrives and returns an `AuthVerdict`:
the SPF result for the envelope sender (pyspf), the result of each DKIM
signature (dkimpy), and the DMARC result for the header From domain,
evaluated here on top of those two (RFC 7489: relaxed alignment unless the
domain asks for strict, organizational domains from the Public Suffix List).
It also renders the RFC 8601 Authentication-Results value. `decide()` turns a
verdict into a refusal, or None, for the `[auth] inbound` mode.

Both are synchronous and do no I/O but DNS, through the resolver passed in
(relay.dns). The handler runs `authenticate()` in a worker thread.

The invariant: a DNS failure that could have changed the outcome is never
read as a pass or as "no record". It becomes `temperror`, and `decide()`
answers it with 451 so the sender retries.
"""

from __future__ import annotations

import contextvars
import dataclasses
import email.parser
import email.policy
import email.utils
import ipaddress
import logging
import re
import threading
import warnings
from dataclasses import dataclass

import dkim
import dkim.util
import dns.exception
import dns.resolver
from publicsuffixlist import PublicSuffixList

from relay import dns as relay_dns
from relay.idn import to_ascii
from relay.replies import Reply

with warnings.catch_warnings():
    # pyspf 2.0.14's docstrings contain invalid escape sequences; Python
    # warns about them while compiling spf.py when no .pyc exists yet.
    warnings.filterwarnings("ignore", message="invalid escape sequence", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="invalid escape sequence", category=SyntaxWarning)
    import spf

log = logging.getLogger(__name__)

MODES = ("dmarc", "strict", "off")

# A message may carry several DKIM signatures (a mailing list adds one, a
# provider adds one). Each costs a DNS lookup and an RSA verification, so an
# adversarial message with hundreds of them must not cost hundreds.
MAX_DKIM_SIGNATURES = 5

# --- replies ------------------------------------------------------------------
# RFC 7372 codes: X.7.26 several authentication checks failed (DMARC is SPF
# and DKIM together), X.7.23 SPF validation failed. 4.7.5: the checks could
# not be completed now.
AUTH_TEMPORARY_FAILURE = Reply(
    451, "4.7.5", "Cannot verify the sender's domain now (DNS lookup failed), try again later")
DMARC_POLICY_REFUSED = Reply(550, "5.7.26", "Message refused by the DMARC policy of the sender's domain")
DMARC_REQUIRED = Reply(550, "5.7.26", "Message refused: this relay accepts only mail that passes DMARC")
NOT_AUTHENTICATED = Reply(
    550, "5.7.26", "Message refused: sender not authenticated (no SPF pass or aligned DKIM signature)")
SPF_FAILED = Reply(550, "5.7.23", "Message refused: SPF check failed for the sender's domain")


# --- the verdict ----------------------------------------------------------------

@dataclass(frozen=True)
class DkimSignature:
    """One DKIM-Signature header field and what became of it."""

    domain: str  # d=, lower-case; "" when the signature could not be parsed
    selector: str  # s=
    result: str  # pass, fail or temperror
    aligned: bool  # d= aligns with the From domain (per the DMARC record's adkim=)


@dataclass(frozen=True)
class AuthVerdict:
    spf: str  # pass, fail, softfail, neutral, none, temperror, permerror
    spf_domain: str  # the domain SPF checked: MAIL FROM's, or the HELO name for a null sender
    spf_identity: str  # which of the two: "mailfrom" or "helo" (RFC 7208 §2.3, §2.4)
    spf_aligned: bool  # spf_domain aligns with the From domain (per aspf=)
    dkim: str  # pass (some signature verified), fail, none (unsigned), temperror
    dkim_domains: tuple[str, ...]  # d= of every signature that verified
    dkim_signatures: tuple[DkimSignature, ...]
    dmarc: str  # pass, fail, none (no record), temperror, permerror (no single usable From, bad record)
    dmarc_policy: str  # the published policy for the From domain: reject, quarantine, none; "" without a record
    from_domain: str  # the header From's domain; "" when there is not exactly one usable address
    header: str  # the Authentication-Results field value (without the field name)

    @property
    def aligned_pass(self) -> bool:
        """An identifier aligned with From was authenticated (DMARC's test)."""
        return _aligned_pass(self.spf, self.spf_aligned, self.dkim_signatures)

    @property
    def aligned_temperror(self) -> bool:
        """A lookup for an identifier aligned with From failed temporarily:
        with an answer, it might have passed."""
        return _aligned_temperror(self.spf, self.spf_aligned, self.dkim_signatures)


def _aligned_pass(spf_result: str, spf_aligned: bool, signatures: tuple[DkimSignature, ...]) -> bool:
    return (spf_result == "pass" and spf_aligned) or any(s.result == "pass" and s.aligned for s in signatures)


def _aligned_temperror(spf_result: str, spf_aligned: bool, signatures: tuple[DkimSignature, ...]) -> bool:
    return ((spf_result == "temperror" and spf_aligned)
            or any(s.result == "temperror" and s.aligned for s in signatures))


# --- deciding -------------------------------------------------------------------

def decide(verdict: AuthVerdict, mode: str) -> Reply | None:
    """The refusal for `verdict` under `[auth] inbound = mode`, or None to
    accept.

    - `off`: never refuse.
    - `dmarc` (default): refuse when DMARC fails and the From domain
      publishes p=reject or p=quarantine. Without a usable DMARC record,
      accept only when SPF passed or a DKIM signature verified for a domain
      aligned with From. p=none is accepted whatever the checks said.
    - `strict`: accept only a DMARC pass.
    In the two refusing modes a lookup failure that could have changed the
    outcome answers 451 (the sender retries), never a pass."""
    if mode == "off":
        return None
    if mode not in MODES:
        raise ValueError(f"unknown [auth] inbound mode {mode!r}; expected one of {', '.join(MODES)}")
    if verdict.dmarc == "temperror":
        if mode == "dmarc" and verdict.aligned_pass:
            # Only the DMARC record could not be read, and an aligned pass
            # is accepted with or without one.
            return None
        return AUTH_TEMPORARY_FAILURE
    if verdict.dmarc == "pass":
        return None
    domain = verdict.from_domain or "the sender's domain"
    if mode == "strict":
        if verdict.dmarc == "fail":
            return DMARC_REQUIRED.with_text(
                f"Message refused: it fails the DMARC policy of {domain} (p={verdict.dmarc_policy}); "
                f"this relay accepts only mail that passes DMARC")
        if verdict.dmarc == "none":
            return DMARC_REQUIRED.with_text(
                f"Message refused: {domain} publishes no DMARC policy; "
                f"this relay accepts only mail that passes DMARC")
        return DMARC_REQUIRED
    # mode == "dmarc"
    if verdict.dmarc == "fail":
        if verdict.dmarc_policy in ("reject", "quarantine"):
            return DMARC_POLICY_REFUSED.with_text(
                f"Message refused by the DMARC policy of {domain} (p={verdict.dmarc_policy}): "
                f"no aligned SPF or DKIM pass")
        return None
    # No usable DMARC record (none, permerror): the domain states no policy,
    # so the relay asks for the least DMARC would: one aligned pass.
    if verdict.aligned_pass:
        return None
    if verdict.aligned_temperror:
        return AUTH_TEMPORARY_FAILURE
    if verdict.spf in ("fail", "softfail") and not verdict.dkim_signatures:
        # SPF was the only evidence, and the domain said the client may not
        # send its mail.
        return SPF_FAILED.with_text(
            f"Message refused: {verdict.spf_domain or 'the sender'} does not permit this server "
            f"to send its mail (SPF {verdict.spf})")
    return NOT_AUTHENTICATED.with_text(
        f"Message refused: sender not authenticated: no SPF pass or DKIM signature aligned with {domain}")


# --- authenticating ---------------------------------------------------------------

def authenticate(raw: bytes, client_ip: str, helo: str, mail_from: str, *,
                 resolver: dns.resolver.Resolver, authserv_id: str) -> AuthVerdict:
    """Check `raw` (the message as received) sent by `client_ip` with
    HELO/EHLO `helo` and envelope sender `mail_from` ("" for a null sender).
    Every lookup goes through `resolver`. `authserv_id` names this relay in
    the Authentication-Results value (RFC 8601 §2.5)."""
    mail_from = mail_from.strip().strip("<>")
    spf_result, spf_domain = check_spf(client_ip, helo, mail_from, resolver=resolver, receiver=authserv_id)
    signatures = check_dkim(raw, resolver=resolver)
    from_domain = header_from_domain(raw)

    record = None
    if not from_domain:
        dmarc = "permerror"  # DMARC needs exactly one author domain
    else:
        try:
            record = find_dmarc_record(from_domain, resolver=resolver)
        except relay_dns.TemporaryDNSError as exc:
            log.debug("DMARC record of %s: %s", from_domain, exc)
            dmarc = "temperror"
        else:
            dmarc = "none" if record is None else "permerror" if record.invalid else "evaluate"
    strict_spf = record is not None and record.aspf == "s"
    strict_dkim = record is not None and record.adkim == "s"
    spf_aligned = aligned(spf_domain, from_domain, strict=strict_spf)
    dkim_signatures = tuple(
        DkimSignature(domain, selector, result, aligned(domain, from_domain, strict=strict_dkim))
        for domain, selector, result in signatures)
    if dmarc == "evaluate":
        if _aligned_pass(spf_result, spf_aligned, dkim_signatures):
            dmarc = "pass"
        elif _aligned_temperror(spf_result, spf_aligned, dkim_signatures):
            dmarc = "temperror"
        else:
            dmarc = "fail"

    results = [sig.result for sig in dkim_signatures]
    verdict = AuthVerdict(
        spf=spf_result,
        spf_domain=spf_domain,
        spf_identity="mailfrom" if mail_from else "helo",
        spf_aligned=spf_aligned,
        dkim=("pass" if "pass" in results else "temperror" if "temperror" in results
              else "fail" if results else "none"),
        dkim_domains=tuple(dict.fromkeys(sig.domain for sig in dkim_signatures
                                         if sig.result == "pass" and sig.domain)),
        dkim_signatures=dkim_signatures,
        dmarc=dmarc,
        dmarc_policy=record.policy if record is not None else "",
        from_domain=from_domain,
        header="",
    )
    return dataclasses.replace(verdict, header=results_header(authserv_id, verdict))


# --- SPF ----------------------------------------------------------------------------

# pyspf looks names up through its module-level `DNSLookup` hook (by default
# dnspython's deprecated resolver.query(), with search domains). We point the
# hook at a function that asks the resolver given to authenticate(), held in
# a context variable for the duration of the check so concurrent checks in
# different threads each use their own; outside a check it falls back to
# dnspython's default resolver, which relay.dns.install() sets.
_spf_resolver: contextvars.ContextVar[dns.resolver.Resolver | None] = contextvars.ContextVar(
    "relay_spf_resolver", default=None)


def _spf_dns_lookup(name, qtype, strict=True, timeout=relay_dns.DEFAULT_LIFETIME):
    """pyspf's DNSLookup contract: [((name, qtype), value), …], [] for no
    record, spf.TempError for a temporary failure."""
    try:
        resolver = _spf_resolver.get() or dns.resolver.get_default_resolver()
        answer = relay_dns.resolve(resolver, name, qtype, lifetime=min(timeout, resolver.lifetime))
    except (relay_dns.TemporaryDNSError, dns.exception.DNSException) as exc:
        # (DNSException: no default resolver could be configured.)
        raise spf.TempError(f"DNS {exc}") from exc
    if answer is None:
        return []
    values = []
    for rdata in answer:
        if qtype in ("A", "AAAA"):
            values.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            values.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            values.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            values.append(((name, qtype), rdata.strings))
    return values


spf.DNSLookup = _spf_dns_lookup


def check_spf(client_ip: str, helo: str, mail_from: str, *, resolver: dns.resolver.Resolver,
              receiver: str = "") -> tuple[str, str]:
    """(SPF result, the domain checked) for MAIL FROM `mail_from`, or for
    the HELO name when the envelope sender is null (RFC 7208 §2.4)."""
    domain = _domain_of(mail_from) if mail_from else _clean_domain(helo)
    if not mail_from and not domain:
        return "none", ""  # a null sender and a HELO that is no domain name: nothing to check
    try:
        ipaddress.ip_address(client_ip)
    except ValueError:
        log.warning("SPF not checked: client address %r is not an IP address", client_ip)
        return "permerror", domain
    token = _spf_resolver.set(resolver)
    try:
        result, _explanation = spf.check2(i=client_ip, s=mail_from, h=helo, receiver=receiver or None)
    finally:
        _spf_resolver.reset(token)
    return result, domain


# --- DKIM ---------------------------------------------------------------------------

def check_dkim(raw: bytes, *, resolver: dns.resolver.Resolver) -> list[tuple[str, str, str]]:
    """(d=, s=, result) for each of the first MAX_DKIM_SIGNATURES
    signatures, result being pass, fail or temperror (the key lookup failed
    temporarily). A missing or malformed key, a bad body hash, a too-short
    key or an unparsable signature are all `fail`."""
    try:
        verifier = dkim.DKIM(raw, logger=_DKIMPY_LOG, minkey=1024, timeout=resolver.lifetime)
    except Exception:  # noqa: BLE001 — untrusted input
        # Headers dkimpy cannot split: no signature it could verify.
        return [("", "", "fail")] if _has_signature_field(raw) else []
    fields = [value for name, value in verifier.headers if name.lower() == b"dkim-signature"]
    lookup = relay_dns.dnsfunc(resolver)
    results = []
    for index, value in enumerate(fields[:MAX_DKIM_SIGNATURES]):
        domain, selector = _signature_ids(value)
        try:
            result = "pass" if verifier.verify(idx=index, dnsfunc=lookup) else "fail"
        except relay_dns.TemporaryDNSError as exc:
            log.debug("DKIM key lookup for %s/%s: %s", domain, selector, exc)
            result = "temperror"
        except Exception as exc:  # noqa: BLE001 — untrusted input: whatever dkimpy chokes on is no pass
            log.debug("DKIM signature %d (%s) does not verify: %s: %s", index, domain,
                      exc.__class__.__name__, exc)
            result = "fail"
        results.append((domain, selector, result))
    return results


class _DebugOnly(logging.LoggerAdapter):
    """dkimpy logs a bad signature (the sender's problem) at ERROR; in our
    log that is debug detail, the verdict is what counts."""

    def log(self, level, msg, *args, **kwargs):
        super().log(logging.DEBUG, msg, *args, **kwargs)


_DKIMPY_LOG = _DebugOnly(log.getChild("dkimpy"), {})


def _signature_ids(value: bytes) -> tuple[str, str]:
    try:
        tags = dkim.util.parse_tag_value(value)
    except Exception:  # noqa: BLE001 — a malformed signature has no usable ids
        return "", ""
    domain = _clean_domain(tags.get(b"d", b"").decode("ascii", "replace"))
    selector = tags.get(b"s", b"").decode("ascii", "replace").strip()
    return domain, selector if _TOKEN_RE.match(selector) else ""


def _has_signature_field(raw: bytes) -> bool:
    head = _header_section(raw)
    return re.search(rb"(?im)^dkim-signature[ \t]*:", head) is not None


# --- DMARC ---------------------------------------------------------------------------

@dataclass(frozen=True)
class DmarcRecord:
    """The parts of a DMARC record (RFC 7489 §6.3) that decide delivery."""

    domain: str  # where it was found: the From domain or its organizational domain
    policy: str  # the policy for the From domain: p=, or sp= when found at the org domain
    adkim: str = "r"
    aspf: str = "r"
    invalid: bool = False  # v=DMARC1 but no usable p= (and no rua= to fall back on)


def parse_dmarc_record(text: bytes | str) -> dict[str, str] | None:
    """The tag=value pairs of one TXT record (RFC 7489 §6.4), names
    lower-cased, or None when it is not a DMARC record: the first tag must
    be exactly v=DMARC1. Parts without "=" are ignored."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    parts = [part.strip() for part in text.split(";") if part.strip()]
    if not parts:
        return None
    name, _, value = parts[0].partition("=")
    if name.strip().lower() != "v" or value.strip() != "DMARC1":
        return None
    tags: dict[str, str] = {}
    for part in parts:
        name, sep, value = part.partition("=")
        if sep:
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


def find_dmarc_record(from_domain: str, *, resolver: dns.resolver.Resolver) -> DmarcRecord | None:
    """The DMARC record that applies to `from_domain` (RFC 7489 §6.6.3):
    at `_dmarc.<from_domain>`, else at `_dmarc.<organizational domain>`.
    None when there is none (or more than one, which voids DMARC). Raises
    relay.dns.TemporaryDNSError."""
    org = organizational_domain(from_domain)
    for domain in dict.fromkeys((from_domain, org)):
        records = [tags for tags in map(parse_dmarc_record, relay_dns.txt(resolver, f"_dmarc.{domain}"))
                   if tags is not None]
        if len(records) > 1:
            return None
        if records:
            return _record(domain, records[0], subdomain=domain != from_domain)
    return None


def _record(domain: str, tags: dict[str, str], *, subdomain: bool) -> DmarcRecord:
    policies = ("none", "quarantine", "reject")
    p = tags.get("p", "").lower()
    if p not in policies:
        # RFC 7489 §6.6.3: a record with a bad or missing p= counts as
        # p=none if it asks for reports (rua=), else it is not a record.
        if "rua" not in tags:
            return DmarcRecord(domain, "", invalid=True)
        p = "none"
    sp = tags.get("sp", "").lower()
    policy = sp if subdomain and sp in policies else p
    adkim = "s" if tags.get("adkim", "").lower() == "s" else "r"
    aspf = "s" if tags.get("aspf", "").lower() == "s" else "r"
    return DmarcRecord(domain, policy, adkim, aspf)


_PSL_LOCK = threading.Lock()
_psl: PublicSuffixList | None = None


def _public_suffix_list() -> PublicSuffixList:
    # The list the package ships, ICANN and private sections. Reading it
    # takes about 5 ms of CPU: once per process, not once per message, and
    # once also when the first messages arrive together. The checks run in
    # threads; without the lock (functools.cache has none) each of eight
    # concurrent first checks parsed it, all holding the event loop's GIL.
    global _psl
    if _psl is None:
        with _PSL_LOCK:
            if _psl is None:
                _psl = PublicSuffixList()
    return _psl


def warm_up() -> None:
    """Read what every check needs (the Public Suffix List) now, before the
    relay listens, instead of during its first messages."""
    _public_suffix_list()


def organizational_domain(domain: str) -> str:
    """The registrable domain (RFC 7489 §3.2): one label below the longest
    public suffix; the domain itself when it is a public suffix."""
    domain = domain.lower().rstrip(".")
    return _public_suffix_list().privatesuffix(domain) or domain


def aligned(identifier: str, from_domain: str, *, strict: bool = False) -> bool:
    """DMARC identifier alignment (RFC 7489 §3.1): the same domain (strict),
    or the same organizational domain (relaxed)."""
    if not identifier or not from_domain:
        return False
    identifier, from_domain = identifier.lower().rstrip("."), from_domain.lower().rstrip(".")
    if strict:
        return identifier == from_domain
    return organizational_domain(identifier) == organizational_domain(from_domain)


# --- the header From ---------------------------------------------------------------

def _header_section(raw: bytes) -> bytes:
    match = re.search(rb"\r?\n\r?\n", raw)
    return raw[:match.end()] if match else raw


def header_from_domain(raw: bytes) -> str:
    """The domain of the single address in the single From field (RFC 7489
    §6.6.1), or "" when there is none, or more than one."""
    # UTF-8, not ASCII: an SMTPUTF8 message may carry an internationalized
    # domain in From (RFC 6532).
    text = _header_section(raw).decode("utf-8", "replace")
    headers = email.parser.HeaderParser(policy=email.policy.compat32).parsestr(text)
    fields = headers.get_all("From") or []
    if len(fields) != 1:
        return ""
    addresses = [addr for _, addr in email.utils.getaddresses([str(fields[0])]) if addr]
    if len(addresses) != 1:
        return ""
    return _domain_of(addresses[0])


def _domain_of(address: str) -> str:
    local, at, domain = address.rpartition("@")
    return _clean_domain(domain) if at and local else ""


_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _clean_domain(domain: str) -> str:
    """A domain fit for lookups, replies and headers (A-labels, lower-case,
    no trailing dot), or "" for text that is not a domain name."""
    # IDNA 2008 (relay/idn.py), as the sender's own resolver reads the
    # name: IDNA 2003 would ask for the records of another domain
    # ("faß.example" → fass.example), one its owner may not be.
    domain = to_ascii(domain.strip())
    return domain if domain is not None and _DOMAIN_RE.match(domain) else ""


# --- Authentication-Results -----------------------------------------------------------

def results_header(authserv_id: str, verdict: AuthVerdict) -> str:
    """The Authentication-Results field value (RFC 8601 §2.2) for `verdict`:
    one resinfo for SPF, one per DKIM signature, one for DMARC.

    Properties name domains only, never an address: smtp.mailfrom carries
    the domain part of the envelope sender (RFC 8601 §2.7.2 allows it), so
    the header cannot reveal a party's address wherever it is kept. Every
    domain in it has been through _clean_domain(), so it is a plain token."""
    spf_part = f"spf={verdict.spf}"
    if verdict.spf_domain:
        spf_part += f" smtp.{verdict.spf_identity}={verdict.spf_domain}"
    parts = [authserv_id, spf_part]
    for sig in verdict.dkim_signatures:
        parts.append(f"dkim={sig.result} header.d={sig.domain}" if sig.domain else f"dkim={sig.result}")
    if not verdict.dkim_signatures:
        parts.append("dkim=none")
    dmarc_part = f"dmarc={verdict.dmarc}"
    if verdict.dmarc_policy:
        dmarc_part += f" (p={verdict.dmarc_policy})"
    if verdict.from_domain:
        dmarc_part += f" header.from={verdict.from_domain}"
    parts.append(dmarc_part)
    return "; ".join(parts)
